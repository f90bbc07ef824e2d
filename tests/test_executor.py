"""The executor between the loop and the evaluation: an outage stops the run with a checkpoint instead of scoring
zeros, several candidates in flight resume exactly, and strategies take several asks before their tells."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_evolve_loop import _assert_same_archive, _comparable

from hf_m2n2.errors import InfrastructureError
from hf_m2n2.evaluate import PythonEvaluator
from hf_m2n2.evolve.checkpoint import load_state
from hf_m2n2.evolve.cma_es import CMAES
from hf_m2n2.evolve.executor import LocalExecutor
from hf_m2n2.evolve.loop import LoopSettings, run_loop
from hf_m2n2.evolve.m2n2 import M2N2, M2N2Config
from hf_m2n2.genomes.dense import DenseTarget, DenseVectorOps


def _outage_spec(state_dir, down_at: int) -> dict:
    return {
        "name": "outage",
        "genome": {"kind": "dense", "size": 32, "seeds": {"kind": "random", "count": 2, "std": 0.1}},
        "evolve": {"algorithm": "m2n2", "budget": 40, "seed": 3, "log_every": 5, "archive_size": 6},
        "evaluate": {
            "kind": "python",
            "callable": "outage:scores",
            "kwargs": {"state_dir": str(state_dir), "down_at": down_at},
        },
    }


def test_an_outage_stops_the_run_with_a_checkpoint_and_resume_equals_an_uninterrupted_run(
    tmp_path, write_spec, cli
):
    (tmp_path / "calm").mkdir()
    (tmp_path / "stormy").mkdir()
    calm = write_spec(_outage_spec(tmp_path / "calm", down_at=10**9), name="calm.yaml")
    stormy = write_spec(_outage_spec(tmp_path / "stormy", down_at=23), name="stormy.yaml")
    code, _, err = cli("evolve", calm, "--out", tmp_path / "calm-run", "--quiet")
    assert code == 0, err

    code, _, err = cli("evolve", stormy, "--out", tmp_path / "stormy-run", "--quiet")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: http://127.0.0.1:9/score: connection refused; checkpointed, continue with: "
        f"hf-m2n2 evolve --resume {tmp_path / 'stormy-run'}"
    ]
    saved = load_state(tmp_path / "stormy-run" / "checkpoint.npz")
    assert saved["loop"]["passes"] == 22 and saved["loop"]["failures"] == 0  # no zeros entered the archive
    assert len(saved["in_flight"]) == 1 and saved["in_flight"][0]["lineage"]["id"] == 22
    code, _, err = cli("evolve", "--resume", tmp_path / "stormy-run", "--quiet")
    assert code == 2  # still down: stops again, nothing lost
    (tmp_path / "stormy" / "down").unlink()  # the service is back
    code, _, err = cli("evolve", "--resume", tmp_path / "stormy-run", "--quiet")
    assert code == 0, err
    _assert_same_archive(tmp_path / "calm-run", tmp_path / "stormy-run")
    read = lambda run: (tmp_path / run / "history.jsonl").read_text()  # noqa: E731
    assert read("calm-run") == read("stormy-run")
    summaries = [json.loads((tmp_path / r / "summary.json").read_text()) for r in ("calm-run", "stormy-run")]
    assert _comparable(summaries[0]) == {**_comparable(summaries[1]), "spec_hash": summaries[0]["spec_hash"]}


class _Wide(LocalExecutor):
    """A local executor that lets the loop keep three candidates in flight (evaluated in order on collect)."""

    parallelism = 3


class _Outage:
    def __init__(self, at: int | None):
        self.calls, self.at = 0, at

    def __call__(self, params):
        self.calls += 1
        if self.calls == self.at:
            raise InfrastructureError("worker-1", "lost")
        return (params[:16] > 0).numpy().astype(np.float64)


def _wide_run(tmp_path, name, strategy_of, outage_at=None, resume=False):
    ops = DenseVectorOps(24)
    strategy = strategy_of(ops)
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    settings = LoopSettings(budget=45, log_every=5, checkpoint_every_steps=7, progress=False)
    executor = _Wide(ops, DenseTarget(), PythonEvaluator(_Outage(outage_at)))
    return run_loop(strategy, ops, executor, run_dir, settings, resume=resume)


def _m2n2(ops):
    rng = np.random.default_rng(0)
    return M2N2(
        ops, [ops.random(0.1, rng) for _ in range(2)], M2N2Config(archive_size=5, mutation_std=0.05), 1
    )


def _cma(ops):
    return CMAES(ops, np.zeros(24, np.float32), popsize=4, sigma0=0.1, rng_seed=2)


@pytest.mark.parametrize("strategy_of", [_m2n2, _cma], ids=["m2n2", "cma_es"])
def test_candidates_in_flight_are_checkpointed_and_resumed_exactly(tmp_path, strategy_of):
    whole = _wide_run(tmp_path, "whole", strategy_of)
    with pytest.raises(InfrastructureError):
        _wide_run(tmp_path, "cut", strategy_of, outage_at=20)
    saved = load_state(tmp_path / "cut" / "checkpoint.npz")
    assert saved["loop"]["passes"] == 19 and len(saved["in_flight"]) >= 1
    resumed = _wide_run(tmp_path, "cut", strategy_of, resume=True)
    _assert_same_archive(tmp_path / "whole", tmp_path / "cut")
    assert _comparable(whole) == _comparable(resumed)
    assert (tmp_path / "whole" / "history.jsonl").read_text() == (
        tmp_path / "cut" / "history.jsonl"
    ).read_text()


def test_cma_es_waits_for_its_generation_before_asking_the_next():
    ops = DenseVectorOps(6)
    cma = CMAES(ops, np.zeros(6, np.float32), popsize=3, sigma0=0.1, rng_seed=0)
    asked = [cma.ask() for _ in range(3)]
    assert cma.ask() is None  # the generation is asked, none told yet
    assert len({a.genome.tobytes() for a in asked}) == 3 and [a.lineage.id for a in asked] == [0, 1, 2]
    for candidate in asked:
        cma.tell(candidate, np.ones(4))
    assert cma.ask().lineage.id == 3 and cma.generation == 2


def test_a_run_that_cannot_start_leaves_no_directory_behind(tmp_path, write_spec, cli):
    out = tmp_path / "run"
    bad_import = _outage_spec(tmp_path, down_at=10**9)
    bad_import["evaluate"] = {"kind": "python", "callable": "hf_m2n2.nope:scores"}
    code, _, err = cli("evolve", write_spec(bad_import, name="a.yaml"), "--out", out, "--quiet")
    assert code == 2 and "evaluate.callable: cannot import module 'hf_m2n2.nope'" in err and not out.exists()

    broken = _outage_spec(tmp_path, down_at=10**9)
    broken["evaluate"] = {"kind": "python", "callable": "builtins:len"}  # a number, not a score vector
    code, _, err = cli("evolve", write_spec(broken, name="b.yaml"), "--out", out, "--quiet")
    assert code == 2 and "the first candidate could not be evaluated" in err and not out.exists()

    down = _outage_spec(tmp_path, down_at=1)  # an outage keeps the directory: it is resumable
    code, _, err = cli("evolve", write_spec(down, name="c.yaml"), "--out", out, "--quiet")
    assert code == 2 and (out / "checkpoint.npz").is_file()


class _Watching:
    """An evaluator with the optional `candidate_scored` hook: it records what the executor tells it."""

    def __init__(self, size: int):
        self.size, self.calls, self.told = size, 0, []

    def scores(self, params):
        self.calls += 1
        return np.full(self.size, float(params[0]))

    def test_score(self, params):
        return 0.5

    def example_groups(self):
        return None

    def candidate_scored(self, candidate_id, scores):
        self.told.append((candidate_id, list(scores)))


def test_the_candidate_scored_hook_follows_fresh_fitness_scores_only():
    """The hook ties what the evaluator just drew to a candidate: called once per computed fitness, never for a
    cached score or a held-out call; a list of parts gives each part its own scores."""
    from hf_m2n2.evaluate import PartsEvaluator
    from hf_m2n2.evolve.strategy import Candidate, Lineage

    class _Hashed(DenseVectorOps):  # a score cache needs genome hashes (Blend genomes have them)
        def hash(self, genome):
            return genome.tobytes().hex()

    ops = _Hashed(3)
    a, b = _Watching(2), _Watching(1)
    executor = LocalExecutor(ops, DenseTarget(), PartsEvaluator([a, b], [1, 3]), cache_scores=True)
    genomes = [np.array([v, 0, 0], np.float32) for v in (1.0, 2.0, 1.0)]
    for i, genome in enumerate(genomes):
        executor.submit(Candidate(genome, Lineage(i, "seed")))
        assert list(executor.collect().scores) == [genome[0]] * 5  # part a once, part b three times
    executor.score(genomes[1], "test")
    assert a.told == [(0, [1.0, 1.0]), (1, [2.0, 2.0])]  # candidate 2 repeats candidate 0: cached
    assert b.told == [(0, [1.0]), (1, [2.0])]
    assert a.calls == 2  # candidate 2 came from the cache
