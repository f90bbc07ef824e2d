"""The evolution loop and `hf-m2n2 evolve`/`plot`: failures scored 0, determinism, SIGKILL + resume, specs, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import sigkill_evolve

from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate import EvaluationError, PythonEvaluator
from hf_m2n2.evolve.executor import LocalExecutor
from hf_m2n2.evolve.loop import LoopSettings, load_archive, run_loop
from hf_m2n2.evolve.m2n2 import M2N2, M2N2Config
from hf_m2n2.evolve.spec import load_evolve_spec
from hf_m2n2.genomes.dense import DenseTarget, DenseVectorOps

torch.set_num_threads(1)

DIGITS_EVAL = {
    "kind": "python",
    "callable": "hf_m2n2.demo.tasks.digits:train_scores",
    "test_callable": "hf_m2n2.demo.tasks.digits:test_accuracy",
}


def digits_spec(budget: int, **evolve) -> dict:
    return {
        "name": "test-m2n2",
        "genome": {"kind": "dense", "size": 19210, "seeds": {"kind": "random", "count": 2, "std": 0.01}},
        "evolve": {"algorithm": "m2n2", "budget": budget, "seed": 42, "log_every": 50, **evolve},
        "evaluate": DIGITS_EVAL,
    }


class FlakyScores:
    """Per-example scores = sign pattern of the first 32 parameters; raises or returns NaN on some calls."""

    def __init__(self, fail_first: bool = False):
        self.calls = 0
        self.fail_first = fail_first

    def __call__(self, params: torch.Tensor) -> np.ndarray:
        self.calls += 1
        if self.fail_first or self.calls % 7 == 0:
            raise RuntimeError("CUDA out of memory (simulated)")
        if self.calls % 11 == 0:
            return np.full(32, np.nan)
        return (params[:32] > 0).numpy().astype(np.float32)


def toy_run(tmp_path: Path, name: str, evaluator_fn, budget: int = 300, seed: int = 0) -> dict:
    ops = DenseVectorOps(64)
    rng = np.random.default_rng(seed)
    seeds = [ops.random(0.1, rng) for _ in range(2)]
    strategy = M2N2(ops, seeds, M2N2Config(archive_size=6, mutation_std=0.05), rng_seed=seed)
    run_dir = tmp_path / name
    run_dir.mkdir()
    settings = LoopSettings(budget=budget, log_every=25, checkpoint_every_steps=100, progress=False)
    executor = LocalExecutor(ops, DenseTarget(), PythonEvaluator(evaluator_fn))
    return run_loop(strategy, ops, executor, run_dir, settings, info={"seed": seed})


def test_failed_evaluations_score_zero_and_the_run_goes_on(tmp_path, caplog):
    summary = toy_run(tmp_path, "flaky", FlakyScores())
    assert summary["forward_passes"] == 300
    # calls 7, 14, ... raise and 11, 22, ... return NaN (77 and 154 counted once)
    assert summary["failures"] == 300 // 7 + 300 // 11 - 300 // 77
    assert summary["failure_examples"][0]["error"].startswith("RuntimeError: CUDA out of memory")
    assert "scored 0 on every example" in caplog.text
    assert summary["best_train"] > 0.6
    history = [json.loads(line) for line in (tmp_path / "flaky" / "history.jsonl").read_text().splitlines()]
    assert [h["passes"] for h in history] == list(range(25, 301, 25))
    assert history[-1]["test"] is None  # no test callable


def test_a_broken_evaluator_stops_at_the_first_candidate(tmp_path):
    with pytest.raises(EvaluationError, match="first candidate could not be evaluated: RuntimeError"):
        toy_run(tmp_path, "broken", FlakyScores(fail_first=True))


def test_same_seed_same_run(tmp_path):
    def scores(params):
        return (params[:32] > 0).numpy().astype(np.float32)

    a = toy_run(tmp_path, "a", scores, seed=3)
    b = toy_run(tmp_path, "b", scores, seed=3)
    toy_run(tmp_path, "c", scores, seed=4)
    assert _comparable(a) == _comparable(b)
    assert (tmp_path / "a" / "history.jsonl").read_bytes() == (tmp_path / "b" / "history.jsonl").read_bytes()
    _assert_same_archive(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "history.jsonl").read_bytes() != (tmp_path / "c" / "history.jsonl").read_bytes()


def _comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timing"}


def _assert_same_archive(a: Path, b: Path) -> None:
    left, right = load_archive(a), load_archive(b)
    assert left["best"] == right["best"] and len(left["members"]) == len(right["members"])
    for x, y in zip(left["members"], right["members"]):
        np.testing.assert_array_equal(x["genome"], y["genome"])
        np.testing.assert_array_equal(x["scores"], y["scores"])
        assert x["lineage"] == y["lineage"] and x["extra"] == y["extra"]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, write_spec, cli):
    spec = write_spec(digits_spec(800, archive_size=8, checkpoint_every_steps=200, checkpoint_every_s=None))
    killed = tmp_path / "killed"
    at_kill = sigkill_evolve(spec, killed)
    assert 200 <= at_kill < 800

    code, out, err = cli("evolve", "--resume", killed, "-q")
    assert code == 0, err
    code, out, err = cli("evolve", spec, "--out", tmp_path / "straight", "-q")
    assert code == 0, err

    resumed = json.loads((killed / "summary.json").read_text())
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert resumed["timing"]["sessions"] == 2 and straight["timing"]["sessions"] == 1
    assert _comparable(resumed) == _comparable(straight)
    assert (killed / "history.jsonl").read_bytes() == (tmp_path / "straight" / "history.jsonl").read_bytes()
    _assert_same_archive(killed, tmp_path / "straight")
    # resuming a finished run changes nothing
    code, _, err = cli("evolve", "--resume", killed, "-q")
    assert code == 0 and json.loads((killed / "summary.json").read_text()) == resumed


def test_runs_and_plot(tmp_path, write_spec, cli):
    spec = write_spec(digits_spec(150, archive_size=5))
    code, out, err = cli("evolve", spec, "--out", tmp_path / "m2n2", "--runs", "2")
    assert code == 0, err
    summaries = [json.loads((tmp_path / "m2n2" / f"run-{r}" / "summary.json").read_text()) for r in range(2)]
    assert [s["seed"] for s in summaries] == [42, 43]
    assert "run-1" in out and "test" in out
    code, out, err = cli("evolve", "--resume", tmp_path / "m2n2", "--runs", "3", "-q")  # one more run
    assert code == 0, err
    assert json.loads((tmp_path / "m2n2" / "run-2" / "summary.json").read_text())["seed"] == 44
    single = write_spec(digits_spec(100, archive_size=5, alpha=0.0), name="ga.yaml")
    assert cli("evolve", single, "--out", tmp_path / "other", "-q")[0] == 0

    png = tmp_path / "figure.png"
    code, out, err = cli("plot", tmp_path / "m2n2", tmp_path / "other", "-o", png, "--labels", "M2N2,alpha 0")
    assert code == 0, err
    from matplotlib.image import imread

    pixels = imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pixels.shape[0] > 100
    assert pixels[..., :3].std() > 0.05  # lines, axes and text, not a blank canvas

    history = tmp_path / "other" / "history.jsonl"
    damaged = bytearray(history.read_bytes())
    damaged[2] = ord("#")  # same length, one byte changed
    history.write_bytes(bytes(damaged))
    code, out, err = cli("plot", tmp_path / "other", "-o", tmp_path / "again.png")
    assert code == 2 and not (tmp_path / "again.png").exists()
    assert err.strip().splitlines() == [f"error: {history}: line 1 is damaged (not a history record)"]


def test_spec_errors_name_the_yaml_path(tmp_path, write_spec, cli):
    def error(spec) -> str:
        with pytest.raises(SpecError) as info:
            load_evolve_spec(write_spec(spec))
        return str(info.value)

    assert (
        error(digits_spec(10, archive_sise=3))
        == "evolve.archive_sise: unknown key (did you mean archive_size?)"
    )
    assert error(digits_spec(10, archive_size=0)).startswith("evolve.archive_size: Input should be greater")
    assert error(digits_spec(10, algorithm="ga", alpha=1.0)).startswith(
        "evolve.alpha: ga is M2N2 with alpha 0"
    )
    assert error(digits_spec(10, algorithm="cma_es", attraction=False)).startswith(
        "evolve.attraction: not used"
    )
    assert error(digits_spec(10, algorithm="map_elites")).startswith("evaluate.groups_callable: required")
    bad_seeds = digits_spec(10)
    bad_seeds["genome"]["seeds"] = {"kind": "random", "count": 2, "stdev": 1}
    assert error(bad_seeds) == "genome.seeds.stdev: unknown key (did you mean std?)"
    bad_callable = digits_spec(10)
    bad_callable["evaluate"] = {**DIGITS_EVAL, "callable": "no colon"}
    assert error(bad_callable).startswith("evaluate.callable: expected 'module:function'")
    del bad_callable["evolve"]
    assert error(bad_callable) == "evolve: required"

    missing = digits_spec(10)
    missing["evaluate"] = {**DIGITS_EVAL, "callable": "hf_m2n2.tasks.digits:no_such_function"}
    code, out, err = cli("evolve", write_spec(missing, name="missing.yaml"), "--out", tmp_path / "x")
    assert code == 2 and err.strip().splitlines() == [
        "error: evaluate.callable: 'hf_m2n2.tasks.digits' has no attribute 'no_such_function'"
    ]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    code, _, err = cli("evolve", write_spec(digits_spec(10)), "--out", tmp_path / "busy")
    assert code == 2 and "already exists and is not empty" in err
    code, _, err = cli("evolve", "--resume", tmp_path / "busy")
    assert code == 2 and "not an hf-m2n2 evolve run directory" in err
