"""The ask/tell strategy interface shared by M2N2 and its baselines.

A strategy proposes candidates (`ask`), is told their per-example score vectors (`tell`), possibly after several
asks (an executor with several workers keeps several in flight): in the order it asked them, or as they finish
under `executor.ordering: completion` unless it sets `told_in_order` (CMA-ES generations). It keeps
all of its state (archive, score matrix, random generator) in explicit objects that `state_dict` returns and
`load_state_dict` restores exactly: a resumed run draws the same numbers as an uninterrupted one. Strategies see
genomes (through `GenomeOps`) and score vectors, never models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Lineage:
    """Where a candidate comes from.

    Attributes:
        id: the candidate's number in its run (0, 1, ... in ask order).
        origin: `seed`, `crossover`, `copy` (of parent 1: crossover off), `cma`, `sweep`.
        parents: ids of the parents (parent 1 first).
        w: crossover mixing ratio, if any.
        split: crossover split point in [0, N] (N: no split), if any.
        mutation: standard deviation of the Gaussian noise added, if any.
    """

    id: int
    origin: str
    parents: tuple[int, ...] = ()
    w: float | None = None
    split: int | None = None
    mutation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["parents"] = list(self.parents)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lineage:
        return cls(**{**data, "parents": tuple(data["parents"])})


@dataclass
class Candidate:
    """A genome proposed by `ask`, with its lineage."""

    genome: Any
    lineage: Lineage


@dataclass
class Member:
    """An archive member: a genome, its per-example scores and lineage."""

    genome: Any
    scores: np.ndarray
    lineage: Lineage
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_score(self) -> float:
        return float(self.scores.mean()) if self.scores.size else 0.0


class Strategy(Protocol):
    """Ask/tell evolution strategy with explicit, checkpointable state."""

    name: str

    def ask(self) -> Candidate | None:
        """The next candidate to evaluate, drawn from the strategy's state as it is now (M2N2: from the archive
        as it stands, whatever is still in flight); None when it cannot propose one before more tells (CMA-ES
        at the end of a generation)."""
        ...

    def tell(self, candidate: Candidate, scores: np.ndarray) -> None:
        """Report the per-example scores (float, shape (n_examples,)) of a candidate returned by `ask`; in ask
        order, or in the order the candidates finished (`executor.ordering: completion`) for a strategy that
        does not set `told_in_order`."""
        ...

    def best(self) -> Member | None:
        """The member whose test score is logged: the best mean training score (None before any tell)."""
        ...

    def members(self) -> list[Member]:
        """The current archive (what a run leaves behind)."""
        ...

    def stats(self) -> dict[str, float]:
        """`best` and `mean` training score over the archive, for logs and progress."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: arrays, numbers, strings, lists and dicts of them."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`."""
        ...


class BestSample:
    """The archive of a strategy that samples rather than keeps a population (CMA-ES, the sweep): the best
    candidate evaluated so far (as the reference logs `xbest`), from `best_genome`, `best_scores` and
    `best_lineage`; `best_extra` adds to the member's `extra`."""

    best_genome: Any = None
    best_scores: np.ndarray | None = None
    best_lineage: Lineage | None = None

    def best_extra(self) -> dict[str, Any]:
        return {}

    def keep_if_best(self, candidate: Candidate, scores: np.ndarray, mean: float) -> None:
        """Keep the candidate when its mean score beats the best so far (the first of equals stays)."""
        if self.best_scores is None or mean > float(self.best_scores.mean()):
            self.best_genome = candidate.genome
            self.best_scores = np.asarray(scores, dtype=np.float64).copy()
            self.best_lineage = candidate.lineage

    def best(self) -> Member | None:
        if self.best_genome is None:
            return None
        return Member(self.best_genome, self.best_scores, self.best_lineage, self.best_extra())

    def members(self) -> list[Member]:
        best = self.best()
        return [] if best is None else [best]


def sample_index(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability proportional to non-negative `weights` (uniform when they sum to 0).

    Args:
        weights: non-negative weights.
        rng: the generator to draw from.

    Returns:
        An index into `weights`.
    """
    return sample_cumulative(np.cumsum(weights), rng)


def sample_cumulative(cumulative: np.ndarray, rng: np.random.Generator) -> int:
    """`sample_index` from the cumulative sums of the weights (which callers may cache).

    One uniform draw and a binary search: a few microseconds, unlike `Generator.choice(p=...)`.
    """
    total = cumulative[-1]
    if not total > 0:
        return int(rng.integers(len(cumulative)))
    return min(int(np.searchsorted(cumulative, rng.random() * total, side="right")), len(cumulative) - 1)


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The generator's bit-generator state (JSON-serialisable: big Python ints)."""
    return rng.bit_generator.state


def make_rng(seed: int | np.random.SeedSequence) -> np.random.Generator:
    """A PCG64 generator from a seed (the only kind of generator strategies use)."""
    return np.random.Generator(np.random.PCG64(seed))


def restore_rng(state: dict[str, Any]) -> np.random.Generator:
    """A generator in the given `rng_state`."""
    rng = make_rng(0)
    rng.bit_generator.state = state
    return rng


def lineages_to_state(lineages: list[Lineage | None]) -> list[dict[str, Any] | None]:
    return [None if lin is None else lin.to_dict() for lin in lineages]


def lineages_from_state(data: list[dict[str, Any] | None]) -> list[Lineage | None]:
    return [None if d is None else Lineage.from_dict(d) for d in data]
