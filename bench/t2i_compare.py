"""Same-budget comparison on the text-to-image demo: M2N2 and its ablations, the SLERP sweep and CMA-ES over per-block
weights, each run through `hf_m2n2.evolve.runs.start_runs` (the API behind `hf-m2n2 evolve --runs N`).

Given a built demo folder (`python -m hf_m2n2.demo.<module> DIR` writes judge/, base/, en/, ja/, prompts/fit.jsonl
and prompts/test.jsonl with groups en and ja), every method gets the same budget (forward passes: candidates
scored on the fitness prompts, seeds included), the same models and the same evaluator settings, which come from
`--spec` (default `examples/text_to_image/spec.yaml` when it exists; its judge and prompt paths are replaced by
the build's) or else from `DEFAULT_SPEC` below:

- `m2n2`: the spec itself (a Blend of the seeds' UNets, M2N2's defaults or the spec's settings);
- `no_split_point`, `no_attraction`: the same with `evolve.split_point: false` / `evolve.attraction: false`;
- `sweep`: the SLERP sweep between the first two models, `budget` evenly spaced t: its candidates and their
  images do not depend on the run seed (the evaluator's image seeds are `evaluate.seed`'s), so it runs once;
- `evomerge_ps`: CMA-ES (x0 0.5, sigma0 1/6, popsize 4 + floor(3 ln n)) over linear weights of every model in
  every UNet block (`genome: {kind: method, method: linear, parameters: [weight]}`);
- `evomerge_ps_slerp` (only when asked for with `--methods`): CMA-ES over slerp's t per UNet block, from the first
  model to the second.

Each method but the sweep runs `--runs` times (run seeds seed, seed + 1, ...). The table gives, per method, the held-out score of
each prompt group of the test prompts (CLIP score, higher is better) and their mean, as the mean over the runs and
the min-max range, then one row per run and the seed models' own rows, all read from the runs' `report.json`;
the loop wall time is the runs' `summary.json`'s. The table is printed (Markdown) and written as JSON.
A method whose run directory already holds finished runs of the same spec is not run again (interrupted runs
resume), so a second call only prints the table.

Usage:
    python bench/t2i_compare.py examples/text_to_image/build --out out/t2i_compare --budget 60 --runs 3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from compare_runs import (  # noqa: F401 (re-exported: the tests and users read them here)
    LABELS,
    METHODS,
    OPTIONAL_METHODS,
    SEED_INDEPENDENT,
    markdown,
    method_specs,
    read_run,
    run_method,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD = ROOT / "examples" / "text_to_image" / "build"
DEFAULT_SPEC_FILE = ROOT / "examples" / "text_to_image" / "spec.yaml"
# Used when there is no spec file: the settings of the tiny end-to-end example (two specialists, CLIP fitness).
DEFAULT_SPEC: dict[str, Any] = {
    "models": [{"model": "build/en"}, {"model": "build/ja"}],
    "genome": {"kind": "blend", "block_size": 1024},
    "evolve": {"algorithm": "m2n2", "budget": 60, "seed": 42, "log_every": 5, "checkpoint_every_steps": 5},
    "evaluate": {
        "kind": "clip",
        "model": "build/judge",
        "prompts": "build/prompts/fit.jsonl",
        "test_prompts": "build/prompts/test.jsonl",
        "images_per_prompt": 2,
        "num_inference_steps": 3,
        "batch_size": 4,
        "scheduler": "DDIMScheduler",
    },
}
# The evaluator's data, taken from the build folder whatever the spec names.
BUILD_FILES = {"model": "judge", "prompts": "prompts/fit.jsonl", "test_prompts": "prompts/test.jsonl"}


def load_base_spec(spec_file: Path | None) -> dict[str, Any]:
    """The spec the methods are derived from: `spec_file`'s mapping, else `DEFAULT_SPEC`."""
    if spec_file is None:
        return copy.deepcopy(DEFAULT_SPEC)
    return yaml.safe_load(Path(spec_file).read_text())


def with_build(spec: dict[str, Any], build: Path) -> dict[str, Any]:
    """The spec pointed at `build`: each model is the build's folder of the same name (`build/en` -> BUILD/en), the
    evaluator's judge and prompts are the build's; every other setting is kept.

    Raises:
        ValueError: the spec's evaluate section is not one clip section, or a model is missing from the build.
    """
    spec = copy.deepcopy(spec)
    build = Path(build).resolve()
    evaluate = spec.get("evaluate")
    if not isinstance(evaluate, dict) or evaluate.get("kind") != "clip":
        raise ValueError("the spec's evaluate section must be one {kind: clip, ...} section")
    for key, relative in BUILD_FILES.items():
        evaluate[key] = str(build / relative)
    models = []
    for entry in spec["models"]:
        ref = entry["model"] if isinstance(entry, dict) else entry
        folder = build / Path(str(ref)).name
        if not folder.is_dir():
            raise ValueError(f"model {ref!r}: {folder} does not exist in the build")
        models.append({**entry, "model": str(folder)} if isinstance(entry, dict) else {"model": str(folder)})
    spec["models"] = models
    return spec


def compare(
    build: Path,
    out: Path,
    *,
    spec: dict[str, Any],
    methods: Sequence[str] = METHODS,
    budget: int = 60,
    runs: int = 3,
    seed: int = 42,
) -> dict[str, Any]:
    """Run every method on `build` and return the summary (also written to `out/t2i_compare.json`)."""
    from hf_m2n2.outdir import atomic_write_text

    specs = method_specs(with_build(spec, build), methods, budget, seed)
    results = {}
    for method, method_spec in specs.items():
        count = 1 if method in SEED_INDEPENDENT else runs
        dirs = run_method(method_spec, out / "specs" / f"{method}.yaml", out / "runs" / method, count)
        results[method] = [read_run(d, method) for d in dirs]
    summary = summarize(results)
    summary["settings"] = {
        "build": str(Path(build).resolve()),
        "budget": budget,
        "runs": runs,
        "seed": seed,
        "evaluate": specs[methods[0]]["evaluate"],
    }
    atomic_write_text(out / "t2i_compare.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path, nargs="?", default=DEFAULT_BUILD, help="the built demo folder")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "t2i_compare", help="runs, specs, JSON")
    parser.add_argument(
        "--spec",
        default=str(DEFAULT_SPEC_FILE) if DEFAULT_SPEC_FILE.is_file() else "",
        help="the spec whose models, genome, evolve and evaluate settings every method shares (default: "
        "examples/text_to_image/spec.yaml if it exists; '': the script's DEFAULT_SPEC)",
    )
    parser.add_argument(
        "--evaluate", default="{}", help="JSON overriding evaluate settings, e.g. '{\"seed\": 1}'"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS + OPTIONAL_METHODS}"
    )
    parser.add_argument("--budget", type=int, default=60, help="forward passes per run (default 60)")
    parser.add_argument("--runs", type=int, default=3, help="runs per method, run seeds seed..seed+runs-1")
    parser.add_argument("--seed", type=int, default=42, help="the first run seed (default 42)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)

    spec = load_base_spec(Path(args.spec) if args.spec else None)
    spec["evaluate"] = {**spec.get("evaluate", {}), **json.loads(args.evaluate)}
    methods = [m for m in args.methods.split(",") if m]
    summary = compare(
        args.build, args.out, spec=spec, methods=methods, budget=args.budget, runs=args.runs, seed=args.seed
    )
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(markdown(summary))
    if not summary["seed_rows_agree"]:
        print("note: the seed models' rows differ between runs (see the JSON)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
