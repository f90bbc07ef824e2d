"""The digits task (the paper's small-scale experiment) and the baselines running on it for a few hundred passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_m2n2.demo.tasks import digits
from hf_m2n2.errors import HfM2n2Error
from hf_m2n2.evolve.build import build_run
from hf_m2n2.evolve.checkpoint import load_state, save_state
from hf_m2n2.evolve.cma_es import CMAES
from hf_m2n2.evolve.loop import LoopSettings, run_loop
from hf_m2n2.evolve.spec import parse_evolve_spec
from hf_m2n2.genomes.dense import DenseVectorOps

torch.set_num_threads(1)

EVALUATE = {
    "kind": "python",
    "callable": "hf_m2n2.demo.tasks.digits:train_scores",
    "test_callable": "hf_m2n2.demo.tasks.digits:test_accuracy",
    "groups_callable": "hf_m2n2.demo.tasks.digits:parity_groups",
}
RANDOM_SEEDS = {"kind": "random", "count": 2, "std": 0.01}
PRETRAINED_SEEDS = {"kind": "python", "callable": "hf_m2n2.demo.tasks.digits:pretrained_seeds"}


def test_split_model_and_scores():
    data = digits.load_data()
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert float(data.x_train.max()) == 16.0  # raw pixel values
    assert digits.NUM_PARAMS == 19210
    params = torch.randn(digits.NUM_PARAMS, generator=torch.Generator().manual_seed(0)) * 0.1
    w1 = params[:16384].view(64, 256)
    b1 = params[16384:16640]
    w2 = params[16640:19200].view(256, 10)
    b2 = params[19200:]
    logits = torch.relu(data.x_train @ w1 + b1) @ w2 + b2
    expected = (logits.argmax(1) == data.y_train).numpy().astype(np.float32)
    np.testing.assert_array_equal(digits.train_scores(params), expected)
    np.testing.assert_array_equal(digits.train_scores(params.numpy()), expected)
    test = (torch.relu(data.x_test @ w1 + b1) @ w2 + b2).argmax(1) == data.y_test
    assert digits.test_accuracy(params) == pytest.approx(float(test.float().mean()))
    groups = digits.parity_groups()
    assert groups.shape == (1437,) and set(groups) == {0, 1}
    assert (groups == (data.y_train.numpy() % 2 == 0)).all()
    with pytest.raises(ValueError, match="19210"):
        digits.train_scores(torch.zeros(10))


def test_pretrained_seeds_each_know_their_half():
    low, high = digits.pretrained_seeds()
    again = digits.pretrained_seeds()
    np.testing.assert_array_equal(low, again[0])
    labels = digits.load_data().y_train.numpy()
    low_scores, high_scores = digits.train_scores(low), digits.train_scores(high)
    assert low_scores[labels < 5].mean() > 0.8 > low_scores[labels >= 5].mean()
    assert high_scores[labels >= 5].mean() > 0.8 > high_scores[labels < 5].mean()


def _run(tmp_path, name: str, budget: int, evolve: dict, seeds: dict) -> list[dict]:
    spec = parse_evolve_spec(
        {
            "genome": {"kind": "dense", "size": digits.NUM_PARAMS, "seeds": seeds},
            "evolve": {"budget": budget, **evolve},
            "evaluate": EVALUATE,
        }
    )
    parts = build_run(spec, 42)
    run_dir = tmp_path / name
    run_dir.mkdir()
    settings = LoopSettings(budget=budget, log_every=50, checkpoint_every_s=None, progress=False)
    run_loop(parts.strategy, parts.ops, parts.executor, run_dir, settings)
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "evolve",
    [
        {"algorithm": "cma_es", "cma": {"diagonal": True}},
        {"algorithm": "map_elites"},
        {"algorithm": "m2n2", "archive_size": 10},
    ],
    ids=["cma_es_diagonal", "map_elites", "m2n2"],
)
def test_from_scratch_baselines_improve(tmp_path, evolve):
    history = _run(tmp_path, evolve["algorithm"], 400, evolve, RANDOM_SEEDS)
    assert len(history) == 8 and history[-1]["passes"] == 400
    assert history[-1]["best_train"] > history[0]["best_train"] + 0.05
    assert history[-1]["test"] > 0.2


def test_sweep_between_pretrained_seeds_beats_both(tmp_path):
    low, high = digits.pretrained_seeds()
    seeds_best = max(digits.train_scores(low).mean(), digits.train_scores(high).mean())
    history = _run(tmp_path, "sweep", 200, {"algorithm": "sweep"}, PRETRAINED_SEEDS)
    assert (
        history[-1]["best_train"] > seeds_best + 0.1 and history[-1]["best_train"] > history[0]["best_train"]
    )


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diagonal"])
def test_cma_es_resumes_identically_from_a_checkpoint_without_pickle(tmp_path, diagonal):
    ops = DenseVectorOps(12)
    target = np.linspace(-1, 1, 12)

    def scores(genome: np.ndarray) -> np.ndarray:
        return np.exp(-((genome - target) ** 2))

    def step(strategy, n):
        for _ in range(n):
            candidate = strategy.ask()
            strategy.tell(candidate, scores(candidate.genome))

    x0 = np.zeros(12, np.float32)
    a = CMAES(ops, x0, popsize=6, sigma0=0.3, diagonal=diagonal, rng_seed=1)
    step(a, 15)  # mid-generation
    save_state(tmp_path / "cma.npz", a.state_dict())
    saved = load_state(tmp_path / "cma.npz")
    assert saved["told"].shape == (2, 6) and len(saved["fvalues"]) == 3
    b = CMAES(ops, x0, popsize=6, sigma0=0.3, diagonal=diagonal, rng_seed=1)
    b.load_state_dict(saved)
    step(a, 300)
    step(b, 300)
    np.testing.assert_array_equal(a.best().genome, b.best().genome)
    np.testing.assert_array_equal(a.cma_state()["C"], b.cma_state()["C"])
    assert a.stats() == b.stats() and a.stats()["best"] > scores(x0).mean() + 0.2
    with pytest.raises(HfM2n2Error, match="other cma_es settings or another seed"):
        CMAES(ops, x0, popsize=6, sigma0=0.3, diagonal=diagonal, rng_seed=2).load_state_dict(saved)
    with pytest.raises(HfM2n2Error, match="unsupported cma_es checkpoint format 1"):
        CMAES(ops, x0, popsize=6, sigma0=0.3, diagonal=diagonal, rng_seed=1).load_state_dict(
            {**saved, "format": 1}
        )


def test_old_module_paths_are_aliases_of_the_demo_package():
    """Specs and commands naming the paths from before `hf_m2n2.demo` get the very same objects (one module state)."""
    import hf_m2n2.specialists
    import hf_m2n2.tasks.digits
    import hf_m2n2.tasks.likelihood
    import hf_m2n2.toy
    from hf_m2n2.demo import specialists, toy
    from hf_m2n2.demo.tasks import likelihood
    from hf_m2n2.evaluate.python import resolve_callable

    assert hf_m2n2.tasks.digits.train_scores is digits.train_scores
    assert hf_m2n2.tasks.digits.load_data is digits.load_data  # one lru_cache, not a second copy
    assert resolve_callable("hf_m2n2.tasks.digits:train_scores", "x") is digits.train_scores
    assert resolve_callable("hf_m2n2.tasks.digits:pretrained_seeds", "x") is digits.pretrained_seeds
    for old, new in [
        (hf_m2n2.tasks.digits, digits),
        (hf_m2n2.tasks.likelihood, likelihood),
        (hf_m2n2.specialists, specialists),
        (hf_m2n2.toy, toy),
    ]:
        assert old.__all__ and all(getattr(old, name) is getattr(new, name) for name in old.__all__)
