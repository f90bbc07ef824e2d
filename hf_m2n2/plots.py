"""Plots and tables of evolution runs: a history column vs forward passes, mean +- standard error over runs.

A "group" is one line of the figure: a run directory (with `history.jsonl`) or a directory of runs
(`run-*/history.jsonl`, as `hf-m2n2 evolve --runs N` writes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_m2n2.errors import HfM2n2Error

METRIC_LABELS = {
    "test": "test accuracy",
    "best_train": "best training score",
    "mean_train": "mean training score",
}


@dataclass
class Curve:
    """One group's values at the forward-pass counts logged by all of its runs.

    Attributes:
        label: the line's label.
        passes: forward passes, shape (k,).
        values: one row per run, shape (runs, k).
    """

    label: str
    passes: np.ndarray
    values: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.values.mean(axis=0)

    @property
    def stderr(self) -> np.ndarray:
        runs = self.values.shape[0]
        if runs < 2:
            return np.zeros(self.values.shape[1])
        return self.values.std(axis=0, ddof=1) / np.sqrt(runs)

    def at(self, passes: int) -> tuple[float, float, int] | None:
        """(mean, stderr, runs) at the last logged count <= passes, or None if there is none."""
        index = int(np.searchsorted(self.passes, passes, side="right")) - 1
        if index < 0:
            return None
        return float(self.mean[index]), float(self.stderr[index]), self.values.shape[0]


def run_dirs(group: str | os.PathLike[str]) -> list[Path]:
    """The run directories of a group: itself if it has a history, else its `run-*` subdirectories.

    Raises:
        HfM2n2Error: no history found.
    """
    path = Path(group)
    if (path / "history.jsonl").is_file():
        return [path]
    runs = sorted(
        (p for p in path.glob("run-*") if p.name[4:].isdigit() and (p / "history.jsonl").is_file()),
        key=lambda p: int(p.name[4:]),
    )
    if not runs:
        raise HfM2n2Error(f"{path}: no history.jsonl (nor run-*/history.jsonl) found")
    return runs


def _read_history(path: Path, metric: str) -> dict[int, float]:
    values = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            value = _field(record, metric)
            if value is not None:
                values[int(record["passes"])] = float(value)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise HfM2n2Error(f"{path}: line {number} is damaged (not a history record)") from None
    return values


def _field(record: dict[str, Any], metric: str) -> Any:
    """`record[metric]`, or a nested one for a dotted name (`parts.webshop`: one part of a list of evaluators)."""
    if metric in record:
        return record[metric]
    head, _, rest = metric.partition(".")
    inner = record.get(head)
    return inner.get(rest) if rest and isinstance(inner, dict) else None


def _group_label(group: Path, runs: list[Path]) -> str:
    summary = runs[0] / "summary.json"
    if summary.is_file():
        name = json.loads(summary.read_text()).get("name")
        if name:
            return str(name)
    return group.name


def load_curve(group: str | os.PathLike[str], metric: str = "test", label: str | None = None) -> Curve:
    """The values of `metric` of every run of a group, at the pass counts all runs logged.

    Args:
        group: a run directory or a directory of runs.
        metric: `test`, `best_train` or `mean_train`.
        label: line label (default: the runs' spec name, else the directory name).

    Returns:
        The curve.

    Raises:
        HfM2n2Error: no history, or no pass count logged by every run.
    """
    runs = run_dirs(group)
    histories = [_read_history(run / "history.jsonl", metric) for run in runs]
    common = sorted(set.intersection(*(set(h) for h in histories)))
    if not common:
        raise HfM2n2Error(f"{group}: the runs have no logged {metric!r} values at common forward-pass counts")
    values = np.array([[h[p] for p in common] for h in histories])
    return Curve(label or _group_label(Path(group), runs), np.array(common), values)


def plot_runs(
    groups: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    metric: str = "test",
    labels: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw `metric` vs forward passes, one line per group (mean over its runs, shaded +- standard error).

    Args:
        groups: run directories or directories of runs.
        out: the PNG file to write.
        metric: `test`, `best_train` or `mean_train`.
        labels: one label per group (default: spec names).
        title: figure title.

    Returns:
        The PNG's path.

    Raises:
        HfM2n2Error: a group has no usable history, or the labels do not match the groups.

    Example:
        >>> plot_runs(["runs/m2n2", "runs/ga"], "digits.png")  # doctest: +SKIP
    """
    if labels is not None and len(labels) != len(groups):
        raise HfM2n2Error(f"{len(labels)} labels for {len(groups)} directories")
    curves = [load_curve(g, metric, labels[i] if labels else None) for i, g in enumerate(groups)]
    return _draw(curves, out, METRIC_LABELS.get(metric, metric), title)


def plot_parts(
    run: str | os.PathLike[str], out: str | os.PathLike[str], parts: list[str], *, title: str | None = None
) -> Path:
    """Draw, for one run whose fitness is a list of evaluators, the best member's mean fitness score on each part
    (the history's `parts`) beside its overall one, vs forward passes.

    Example:
        >>> plot_parts("runs/math-agent", "fitness.png", ["lm_eval", "webshop"])  # doctest: +SKIP
    """
    curves = [load_curve(run, "best_train", "all parts")]
    curves += [load_curve(run, f"parts.{name}", name) for name in parts]
    return _draw(curves, out, "best member's fitness score", title)


def _draw(curves: list[Curve], out: str | os.PathLike[str], ylabel: str, title: str | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for curve in curves:
        mean, err = curve.mean, curve.stderr
        runs = curve.values.shape[0]
        (line,) = axes.plot(curve.passes, mean, label=f"{curve.label} ({runs} run{'s' if runs > 1 else ''})")
        axes.fill_between(
            curve.passes, mean - err, mean + err, color=line.get_color(), alpha=0.25, linewidth=0
        )
    axes.set_xlabel("forward passes")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(out)
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise HfM2n2Error(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
