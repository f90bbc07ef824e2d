"""Lineage cards: README.md with Hub front matter (base_model, base_model_relation: merge, ...)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hf_m2n2.hub import ResolvedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CardModel:
    model: ResolvedModel
    role: str

    @property
    def revision(self) -> str:
        if self.model.commit:
            return f"`{self.model.commit}`"
        return self.model.revision or "local directory"


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


def build_merge_card(
    *,
    model_name: str,
    method: str,
    paper: str,
    models: Sequence[CardModel],
    config_yaml: str,
    notes: Sequence[str] = (),
    chat_template: bool = False,
    extra_tags: Sequence[str] = (),
):
    """Build the README card of a merge with huggingface_hub's ModelCard and the template in model_cards/.

    Returns:
        a `huggingface_hub.ModelCard`; `card.save(path)` writes it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_models = list(dict.fromkeys(m.model.name for m in models))
    license_, license_note = merged_license([m.model for m in models])
    data = ModelCardData(
        base_model=base_models,
        library_name="transformers",
        license=license_,
        tags=list(dict.fromkeys(["merge", "hf-m2n2", method, *extra_tags])),
        **{"base_model_relation": "merge"},
    )
    all_notes = [*notes, *([license_note] if license_note else [])]
    return ModelCard.from_template(
        data,
        template_path=str(template_path("merge_card.md")),
        model_name=model_name,
        model_id=model_name,
        method=method,
        paper=paper,
        models=[{"name": m.model.name, "role": m.role, "revision": m.revision} for m in models],
        notes=all_notes,
        config_yaml=config_yaml.rstrip(),
        chat_template=chat_template,
    )


@dataclass(frozen=True)
class ScoreRow:
    name: str
    values: list[float]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else 0.0


def build_evolve_card(
    *,
    model_name: str,
    algorithm: str,
    seeds: Sequence[ResolvedModel],
    tasks: Sequence[str],
    metric: str,
    merged: Sequence[float],
    seed_scores: dict[str, Sequence[float]],
    lineage: Sequence[dict],
    passes: int,
    run_seed: int,
    recipe_file: str,
    plot: str | None = None,
    paper: str = "",
):
    """The lineage card of an evolved model: every seed as base_model, a model-index with the held-out scores
    of the merged model (seeds alongside in the body), the lineage table, the fitness curve and the recipe.

    Returns:
        a `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=task,
            dataset_name=task,
            metric_type=metric,
            metric_value=float(value),
        )
        for task, value in zip(tasks, merged)
    ]
    license_, license_note = merged_license(seeds)
    data = ModelCardData(
        base_model=list(dict.fromkeys(s.name for s in seeds)),
        library_name="transformers",
        license=license_,
        tags=["merge", "m2n2", "hf-m2n2", algorithm] if algorithm != "m2n2" else ["merge", "m2n2", "hf-m2n2"],
        model_name=model_name,
        eval_results=results or None,
        **{"base_model_relation": "merge"},
    )
    rows = [ScoreRow(model_name, list(merged))] + [ScoreRow(name, list(v)) for name, v in seed_scores.items()]
    card = ModelCard.from_template(
        data,
        template_path=str(template_path("evolve_card.md")),
        model_name=model_name,
        algorithm=algorithm,
        paper=paper,
        seeds=[{"name": s.name, "revision": CardModel(s, "seed").revision} for s in seeds],
        tasks=list(tasks),
        score_rows=rows,
        lineage=list(lineage),
        passes=passes,
        run_seed=run_seed,
        recipe_file=recipe_file,
        plot=plot,
    )
    if license_note:
        card.text += f"\n{license_note}\n"
    return card
