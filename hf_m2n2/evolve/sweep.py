"""Brute-force SLERP sweep between two seeds (the paper's pretrained baseline).

Candidate i of `points` is `slerp(w_i, seed_1, seed_2)` with `w_i = i / (points - 1)` (no split point); the
best is the first candidate of highest mean score, as the reference code keeps the first strict improvement.
The result is only meaningful once the whole sweep has run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_m2n2.evolve.strategy import BestSample, Candidate, Lineage
from hf_m2n2.genomes.base import GenomeOps


class Sweep(BestSample):
    """SLERP sweep over `points` evenly spaced mixing ratios in [0, 1].

    Args:
        ops: operations on the genomes.
        initial: exactly two genomes (w = 0 gives the first, w = 1 the second).
        points: number of candidates (the budget).
    """

    name = "sweep"

    def __init__(self, ops: GenomeOps, initial: list[Any], points: int):
        if len(initial) != 2:
            raise ValueError(f"the sweep needs exactly two genomes, got {len(initial)}")
        if points < 1:
            raise ValueError("points must be at least 1")
        self.ops = ops
        self.ends = list(initial)
        self.points = points
        self.next_id = 0
        self.score_sum = 0.0
        self.told = 0
        self.best_genome: Any = None
        self.best_scores: np.ndarray | None = None
        self.best_lineage: Lineage | None = None

    def ratio(self, index: int) -> float:
        """The mixing ratio of candidate `index` (the ratios wrap around after `points`)."""
        return (index % self.points) / (self.points - 1) if self.points > 1 else 0.0

    def ask(self) -> Candidate:
        cid, self.next_id = self.next_id, self.next_id + 1
        w = self.ratio(cid)
        genome = self.ops.crossover(self.ends[0], self.ends[1], w, self.ops.size)
        return Candidate(genome, Lineage(cid, "sweep", (), w, self.ops.size))

    def tell(self, candidate: Candidate, scores: np.ndarray) -> None:
        mean = float(np.mean(scores))
        self.score_sum += mean
        self.told += 1
        self.keep_if_best(candidate, scores, mean)

    def stats(self) -> dict[str, float]:
        best = 0.0 if self.best_scores is None else float(self.best_scores.mean())
        return {"best": best, "mean": self.score_sum / self.told if self.told else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {
            "points": self.points,
            "seeds": [self.ops.to_state(g) for g in self.ends],  # the key of earlier checkpoints
            "next_id": self.next_id,
            "score_sum": self.score_sum,
            "told": self.told,
            "best_genome": None if self.best_genome is None else self.ops.to_state(self.best_genome),
            "best_scores": self.best_scores,
            "best_lineage": None if self.best_lineage is None else self.best_lineage.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["points"] != self.points:
            raise ValueError("the checkpoint was written with a different number of sweep points")
        self.ends = [self.ops.from_state(g) for g in state["seeds"]]
        self.next_id = int(state["next_id"])
        self.score_sum = float(state["score_sum"])
        self.told = int(state["told"])
        genome = state["best_genome"]
        self.best_genome = None if genome is None else self.ops.from_state(genome)
        self.best_scores = None if state["best_scores"] is None else np.array(state["best_scores"])
        lineage = state["best_lineage"]
        self.best_lineage = None if lineage is None else Lineage.from_dict(lineage)
