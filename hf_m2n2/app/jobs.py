"""The app's runs: a merge or an evolution in a worker thread (`Job`), scoring, and what the page shows of a run
directory (fitness plot, progress, the best text-to-image candidate's images, score table, model card, zip). No
Gradio here.
"""

import json
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLOT_SERIES = ("best candidate (fitness)", "archive mean", "held-out score of the best")


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
    spec_path: Path,
    merged_name: str,
    seeds: Sequence[str],
    evaluate: dict[str, Any] | None,
    *,
    trust_remote_code: bool = False,
) -> Callable[[Job], None]:
    def target(job: Job) -> None:
        from hf_m2n2.merge import MergeOptions, run_merge

        job.stage = "merging"
        options = MergeOptions(overwrite=True, workers=2, progress=False, trust_remote_code=trust_remote_code)
        result = run_merge(spec_path, job.out_dir, options)
        if evaluate is not None:
            models = {seed.name: seed.path for seed in result.seeds}
            job.roles = {m.name: "base" for m in result.seeds if m.ref not in seeds}  # e.g. TIES's base
            models[merged_name] = job.out_dir
            job.report = score_models(
                models, evaluate, job, base_dir=spec_path.parent, trust_remote_code=trust_remote_code
            )

    return target


def _evolve_job(spec_path: Path) -> Callable[[Job], None]:
    def target(job: Job) -> None:
        from hf_m2n2.evolve.loop import stop_when
        from hf_m2n2.evolve.outcome import REPORT
        from hf_m2n2.evolve.runs import start_runs

        job.stage = "evolving"
        with stop_when(job.stop):
            start_runs(spec_path, job.directory / "run", runs=None, overwrite=True, progress=False)
        job.report = json.loads((job.directory / "run" / REPORT).read_text())

    return target


def _remove_when_done(job: Job) -> None:
    job.done.wait()
    shutil.rmtree(job.directory, ignore_errors=True)


def score_models(
    models: dict[str, Path],
    evaluate: dict[str, Any],
    job: Job | None = None,
    *,
    base_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> dict[str, dict[str, float]]:
    """Score each model directory with one lm-eval evaluator (held-out tasks when given, else the fitness tasks),
    as an evolve run's held-out report does. A relative `include_path` resolves against `base_dir`.

    Returns:
        `{model name: {task: score}}`, the shape of an evolve run's `report.json`.
    """
    from hf_m2n2.evaluate.lm_eval import LmEvalConfig
    from hf_m2n2.evolve.outcome import held_out_report

    rows = [(name, (name, path)) for name, path in models.items()]
    saved = _SavedModels(LmEvalConfig(**evaluate), job, base_dir, trust_remote_code)
    report, _, _ = held_out_report(saved, rows)
    return report


class _SavedModels:
    """The report's door for saved model directories: `report((name, path))` loads the model and scores it with the
    evaluator built (from the registry) on the first one, as a run's executor reports its genomes."""

    def __init__(self, config: Any, job: Job | None, base_dir: Path | None, trust_remote_code: bool = False):
        self.config, self.job, self.base_dir = config, job, base_dir
        self.trust_remote_code = trust_remote_code
        self.evaluator: Any = None

    def report(self, named: tuple[str, Path]) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        from hf_m2n2.evaluate import EvaluationContext, build_evaluator

        name, path = named
        if self.job is not None:
            if self.job.stop.is_set():
                raise Cancelled
            self.job.stage = f"scoring {name}"
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, trust_remote_code=self.trust_remote_code
        )
        model.eval()
        if self.evaluator is None:
            context = EvaluationContext(
                model, Path(path), self.base_dir, trust_remote_code=self.trust_remote_code
            )
            self.evaluator = build_evaluator(self.config, context)
        return self.evaluator.report(model)


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


def preview_gallery(
    run_dir: Path, *, known: int | None = None, min_side: int = 128
) -> tuple[int | None, float | None, list[tuple[Any, str]] | None]:
    """The best candidate so far of a (running) text-to-image run, from its `preview/` (written by the CLIP
    evaluator from the images it scored: `hf_m2n2.evaluate.previews`).

    Args:
        run_dir: the run directory.
        known: the candidate already shown: its images are not read again (None in the result).
        min_side: images smaller than this are enlarged by a whole factor, nearest neighbour (a tiny pipeline's
            32-pixel images shown as drawn, not blurred).

    Returns:
        (candidate id, its mean fitness score, [(PIL image, caption "group · prompt (score)")]); (None, None, [])
        before the first preview. Images replaced while being read are left out.
    """
    from PIL import Image

    from hf_m2n2.evaluate.previews import read_previews

    shown = read_previews(run_dir)
    if shown is None:
        return None, None, [] if known is None else None
    if known is not None and int(shown["candidate"]) == known:
        return known, float(shown["score"]), None
    items = []
    for entry in shown["images"]:
        try:
            with Image.open(entry["path"]) as opened:
                image = opened.convert("RGB")
        except OSError:
            continue
        factor = -(-min_side // max(1, min(image.size)))  # ceil
        if factor > 1:
            image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        group = f"{entry['group']} · " if entry.get("group") else ""
        items.append((image, f"{group}{entry['prompt']} ({entry['score']:.2f})"))
    return int(shown["candidate"]), float(shown["score"]), items


def zip_model(model_dir: Path, dest: Path) -> Path:
    """A zip of the model directory (files at the root of the archive)."""
    return Path(shutil.make_archive(str(dest), "zip", root_dir=model_dir))
