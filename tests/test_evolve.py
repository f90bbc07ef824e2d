"""M2N2's pieces on hand-made inputs: competition, attraction, parent sampling, replacement, SLERP crossover."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_m2n2.evolve.build import build_strategy
from hf_m2n2.evolve.checkpoint import load_state, pack, save_state, unpack
from hf_m2n2.evolve.competition import attraction, competition_weights, fitness
from hf_m2n2.evolve.config import EvolveConfig
from hf_m2n2.evolve.m2n2 import M2N2, M2N2Config
from hf_m2n2.evolve.strategy import Candidate, Lineage, sample_index
from hf_m2n2.genomes.dense import DenseVectorOps, slerp_coefficients

torch.set_num_threads(1)

# three models, three examples: example 0 solved by models 0 and 1, example 1 by 0, example 2 by 2
SCORES = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_fitness_is_shared_resources():
    weights = competition_weights(SCORES)  # z = [2, 1, 1]
    np.testing.assert_allclose(weights, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(fitness(SCORES, weights), [1.5, 0.5, 1.0])


def test_alpha_epsilon_and_capacity():
    np.testing.assert_allclose(fitness(SCORES, competition_weights(SCORES, alpha=2.0)), [1.25, 0.25, 1.0])
    np.testing.assert_allclose(fitness(SCORES, competition_weights(SCORES, alpha=0.0)), SCORES.sum(1))
    eps = competition_weights(SCORES, epsilon=0.5)
    np.testing.assert_allclose(eps, [1 / 2.5, 1 / 1.5, 1 / 1.5])
    # an example nobody solves: z = 0 counts as 1 (reference), or z = epsilon
    unsolved = np.zeros((2, 1))
    assert competition_weights(unsolved)[0] == 1.0
    assert competition_weights(unsolved, epsilon=0.25)[0] == 4.0
    # continuous scores, capacity = best score on each example
    soft = np.array([[0.5, 0.2], [0.25, 0.0]])
    weights = competition_weights(soft, capacity="max")
    np.testing.assert_allclose(weights, [0.5 / 0.75, 0.2 / 0.2])
    # the child competes too: it adds to z and to the capacity
    child = np.array([1.0, 0.0])
    np.testing.assert_allclose(competition_weights(soft, capacity="max", child=child), [1.0 / 1.75, 1.0])


def test_attraction_counts_what_parent_one_lacks():
    weights = competition_weights(SCORES)
    # F = [[.5, 1, 0], [.5, 0, 0], [0, 0, 1]]
    np.testing.assert_allclose(attraction(SCORES, weights, 0), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(attraction(SCORES, weights, 1), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(attraction(SCORES, weights, 2), [1.5, 0.5, 0.0])


def test_sample_index_is_proportional_and_handles_zero_weights():
    rng = np.random.default_rng(0)
    draws = np.bincount([sample_index(np.array([1.0, 0.0, 3.0]), rng) for _ in range(4000)], minlength=3)
    assert draws[1] == 0
    assert abs(draws[2] / draws.sum() - 0.75) < 0.03
    uniform = np.bincount([sample_index(np.zeros(4), rng) for _ in range(4000)], minlength=4)
    assert uniform.min() > 850


def _strategy(scores: np.ndarray, **config) -> M2N2:
    """An M2N2 whose archive holds one genome per row of `scores` (genome i is the constant vector i + 1)."""
    ops = DenseVectorOps(4)
    seeds = [np.full(4, i + 1.0, dtype=np.float32) for i in range(len(scores))]
    strategy = M2N2(ops, seeds, M2N2Config(archive_size=len(scores), **config), rng_seed=0)
    for row in scores:
        strategy.tell(strategy.ask(), row)
    return strategy


def test_seeds_enter_empty_slots_and_a_worst_child_is_discarded():
    scores = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    strategy = _strategy(scores)
    assert strategy.occupied.all() and strategy.accepted == 3
    # z with the child = [3, 1, 1, 2]: fitness [4/3, 5/6, 3/2] and 1/3 for the child -> discarded
    strategy.tell(
        Candidate(np.zeros(4, np.float32), Lineage(99, "crossover", (0, 1), 0.5, 2)), np.array([1.0, 0, 0, 0])
    )
    assert strategy.discarded == 1
    np.testing.assert_array_equal(strategy.scores, scores)
    # z = [2, 2, 2, 3]: fitness [1, 5/6, 5/6] and 4/3 for the child: the first worst (member 1) is replaced
    strategy.tell(
        Candidate(np.ones(4, np.float32), Lineage(100, "crossover", (0, 2), 0.5, 2)), np.array([0.0, 1, 1, 1])
    )
    np.testing.assert_array_equal(strategy.scores[1], [0.0, 1, 1, 1])
    assert strategy.lineages[1].id == 100 and strategy.discarded == 1


def test_a_child_tied_with_the_worst_replaces_it():
    strategy = _strategy(np.array([[1.0, 0.0], [0.0, 1.0]]))
    strategy.tell(Candidate(np.zeros(4, np.float32), Lineage(7, "crossover")), np.array([1.0, 0.0]))
    # fitness with the child: [0.5, 1.0] for the members, 0.5 for the child: the tie replaces member 0
    assert strategy.lineages[0].id == 7 and strategy.discarded == 0


def test_parent_two_by_attraction_and_the_zero_attraction_fallback():
    # member 0 solves everything: when it is parent 1, every attraction is 0 -> fitness-proportional
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    strategy = _strategy(scores, mutation_std=0.0)
    weights = competition_weights(scores)
    fit = fitness(scores, weights)
    pairs = []
    for _ in range(3000):
        candidate = strategy.ask()
        pairs.append(candidate.lineage.parents)
        assert np.isfinite(candidate.genome).all()
    pairs = np.array(pairs)
    second_after_0 = np.bincount(pairs[pairs[:, 0] == 0, 1], minlength=3)
    np.testing.assert_allclose(second_after_0 / second_after_0.sum(), fit / fit.sum(), atol=0.04)
    # parent 1 = member 1: only member 0 holds what it lacks (examples 1-3); member 2 holds example 1
    second_after_1 = np.bincount(pairs[pairs[:, 0] == 1, 1], minlength=3)
    pull = attraction(scores, weights, 1)
    np.testing.assert_allclose(second_after_1 / second_after_1.sum(), pull / pull.sum(), atol=0.05)


def test_ga_is_m2n2_without_competition_and_attraction():
    ops = DenseVectorOps(8)
    ga = build_strategy(
        EvolveConfig(algorithm="ga", budget=10),
        ops,
        [np.ones(8, np.float32)],
        seed=np.random.SeedSequence(1),
        mutation_std=0,
    )
    assert ga.name == "ga" and ga.config.alpha == 0.0 and ga.config.attraction is False

    def run(strategy):
        for _ in range(60):
            candidate = strategy.ask()
            strategy.tell(candidate, (candidate.genome > 0).astype(float))
        return strategy

    rng = np.random.default_rng(0)
    seeds = [ops.random(1.0, rng) for _ in range(2)]
    common = dict(archive_size=5, mutation_std=0.1)
    a = run(
        build_strategy(
            EvolveConfig(algorithm="ga", budget=60, archive_size=5),
            ops,
            seeds,
            seed=np.random.SeedSequence(3),
            mutation_std=0.1,
        )
    )
    b = run(M2N2(ops, seeds, M2N2Config(alpha=0.0, attraction=False, **common), np.random.SeedSequence(3)))
    np.testing.assert_array_equal(a.scores, b.scores)
    assert all(np.array_equal(x, y) for x, y in zip(a.genomes, b.genomes))


def _slerp(t: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cos = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
    omega = math.acos(np.clip(cos, -1, 1))
    return (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)


@pytest.mark.parametrize("split", [0, 3, 10])
def test_crossover_is_split_point_slerp(split):
    rng = np.random.default_rng(split)
    x, y = rng.standard_normal(10), rng.standard_normal(10)
    tx, ty = x.astype(np.float32), y.astype(np.float32)
    w = 0.3
    glob = DenseVectorOps(10, "global").crossover(tx, ty, w, split)
    # global: one angle from the full vectors, t = w before the split and 1 - w after it
    want = np.concatenate([_slerp(w, x, y)[:split], _slerp(1 - w, x, y)[split:]])
    np.testing.assert_allclose(glob, want, rtol=1e-5, atol=1e-6)
    # segment: each segment's own angle
    seg = DenseVectorOps(10, "segment").crossover(tx, ty, w, split)
    parts = []
    if split > 0:
        parts.append(_slerp(w, x[:split], y[:split]))
    if split < 10:
        parts.append(_slerp(1 - w, x[split:], y[split:]))
    np.testing.assert_allclose(seg, np.concatenate(parts), rtol=1e-5, atol=1e-6)
    if 0 < split < 10:
        assert not np.allclose(glob, seg)


def test_crossover_falls_back_to_linear_when_sin_is_tiny():
    x = np.array([1.0, 2.0, 3.0], np.float32)
    ops = DenseVectorOps(3)
    # parallel vectors: omega = 0 -> (1 - t) x + t y
    np.testing.assert_allclose(ops.crossover(x, 2 * x, 0.25, 3), (0.75 + 0.5) * x, rtol=1e-6)
    assert slerp_coefficients(0.25, 0.0, 1.0, 0.0) == (0.75, 0.25)  # a zero vector
    a, b = slerp_coefficients(0.5, 1.0, 1.0, 0.0)  # orthogonal unit vectors
    assert a == pytest.approx(math.sqrt(0.5)) and b == pytest.approx(math.sqrt(0.5))


def test_mutation_and_random_init_draw_from_the_given_generator():
    ops = DenseVectorOps(1000)
    x = np.zeros(1000, np.float32)
    a = ops.mutate(x, 0.01, np.random.default_rng(5))
    b = ops.mutate(x, 0.01, np.random.default_rng(5))
    assert np.array_equal(a, b) and not np.array_equal(a, x) and not x.any()
    assert abs(float(a.std()) - 0.01) < 0.001
    r = ops.random(0.5, np.random.default_rng(1))
    assert abs(float(r.std()) - 0.5) < 0.05


def test_state_dict_round_trip_continues_identically(tmp_path):
    ops = DenseVectorOps(16)
    seeds = [ops.random(0.1, np.random.default_rng(i)) for i in range(2)]

    def step(strategy, n):
        for _ in range(n):
            candidate = strategy.ask()
            strategy.tell(candidate, (candidate.genome > 0).astype(float))

    config = M2N2Config(archive_size=4, mutation_std=0.05)
    a = M2N2(ops, seeds, config, rng_seed=7)
    step(a, 30)
    save_state(tmp_path / "state.npz", a.state_dict())
    b = M2N2(ops, seeds, config, rng_seed=123)
    b.load_state_dict(load_state(tmp_path / "state.npz"))
    step(a, 30)
    step(b, 30)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert [lin.to_dict() for lin in a.lineages] == [lin.to_dict() for lin in b.lineages]


def test_pack_rejects_unknown_types_and_round_trips():
    tree = {"a": np.arange(3), "b": [1, 2.5, None, "x", {"c": np.ones((2, 2))}], "d": (True, np.int64(4))}
    meta, arrays = pack(tree)
    back = unpack(meta, arrays)
    np.testing.assert_array_equal(back["a"], np.arange(3))
    assert back["b"][:4] == [1, 2.5, None, "x"] and back["d"] == [True, 4]
    with pytest.raises(TypeError, match="state.x"):
        pack({"x": object()})
