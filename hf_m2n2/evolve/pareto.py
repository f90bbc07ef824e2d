"""The Pareto front a multi-objective run (`algorithm: nsga2`) ends with: `pareto.json`, `pareto.png`, and
`hf-m2n2 export RUN OUT --front K`, which exports front member K as the run exported its best one (weights,
recipe, lineage card with held-out scores).

A run's `model/` holds the front member with the best mean training score; every member is one command away.
Front members are numbered as `pareto.json` lists them: by the first objective, descending.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hf_m2n2.errors import HfM2n2Error
from hf_m2n2.outdir import atomic_write_text

PARETO = "pareto.json"
PARETO_PLOT = "pareto.png"


def objective_names(spec: Any, count: int) -> list[str]:
    """One name per objective: the evaluator's tasks when it lists as many (lm_eval), else `group_0`, ..."""
    tasks = getattr(spec.evaluate, "tasks", None)
    if isinstance(tasks, list) and len(tasks) == count:
        return [str(t) for t in tasks]
    return [f"group_{i}" for i in range(count)]


def save_front(strategy: Any, spec: Any, run_dir: Path) -> list[dict[str, Any]]:
    """Write `pareto.json` (each front member's index, candidate id, objectives and mean score) and its plot."""
    front = strategy.front()
    count = len(front[0].extra["objectives"]) if front else 0
    names = objective_names(spec, count)
    rows = [
        {
            "index": i,
            "id": m.lineage.id,
            "objectives": dict(zip(names, (float(v) for v in m.extra["objectives"]))),
            "mean": m.mean_score,
        }
        for i, m in enumerate(front)
    ]
    atomic_write_text(run_dir / PARETO, json.dumps({"objectives": names, "front": rows}, indent=2) + "\n")
    _plot(rows, names, run_dir / PARETO_PLOT)
    return rows


def _plot(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    """The front on the first two objectives, each point labelled with its index."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the front is in pareto.json; the picture is a convenience
        return
    if len(names) < 2 or not rows:
        return
    x = [r["objectives"][names[0]] for r in rows]
    y = [r["objectives"][names[1]] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(x, y, "o-", drawstyle="steps-post")
    for row, xi, yi in zip(rows, x, y):
        ax.annotate(str(row["index"]), (xi, yi), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(f"Pareto front ({len(rows)} members; training scores)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def export_front(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    index: int,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """`hf-m2n2 export RUN OUT --front K`: front member K of a finished nsga2 run, exported (weights, recipe,
    card with its held-out scores and the seeds') as the run exported its best member.

    Raises:
        HfM2n2Error: the run is not a finished nsga2 run, K is not on its front, or `out_dir` exists.
    """
    from hf_m2n2.evolve.build import build_run
    from hf_m2n2.evolve.loop import load_archive
    from hf_m2n2.evolve.outcome import RunOutcome
    from hf_m2n2.evolve.runs import SPEC_COPY, RunInfo
    from hf_m2n2.evolve.spec import load_evolve_spec
    from hf_m2n2.evolve.strategy import Lineage, Member
    from hf_m2n2.outdir import check_output_dir

    run = Path(run_dir)
    if not (run / PARETO).is_file():
        raise HfM2n2Error(
            f"{run} has no {PARETO}: --front exports a member of a finished nsga2 run's Pareto front"
        )
    front = json.loads((run / PARETO).read_text())["front"]
    if not 0 <= index < len(front):
        raise HfM2n2Error(f"--front {index}: the front of {run} has members 0..{len(front) - 1}")
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    info = RunInfo.load(run)
    spec, _ = load_evolve_spec(run / SPEC_COPY)
    if trust_remote_code:
        spec = spec.model_copy(update={"trust_remote_code": True})
    summary = json.loads((run / "summary.json").read_text())
    parts = build_run(spec, info.seed, run, Path(info.spec_dir) if info.spec_dir else None)
    try:
        stored = load_archive(run)["members"][index]
        lineage = Lineage.from_dict(stored["lineage"])
        if lineage.id != front[index]["id"]:
            raise HfM2n2Error(f"{run}: the archive and {PARETO} disagree on front member {index}")
        member = Member(
            parts.ops.from_state(stored["genome"]), stored["scores"], lineage, stored.get("extra", {})
        )
        name = f"{spec.name or 'nsga2-merge'}-front{index}"
        outcome = RunOutcome.of(spec, parts, run, summary, best=member, merged_name=name)
        spec.kind.export(parts.genome, spec, outcome, out)
    finally:
        close = getattr(parts.executor, "close", None)
        if close is not None:
            close()
    return out
