"""Data-flow space on the tiny specialists, at one budget: DFS, DFS without scales, PS, PS+DFS, M2N2, and a
hand-written frankenmerge, scored on the same held-out lm-eval tasks.

    python bench/dfs_compare.py [--seeds 42 43 44] [--out out/dfs_compare] [--methods dfs,ps,...]

Methods (`examples/specialists/compare/`): `dfs` (`evomerge_dfs.yaml`: CMA-ES over the indicator and the scaling
matrix, model A = add), `dfs_noscale` (the same with `scales: false`, the paper's ablation), `ps`
(`evomerge_ps_linear.yaml`: CMA-ES over per-layer linear weights of add and rev), `ps_dfs` (DFS whose model A is
the model that run seed's `ps` run exported: PS+DFS), `m2n2` (`../spec.yaml`), and `frankenmerge`
(`frankenmerge.yaml`, merged once with `hf-m2n2 merge` and scored by the same lm-eval evaluator). Finished runs
are reused. Prints the table (mean and min-max over run seeds) and each DFS run's best path.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_compare import absolute_spec  # noqa: E402
from compare_runs import markdown, read_run, run_method, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "specialists"
COMPARE = DEMO / "compare"
METHODS = ("dfs", "dfs_noscale", "ps", "ps_dfs", "m2n2", "frankenmerge")
LABELS = {
    "dfs": "DFS: CMA-ES over the path and scales (`evomerge_dfs.yaml`)",
    "dfs_noscale": "DFS with W = 1 (`scales: false`)",
    "ps": "PS: CMA-ES over per-layer linear weights (`evomerge_ps_linear.yaml`)",
    "ps_dfs": "PS+DFS: DFS whose model A is the PS run's model",
    "m2n2": "M2N2 (`spec.yaml`)",
    "frankenmerge": "hand-written frankenmerge (`frankenmerge.yaml`: add 0, rev 0-1, add 1)",
}


def method_spec(method: str, seed: int, ps_model: Path | None = None) -> dict[str, Any]:
    """The evolve spec of one method and run seed (absolute paths: written anywhere)."""
    if method == "m2n2":
        spec = absolute_spec(DEMO / "spec.yaml")
    elif method == "ps":
        spec = absolute_spec(COMPARE / "evomerge_ps_linear.yaml")
    else:
        spec = absolute_spec(COMPARE / "evomerge_dfs.yaml")
        if method == "dfs_noscale":
            spec["genome"]["scales"] = False
        if method == "ps_dfs":
            spec["models"][0] = {"model": str(ps_model)}
    spec["name"] = method
    spec["evolve"] = {**spec["evolve"], "seed": seed}
    return spec


def run(method: str, seed: int, out: Path) -> dict[str, Any]:
    """One finished run of `method` with run seed `seed` (reused when already finished)."""
    ps_model = out / "ps" / f"seed-{seed}" / "run-0" / "model" if method == "ps_dfs" else None
    if ps_model is not None and not ps_model.is_dir():
        run("ps", seed, out)
    spec = method_spec(method, seed, ps_model)
    where = out / method / f"seed-{seed}"
    if not (where / "run-0" / "report.json").is_file():
        run_method(spec, out / "specs" / f"{method}-{seed}.yaml", where, runs=1)
    return read_run(where / "run-0", method)


def frankenmerge(out: Path) -> dict[str, Any]:
    """The hand-written frankenmerge, merged once and scored like the runs' held-out report (and the seeds)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_m2n2.evaluate import build_evaluator
    from hf_m2n2.evaluate.base import EvaluationContext
    from hf_m2n2.evolve.spec import load_evolve_spec
    from hf_m2n2.merge import MergeOptions, merge
    from hf_m2n2.spec import parse_spec

    model_dir = out / "frankenmerge" / "model"
    if not (model_dir / "config.json").is_file():
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        data = yaml.safe_load((COMPARE / "frankenmerge.yaml").read_text())
        for piece in data["slices"]:
            for source in piece["sources"]:
                source["model"] = str((COMPARE / source["model"]).resolve())
        merge(
            parse_spec(data, source="frankenmerge.yaml"),
            model_dir,
            MergeOptions(progress=False, overwrite=True),
        )
    evolve_spec, _ = load_evolve_spec(COMPARE / "evomerge_dfs.yaml")
    rows = {}
    for name, path in (
        ("frankenmerge", model_dir),
        ("add", DEMO / "build" / "add"),
        ("rev", DEMO / "build" / "rev"),
    ):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        context = EvaluationContext(model, path, COMPARE, "cpu", reference_name=name)
        evaluator = build_evaluator(evolve_spec.evaluate, context)
        scores = dict(evaluator.report(model).scores)
        rows[name] = {**scores, "mean": float(np.mean(list(scores.values())))}
    return rows


def dfs_path(run_dir: Path) -> str:
    """A DFS run's best path, readable: `add.0 -> rev.1 (x0.93) -> add.1`."""
    recipe = json.loads((run_dir / "model" / "route.json").read_text())
    names = [Path(s["ref"]).name or s["name"] for s in recipe["seeds"]]
    hops = []
    for hop, scale in zip(recipe["path"], recipe["hop_scales"]):
        seed, layer = recipe["stored"][hop]
        hops.append(f"{names[seed]}.{layer}" + ("" if scale == 1.0 else f" (x{scale:.2f})"))
    return " -> ".join(hops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "dfs_compare")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown} (choose from {', '.join(METHODS)})")
    results = {m: [run(m, seed, args.out) for seed in args.seeds] for m in methods if m != "frankenmerge"}
    summary = summarize(results, LABELS) if results else None
    if summary is not None:
        print(markdown(summary))
    if "frankenmerge" in methods:
        rows = frankenmerge(args.out)
        print()
        print("| model | " + " | ".join(rows["frankenmerge"]) + " |")
        print("|" + "---|" * (len(rows["frankenmerge"]) + 1))
        for name, row in rows.items():
            label = (
                LABELS["frankenmerge"] if name == "frankenmerge" else f"seed model `{name}` (same evaluator)"
            )
            print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    for method in ("dfs", "dfs_noscale", "ps_dfs"):
        for seed in args.seeds if method in results else ():
            print(f"{method}, run seed {seed}: {dfs_path(args.out / method / f'seed-{seed}' / 'run-0')}")
    (args.out / "summary.json").write_text(json.dumps(copy.deepcopy(summary), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
