"""M2N2 (Model Merging of Natural Niches): competition, attraction, split-point SLERP, replacement.

The archive is P slots, initially empty; the seeds enter through the normal replacement rule. One step:
parent 1 is drawn proportional to fitness under resource competition; parent 2 proportional to its attraction
to parent 1 (fitness-proportional when every attraction is 0); the child is their split-point SLERP (plus
Gaussian noise in from-scratch runs); it replaces the archive member of lowest fitness, computed with the
child among the competitors, unless the child itself is the worst. The GA baseline is the same loop with
alpha = 0 and no attraction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hf_m2n2.evolve.competition import Capacity, attraction, fitness, resource_weights
from hf_m2n2.evolve.strategy import (
    Candidate,
    Lineage,
    Member,
    lineages_from_state,
    lineages_to_state,
    make_rng,
    restore_rng,
    rng_state,
    sample_cumulative,
)
from hf_m2n2.genomes.base import GenomeOps


@dataclass(frozen=True)
class M2N2Config:
    """M2N2's settings; the defaults are the reference code's.

    Attributes:
        archive_size: P, the number of archive slots.
        alpha: competition exponent (0: none, as the GA).
        epsilon: added to the resource denominators when positive (the paper's variant).
        capacity: per-example capacity, `one` or `max` (max score over the competitors; continuous scores).
        crossover: crossover on (off: the child is a copy of parent 1, then mutated).
        split_point: random split point on (off: t = w over the whole vector).
        attraction: parent 2 by attraction (off: fitness-proportional, like parent 1).
        mutation_std: Gaussian noise added to every child (0: none; from-scratch runs use 0.01).
    """

    archive_size: int = 20
    alpha: float = 1.0
    epsilon: float = 0.0
    capacity: Capacity = "one"
    crossover: bool = True
    split_point: bool = True
    attraction: bool = True
    mutation_std: float = 0.0


@dataclass
class _Competition:
    """The archive's competition, derived from its score matrix and rebuilt only when a child enters: most
    children are discarded, so most steps reuse it (and the attraction rows of parents drawn before)."""

    slots: np.ndarray
    scores: np.ndarray
    total: np.ndarray
    cap: np.ndarray | None
    weights: np.ndarray
    fitness: np.ndarray
    pulls: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fitness_cumsum = np.cumsum(self.fitness)

    def attraction_cumsum(self, parent: int) -> np.ndarray:
        """Cumulative attraction of every member to `parent`; the fitness's when all attractions are 0."""
        if parent not in self.pulls:
            pull = np.cumsum(attraction(self.scores, self.weights, parent))
            self.pulls[parent] = pull if pull[-1] > 0 else self.fitness_cumsum
        return self.pulls[parent]


class M2N2:
    """M2N2 as an ask/tell strategy over opaque genomes.

    Args:
        ops: operations on the genomes.
        initial: the initial genomes, asked first (each enters the archive by the replacement rule).
        config: the algorithm's settings.
        rng_seed: seed of the strategy's random generator (parent sampling, w, split points, mutation).
        name: reported name (`m2n2`, `ga`, ...).

    Example:
        >>> from hf_m2n2.genomes.dense import DenseVectorOps
        >>> ops = DenseVectorOps(8)
        >>> rng = np.random.default_rng(0)
        >>> strategy = M2N2(ops, [ops.random(0.01, rng) for _ in range(2)], M2N2Config(archive_size=4), rng_seed=0)
        >>> for _ in range(10):
        ...     candidate = strategy.ask()
        ...     strategy.tell(candidate, (candidate.genome[:4] > 0).astype(float))
        >>> int(strategy.occupied.sum())
        4
    """

    def __init__(
        self,
        ops: GenomeOps,
        initial: list[Any],
        config: M2N2Config,
        rng_seed: int | np.random.SeedSequence,
        name: str = "m2n2",
    ):
        if config.archive_size < 1:
            raise ValueError("archive_size must be at least 1")
        if not initial:
            raise ValueError("M2N2 needs at least one initial genome")
        self.ops = ops
        self.config = config
        self.name = name
        self.rng = make_rng(rng_seed)
        size = config.archive_size
        self.genomes: list[Any] = [None] * size
        self.lineages: list[Lineage | None] = [None] * size
        self.occupied = np.zeros(size, dtype=bool)
        self.scores: np.ndarray | None = None  # (P, n) float64, allocated at the first tell
        self.pending_seeds = list(initial)
        self.next_id = 0
        self.accepted = 0
        self.discarded = 0
        self._cached: _Competition | None = None

    def _competition(self) -> _Competition:
        if self._cached is None:
            c = self.config
            full = bool(self.occupied.all())
            slots = np.arange(c.archive_size) if full else np.flatnonzero(self.occupied)
            scores = self.scores if full else self.scores[slots]
            total = scores.sum(axis=0)
            cap = scores.max(axis=0) if c.capacity == "max" else None
            weights = resource_weights(total, alpha=c.alpha, epsilon=c.epsilon, capacity=cap)
            self._cached = _Competition(slots, scores, total, cap, weights, fitness(scores, weights), {})
        return self._cached

    def ask(self) -> Candidate | None:
        """Propose the next seed, or a child of two archive members (None while no member is told yet)."""
        if not self.pending_seeds and not self.occupied.any():
            return None
        cid, self.next_id = self.next_id, self.next_id + 1
        if self.pending_seeds:
            return Candidate(self.pending_seeds.pop(0), Lineage(cid, "seed"))
        c, rng, arena = self.config, self.rng, self._competition()
        first = sample_cumulative(arena.fitness_cumsum, rng)
        pull = arena.attraction_cumsum(first) if c.attraction else arena.fitness_cumsum
        second = sample_cumulative(pull, rng)
        p1, p2 = arena.slots[first], arena.slots[second]
        x, y = self.genomes[p1], self.genomes[p2]
        w = split = None
        if c.crossover:
            w = float(rng.random())
            split = int(rng.integers(self.ops.size)) if c.split_point else self.ops.size
            child, parents = self.ops.crossover(x, y, w, split), (self.lineages[p1].id, self.lineages[p2].id)
        else:
            child, parents = x, (self.lineages[p1].id,)
        mutation = c.mutation_std if c.mutation_std > 0 else None
        if mutation:
            child = self.ops.mutate(child, mutation, rng)
        origin = "crossover" if c.crossover else "copy"
        return Candidate(child, Lineage(cid, origin, parents, w, split, mutation))

    def tell(self, candidate: Candidate, scores: np.ndarray) -> None:
        """Insert the candidate into an empty slot, or in place of the least fit member unless it is the least fit."""
        c, s = self.config, np.asarray(scores, dtype=np.float64)
        if self.scores is None:
            self.scores = np.zeros((c.archive_size, s.shape[0]))
        if not self.occupied.all():
            slot = int(np.argmin(self.occupied))
        else:  # the child competes for the resources too
            arena = self._competition()
            cap = None if arena.cap is None else np.maximum(arena.cap, s)
            weights = resource_weights(arena.total + s, alpha=c.alpha, epsilon=c.epsilon, capacity=cap)
            fit = fitness(arena.scores, weights)
            slot = int(np.argmin(fit))
            if fitness(s, weights) < fit[slot]:  # a tie replaces the member, as the reference's argmin
                self.discarded += 1
                return
        self.genomes[slot] = candidate.genome
        self.lineages[slot] = candidate.lineage
        self.scores[slot] = s
        self.occupied[slot] = True
        self.accepted += 1
        self._cached = None

    def _means(self) -> np.ndarray:
        return self.scores.mean(axis=1) if self.scores is not None else np.zeros(0)

    def best(self) -> Member | None:
        """The member with the best mean score (the first on ties)."""
        if not self.occupied.any():
            return None
        means = np.where(self.occupied, self._means(), -np.inf)
        return self._member(int(np.argmax(means)))

    def _member(self, slot: int) -> Member:
        return Member(self.genomes[slot], self.scores[slot].copy(), self.lineages[slot], {"slot": slot})

    def members(self) -> list[Member]:
        return [self._member(int(slot)) for slot in np.flatnonzero(self.occupied)]

    def stats(self) -> dict[str, float]:
        means = self._means()[self.occupied]
        if not means.size:
            return {"best": 0.0, "mean": 0.0}
        return {"best": float(means.max()), "mean": float(means.mean())}

    def state_dict(self) -> dict[str, Any]:
        to_state = self.ops.to_state
        return {
            "config": asdict(self.config),
            "rng": rng_state(self.rng),
            "genomes": [None if g is None else to_state(g) for g in self.genomes],
            "lineages": lineages_to_state(self.lineages),
            "occupied": self.occupied.copy(),
            "scores": None if self.scores is None else self.scores.copy(),
            "pending_seeds": [to_state(g) for g in self.pending_seeds],
            "next_id": self.next_id,
            "accepted": self.accepted,
            "discarded": self.discarded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if M2N2Config(**state["config"]) != self.config:
            raise ValueError("the checkpoint was written with different M2N2 settings")
        from_state = self.ops.from_state
        self.rng = restore_rng(state["rng"])
        self.genomes = [None if g is None else from_state(g) for g in state["genomes"]]
        self.lineages = lineages_from_state(state["lineages"])
        self.occupied = np.asarray(state["occupied"], dtype=bool).copy()
        self.scores = None if state["scores"] is None else np.array(state["scores"], dtype=np.float64)
        self.pending_seeds = [from_state(g) for g in state["pending_seeds"]]
        self.next_id = int(state["next_id"])
        self.accepted = int(state["accepted"])
        self.discarded = int(state["discarded"])
        self._cached = None
