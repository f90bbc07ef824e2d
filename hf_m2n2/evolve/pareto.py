"""The Pareto front a multi-objective run (`algorithm: nsga2`) ends with: `pareto.json` and `pareto.png`.

A run's `model/` holds the front member with the best mean training score; every member is one command away
(`hf-m2n2 export RUN OUT --front K`, `hf_m2n2.evolve.front_export`). Front members are numbered as `pareto.json`
lists them: by the first objective, descending.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
