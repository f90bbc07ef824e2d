"""What the same-budget comparison scripts share (`bench/t2i_compare.py`, `bench/agent_compare.py`): one evolve spec
per method derived from a base spec, seeded runs through `hf_m2n2.evolve.runs` (the API behind `hf-m2n2 evolve
--runs N`; finished runs are reused, interrupted ones resumed), and the table of the runs' held-out `report.json`.

Methods: `m2n2` (the spec itself), `no_split_point` / `no_attraction` (M2N2 ablations), `ga` (M2N2 without
competition and attraction: the project's GA), `sweep` (the SLERP sweep between the first two models, `budget` evenly
spaced t; independent of the run seed), `evomerge_ps` (CMA-ES over per-layer linear weights of every model; per UNet
block for pipelines) and `evomerge_ps_slerp` (CMA-ES over slerp's t per layer or block).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

METHODS = ("m2n2", "no_split_point", "no_attraction", "sweep", "evomerge_ps")
OPTIONAL_METHODS = ("evomerge_ps_slerp", "ga")
SEED_INDEPENDENT = ("sweep",)  # every run seed gives the same run: one is enough
LABELS = {
    "m2n2": "M2N2",
    "no_split_point": "M2N2 without split point",
    "no_attraction": "M2N2 without attraction",
    "sweep": "SLERP sweep between the seeds",
    "evomerge_ps": "CMA-ES over per-block linear weights (evomerge_ps)",
    "evomerge_ps_slerp": "CMA-ES over per-block SLERP t (evomerge_ps)",
    "ga": "GA (M2N2 without competition and attraction)",
}


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
        elif method == "ga":
            variant["evolve"] = _kept_settings(evolve, "ga")
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


def summarize(
    results: dict[str, list[dict[str, Any]]], labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Per method: mean, min and max over its runs of every column; the seed models' rows (from the first method
    that reports them; `seed_rows_agree` says whether every run of every method scored them the same)."""
    methods = {}
    seeds: dict[str, dict[str, float]] = {}
    agree = True
    for method, runs in results.items():
        columns = list(runs[0]["scores"])
        table = np.array([[run["scores"][c] for c in columns] for run in runs])
        methods[method] = {
            "label": (labels or LABELS)[method],
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
