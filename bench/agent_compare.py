"""Same-budget comparison on the math + agent demo: M2N2, its ablations, the GA and CMA-ES over per-layer weights,
each run through `hf_m2n2.evolve.runs.start_runs` with the demo spec's models and fitness (the add task through
lm-eval + shop sessions through the WebShop evaluator, against the local shop server started here).

The paper's claim for its LLM experiment is that M2N2 beats CMA-ES and the GA on both tasks at the same budget; this
script measures that claim on the tiny demo. Every method gets the spec's models, evaluator settings and `--budget`
(forward passes, seeds included); run seeds `--seed`.. (`--runs` of them). The table gives each method's held-out
columns (add exact match, shop mean reward and success rate) and their mean over the two tasks (the success rate
is not averaged in), then each run and the seed models' rows, from the runs' `report.json`.

Usage:
    python bench/agent_compare.py [--spec examples/math_agent/spec.yaml] [--shop-config BUILD/shop/shop.json]
        [--out out/agent_compare] [--budget N] [--runs 1] [--methods m2n2,no_split_point,no_attraction,ga,evomerge_ps]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from compare_runs import LABELS, markdown, method_specs, read_run, run_method, summarize

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "math_agent"
METHODS = ("m2n2", "no_split_point", "no_attraction", "ga", "evomerge_ps")
AGENT_LABELS = {**LABELS, "evomerge_ps": "CMA-ES over per-layer linear weights (evomerge_ps)"}
SERVER_VARIABLE = "WEBSHOP_SERVER"


def absolute_spec(spec_file: Path) -> dict[str, Any]:
    """The spec with its relative model paths and lm-eval `include_path` made absolute (the method specs are
    written elsewhere)."""
    spec = yaml.safe_load(spec_file.read_text())
    base = spec_file.resolve().parent
    spec["models"] = [
        {**entry, "model": str((base / entry["model"]).resolve())}
        if (base / entry["model"]).exists()
        else entry
        for entry in spec["models"]
    ]
    parts = spec["evaluate"] if isinstance(spec["evaluate"], list) else [spec["evaluate"]]
    for part in parts:
        if part.get("include_path"):
            part["include_path"] = str((base / part["include_path"]).resolve())
    return spec


def with_two_task_mean(row: dict[str, Any]) -> dict[str, Any]:
    """A run row whose `mean` is over the tasks' figures (exact match, mean reward), not the success rate."""
    row = copy.deepcopy(row)
    for scores in [row["scores"], *row["seeds"].values()]:
        tasks = [v for k, v in scores.items() if k != "mean" and not k.endswith("_success")]
        scores["mean"] = float(np.mean(tasks))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=DEMO / "spec.yaml")
    parser.add_argument("--shop-config", type=Path, default=DEMO / "build" / "shop" / "shop.json")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "agent_compare")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budget", type=int, help="forward passes per run (default: the spec's)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, help="the first run seed (default: the spec's)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)

    from hf_m2n2.demo.shop.catalogue import ShopConfig
    from hf_m2n2.demo.shop.server import serve
    from hf_m2n2.outdir import atomic_write_text

    if not args.shop_config.is_file():
        print(f"{args.shop_config} is missing: run `make demo-agent` first", file=sys.stderr)
        return 2
    spec = absolute_spec(args.spec)
    budget = args.budget or spec["evolve"]["budget"]
    seed = spec["evolve"].get("seed", 0) if args.seed is None else args.seed
    methods = [m for m in args.methods.split(",") if m]
    specs = method_specs(spec, methods, budget, seed)
    results = {}
    with serve(ShopConfig.read(args.shop_config)) as shop:
        os.environ[SERVER_VARIABLE] = shop.url  # the specs say ${WEBSHOP_SERVER}
        for method, method_spec in specs.items():
            dirs = run_method(
                method_spec, args.out / "specs" / f"{method}.yaml", args.out / "runs" / method, args.runs
            )
            results[method] = [with_two_task_mean(read_run(d, method)) for d in dirs]
    summary = summarize(results, AGENT_LABELS)
    summary["settings"] = {"spec": str(args.spec), "budget": budget, "runs": args.runs, "seed": seed}
    atomic_write_text(args.out / "agent_compare.json", json.dumps(summary, indent=2) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
