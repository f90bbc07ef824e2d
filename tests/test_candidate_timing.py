"""Per-candidate timing of model evolution: seconds writing the candidate (materialize) vs scoring it (evaluate)."""

from __future__ import annotations

import json
import time

import numpy as np
import yaml

from hf_m2n2.evolve.executor import LocalExecutor
from hf_m2n2.evolve.outcome import TIMING
from hf_m2n2.evolve.runs import start_runs


class _Ops:
    def hash(self, genome):
        return str(genome)

    def write(self, genome):
        time.sleep(0.02)
        return genome


class _Inner:
    def scores(self, model):
        time.sleep(0.05)
        return np.array([float(model)])

    def test_score(self, model):
        return float(model)


def test_executor_times_write_and_evaluation_of_cache_misses():
    executor = LocalExecutor(_Ops(), _Ops(), _Inner(), cache_scores=True, timed=True)
    executor.score(1, "fit")
    executor.score(2, "fit")
    executor.score(1, "fit")  # cached: not timed again
    executor.score(2, "test")
    timing = executor.timing.to_dict()
    assert timing["fit"]["count"] == 2 and timing["test"]["count"] == 1 and timing["cache_hits"] == 1
    assert 0.015 <= timing["fit"]["materialize_s_mean"] < timing["fit"]["evaluate_s_mean"]
    assert timing["fit"]["evaluate_s_total"] >= 0.09
    assert [r["kind"] for r in timing["records"]] == ["fit", "fit", "test"]


def test_model_run_writes_timing_json(seeds, tmp_path):
    spec = {
        "name": "timed",
        "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}],
        "genome": {"kind": "blend", "block_size": 2048},
        "evolve": {"algorithm": "m2n2", "budget": 4, "seed": 1, "log_every": 2},
        "evaluate": {
            "kind": "python",
            "callable": "hf_m2n2.demo.tasks.likelihood:token_likelihood",
            "kwargs": {"sequences": [[1, 40, 41, 42, 2], [1, 50, 51, 52, 2]]},
        },
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    start_runs(tmp_path / "spec.yaml", tmp_path / "run", progress=False)
    timing = json.loads((tmp_path / "run" / TIMING).read_text())
    assert 1 <= timing["fit"]["count"] <= 4
    assert all(r["materialize_s"] >= 0 and r["evaluate_s"] >= 0 for r in timing["records"])
