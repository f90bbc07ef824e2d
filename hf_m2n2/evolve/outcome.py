"""What a finished model run leaves: the best member exported through its genome kind, its lineage, the held-out
report of every seed and of the merge (`report.json`), the lineage card, the fitness plot, the image grid (when
the evaluator draws images: a text-to-image fitness), `timing.json`; and `hf-m2n2 export`, which writes a finished
run's model again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_m2n2.errors import HfM2n2Error
from hf_m2n2.evolve.loop import HISTORY, LINEAGE, SUMMARY
from hf_m2n2.image_grid import COLUMNS as GRID_COLUMNS
from hf_m2n2.image_grid import GRID
from hf_m2n2.outdir import atomic_write_text

MODEL_DIR = "model"
REPORT = "report.json"
TIMING = "timing.json"


def ancestors(lineage_path: Path, best_id: int) -> list[dict[str, Any]]:
    """The lineage records of `best_id` and all its ancestors, oldest first."""
    records = {}
    if lineage_path.exists():
        for line in lineage_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["id"]] = record
    wanted, stack = set(), [best_id]
    while stack:
        node = stack.pop()
        if node in wanted or node not in records:
            continue
        wanted.add(node)
        stack.extend(records[node]["parents"])
    return [records[i] for i in sorted(wanted)]


def held_out_report(
    executor: Any, rows: list[tuple[str, Any]], each: Callable[[str, Any], None] | None = None
) -> tuple[dict[str, dict[str, float]], list[str], str | dict[str, str]]:
    """The report table: one row per (name, genome), each the executor's held-out report of that genome.

    Args:
        each: called as `each(name, genome)` after each row's report, while the genome is still the one written
            into the target (what else the run needs of it costs no second write).

    Returns:
        (`{name: {part: score}}`, the part names in order, the metric's name, or `{part: metric}` where the parts
        measure different things).
    """
    report: dict[str, dict[str, float]] = {}
    metric: str | dict[str, str] = "score"
    for name, genome in rows:
        row = executor.report(genome)
        report[name] = dict(row.scores)
        metric = row.metric if not row.metrics else {part: row.metric_of(part) for part in row.scores}
        if each is not None:
            each(name, genome)
    tasks = list(next(iter(report.values())))
    return report, tasks, metric


@dataclass
class RunOutcome:
    """What a finished model run exports, whatever its genome: the best member, its lineage, the held-out
    report of every seed and of the merge, the fitness plot, and where the evaluator says so, how it scores
    (`scoring`: its `describe()`) and the image grid it drew (`grid`: the card's entry, see `image_grid_entry`)."""

    spec: Any
    seeds: list[Any]
    run_dir: Path
    summary: dict[str, Any]
    best: Any
    lineage: list[dict[str, Any]]
    merged_name: str
    report: dict[str, dict[str, float]]
    tasks: list[str]
    metric: str | dict[str, str]
    plot_name: str | None
    grid: dict[str, Any] | None = None
    scoring: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        spec: Any,
        parts: Any,
        run_dir: Path,
        summary: dict[str, Any],
        *,
        best: Any = None,
        merged_name: str | None = None,
    ) -> RunOutcome:
        """Gather the outcome of a finished run (`parts`: the run's `RunParts`; `best`: the member to export, by
        default the strategy's best; `merged_name`: its name in the report and card)."""
        best = best if best is not None else parts.strategy.best()
        if best is None:
            raise HfM2n2Error("the run has no archive member to export")
        merged_name = merged_name or spec.name or f"{spec.evolve.algorithm}-merge"
        seeds = parts.genome.seeds
        rows = [(s.name, g) for s, g in zip(seeds, parts.ops.seed_genomes())] + [(merged_name, best.genome)]
        executor = parts.executor
        drawn: dict[str, Any] = {}
        draw = getattr(executor, "images", None)
        each = None if draw is None else lambda name, genome: drawn.update({name: draw(genome, GRID_COLUMNS)})
        report, tasks, metric = held_out_report(executor, rows, each)
        lineage = ancestors(run_dir / LINEAGE, best.lineage.id)
        describe = getattr(executor, "describe", None)
        return cls(
            spec,
            seeds,
            run_dir,
            summary,
            best,
            lineage,
            merged_name,
            report,
            tasks,
            metric,
            _fitness_plot(run_dir),
            image_grid_entry(drawn, run_dir / GRID),
            describe() if describe is not None else None,
        )

    def write_card(
        self,
        out: Path,
        *,
        fixed: int | None = None,
        evolved: Sequence[str] | None = None,
        **card_fields: Any,
    ) -> None:
        """Add the fitness plot, the image grid, README.md and card.json (seeds, held-out scores, lineage, how it
        was scored, push target) to `out`; the seeds' model kind gives the card its flavour (a pipeline's is a
        diffusers card).

        Args:
            fixed: the index of the seed whose non-evolved tensors and files the model has, when one has them all.
            evolved: the names of the evolved tensors, when the genome says.
            card_fields: more `evolve_card_info` arguments (the recipe file, ...).
        """
        from hf_m2n2.card import evolve_card_info, write_card
        from hf_m2n2.models import model_kind

        report, tasks = self.report, self.tasks
        for name in (self.plot_name, self.grid and self.grid["file"]):
            if name:
                (out / name).write_bytes((self.run_dir / name).read_bytes())
        output = self.spec.output
        info = evolve_card_info(
            model_name=self.merged_name,
            algorithm=self.spec.evolve.algorithm,
            seeds=[s.model for s in self.seeds],
            tasks=tasks,
            metric=self.metric,
            merged=[report[self.merged_name][t] for t in tasks],
            seed_scores={s.name: [report[s.name][t] for t in tasks] for s in self.seeds},
            lineage=self.lineage,
            passes=self.summary["forward_passes"],
            run_seed=self.summary["seed"],
            plot=self.plot_name,
            # the usage snippet loads what exists: the pushed repo, else the model directory as given (--out)
            model_id=output.push_to_hub
            if output is not None and output.push_to_hub
            else str(self.run_dir / MODEL_DIR),
            grid=self.grid,
            scoring=self.scoring,
            **card_fields,
        )
        reference = self.seeds[fixed or 0]
        info = model_kind(reference.kind).evolve_card(info, self.seeds, fixed, evolved)
        write_card(out, info)

    def save_report(self, progress: bool) -> dict[str, dict[str, float]]:
        # the run's "finished" marker: written last, so a run killed before it exports again on resume
        atomic_write_text(self.run_dir / REPORT, json.dumps(self.report, indent=2) + "\n")
        if progress:
            print(format_report(self.report, self.tasks))
        return self.report


def is_finished(run_dir: Path, exports: bool) -> bool:
    """Whether a run finished: its summary is written, and for a model run the report, written after the model."""
    return (run_dir / (REPORT if exports else SUMMARY)).is_file() and (run_dir / SUMMARY).is_file()


def finish_model_run(
    spec: Any, parts: Any, run_dir: Path, summary: dict[str, Any], progress: bool = True
) -> dict[str, dict[str, float]]:
    """Export the best member through its genome kind to `run_dir/model` (weights, recipe, lineage card, fitness
    plot), write the held-out report `{model_name: {task: score}}` of every seed and of the merged model to
    `run_dir/report.json`, and the per-candidate materialize/evaluate seconds to `run_dir/timing.json`."""
    timing = parts.executor.timing
    if timing is not None:
        atomic_write_text(run_dir / TIMING, json.dumps(timing.to_dict(), indent=2) + "\n")
    if hasattr(parts.strategy, "front"):  # a multi-objective run: every front member is exportable by index
        from hf_m2n2.evolve.pareto import save_front

        save_front(parts.strategy, spec, run_dir)
    outcome = RunOutcome.of(spec, parts, run_dir, summary)
    spec.kind.export(parts.genome, spec, outcome, run_dir / MODEL_DIR)
    return outcome.save_report(progress)


def format_report(report: dict[str, dict[str, float]], tasks: list[str]) -> str:
    width = max(len(n) for n in report) + 2
    lines = ["".ljust(width) + "".join(t[:22].rjust(24) for t in tasks) + "mean".rjust(10)]
    for name, scores in report.items():
        values = [scores[t] for t in tasks]
        lines.append(name.ljust(width) + "".join(f"{v:24.4f}" for v in values) + f"{np.mean(values):10.4f}")
    return "\n".join(lines)


def image_grid_entry(drawn: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """Write the image grid of what the evaluator drew per report row (`{row name: [(prompt row, images)]}`, the
    same prompts in every row) to `path`, atomically.

    Returns:
        the card's `grid` entry: the file name, the row names, the prompts of the columns (id, prompt, scoring
        text) and the layout (cell size, origin of the first cell, gap, scale: `image_grid.GridLayout`); None when
        nothing was drawn.
    """
    if not drawn or any(not rows for rows in drawn.values()):
        return None
    from hf_m2n2.image_grid import draw_grid, prompt_label, write_grid

    prompts = [row for row, _ in next(iter(drawn.values()))]
    grid, layout = draw_grid(
        [(name, [images[0] for _, images in rows]) for name, rows in drawn.items()],
        [prompt_label(row.id, row.prompt, row.scoring_text) for row in prompts],
    )
    write_grid(path, grid)
    return {
        "file": path.name,
        "rows": list(drawn),
        "prompts": [{"id": r.id, "prompt": r.prompt, "scoring_text": r.scoring_text} for r in prompts],
        "cell": list(layout.cell),
        "origin": list(layout.origin),
        "gap": layout.gap,
        "scale": layout.scale,
    }


def _fitness_plot(run_dir: Path) -> str | None:
    """The fitness curve: the best member's, and with a list of evaluators its score on each part beside it."""
    try:
        from hf_m2n2.plots import plot_parts, plot_runs
    except ImportError:
        return None
    name = "fitness.png"
    try:
        parts = _history_parts(run_dir / HISTORY)
        if parts:
            plot_parts(run_dir, run_dir / name, parts)
        else:
            plot_runs([run_dir], run_dir / name, metric="best_train")
    except Exception:  # a missing matplotlib or an empty history must not lose the exported model
        return None
    return name


def _history_parts(path: Path) -> list[str]:
    """The part names a run's history logs (its last record's `parts`), none for one evaluator."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return list(json.loads(lines[-1]).get("parts") or {}) if lines else []


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """`hf-m2n2 export`: write the best model of a finished run again, with its card and plot, into `out_dir`
    (the genome kind whose recipe the run's `model/` holds does it; `trust_remote_code`: the seeds' custom code
    may run, for runs started with `--trust-remote-code`).

    Raises:
        HfM2n2Error: `run_dir` is not a finished model evolution run.
    """
    from hf_m2n2.genomes import genome_kinds

    model = Path(run_dir) / MODEL_DIR
    for kind in genome_kinds().values():
        out = kind.export_again(model, Path(out_dir), overwrite, trust_remote_code=trust_remote_code)
        if out is not None:
            return out
    raise HfM2n2Error(f"{run_dir} has no exported model ({MODEL_DIR}/recipe.json): is the run finished?")
