"""The Gradio app (the Hugging Face Space): merge or evolve models from a browser, with the same API as the CLI.

Every run writes a spec in the CLI's YAML schema and calls what `hf-m2n2` calls: `hf_m2n2.merge.run_merge` for a
static merge, `hf_m2n2.evolve.runs.start_runs` for an evolution (M2N2 or a baseline). The job runs in a worker
thread; the event handler polls the run directory (`history.jsonl`, `lineage.jsonl`) to move the progress bar and
redraw the fitness plot, and stops the job through `hf_m2n2.evolve.loop.stop_when` (the loop checkpoints and
stops after its current step). At the end it shows the seeds-vs-merged score table (`report.json` of the run; for
static merges the seeds and the merge are scored with the same lm-eval evaluator), the model card, a zip of the
model, and pushes it to the Hub with `hf_m2n2.push.push_folder` (OAuth on a Space, or a token field whose value is
never written to any output, log or file).

Gradio is imported here only: the rest of the package never imports this module.

Example:
    >>> demo = build_demo()  # doctest: +SKIP
    >>> demo.launch(server_name="127.0.0.1")  # doctest: +SKIP

Command line: `python -m hf_m2n2.app [--host 127.0.0.1] [--port 7860] [--allow-local-models]`.
"""

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

log = logging.getLogger(__name__)

SPECIALISTS = "Bundled tiny specialists (add, rev)"
HUB = "Hub models"
DEMO_TASKS = "Demo tasks (add, rev)"
LM_EVAL = "lm-eval tasks"
EVOLVE_ALGORITHMS = {
    "m2n2": "M2N2 (evolve)",
    "ga": "GA baseline: M2N2 without competition or attraction (evolve)",
    "map_elites": "MAP-Elites baseline (evolve)",
    "sweep": "SLERP sweep between two seeds, baseline (evolve)",
}
HIDDEN_METHODS = ("passthrough",)  # layer stacking needs slices, which this form does not offer
EXTRA_PARAMS_HELP = (
    "e.g. `normalize: false` or `lambda: 1.2` (the method's global parameters, mergekit's schema)"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_SECRET_PATTERN = re.compile(r"hf_[A-Za-z0-9]{10,}")
POLL_S = 0.5
PLOT_SERIES = ("best candidate (fitness)", "archive mean", "held-out score of the best")


# ---------------------------------------------------------------------- specs (the CLI's YAML schema)


def static_methods() -> dict[str, Any]:
    """The registered merge methods offered by the form (name -> MergeMethod)."""
    from hf_m2n2.methods import all_methods

    return {m.name: m for m in sorted(all_methods(), key=lambda m: m.name) if m.name not in HIDDEN_METHODS}


def method_choices() -> list[tuple[str, str]]:
    """(label, value) pairs of the method dropdown: the evolution algorithms, then the static methods."""
    return list((label, name) for name, label in EVOLVE_ALGORITHMS.items()) + [
        (f"{name} (static merge)", name) for name in static_methods()
    ]


def method_help(method: str) -> str:
    """Markdown describing a method and the parameters it takes."""
    if method in EVOLVE_ALGORITHMS:
        text = {
            "m2n2": "M2N2 (Model Merging of Natural Niches): an archive of merges, split-point SLERP crossover, "
            "competition for per-example resources and attraction between complementary models.",
            "ga": "M2N2's crossover without resource competition (alpha 0) and without attraction.",
            "map_elites": "MAP-Elites over the mean score of each task, with M2N2's crossover.",
            "sweep": "SLERP between the two seeds at `budget` evenly spaced points; the best one wins.",
        }[method]
        return f"**{EVOLVE_ALGORITHMS[method]}.** {text} Budget = candidates evaluated (seeds included)."
    from hf_m2n2.methods import REQUIRED

    spec = static_methods()[method]
    params = ", ".join(
        f"`{p.name}`{' per model' if p.per_model else ''}"
        + (" (required)" if p.default is REQUIRED else "" if p.default is None else f" = {p.default}")
        for p in spec.params
    )
    base = {"required": "needs a base model", "optional": "base model optional", "never": "no base model"}
    paper = f" Paper: {spec.paper}." if spec.paper else ""
    return (
        f"**{spec.name}** ({base[spec.uses_base]}): {spec.description}{paper} Parameters: {params or 'none'}."
    )


def _parse_numbers(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise gr.Error(f"{what}: expected numbers separated by commas, got {text!r}") from None


def _parse_list(text: str) -> list[str]:
    return [x for x in re.split(r"[,\s]+", text or "") if x]


def static_spec(
    method: str,
    models: Sequence[str],
    base_model: str | None,
    *,
    weights: str = "",
    density: float = 0.5,
    t: float = 0.5,
    extra: str = "",
) -> dict[str, Any]:
    """A mergekit-style merge spec for `hf-m2n2 merge`.

    Args:
        method: a registered merge method.
        models: the seeds (directories or Hub ids).
        base_model: the base model (None: none, or the first seed for `slerp`).
        weights: per-model `weight`, comma-separated (one number is used for every model).
        density: per-model `density` (methods that sparsify).
        t: global `t` (slerp).
        extra: YAML mapping of further global parameters.

    Returns:
        The spec mapping (`merge_method`, `base_model`, `models`, `parameters`).

    Raises:
        gr.Error: a value the user typed is malformed.
    """
    spec = static_methods()[method]
    declared = {p.name: p for p in spec.params}
    if spec.uses_base == "required" and not base_model:
        if method != "slerp":
            raise gr.Error(f"{method} needs a base model")
        base_model = models[0]
    if spec.uses_base == "never":
        base_model = None
    members = list(models)
    if base_model and method == "slerp" and base_model not in members:
        members.insert(0, base_model)
    per_model: list[dict[str, Any]] = [{} for _ in members]
    if "weight" in declared:
        values = _parse_numbers(weights or "1", "weights")
        if len(values) == 1:
            values = values * len(members)
        others = [m for m in members if m != base_model] if method != "slerp" else members
        if len(values) not in (len(members), len(others)):
            raise gr.Error(f"weights: {len(values)} numbers for {len(others)} models")
        targets = members if len(values) == len(members) else others
        for ref, value in zip(targets, values):
            per_model[members.index(ref)]["weight"] = value
    if "density" in declared:
        for entry, ref in zip(per_model, members):
            if ref != base_model:
                entry["density"] = float(density)
    parameters: dict[str, Any] = {}
    if "t" in declared:
        parameters["t"] = float(t)
    if extra and extra.strip():
        try:
            more = yaml.safe_load(extra)
        except yaml.YAMLError as exc:
            raise gr.Error(f"extra parameters: not YAML ({exc.__class__.__name__})") from None
        if not isinstance(more, dict):
            raise gr.Error("extra parameters: expected a YAML mapping such as `normalize: false`")
        parameters.update(more)
    out: dict[str, Any] = {"merge_method": method}
    if base_model:
        out["base_model"] = base_model
    out["models"] = [{"model": ref, **({"parameters": p} if p else {})} for ref, p in zip(members, per_model)]
    if parameters:
        out["parameters"] = parameters
    return out


def lm_eval_section(
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    test_tasks: Sequence[str] = (),
    metric: str = "exact_match",
    limit: int | None = None,
    split: str | None = None,
    test_split: str | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """The `evaluate:` section (`kind: lm_eval`) of a spec."""
    if not tasks:
        raise gr.Error("fitness: give at least one lm-eval task")
    section: dict[str, Any] = {"kind": "lm_eval", "tasks": list(tasks)}
    if include_path:
        section["include_path"] = include_path
    if test_tasks:
        section["test_tasks"] = list(test_tasks)
    if limit:
        section["limit"] = int(limit)
    if split:
        section["split"] = split
    if test_split:
        section["test_split"] = test_split
    section["metric"] = metric or "exact_match"
    section["batch_size"] = int(batch_size)
    return section


def evolve_spec(
    algorithm: str,
    models: Sequence[str],
    evaluate: dict[str, Any],
    *,
    budget: int,
    seed: int = 42,
    archive_size: int = 20,
    block_size: int = 65536,
    name: str | None = None,
) -> dict[str, Any]:
    """An evolve spec for `hf-m2n2 evolve` (Blend genomes over the seeds, checkpointed every pass)."""
    if algorithm == "sweep" and len(models) != 2:
        raise gr.Error("the SLERP sweep needs exactly two seeds")
    evolve: dict[str, Any] = {
        "algorithm": algorithm,
        "budget": int(budget),
        "seed": int(seed),
        "log_every": max(1, int(budget) // 10),
        "checkpoint_every_steps": 1,  # flushes history and lineage every pass: the plot follows live
    }
    if algorithm != "sweep":
        evolve["archive_size"] = int(archive_size)
    return {
        "name": name or f"{algorithm}-merge",
        "models": [{"model": ref} for ref in models],
        "genome": {"kind": "blend", "block_size": int(block_size), "slerp_scope": "global"},
        "evolve": evolve,
        "evaluate": evaluate,
    }


# ---------------------------------------------------------------------- jobs


class Cancelled(Exception):
    """The visitor cancelled the run."""


@dataclass
class Job:
    """One run in a worker thread. `stop` asks it to stop; `error` and `report` hold the outcome once `done`."""

    kind: str  # "merge" or "evolve"
    directory: Path
    out_dir: Path
    budget: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    stage: str = "waiting for the previous run to stop"
    error: BaseException | None = None
    report: dict[str, dict[str, float]] | None = None
    roles: dict[str, str] = field(default_factory=dict)  # model name -> "base" (static merges)
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, target: Callable[["Job"], None], lock: threading.Lock) -> None:
        def run() -> None:
            try:
                with lock:  # one job at a time, even while a cancelled one winds down
                    if self.stop.is_set():
                        raise Cancelled
                    self.stage = "starting"
                    target(self)
            except KeyboardInterrupt:
                self.error = Cancelled()
            except BaseException as exc:  # reported to the visitor by the event handler
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, name=f"hf-m2n2-{self.kind}", daemon=True)
        self.thread.start()


def _merge_job(
    spec_path: Path, merged_name: str, seeds: Sequence[str], evaluate: dict[str, Any] | None
) -> Callable[[Job], None]:
    def target(job: Job) -> None:
        from hf_m2n2.merge import MergeOptions, run_merge

        job.stage = "merging"
        result = run_merge(spec_path, job.out_dir, MergeOptions(overwrite=True, workers=2, progress=False))
        if evaluate is not None:
            models = {seed.name: seed.path for seed in result.seeds}
            job.roles = {m.name: "base" for m in result.seeds if m.ref not in seeds}  # e.g. TIES's base
            models[merged_name] = job.out_dir
            job.report = score_models(models, evaluate, job, base_dir=spec_path.parent)

    return target


def _evolve_job(spec_path: Path) -> Callable[[Job], None]:
    def target(job: Job) -> None:
        from hf_m2n2.evolve.loop import stop_when
        from hf_m2n2.evolve.models import REPORT
        from hf_m2n2.evolve.runs import start_runs

        job.stage = "evolving"
        with stop_when(job.stop):
            start_runs(spec_path, job.directory / "run", runs=None, overwrite=True, progress=False)
        job.report = json.loads((job.directory / "run" / REPORT).read_text())

    return target


def score_models(
    models: dict[str, Path], evaluate: dict[str, Any], job: Job | None = None, *, base_dir: Path | None = None
) -> dict[str, dict[str, float]]:
    """Score each model directory with one lm-eval evaluator (held-out tasks when given, else the fitness tasks),
    as an evolve run's held-out report does. A relative `include_path` resolves against `base_dir`.

    Returns:
        `{model name: {task: score}}`, the shape of an evolve run's `report.json`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_m2n2.evaluate.lm_eval import LmEvalConfig, LmEvalEvaluator

    config = LmEvalConfig(**evaluate)
    split = "test" if config.has_test else "fitness"
    evaluator = None
    report: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        if job is not None:
            if job.stop.is_set():
                raise Cancelled
            job.stage = f"scoring {name}"
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        model.eval()
        if evaluator is None:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            evaluator = LmEvalEvaluator(config, model, tokenizer, base_dir=base_dir)
        report[name] = evaluator.evaluate(split, model).entry_means()
        del model
    return report


# ---------------------------------------------------------------------- run directory readers


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return rows


def progress_frame(run_dir: Path) -> Any:
    """The fitness plot's data from a (running) evolve run directory: best candidate so far (fitness mean, from
    `lineage.jsonl`), archive mean and held-out score of the best member (from `history.jsonl`).

    Every series has a first row with no score (drawn as nothing): Gradio's plot fixes its colour legend at the
    first value it shows, so all series must be there from the start."""
    import pandas as pd

    rows: list[dict[str, Any]] = [{"passes": 1, "score": None, "series": name} for name in PLOT_SERIES]
    best = None
    for index, record in enumerate(_read_jsonl(run_dir / "lineage.jsonl"), start=1):
        score = record.get("score")
        if score is not None:
            best = score if best is None else max(best, score)
            rows.append({"passes": index, "score": best, "series": PLOT_SERIES[0]})
    for record in _read_jsonl(run_dir / "history.jsonl"):
        if record.get("mean_train") is not None:
            rows.append({"passes": record["passes"], "score": record["mean_train"], "series": PLOT_SERIES[1]})
        if record.get("test") is not None:
            rows.append({"passes": record["passes"], "score": record["test"], "series": PLOT_SERIES[2]})
    return pd.DataFrame(rows, columns=["passes", "score", "series"]).astype({"score": float})


def passes_done(run_dir: Path) -> int:
    """Candidates evaluated so far (lines of `lineage.jsonl`; flushed every pass by the app's specs)."""
    try:
        with open(run_dir / "lineage.jsonl", "rb") as handle:
            return sum(1 for line in handle if line.endswith(b"\n"))
    except OSError:
        return 0


def score_table(report: dict[str, dict[str, float]], merged: str, roles: dict[str, str] | None = None) -> Any:
    """The seeds-vs-merged table: one row per model (role seed, base or merged), one column per task, the mean;
    scores rounded to 4 digits."""
    import pandas as pd

    tasks = list(next(iter(report.values()))) if report else []
    rows = []
    for name, scores in report.items():
        values = [scores[t] for t in tasks]
        role = "merged" if name == merged else (roles or {}).get(name, "seed")
        rows.append([name, role, *[round(v, 4) for v in values], round(sum(values) / len(values), 4)])
    return pd.DataFrame(rows, columns=["model", "role", *tasks, "mean"])


def card_preview(model_dir: Path) -> str:
    """The model card as Markdown: its YAML metadata in a code block, then the body (local images dropped)."""
    try:
        text = (model_dir / "README.md").read_text()
    except OSError:
        return "*No model card was written.*"
    front = ""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            front, text = text[4:end], text[end + 4 :].lstrip("\n")
    text = re.sub(r"!\[[^\]]*\]\((?!https?://)[^)]*\)", "", text)
    return (f"```yaml\n{front.strip()}\n```\n\n" if front else "") + text


def zip_model(model_dir: Path, dest: Path) -> Path:
    """A zip of the model directory (files at the root of the archive)."""
    return Path(shutil.make_archive(str(dest), "zip", root_dir=model_dir))


def _scrub(message: str, secret: str | None) -> str:
    if secret:
        message = message.replace(secret, "***")
    return _SECRET_PATTERN.sub("hf_***", message)


# ---------------------------------------------------------------------- the app


@dataclass
class _Settings:
    specialists_dir: Path
    specialists_config: Any
    work_dir: Path
    allow_local_models: bool
    jobs: dict[str, Job] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    build_lock: threading.Lock = field(default_factory=threading.Lock)


def default_specialists_dir() -> Path:
    """Where the bundled specialists are built on first use: `$HF_M2N2_SPECIALISTS_DIR`, else the user cache."""
    env = os.environ.get("HF_M2N2_SPECIALISTS_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "hf_m2n2" / "specialists"


def _on_space() -> bool:
    return bool(os.environ.get("SPACE_ID")) and bool(os.environ.get("OAUTH_CLIENT_ID"))


def build_demo(
    *,
    specialists_dir: str | os.PathLike[str] | None = None,
    specialists_config: Any = None,
    work_dir: str | os.PathLike[str] | None = None,
    allow_local_models: bool = False,
    prebuild_specialists: bool = False,
) -> gr.Blocks:
    """The Gradio app, with its queue set up (one run at a time).

    Args:
        specialists_dir: where the bundled tiny specialists are (built there on first use, cached).
        specialists_config: a `hf_m2n2.specialists.SpecialistsConfig` (default: the demo's).
        work_dir: where runs are written (default: a folder under the system temp dir, which Gradio serves).
        allow_local_models: accept local directories as seeds (never on a public Space).
        prebuild_specialists: build the tiny specialists now, in the background (a Space's first visitor then
            does not wait for them).

    Returns:
        The Blocks app; `demo.launch()` serves it.
    """
    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "hf_m2n2_app"
    work.mkdir(parents=True, exist_ok=True)
    settings = _Settings(
        Path(specialists_dir) if specialists_dir else default_specialists_dir(),
        specialists_config,
        work,
        allow_local_models,
    )
    on_space = _on_space()
    if prebuild_specialists:
        threading.Thread(target=_build_specialists, args=(settings,), name="specialists", daemon=True).start()

    with gr.Blocks(title="hf-m2n2: merge and evolve models", analytics_enabled=False) as demo:
        gr.Markdown(
            "# hf-m2n2: merge and evolve Hugging Face models\n"
            "Pick seeds, a static merge method (mergekit's) or an evolution (**M2N2** or a baseline) with a budget, "
            "and a fitness; the merged model comes with its lineage card. Same engine as the `hf-m2n2` CLI.",
            elem_id="title",
        )
        with gr.Row():
            with gr.Column(scale=4):
                source = gr.Radio([SPECIALISTS, HUB], value=SPECIALISTS, label="Seeds", elem_id="seed-source")
                hub_ids = gr.Textbox(
                    value="",
                    label="Hub model ids (one per line, org/name or org/name@revision)",
                    lines=3,
                    visible=False,
                    elem_id="hub-ids",
                )
                base_id = gr.Textbox(
                    value="",
                    label="Base model (static methods that need one; Hub id)",
                    visible=False,
                    elem_id="base-model",
                )
                method = gr.Dropdown(method_choices(), value="m2n2", label="Method", elem_id="method")
                info = gr.Markdown(method_help("m2n2"), elem_id="method-help")
                with gr.Group(visible=True) as evolve_box:
                    budget = gr.Slider(
                        4, 500, value=20, step=1, label="Budget (forward passes)", elem_id="budget"
                    )
                    with gr.Row():
                        seed = gr.Number(42, precision=0, label="Random seed", elem_id="seed")
                        archive = gr.Number(
                            20, precision=0, minimum=2, label="Archive size", elem_id="archive"
                        )
                with gr.Group(visible=False) as static_box:
                    weights = gr.Textbox(
                        "0.5, 0.5", label="Weights (one per model, or one for all)", elem_id="weights"
                    )
                    density = gr.Slider(0, 1, value=0.5, step=0.01, label="Density", elem_id="density")
                    t = gr.Slider(0, 1, value=0.5, step=0.01, label="t (slerp)", elem_id="t")
                    extra = gr.Textbox(
                        value="", label="More parameters (YAML)", info=EXTRA_PARAMS_HELP, elem_id="extra"
                    )
                    score_static = gr.Checkbox(
                        True, label="Score the seeds and the merge", elem_id="score-static"
                    )
                fitness = gr.Radio(
                    [DEMO_TASKS, LM_EVAL], value=DEMO_TASKS, label="Fitness", elem_id="fitness"
                )
                with gr.Group(visible=False) as lm_eval_box:
                    tasks = gr.Textbox(
                        label="lm-eval tasks (comma-separated)", value="gsm8k", elem_id="tasks"
                    )
                    test_tasks = gr.Textbox(value="", label="Held-out tasks (optional)", elem_id="test-tasks")
                    with gr.Row():
                        metric = gr.Textbox("exact_match", label="Metric", elem_id="metric")
                        limit = gr.Number(
                            50, precision=0, minimum=1, label="Examples per task", elem_id="limit"
                        )
                    with gr.Row():
                        split = gr.Textbox(value="", label="Fitness split (optional)", elem_id="split")
                        test_split = gr.Textbox(
                            value="", label="Held-out split (optional)", elem_id="test-split"
                        )
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
            with gr.Column(scale=5):
                status = gr.Markdown("Ready.", elem_id="status")
                plot = gr.LinePlot(
                    x="passes",
                    y="score",
                    color="series",
                    y_lim=[0, 1],
                    title="Fitness",
                    x_title="forward passes",
                    y_title="score",
                    label="Fitness",
                    elem_id="fitness-plot",
                )
                table = gr.Dataframe(
                    score_table({}, ""), label="Seeds vs merged", interactive=False, elem_id="score-table"
                )
                download = gr.File(label="Merged model (zip)", interactive=False, elem_id="download")
                with gr.Accordion("Push to the Hub", open=False, elem_id="push-box"):
                    if on_space:
                        gr.LoginButton(elem_id="login")
                    repo_id = gr.Textbox(label="Repository (your-name/model-name)", elem_id="repo-id")
                    token = gr.Textbox(
                        label="Hugging Face token (write)" + (", unless signed in" if on_space else ""),
                        type="password",
                        elem_id="hf-token",
                    )
                    private = gr.Checkbox(True, label="Private repository", elem_id="private")
                    push_btn = gr.Button("Push", elem_id="push-btn")
                    push_status = gr.Markdown(elem_id="push-status")
        with gr.Accordion("Model card", open=True):
            card = gr.Markdown(elem_id="card-preview")
        model_state = gr.State(None)

        def on_method(name: str):
            evolve = name in EVOLVE_ALGORITHMS
            return method_help(name), gr.update(visible=evolve), gr.update(visible=not evolve)

        method.change(on_method, method, [info, evolve_box, static_box], api_visibility="private")
        source.change(
            lambda s: (gr.update(visible=s == HUB), gr.update(visible=s == HUB)),
            source,
            [hub_ids, base_id],
            api_visibility="private",
        )
        fitness.change(
            lambda f: gr.update(visible=f == LM_EVAL), fitness, lm_eval_box, api_visibility="private"
        )

        def run(
            source: str,
            hub_ids: str,
            base_id: str,
            method: str,
            budget: float,
            seed: float,
            archive: float,
            weights: str,
            density: float,
            t: float,
            extra: str,
            score_static: bool,
            fitness: str,
            tasks: str,
            test_tasks: str,
            metric: str,
            limit: float,
            split: str,
            test_split: str,
            request: gr.Request,
            progress=gr.Progress(),  # noqa: B008  (Gradio's way of asking for a progress tracker)
        ) -> Iterator[tuple[Any, ...]]:
            values = {
                "source": source,
                "hub_ids": hub_ids,
                "base_id": base_id,
                "method": method,
                "budget": budget,
                "seed": seed,
                "archive": archive,
                "weights": weights,
                "density": density,
                "t": t,
                "extra": extra,
                "score_static": score_static,
                "fitness": fitness,
                "tasks": tasks,
                "test_tasks": test_tasks,
                "metric": metric,
                "limit": limit,
                "split": split,
                "test_split": test_split,
            }
            try:
                yield from _run(settings, request, progress, values)
            except gr.Error as exc:  # shown as a toast; the status line says it too
                yield _outputs(f"**Error**: {exc.message}")
                raise

        run_event = run_btn.click(
            run,
            [
                source,
                hub_ids,
                base_id,
                method,
                budget,
                seed,
                archive,
                weights,
                density,
                t,
                extra,
                score_static,
                fitness,
                tasks,
                test_tasks,
                metric,
                limit,
                split,
                test_split,
            ],
            [status, plot, table, card, download, model_state],
            api_name="run",
            concurrency_limit=1,
            concurrency_id="run",
        )

        def cancel(request: gr.Request) -> str:
            job = settings.jobs.get(_session(request))
            if job is None or job.done.is_set():
                return "Nothing to cancel."
            job.stop.set()
            if job.kind == "evolve":
                done = passes_done(job.directory / "run")
                return (
                    f"**Cancelled** after {done} of {job.budget} forward passes: the evolution stops after its "
                    "current step (checkpointed)."
                )
            return "**Cancelled**: the merge stops before scoring."

        cancel_btn.click(
            cancel, None, status, api_name="cancel", cancels=[run_event], concurrency_limit=None, queue=False
        )

        def push(
            model_dir: str | None,
            repo_id: str,
            token: str,
            private: bool,
            oauth_token: gr.OAuthToken | None,
            profile: gr.OAuthProfile | None,
        ) -> str:
            return _push(model_dir, repo_id, token, private, oauth_token, profile)

        push_btn.click(
            push,
            [model_state, repo_id, token, private],
            push_status,
            api_name="push",
            concurrency_limit=2,
            concurrency_id="push",
        )

        def forget(request: gr.Request) -> None:
            """The visitor closed the tab: stop their run and delete its directory."""
            job = settings.jobs.pop(_session(request), None)
            if job is not None:
                job.stop.set()
                threading.Thread(target=_remove_when_done, args=(job,), daemon=True).start()

        demo.unload(forget)
    demo.queue(default_concurrency_limit=1)
    return demo


def _remove_when_done(job: Job) -> None:
    job.done.wait()
    shutil.rmtree(job.directory, ignore_errors=True)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _build_specialists(settings: _Settings) -> Any:
    from hf_m2n2.demo.specialists import build_specialists

    with settings.build_lock:
        return build_specialists(settings.specialists_dir, settings.specialists_config, log=log.info)


def _seeds(
    settings: _Settings, values: dict[str, Any], progress: Any, directory: Path
) -> tuple[list[str], str | None, Any]:
    """The seed references, the base model, and the specialists build (None for Hub seeds).

    The specialists are linked into the run's `directory` and named relative to it (`add`, `rev`, `base`,
    `tasks`): specs, cards and recipes then carry these names, not the server's paths."""
    if values["source"] == SPECIALISTS:
        progress(None, desc="building the tiny specialists (first use only, about a minute)")
        built = _build_specialists(settings)
        for name, path in [*built.models.items(), ("base", built.base), ("tasks", built.tasks_dir)]:
            (directory / name).symlink_to(path, target_is_directory=True)
        return list(built.models), "base", built
    refs = [line.strip() for line in (values["hub_ids"] or "").splitlines() if line.strip()]
    base = (values["base_id"] or "").strip() or None
    for ref in [*refs, *([base] if base else [])]:
        if not settings.allow_local_models and (not _HUB_ID.match(ref) or Path(ref).exists()):
            raise gr.Error(f"{ref!r} is not a Hub model id (org/name or org/name@revision)")
    if len(refs) < 2 and values["method"] in EVOLVE_ALGORITHMS:
        raise gr.Error("give at least two seed models (one per line)")
    if not refs:
        raise gr.Error("give the seed models (one Hub id per line)")
    if len(set(refs)) != len(refs):
        raise gr.Error("a seed model is listed twice")
    return refs, base, None


def _evaluate(values: dict[str, Any], built: Any) -> dict[str, Any]:
    if values["fitness"] == DEMO_TASKS:
        if built is None:  # Hub seeds scored on the demo tasks: the tasks come with the specialists build
            raise gr.Error(
                "the demo tasks come with the bundled specialists; choose lm-eval tasks for Hub models"
            )
        return lm_eval_section(
            built.fitness_tasks,
            include_path="tasks",  # linked into the run directory, next to the spec
            test_tasks=built.test_tasks,
            metric="exact_match",
            batch_size=64,
        )
    limit = int(values["limit"]) if values["limit"] else None
    return lm_eval_section(
        _parse_list(values["tasks"]),
        test_tasks=_parse_list(values["test_tasks"]),
        metric=(values["metric"] or "exact_match").strip(),
        limit=limit,
        split=(values["split"] or "").strip() or None,
        test_split=(values["test_split"] or "").strip() or None,
    )


def _outputs(
    status: str,
    plot: Any = None,
    table: Any = None,
    card: Any = None,
    download: Any = None,
    model: Any = None,
) -> tuple[Any, ...]:
    skip = gr.skip()
    return (
        status,
        skip if plot is None else plot,
        skip if table is None else table,
        skip if card is None else card,
        skip if download is None else download,
        skip if model is None else model,
    )


def _run(
    settings: _Settings, request: Any, progress: Any, values: dict[str, Any]
) -> Iterator[tuple[Any, ...]]:
    from hf_m2n2.errors import HfM2n2Error

    method = values["method"]
    evolve = method in EVOLVE_ALGORITHMS
    if not evolve and method not in static_methods():
        raise gr.Error(f"unknown method {method!r}")
    session = _session(request)
    previous = settings.jobs.pop(session, None)
    if previous is not None:  # one run directory per session: the last one goes (once its job has stopped)
        previous.stop.set()
        threading.Thread(target=_remove_when_done, args=(previous,), daemon=True).start()
    yield _outputs(
        "Preparing the seeds ...",
        plot=progress_frame(Path("/nonexistent")),
        table=score_table({}, ""),
        card="",
    )
    directory = settings.work_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True)
    try:
        refs, base, built = _seeds(settings, values, progress, directory)
        evaluate = _evaluate(values, built) if (evolve or values["score_static"]) else None
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    spec_path = directory / "spec.yaml"
    if evolve:
        budget = int(values["budget"])
        spec = evolve_spec(
            method,
            refs,
            evaluate,
            budget=budget,
            seed=int(values["seed"] or 0),
            archive_size=max(2, int(values["archive"] or 20)),
            block_size=1024 if built is not None else 65536,
        )
        job = Job("evolve", directory, directory / "run" / "model", budget=budget)
        target = _evolve_job(spec_path)
        merged_name = spec["name"]
    else:
        # the specialists' base is the base of task-vector methods; slerp goes add -> rev
        if built is not None:
            uses_base = static_methods()[method].uses_base
            base = base if uses_base == "required" and method != "slerp" else None
        spec = static_spec(
            method,
            refs,
            base,
            weights=values["weights"],
            density=values["density"],
            t=values["t"],
            extra=values["extra"],
        )
        merged_name = f"{method}-merge"
        job = Job("merge", directory, directory / merged_name)
        target = _merge_job(spec_path, merged_name, refs, evaluate)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    settings.jobs[session] = job
    job.start(target, settings.lock)
    started = time.perf_counter()
    shown, last_yield = (-1, ""), 0.0
    try:
        while not job.done.wait(POLL_S):
            now = time.perf_counter()
            done = passes_done(directory / "run") if job.kind == "evolve" else 0
            if job.kind == "merge" or job.stage != "evolving":
                desc = job.stage
                progress(None, desc=desc)
            elif done == 0:
                desc = "starting: opening the seeds, Gram sums, first candidate"
                progress(None, desc=desc)
            elif done >= job.budget:
                desc = "held-out report and export"
                progress(None, desc=desc)
            else:
                desc = f"evolving: {done}/{job.budget} forward passes"
                progress((done, job.budget), desc=desc, unit="passes")
            if (done, desc) != shown or now - last_yield >= 2:  # new data, or the elapsed time every 2 s
                plot = (
                    progress_frame(directory / "run")
                    if job.kind == "evolve" and (done, desc) != shown
                    else None
                )
                shown, last_yield = (done, desc), now
                yield _outputs(f"**Running** ({now - started:.0f} s): {desc}", plot=plot)
    finally:
        if not job.done.is_set():  # the event was cancelled or the client left: stop the worker too
            job.stop.set()
    elapsed = time.perf_counter() - started
    if isinstance(job.error, Cancelled):
        done = passes_done(directory / "run") if job.kind == "evolve" else 0
        what = f" after {done} of {job.budget} forward passes" if job.kind == "evolve" else ""
        yield _outputs(
            f"**Cancelled**{what} ({elapsed:.0f} s).",
            plot=progress_frame(directory / "run") if job.kind == "evolve" else None,
        )
        return
    if isinstance(job.error, HfM2n2Error):
        raise gr.Error(str(job.error).splitlines()[0] if str(job.error) else type(job.error).__name__)
    if job.error is not None:
        log.error("run failed", exc_info=job.error)
        raise gr.Error(
            f"{type(job.error).__name__}: {str(job.error).splitlines()[0] if str(job.error) else ''}"
        )
    progress(None, desc="packing the model")
    archive = zip_model(job.out_dir, directory / merged_name)
    table = score_table(job.report or {}, merged_name, job.roles)
    summary = f"**Done** in {elapsed:.0f} s: `{merged_name}`"
    if job.report and merged_name in job.report:
        rows = {name: sum(s.values()) / len(s) for name, s in job.report.items() if s}
        seeds = [v for name, v in rows.items() if name != merged_name and name not in job.roles]
        if seeds:
            summary += f", mean {rows[merged_name]:.3f} vs best seed {max(seeds):.3f}"
    yield _outputs(
        summary + ".",
        plot=progress_frame(directory / "run") if job.kind == "evolve" else None,
        table=table,
        card=card_preview(job.out_dir),
        download=str(archive),
        model=str(job.out_dir),
    )


def _push(
    model_dir: str | None,
    repo_id: str,
    token_text: str,
    private: bool,
    oauth_token: Any,
    profile: Any,
) -> str:
    """Push the last merged model; the token (typed or OAuth) appears in no output, log or file."""
    from hf_m2n2.errors import HfM2n2Error

    secret = (token_text or "").strip() or (oauth_token.token if oauth_token is not None else None)
    if not model_dir or not Path(model_dir).is_dir():
        raise gr.Error("run a merge first")
    repo_id = (repo_id or "").strip()
    if repo_id and "/" not in repo_id and profile is not None:
        repo_id = f"{profile.username}/{repo_id}"
    if not re.match(r"^([\w.-]+/)?[\w.-]+$", repo_id):  # a bare name goes to the token owner's namespace
        raise gr.Error("repository: expected your-name/model-name")
    if not secret:  # never fall back to the server's own HF_TOKEN: visitors push to their namespace only
        raise gr.Error("sign in with Hugging Face or paste a write token")
    try:
        from hf_m2n2.push import push_folder

        result = push_folder(model_dir, repo_id, token=secret, private=bool(private))
    except HfM2n2Error as exc:
        raise gr.Error(_scrub(str(exc), secret)) from None
    except Exception as exc:  # network or Hub errors: one line, the token scrubbed
        raise gr.Error(_scrub(f"{type(exc).__name__}: {exc}".splitlines()[0], secret)) from None
    commit = f"[{result.commit_oid[:8]}]({result.commit_url})"
    return f"Pushed to [{result.repo_url}]({result.repo_url}) (commit {commit})."


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hf_m2n2.app`: serve the app."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_m2n2.app", description="Serve the hf-m2n2 Gradio app."
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--specialists-dir", help="where the bundled tiny specialists are built (cached)")
    parser.add_argument("--work-dir", help="where runs are written (default: under the system temp dir)")
    parser.add_argument(
        "--allow-local-models", action="store_true", help="accept local directories as seeds (not on a Space)"
    )
    parser.add_argument(
        "--prebuild", action="store_true", help="build the tiny specialists at start-up, in the background"
    )
    args = parser.parse_args(argv)
    demo = build_demo(
        specialists_dir=args.specialists_dir,
        work_dir=args.work_dir,
        allow_local_models=args.allow_local_models,
        prebuild_specialists=args.prebuild,
    )
    allowed = [args.work_dir] if args.work_dir else None
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=allowed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
