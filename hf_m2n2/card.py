"""Lineage cards: README.md with Hub front matter (base_model, base_model_relation: merge, model-index, ...).

Causal LMs are cards of the `transformers` library; merged text-to-image pipelines (`pipeline_merge`) are cards of
the `diffusers` library with `pipeline_tag: text-to-image`, a component table and a diffusers usage snippet; so are
evolved ones (`evolve` cards turned into diffusers ones by `pipeline_evolve_card_info`), which also show the image
grid of the seeds and the merge and how the images were scored.

A card is rendered from a `CardInfo` (plain data, saved next to the weights as `card.json`), so that
`hf-m2n2 card OUT_DIR` can render it again after the template changes or evaluation results are added,
without touching the weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from hf_m2n2.errors import HfM2n2Error
from hf_m2n2.hub import ResolvedModel
from hf_m2n2.outdir import atomic_write_text

log = logging.getLogger(__name__)

CARD_INFO = "card.json"
M2N2_PAPER = "Competition and Attraction Improve Model Fusion (https://arxiv.org/abs/2508.16204)"


@dataclass(frozen=True)
class CardModel:
    model: ResolvedModel
    role: str

    @property
    def revision(self) -> str:
        if self.model.commit:
            return f"`{self.model.commit}`"
        return self.model.revision or "local directory"


@dataclass
class EvalScore:
    """One `model-index` entry: the merged model's score on a task (`dataset` names the task's data)."""

    task: str
    metric: str
    value: float
    dataset: str | None = None


@dataclass
class CardInfo:
    """Everything a card shows. `kind` picks the template: `merge` (static recipe), `evolve` (evolved model) or
    `pipeline_merge` (static merge of text-to-image pipelines).

    Attributes:
        model_id: the name used in the usage snippet (the Hub repo id once known).
        models: `{name, role, revision}` per seed, in order.
        details: the template's kind-specific fields (merge: method, config_yaml, notes, chat_template;
            evolve: tasks, score_rows, lineage, passes, run_seed, recipe_file, plot, and where known grid, scoring,
            and for a pipeline pipeline_class, family, components, usage; pipeline_merge: config_yaml, notes,
            pipeline_class, family, components, variant, single_file).
        eval_results: the merged model's scores, published as the card's `model-index`.
        library_name: the library that loads the model (`transformers`, `diffusers`), the card's `library_name`.
        pipeline_tag: the Hub task (`text-to-image`); None leaves it to the Hub (LLM cards).
    """

    kind: str
    model_name: str
    model_id: str
    method: str
    paper: str
    models: list[dict[str, str]]
    license: str | None = None
    license_note: str | None = None
    tags: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    eval_results: list[EvalScore] = field(default_factory=list)
    template: str | None = None  # a custom template's text (`hf-m2n2 card --template`), kept for re-rendering
    library_name: str = "transformers"
    pipeline_tag: str | None = None

    def save(self, directory: Path) -> None:
        (directory / CARD_INFO).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CardInfo:
        path = Path(directory) / CARD_INFO
        if not path.is_file():
            raise HfM2n2Error(f"{path}: not found (cards are regenerated from the card.json hf-m2n2 writes)")
        try:
            data = json.loads(path.read_text())
            data["eval_results"] = [EvalScore(**e) for e in data.get("eval_results", [])]
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise HfM2n2Error(f"{path}: not a card.json written by hf-m2n2 ({exc})") from exc


def template_path(name: str) -> Path:
    return Path(str(resources.files("hf_m2n2.model_cards") / name))


def seed_license(model: ResolvedModel) -> str | None:
    """The `license` in a seed's own card front matter, if it has one."""
    readme = model.path / "README.md"
    if not readme.exists():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a malformed third-party card must not stop a merge
        log.warning("%s: could not parse README.md front matter", model.name)
        return None


def merged_license(models: Sequence[ResolvedModel]) -> tuple[str | None, str | None]:
    """(license, note): the seeds' common license, or `other` with a note when they disagree."""
    licenses = {m.name: seed_license(m) for m in models}
    known = {lic for lic in licenses.values() if lic}
    if not known:
        return None, None
    if len(known) == 1 and all(licenses.values()):
        return known.pop(), None
    detail = ", ".join(f"{name}: {lic or 'unknown'}" for name, lic in licenses.items())
    return "other", f"The seeds' licenses differ ({detail}); check each before using this model."


def merge_card_info(
    *,
    model_name: str,
    method: str,
    paper: str,
    models: Sequence[CardModel],
    config_yaml: str,
    notes: Sequence[str] = (),
    chat_template: bool = False,
    model_id: str | None = None,
) -> CardInfo:
    """The card of a static merge (`hf-m2n2 merge`)."""
    license_, license_note = merged_license([m.model for m in models])
    return CardInfo(
        kind="merge",
        model_name=model_name,
        model_id=model_id or model_name,
        method=method,
        paper=paper,
        models=[_model_entry(m.model, m.role) for m in models],
        license=license_,
        license_note=license_note,
        tags=["merge", "hf-m2n2", method],
        details={"config_yaml": config_yaml.rstrip(), "notes": list(notes), "chat_template": chat_template},
    )


@dataclass(frozen=True)
class CardComponent:
    """One row of a pipeline card's component table.

    Attributes:
        name: the component's folder (`unet`, `text_encoder`, `tokenizer`, ...).
        class_name: its class in model_index.json (`UNet2DConditionModel`, `CLIPTokenizer`, ...).
        source: the index in the card's models of the seed it is taken from whole; None when it is merged.
        via: the folder its files came from when not the seed's own (a single-file seed's config folder).
    """

    name: str
    class_name: str
    source: int | None = None
    via: str | None = None


def pipeline_merge_card_info(
    *,
    model_name: str,
    method: str,
    paper: str,
    models: Sequence[CardModel],
    pipeline_class: str,
    family: str,
    components: Sequence[CardComponent],
    config_yaml: str,
    notes: Sequence[str] = (),
    variant: str | None = None,
    single_file: str | None = None,
    tags: Sequence[str] = (),
    model_id: str | None = None,
    custom_code: bool = False,
) -> CardInfo:
    """The card of a static merge of text-to-image pipelines: a `diffusers` card whose component table says which
    components were merged and which seed each other one comes from.

    Args:
        models: every seed (merged ones and donors) with its role; all of them are the card's `base_model`.
        pipeline_class: the diffusers pipeline class of the output (model_index.json's `_class_name`).
        family: the seeds' family, for the text (`SD 1.x`, `SDXL`).
        components: model_index.json's components, in its order.
        variant: the weights variant the seeds were read in (`fp16`), if any.
        single_file: the output's file name when the pipeline was written as one original-layout file
            (`--output-format single_file`); the snippet then loads it with `from_single_file`.
        tags: extra tags (the family's, e.g. `stable-diffusion-xl`).
        custom_code: the pipeline class is the output's own code (JSDXL's): the snippet loads it with
            `trust_remote_code=True`.

    Raises:
        ValueError: a component's source is not an index into `models` (a bug in the caller).
    """
    rows = _component_rows(components, [m.model for m in models])
    merge = merge_card_info(
        model_name=model_name,
        method=method,
        paper=paper,
        models=models,
        config_yaml=config_yaml,
        notes=notes,
        model_id=model_id,
    )  # the static merge's card, turned into a diffusers one
    return replace(
        merge,
        kind="pipeline_merge",
        tags=[*merge.tags, *tags],
        details={
            "config_yaml": merge.details["config_yaml"],
            "notes": merge.details["notes"],
            "pipeline_class": pipeline_class,
            "family": family,
            "components": rows,
            "variant": variant,
            "single_file": single_file,
            "custom_code": custom_code,
        },
        library_name="diffusers",
        pipeline_tag="text-to-image",
    )


def _component_rows(
    components: Sequence[CardComponent], models: Sequence[ResolvedModel]
) -> list[dict[str, Any]]:
    """The component table's rows: name, class, whether merged, and the seed (label) the others come from."""
    labels = _seed_labels(models)
    rows = []
    for c in components:
        if c.source is not None and not 0 <= c.source < len(models):
            raise ValueError(f"component {c.name}: source {c.source} is not one of the {len(models)} models")
        source = "merged" if c.source is None else labels[c.source]
        if c.via:
            source += f" (its config folder {c.via})"
        rows.append(
            {"name": c.name, "class_name": c.class_name, "merged": c.source is None, "source": source}
        )
    return rows


def _seed_labels(models: Sequence[ResolvedModel]) -> list[str]:
    """How the component table names each seed: its name, or its pinned reference (`org/name@sha`) where two
    seeds share a name (one repo at two revisions)."""
    names = [m.name for m in models]
    return [m.name if names.count(m.name) == 1 else m.pinned if m.commit else m.ref for m in models]


def evolve_card_info(
    *,
    model_name: str,
    algorithm: str,
    seeds: Sequence[ResolvedModel],
    tasks: Sequence[str],
    metric: str | Mapping[str, str],
    merged: Sequence[float],
    seed_scores: dict[str, Sequence[float]],
    lineage: Sequence[dict],
    passes: int,
    run_seed: int,
    recipe_file: str,
    plot: str | None = None,
    model_id: str | None = None,
    rebuild_command: str | None = None,
    paper: str | None = None,
    merge_device: str | None = None,
    grid: dict[str, Any] | None = None,
    scoring: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    custom_code: bool = False,
) -> CardInfo:
    """The lineage card of an evolved model: held-out scores of the merged model (as model-index) and of the
    seeds, the lineage table, the fitness curve and the recipe (and, when the recipe is a merge spec merged on
    another device than the CPU, that device: `hf-m2n2 export` merges there again).

    Args:
        grid: the image grid of the seeds and the merge, when the evaluator draws images
            (`hf_m2n2.evolve.outcome.image_grid_entry`).
        scoring: how the evaluator scores (its `describe()`: judge, prompts, generation settings), when it says.
        notes: lines shown under the seeds (how to load a routed model, the seeds' own recipes).
        custom_code: the model's class is its own code (a routed model): the usage snippet passes
            `trust_remote_code=True`.
        metric: what every task's figure measures, or `{task: metric}` (a list of evaluators: exact match beside a
            reward).
    """
    license_, license_note = merged_license(seeds)
    rows = [{"name": model_name, "values": [float(v) for v in merged]}]
    rows += [{"name": name, "values": [float(v) for v in values]} for name, values in seed_scores.items()]
    return CardInfo(
        kind="evolve",
        model_name=model_name,
        model_id=model_id or model_name,
        method=algorithm,
        paper=paper if paper is not None else M2N2_PAPER if algorithm.startswith("m2n2") else "",
        models=[_model_entry(s, "seed") for s in seeds],
        license=license_,
        license_note=license_note,
        tags=["merge", "m2n2", "hf-m2n2", *([algorithm] if algorithm != "m2n2" else [])],
        details={
            "tasks": list(tasks),
            "score_rows": rows,
            "lineage": [dict(a) for a in lineage],
            "passes": passes,
            "run_seed": run_seed,
            "recipe_file": recipe_file,
            "rebuild_command": rebuild_command or f"hf-m2n2 rebuild {recipe_file} OUT_DIR",
            "plot": plot,
            **({"merge_device": merge_device} if merge_device is not None else {}),
            **({"grid": grid} if grid is not None else {}),
            **({"scoring": scoring} if scoring is not None else {}),
            **({"notes": list(notes)} if notes else {}),
            **({"custom_code": True} if custom_code else {}),
        },
        eval_results=[
            EvalScore(task, metric if isinstance(metric, str) else metric.get(task, "score"), float(value))
            for task, value in zip(tasks, merged)
        ],
    )


def pipeline_evolve_card_info(
    info: CardInfo,
    *,
    seeds: Sequence[ResolvedModel],
    pipeline_class: str,
    family: str,
    components: Sequence[CardComponent] | None = None,
    scheduler: str | None = None,
    tags: Sequence[str] = (),
    custom_code: bool = False,
) -> CardInfo:
    """The lineage card of an evolved text-to-image pipeline: the evolve card (`evolve_card_info`) turned into a
    `diffusers` one (`pipeline_tag: text-to-image`, model-index results of task type text-to-image), with a
    component table and a diffusers usage snippet drawing the first grid prompt with the scoring's settings.

    Args:
        info: the evolve card (its `scoring` and `grid`, when given, set the snippet's prompt and settings).
        seeds: the seeds, in the card's order (component sources index them).
        pipeline_class: the diffusers pipeline class of the output (model_index.json's `_class_name`).
        family: the seeds' family, for the text (`SD 1.x`, `SDXL`).
        components: model_index.json's components (evolved ones with source None), None when not known.
        scheduler: the pipeline's own scheduler class (the snippet replaces it where the scoring did).
        tags: extra tags (the family's, e.g. `stable-diffusion`).
        custom_code: the pipeline class is the output's own code (JSDXL's): the snippet loads it with
            `trust_remote_code=True`.

    Raises:
        ValueError: a component's source is not an index into `seeds` (a bug in the caller).
    """
    details = info.details
    generation = (details.get("scoring") or {}).get("generation", {})
    prompts = (details.get("grid") or {}).get("prompts") or [
        {"prompt": "a photograph of an astronaut riding a horse"}
    ]
    kwargs = {
        key: generation[key]
        for key in ("num_inference_steps", "guidance_scale", "height", "width", "negative_prompt")
        if key in generation
    }
    replaced = (details.get("scoring") or {}).get("scheduler_replaced") and generation.get(
        "scheduler"
    ) != scheduler
    usage = {
        "prompt": json.dumps(prompts[0]["prompt"], ensure_ascii=False),  # a Python string literal
        "arguments": ", ".join(f"{k}={v!r}" for k, v in ({"num_inference_steps": 30} | kwargs).items()),
        "scheduler": generation.get("scheduler") if replaced else None,
    }
    return replace(
        info,
        tags=[*info.tags, *tags],
        details={
            **details,
            "pipeline_class": pipeline_class,
            "family": family,
            "components": None if components is None else _component_rows(components, seeds),
            "pipeline_scheduler": scheduler,
            "usage": usage,
            "custom_code": custom_code,
        },
        library_name="diffusers",
        pipeline_tag="text-to-image",
    )


def copy_card(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a model directory's card (README.md, card.json) and the images it shows (fitness plot, image grid)
    into `dst` (`hf-m2n2 export` writes a run's model again with them)."""
    src, dst = Path(src), Path(dst)
    names = ["README.md", CARD_INFO]
    try:
        details = CardInfo.load(src).details
        names += [details.get("plot"), (details.get("grid") or {}).get("file")]
    except HfM2n2Error:  # no card.json of ours: the README (if any) alone
        pass
    for name in names:
        if name and (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _model_entry(model: ResolvedModel, role: str) -> dict[str, Any]:
    entry = {
        "name": model.name,
        "role": role,
        "revision": CardModel(model, role).revision,
        "hub": bool(model.repo_id),
    }
    if (
        model.adapter is not None
    ):  # `base+adapter`: the base and its LoRA adapter are linked as two base models
        parts = [
            _model_entry(replace(model, adapter=None), role),
            _model_entry(model.adapter, "LoRA adapter"),
        ]
        entry["revision"] = " + ".join(p["revision"] for p in parts)
        entry["parts"] = parts
    return entry


def render_card(info: CardInfo, template: str | os.PathLike[str] | None = None, *, for_hub: bool = False):
    """Render a card with huggingface_hub's ModelCard and the template (default: `info.template`, else the
    packaged one for its kind).

    Args:
        for_hub: the card uploaded to the Hub, which links base models by repo id and rejects other values:
            seeds from local directories are then named in the body only. Locally, `base_model` names every seed
            (local ones by directory name).

    Returns:
        a `huggingface_hub.ModelCard`; `card.save(path)` writes it.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = [
        EvalResult(
            task_type=info.pipeline_tag or "text-generation",
            dataset_type=e.dataset or e.task,
            dataset_name=e.dataset or e.task,
            metric_type=e.metric,
            metric_value=float(e.value),
        )
        for e in info.eval_results
    ]
    linked = [part for m in info.models for part in m.get("parts", [m])]
    local = list(dict.fromkeys(m["name"] for m in linked if not m.get("hub"))) if for_hub else []
    base_models = [name for name in dict.fromkeys(m["name"] for m in linked) if name not in local]
    data = ModelCardData(
        base_model=base_models or None,
        library_name=info.library_name,
        pipeline_tag=info.pipeline_tag,
        license=info.license,
        tags=list(dict.fromkeys(info.tags)),
        model_name=info.model_name,
        eval_results=results or None,
        **({"base_model_relation": "merge"} if base_models else {}),
    )
    notes = list(info.details.get("notes", [])) + ([info.license_note] if info.license_note else [])
    if local:
        notes.append(
            f"Seeds from local directories ({', '.join(local)}) are not listed as `base_model`: "
            "the Hub links base models by repo id."
        )
    details = {k: v for k, v in info.details.items() if k != "notes"}
    if template is None and info.template is None:
        template = template_path(f"{info.kind}_card.md")
    return ModelCard.from_template(
        data,
        template_path=None if template is None else str(template),
        template_str=info.template if template is None else None,
        model_name=info.model_name,
        model_id=info.model_id,
        method=info.method,
        algorithm=info.method,
        paper=info.paper,
        models=info.models,
        seeds=info.models,
        notes=notes,
        eval_results=info.eval_results,
        **details,
    )


def write_card(directory: str | os.PathLike[str], info: CardInfo, template=None) -> None:
    """Write README.md and card.json into `directory`."""
    directory = Path(directory)
    render_card(info, template).save(directory / "README.md")
    info.save(directory)


def read_eval_results(path: str | os.PathLike[str]) -> list[EvalScore]:
    """Scores from an lm-eval results file (`{"results": {task: {"metric,filter": value}}}`) or a plain
    `{task: {metric: value}}` mapping. Standard errors (`*_stderr`) and aliases are skipped."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HfM2n2Error(f"{path}: cannot read evaluation results ({exc})") from exc
    results = data.get("results", data) if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise HfM2n2Error(f"{path}: expected {{task: {{metric: value}}}} or lm-eval's results.json")
    scores = []
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            raise HfM2n2Error(f"{path}: results.{task}: expected {{metric: value}}")
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if metric.endswith("_stderr") or metric == "alias" or not isinstance(value, int | float):
                continue
            scores.append(EvalScore(task=task, metric=key.replace(",", " ").strip(), value=float(value)))
    if not scores:
        raise HfM2n2Error(f"{path}: no numeric scores found")
    return scores


def regenerate_card(
    out_dir: str | os.PathLike[str],
    *,
    template: str | os.PathLike[str] | None = None,
    eval_results: str | os.PathLike[str] | None = None,
    model_id: str | None = None,
) -> Path:
    """`hf-m2n2 card`: render OUT_DIR/README.md again from OUT_DIR/card.json; the weights are not touched.

    Args:
        template: a Jinja card template (default: the packaged one).
        eval_results: scores to add to the card's model-index (replacing earlier ones for the same task
            and metric); see `read_eval_results`.
        model_id: the Hub repo id shown in the usage snippet.

    Returns:
        the path of the README.md written.
    """
    out = Path(out_dir)
    info = CardInfo.load(out)
    if template is not None:
        if not Path(template).is_file():
            raise HfM2n2Error(f"{template}: card template not found")
        info.template = Path(template).read_text()
    if eval_results is not None:
        new = read_eval_results(eval_results)
        replaced = {(e.task, e.metric) for e in new}
        info.eval_results = [e for e in info.eval_results if (e.task, e.metric) not in replaced] + new
    if model_id:
        info.model_id = model_id
    try:
        card = str(render_card(info))
    except Exception as exc:  # a template error (Jinja syntax, undefined filter) from the user's template
        raise HfM2n2Error(
            f"card template: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    try:
        atomic_write_text(out / CARD_INFO, json.dumps(asdict(info), indent=2) + "\n")
        atomic_write_text(out / "README.md", card)
    except OSError as exc:
        raise HfM2n2Error(f"{out}: cannot write the card ({exc.strerror or exc})") from exc
    return out / "README.md"
