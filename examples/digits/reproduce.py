"""Run the digits reproduction: every method's spec, N seeded runs each, one run at a time.

Each (setup, method) gets `OUT/<setup>/<method>/run-<r>` (seeds 42 + r), exactly what
`hf-m2n2 evolve SPEC --out OUT/<setup>/<method> --runs N` writes. Re-running the script resumes interrupted runs
and adds runs when N grows; finished runs are kept. Then `report.py OUT` makes the table and the figures.

Usage:
    nice -n 10 python examples/digits/reproduce.py --out runs/digits --runs 10            # everything
    python examples/digits/reproduce.py --out runs/digits --runs 3 --setup pretrained --methods m2n2,sweep
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETUPS = ("scratch", "pretrained")
# cma_es (full covariance) is left out of the default list: hours and ~9 GB per 50k-pass run
DEFAULT_METHODS = (
    "m2n2",
    "no_split_point",
    "no_attraction",
    "no_crossover",
    "ga",
    "map_elites",
    "cma_es_diagonal",
    "sweep",
    "m2n2_segment",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--runs", type=int, default=10, help="runs per method (seeds 42, 43, ...)")
    parser.add_argument("--setup", choices=[*SETUPS, "all"], default="all")
    parser.add_argument("--methods", help="comma-separated spec names (default: all but full CMA-ES)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)

    from hf_m2n2.evolve.runs import resume_runs, start_runs

    methods = args.methods.split(",") if args.methods else DEFAULT_METHODS
    setups = SETUPS if args.setup == "all" else (args.setup,)
    for setup in setups:
        for method in methods:
            spec = HERE / setup / f"{method}.yaml"
            if not spec.is_file():
                continue  # e.g. no sweep from scratch, no CMA-ES from pretrained seeds
            out = args.out / setup / method
            start = time.perf_counter()
            if (out / "runs.json").is_file():
                summaries = resume_runs(out, runs=args.runs, progress=args.progress)
            else:
                summaries = start_runs(spec, out, runs=args.runs, progress=args.progress)
            tests = [s["test"] for s in summaries]
            print(
                f"{setup}/{method}: {len(summaries)} runs, final test "
                f"{sum(tests) / len(tests):.4f} (took {time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
