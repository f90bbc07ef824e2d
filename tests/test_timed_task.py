"""The scheduler benchmark's timed fitness: cost and scores are functions of the genome, the cost scale holds."""

import math
import time

import numpy as np
import pytest
import torch

from hf_m2n2.demo.tasks import timed

SIZE = 64


def _genome(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.01, SIZE).astype(np.float32)


def test_same_genome_same_cost_and_scores():
    genome = _genome(1)
    assert timed.cost_seconds(genome, 0.5, 0.75) == timed.cost_seconds(genome.copy(), 0.5, 0.75)
    # the dense target hands the evaluator a torch view: same bytes, same cost and scores
    assert timed.cost_seconds(torch.from_numpy(genome), 0.5, 0.75) == timed.cost_seconds(genome, 0.5, 0.75)
    a = timed.scores(genome, mean_s=0.001)
    b = timed.scores(torch.from_numpy(genome.copy()), mean_s=0.001)
    assert a.tobytes() == b.tobytes()


def test_scores_are_the_closeness_formula_and_vary_with_the_genome():
    genome = _genome(2)
    got = timed.scores(genome, mean_s=0.0, examples=4, width=0.1, target_seed=3, target_std=0.05)
    targets = np.random.default_rng(3).normal(0.0, 0.05, SIZE // 4 * 4)  # four slices of 16, drawn in turn
    want = [
        math.exp(
            -np.sum((genome[i * 16 : (i + 1) * 16].astype(np.float64) - targets[i * 16 : (i + 1) * 16]) ** 2)
            / (16 * 0.01)
        )
        for i in range(4)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    other = timed.scores(_genome(3), mean_s=0.0, examples=4, width=0.1, target_seed=3, target_std=0.05)
    assert got.shape == (4,) and not np.array_equal(got, other)
    assert len(set(got.round(6))) > 1  # per-example scores differ: a search has something to improve
    # a genome on the targets scores 1 everywhere, the held-out figure too
    on_target = targets.astype(np.float32)
    assert timed.test_score(
        on_target, examples=4, width=0.1, target_seed=3, target_std=0.05
    ) == pytest.approx(1.0)


def test_cost_is_lognormal_with_the_given_mean_and_differs_between_genomes():
    costs = np.array([timed.cost_seconds(_genome(seed), 0.5, 0.75) for seed in range(4000)])
    assert costs.mean() == pytest.approx(0.5, rel=0.05)
    assert np.log(costs).std() == pytest.approx(0.75, rel=0.05)
    assert np.median(costs) < costs.mean()  # skewed: most evaluations are shorter than the mean
    assert timed.cost_seconds(_genome(0), 0.5, 0.0) == 0.5


def test_evaluation_sleeps_its_drawn_cost():
    genome = _genome(5)
    expected = timed.cost_seconds(genome, 0.02, 0.75)
    start = time.perf_counter()
    timed.scores(genome, mean_s=0.02, sigma=0.75)
    elapsed = time.perf_counter() - start
    assert expected <= elapsed < expected + 0.05


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="examples must be in"):
        timed.scores(_genome(0), mean_s=0.0, examples=SIZE + 1)
    with pytest.raises(ValueError, match="mean_s and sigma"):
        timed.cost_seconds(_genome(0), -1.0, 0.5)
