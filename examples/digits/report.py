"""Table and figures of a digits reproduction (the output directory of `reproduce.py`).

Prints a Markdown table: per method, the test accuracy (%) of the best-training-accuracy member, mean +- standard
error over runs, at 10k/20k/50k forward passes from scratch and 2k/5k/10k from pretrained seeds, and the mean
wall time per run; writes one figure per setup (test accuracy vs forward passes, like the paper's).

Usage:
    python examples/digits/report.py runs/digits --figures examples/digits
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hf_m2n2.plots import load_curve, plot_runs, run_dirs

CHECKPOINTS = {"scratch": (10_000, 20_000, 50_000), "pretrained": (2_000, 5_000, 10_000)}
ORDER = (
    "m2n2",
    "m2n2_segment",
    "no_crossover",
    "no_split_point",
    "no_attraction",
    "ga",
    "map_elites",
    "cma_es",
    "cma_es_diagonal",
    "sweep",
)


def _cell(curve, passes: int) -> str:
    if curve.passes[-1] < passes:
        return "—"
    mean, err, runs = curve.at(passes)
    return f"{100 * mean:.1f} ± {100 * err:.1f}"


def _wall(group: Path) -> str:
    walls = [
        json.loads((run / "summary.json").read_text())["timing"]["wall_time_s"]
        for run in run_dirs(group)
        if (run / "summary.json").is_file()
    ]
    return f"{sum(walls) / len(walls):.0f}" if walls else "—"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the --out directory of reproduce.py")
    parser.add_argument("--figures", type=Path, help="write <setup>.png here")
    args = parser.parse_args(argv)

    rows: dict[str, dict[str, list[str]]] = {}
    names: dict[str, str] = {}
    for setup, checkpoints in CHECKPOINTS.items():
        groups = []
        for method in ORDER:
            group = args.results / setup / method
            if not (group / "runs.json").is_file():
                continue
            try:
                curve = load_curve(group, "test")
            except Exception:  # no finished history yet
                continue
            groups.append(group)
            names[method] = curve.label
            runs = curve.values.shape[0]
            rows.setdefault(method, {})[setup] = [
                *(_cell(curve, p) for p in checkpoints),
                _wall(group),
                str(runs),
            ]
        if args.figures and groups:
            title = f"digits, {'from scratch' if setup == 'scratch' else 'pretrained seeds'}"
            plot_runs(groups, args.figures / f"{setup}.png", title=title)

    header = ["method"]
    for setup, checkpoints in CHECKPOINTS.items():
        header += [f"{setup} {p // 1000}k" for p in checkpoints] + [f"{setup} s/run", "runs"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method in ORDER:
        if method not in rows:
            continue
        cells = [names[method]]
        for setup, checkpoints in CHECKPOINTS.items():
            cells += rows[method].get(setup, ["—"] * (len(checkpoints) + 2))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
