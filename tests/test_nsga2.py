"""NSGA-II (pymoo) as an ask/tell strategy: determinism, numpy's global generator untouched, the Pareto front,
checkpoints resumed mid-generation by replay, tampered checkpoints refused, x0 and argument checks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from hf_m2n2.errors import ContractError, HfM2n2Error
from hf_m2n2.evolve.checkpoint import pack, unpack
from hf_m2n2.evolve.nsga2 import NSGA2

N = 3
GROUPS = np.array([0, 0, 1, 1, 1])


class VectorOps:
    """A bounded vector genome: the genome is the sample itself."""

    size = N

    def from_array(self, values):
        return np.array(values, dtype=np.float64)

    def to_state(self, genome):
        return genome

    def from_state(self, state):
        return np.asarray(state, dtype=np.float64)


def score(genome: np.ndarray) -> np.ndarray:
    """Per-example scores: group 0 (two examples) rewards x near 0, group 1 (three) rewards x near 1."""
    near0, near1 = -np.mean(genome**2), -np.mean((genome - 1.0) ** 2)
    return np.array([near0, near0 + 0.5, near1, near1 - 0.25, near1 + 0.25])


def make(**kwargs) -> NSGA2:
    options = {"lower": 0.0, "upper": 1.0, "popsize": 6, "rng_seed": 3, **kwargs}
    return NSGA2(VectorOps(), GROUPS, **options)


def run(strategy: NSGA2, evaluations: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ask/tell one at a time (a whole generation in flight, as the loop does); the (genome, scores) told."""
    told, in_flight = [], []
    while len(told) < evaluations:
        while len(told) + len(in_flight) < evaluations and (candidate := strategy.ask()) is not None:
            in_flight.append(candidate)
        candidate = in_flight.pop(0)
        scores = score(candidate.genome)
        strategy.tell(candidate, scores)
        told.append((candidate.genome, scores))
    assert not in_flight
    return told


def objectives(scores: np.ndarray) -> np.ndarray:
    return np.array([scores[:2].mean(), scores[2:].mean()])


def test_same_seed_same_asks_other_seed_differs():
    a, b, c = (np.array([g for g, _ in run(make(rng_seed=s), 30)]) for s in (3, 3, 4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all((a >= 0.0) & (a <= 1.0))
    seeded = np.array([g for g, _ in run(make(rng_seed=np.random.SeedSequence(3)), 12)])
    assert np.array_equal(seeded, a[:12])  # an int and its SeedSequence seed the same generator


def test_numpy_global_generator_untouched():
    np.random.seed(123)
    before = np.random.get_state()
    run(make(), 24)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


def test_front_is_the_non_dominated_set_of_everything_evaluated():
    strategy = make(popsize=8)
    told = run(strategy, 80)
    front = strategy.front()
    assert [m.lineage.id for m in front] == [m.lineage.id for m in strategy.members()]
    everything = np.array([objectives(s) for _, s in told])

    def dominated(o):
        return bool(np.any(np.all(everything >= o, axis=1) & np.any(everything > o, axis=1)))

    front_ids = {m.lineage.id for m in front}
    first = {}  # the first candidate of each objective vector: ties keep the earliest
    for i, o in enumerate(everything):
        first.setdefault(tuple(o), i)
    expected = {i for i, o in enumerate(everything) if not dominated(o) and first[tuple(o)] == i}
    assert front_ids == expected and len(expected) > 2  # a trade-off: several points on the front
    for i, m in enumerate(front):
        assert m.extra["front_index"] == i
        assert m.extra["objectives"] == pytest.approx(objectives(m.scores).tolist(), abs=1e-12)
        assert np.array_equal(m.scores, told[m.lineage.id][1]) and m.lineage.origin == "nsga2"
    keys = [(-m.extra["objectives"][0], m.lineage.id) for m in front]
    assert keys == sorted(keys)
    means = [s.mean() for _, s in told]
    best = strategy.best()
    assert best.lineage.id == int(np.argmax(means)) and best.mean_score == max(means)
    assert strategy.stats() == {"best": max(means), "mean": pytest.approx(np.mean(means[-8:]))}


def test_ask_returns_none_until_the_generation_is_told_and_tells_follow_ask_order():
    strategy = make(popsize=4)
    asked = [strategy.ask() for _ in range(4)]
    assert strategy.ask() is None
    with pytest.raises(ContractError):
        strategy.tell(asked[1], score(asked[1].genome))
    for candidate in asked:
        strategy.tell(candidate, score(candidate.genome))
    assert strategy.ask().lineage.id == 4


ROUND_TRIPS = {
    "copy": copy.deepcopy,
    "json": lambda state: json.loads(json.dumps(state, default=lambda a: a.tolist())),
    "npz": lambda state: unpack(json.loads(json.dumps((packed := pack(state))[0])), packed[1]),
}


@pytest.mark.parametrize("round_trip", sorted(ROUND_TRIPS))
def test_checkpoint_mid_generation_resumes_exactly(round_trip):
    whole = make()
    whole_told = run(whole, 40)

    first = make()
    told = run(first, 16)  # two full generations of six, four of the third told
    in_flight = [first.ask(), first.ask()]  # the third generation's last two: asked, not told
    assert first.ask() is None
    state = first.state_dict()
    state = ROUND_TRIPS[round_trip](state)
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.ask() is None
    for candidate in in_flight:
        resumed.tell(candidate, score(candidate.genome))
        told.append((candidate.genome, score(candidate.genome)))
    told += run(resumed, 22)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(told, whole_told, strict=True))
    key = [(m.lineage.id, m.extra["objectives"]) for m in whole.front()]
    assert key == [(m.lineage.id, m.extra["objectives"]) for m in resumed.front()]
    assert whole.best().lineage.id == resumed.best().lineage.id and whole.stats() == resumed.stats()
    assert np.array_equal(whole.state_dict()["pymoo"]["X"], resumed.state_dict()["pymoo"]["X"])


def test_tampered_checkpoints_are_refused():
    strategy = make()
    run(strategy, 9)
    state = strategy.state_dict()
    for other in (make(rng_seed=4), make(popsize=5), make(x0=[0.5, 0.5, 0.5])):
        with pytest.raises(HfM2n2Error, match="other nsga2 settings or another seed"):
            other.load_state_dict(copy.deepcopy(state))
    moved = copy.deepcopy(state)
    moved["current"][1, 0] += 1e-9
    with pytest.raises(HfM2n2Error, match="did not reproduce.*current generation"):
        make().load_state_dict(moved)
    refit = copy.deepcopy(state)
    refit["told"][0]["F"][0, 0] -= 1.0  # another objective value changes pymoo's survivors
    with pytest.raises(HfM2n2Error, match="did not reproduce"):
        make().load_state_dict(refit)
    with pytest.raises(HfM2n2Error, match="format"):
        make().load_state_dict({**state, "format": 99})


def test_x0_is_the_first_asked_genome():
    x0 = np.array([0.25, 0.5, 1.0])
    strategy = make(x0=x0)
    first = strategy.ask()
    assert np.array_equal(first.genome, x0) and first.lineage.id == 0
    second = strategy.ask().genome
    assert not np.array_equal(second, x0)
    assert np.array_equal(second, make().ask().genome)  # the rest: pymoo's own sampling from the same draws


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"popsize": 1}, "popsize"),
        ({"lower": 1.0, "upper": 1.0}, "below upper"),
        ({"lower": [0.0, 0.5, 1.0]}, "below upper"),
        ({"lower": [0.0, 0.0]}, "lower must be"),
        ({"upper": np.ones((3, 1))}, "upper must be"),
        ({"x0": [0.5, 0.5]}, "x0 must be"),
        ({"x0": [0.5, 0.5, 1.5]}, "within"),
        ({"groups": np.array([], dtype=int)}, "groups"),
        ({"groups": np.array([0, 2])}, "every group id"),
        ({"groups": np.array([0.0, 1.0])}, "integer"),
        ({"objective_names": ["only one"]}, "objective_names"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    groups = kwargs.pop("groups", GROUPS)
    options = {"lower": 0.0, "upper": 1.0, "popsize": 6, **kwargs}
    with pytest.raises(ValueError, match=message):
        NSGA2(VectorOps(), groups, **options)


def test_scores_of_another_length_raise_value_error():
    strategy = make()
    candidate = strategy.ask()
    with pytest.raises(ValueError, match="shape"):
        strategy.tell(candidate, np.zeros(4))


def test_best_and_the_front_keep_the_first_asked_of_equal_objectives():
    strategy = make(popsize=3)
    asked = [strategy.ask() for _ in range(3)]
    for candidate, scores in zip(
        asked, ([0.0, 0, 1, 1, 1], [1.0, 1, 0, 0, 0], [0.0, 0, 1, 1, 1]), strict=True
    ):
        strategy.tell(candidate, np.array(scores))
    assert [m.lineage.id for m in strategy.front()] == [1, 0]  # equal objectives: the first one stays
    assert strategy.best().lineage.id == 0 and strategy.best().mean_score == 0.6
