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

import numpy as np
import yaml

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
METHODS = ("m2n2", "no_split_point", "no_attraction", "sweep", "evomerge_ps")
OPTIONAL_METHODS = ("evomerge_ps_slerp",)
SEED_INDEPENDENT = ("sweep",)  # every run seed gives the same run: one is enough
LABELS = {
    "m2n2": "M2N2",
    "no_split_point": "M2N2 without split point",
    "no_attraction": "M2N2 without attraction",
    "sweep": "SLERP sweep between the seeds",
    "evomerge_ps": "CMA-ES over per-block linear weights (evomerge_ps)",
    "evomerge_ps_slerp": "CMA-ES over per-block SLERP t (evomerge_ps)",
}


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


def _kept_settings(evolve: dict[str, Any], algorithm: str) -> dict[str, Any]:
    """The evolve settings `algorithm` accepts (M2N2's own are dropped for the sweep and evomerge_ps), as the
    evolve spec's own check decides."""
    from hf_m2n2.errors import SpecError
    from hf_m2n2.evolve.config import EvolveConfig, check_evolve

    kept = {}
    for key, value in evolve.items():
        if key == "algorithm":
            continue
        try:
            check_evolve(EvolveConfig(**{"budget": 1, key: value, "algorithm": algorithm}))
        except SpecError:
            continue
        kept[key] = value
    return {"algorithm": algorithm, **kept}


def method_specs(
    spec: dict[str, Any], methods: Sequence[str], budget: int, seed: int
) -> dict[str, dict[str, Any]]:
    """One evolve spec per method, all with the spec's models and evaluator, `budget` and run seed `seed`.

    Raises:
        ValueError: an unknown method.
    """
    base = copy.deepcopy(spec)
    base.pop("output", None)  # nothing is pushed from a benchmark
    base["evolve"] = {**base.get("evolve", {}), "budget": budget, "seed": seed}
    out = {}
    for method in methods:
        variant = copy.deepcopy(base)
        variant["name"] = method
        evolve = variant["evolve"]
        if method == "m2n2":
            pass
        elif method in ("no_split_point", "no_attraction"):
            evolve[method.removeprefix("no_")] = False
        elif method == "sweep":
            variant["evolve"] = _kept_settings(evolve, "sweep")
            variant["models"] = variant["models"][:2]
        elif method == "evomerge_ps":
            variant["genome"] = {"kind": "method", "method": "linear", "parameters": ["weight"]}
            variant["evolve"] = _kept_settings(evolve, "evomerge_ps")
        elif method == "evomerge_ps_slerp":
            variant["genome"] = {"kind": "method", "method": "slerp", "parameters": ["t"]}
            variant["evolve"] = _kept_settings(evolve, "evomerge_ps")
            variant["models"] = variant["models"][:2]
        else:
            raise ValueError(f"unknown method {method!r} (use {', '.join(METHODS + OPTIONAL_METHODS)})")
        out[method] = variant
    return out


def run_method(spec: dict[str, Any], spec_path: Path, out: Path, runs: int) -> list[Path]:
    """Run (or resume, or reuse) `runs` seeded runs of one method's spec into `out`; returns the run directories.

    The spec is written to `spec_path` (absolute paths inside: it resolves anywhere). A directory holding runs of
    the same spec is resumed (finished runs are kept, more runs are added); one holding another spec is started
    over.
    """
    from hf_m2n2.evolve.runs import RUNS_INFO, SPEC_COPY, resume_runs, start_runs

    text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(text)
    if (out / RUNS_INFO).is_file() and (out / SPEC_COPY).read_text() == text:
        resume_runs(out, runs=max(runs, json.loads((out / RUNS_INFO).read_text())["runs"]), progress=False)
    else:
        start_runs(spec_path, out, runs=runs, overwrite=True, progress=False)
    return [out / f"run-{i}" for i in range(runs)]


def read_run(run_dir: Path, name: str) -> dict[str, Any]:
    """One finished run's held-out scores: the merged model's per group, their mean, the seed models' rows, the run
    seed and the loop wall time."""
    report = json.loads((run_dir / "report.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    merged = report[name]
    return {
        "dir": str(run_dir),
        "seed": summary["seed"],
        "scores": {**merged, "mean": float(np.mean(list(merged.values())))},
        "seeds": {
            model: {**row, "mean": float(np.mean(list(row.values())))}
            for model, row in report.items()
            if model != name
        },
        "wall_time_s": summary["timing"]["wall_time_s"],
    }


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: mean, min and max over its runs of every column; the seed models' rows (from the first method
    that reports them; `seed_rows_agree` says whether every run of every method scored them the same)."""
    methods = {}
    seeds: dict[str, dict[str, float]] = {}
    agree = True
    for method, runs in results.items():
        columns = list(runs[0]["scores"])
        table = np.array([[run["scores"][c] for c in columns] for run in runs])
        methods[method] = {
            "label": LABELS[method],
            "runs": runs,
            "mean": dict(zip(columns, table.mean(axis=0).tolist())),
            "min": dict(zip(columns, table.min(axis=0).tolist())),
            "max": dict(zip(columns, table.max(axis=0).tolist())),
            "wall_time_s": float(np.mean([run["wall_time_s"] for run in runs])),
        }
        for run in runs:
            for model, row in run["seeds"].items():
                if model in seeds and seeds[model] != row:
                    agree = False
                seeds.setdefault(model, row)
    return {"methods": methods, "seed_models": seeds, "seed_rows_agree": agree}


def markdown(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table: methods (mean over runs, min-max), then each run, then the seed models."""
    methods = summary["methods"]
    columns = list(next(iter(methods.values()))["mean"])
    header = ["method", *columns, "loop wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in methods.values():
        cells = [
            f"{entry['mean'][c]:.3f} ({entry['min'][c]:.3f}–{entry['max'][c]:.3f})"
            if len(entry["runs"]) > 1
            else f"{entry['mean'][c]:.3f}"
            for c in columns
        ]
        runs = len(entry["runs"])
        label = f"{entry['label']} ({runs} runs)" if runs > 1 else entry["label"]
        lines.append("| " + " | ".join([label, *cells, f"{entry['wall_time_s']:.0f} s"]) + " |")
    for entry in methods.values():
        for run in entry["runs"]:
            cells = [f"{run['scores'][c]:.3f}" for c in columns]
            label = f"{entry['label']}, run seed {run['seed']}"
            lines.append("| " + " | ".join([label, *cells, f"{run['wall_time_s']:.0f} s"]) + " |")
    for model, row in summary["seed_models"].items():
        cells = [f"{row[c]:.3f}" for c in columns]
        lines.append("| " + " | ".join([f"seed model `{model}`", *cells, "—"]) + " |")
    return "\n".join(lines)


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
