"""MAP-Elites baseline: a grid over per-group accuracies, one elite per cell.

The descriptors of a candidate are its mean scores on each group of examples (the paper: accuracy on odd and
on even digits, a 10 x 10 grid); quality is its mean score over all examples. A candidate takes its cell when
the cell is empty or it beats the elite there. Parents: two distinct occupied cells drawn proportional to
quality (with replacement when fewer than two have positive quality); split-point SLERP crossover, then
mutation in from-scratch runs (as the reference code).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_m2n2.evolve.strategy import (
    Candidate,
    Lineage,
    Member,
    lineages_from_state,
    lineages_to_state,
    make_rng,
    restore_rng,
    rng_state,
    sample_index,
)
from hf_m2n2.genomes.base import GenomeOps


class MapElites:
    """MAP-Elites over opaque genomes.

    Args:
        ops: operations on the genomes.
        initial: initial genomes, asked first.
        groups: per-example group ids 0..G-1 (shape (n,)); the grid has `bins ** G` cells.
        bins: cells per descriptor axis.
        split_point: crossover with a random split point (off: t = w everywhere).
        mutation_std: Gaussian noise added to every child (0: none).
        rng_seed: seed of the strategy's generator.
    """

    name = "map_elites"

    def __init__(
        self,
        ops: GenomeOps,
        initial: list[Any],
        groups: np.ndarray,
        *,
        bins: int = 10,
        split_point: bool = True,
        mutation_std: float = 0.0,
        rng_seed: int | np.random.SeedSequence = 0,
    ):
        groups = np.asarray(groups)
        if groups.ndim != 1 or not groups.size or groups.min() < 0:
            raise ValueError("groups must be a non-empty 1-D array of ids 0..G-1")
        self.n_groups = int(groups.max()) + 1
        counts = np.bincount(groups, minlength=self.n_groups)
        if (counts == 0).any():
            raise ValueError(f"every group id in 0..{self.n_groups - 1} needs at least one example")
        if not initial:
            raise ValueError("MAP-Elites needs at least one initial genome")
        self.ops = ops
        self.bins = bins
        self.split_point = split_point
        self.mutation_std = mutation_std
        self.groups, self.counts = groups.astype(np.int64), counts
        cells = bins**self.n_groups
        self.rng = make_rng(rng_seed)
        self.genomes: list[Any] = [None] * cells
        self.lineages: list[Lineage | None] = [None] * cells
        self.cell_scores: dict[int, np.ndarray] = {}
        self.quality = np.zeros(cells)
        self.occupied = np.zeros(cells, dtype=bool)
        self.pending_seeds = list(initial)
        self.next_id = 0

    def cell_of(self, scores: np.ndarray) -> int:
        """The grid cell of a score vector: floor(descriptor * bins), clipped to the last bin."""
        sums = np.bincount(self.groups, weights=scores, minlength=self.n_groups)
        # sum * bins / count rather than (sum / count) * bins: exact at bin edges for 0/1 scores (7/10 -> bin 7)
        index = np.clip(np.floor(sums * self.bins / self.counts), 0, self.bins - 1).astype(np.int64)
        return int(np.ravel_multi_index(tuple(index), (self.bins,) * self.n_groups))

    def ask(self) -> Candidate | None:
        """The next seed, or a child of two elites; None while no elite is told yet."""
        if not self.pending_seeds and not self.occupied.any():
            return None
        cid, self.next_id = self.next_id, self.next_id + 1
        if self.pending_seeds:
            return Candidate(self.pending_seeds.pop(0), Lineage(cid, "seed"))
        rng = self.rng
        cells = np.flatnonzero(self.occupied)
        quality = self.quality[cells]
        first = sample_index(quality, rng)
        if np.count_nonzero(quality) >= 2:
            quality = quality.copy()
            quality[first] = 0.0  # two distinct parents
        second = sample_index(quality, rng)
        c1, c2 = cells[first], cells[second]
        w = float(rng.random())
        split = int(rng.integers(self.ops.size)) if self.split_point else self.ops.size
        child = self.ops.crossover(self.genomes[c1], self.genomes[c2], w, split)
        mutation = self.mutation_std if self.mutation_std > 0 else None
        if mutation:
            child = self.ops.mutate(child, mutation, rng)
        parents = (self.lineages[c1].id, self.lineages[c2].id)
        return Candidate(child, Lineage(cid, "crossover", parents, w, split, mutation))

    def tell(self, candidate: Candidate, scores: np.ndarray) -> None:
        s = np.asarray(scores, dtype=np.float64)
        cell = self.cell_of(s)
        quality = float(s.mean())
        if self.occupied[cell] and not quality > self.quality[cell]:
            return
        self.genomes[cell] = candidate.genome
        self.lineages[cell] = candidate.lineage
        self.cell_scores[cell] = s.copy()
        self.quality[cell] = quality
        self.occupied[cell] = True

    def best(self) -> Member | None:
        """The elite of highest quality (the first cell in row-major order on ties)."""
        if not self.occupied.any():
            return None
        return self._member(int(np.argmax(np.where(self.occupied, self.quality, -np.inf))))

    def _member(self, cell: int) -> Member:
        return Member(self.genomes[cell], self.cell_scores[cell], self.lineages[cell], {"cell": cell})

    def members(self) -> list[Member]:
        return [self._member(int(cell)) for cell in np.flatnonzero(self.occupied)]

    def stats(self) -> dict[str, float]:
        quality = self.quality[self.occupied]
        if not quality.size:
            return {"best": 0.0, "mean": 0.0}
        return {"best": float(quality.max()), "mean": float(quality.mean())}

    def state_dict(self) -> dict[str, Any]:
        to_state = self.ops.to_state
        cells = [int(c) for c in np.flatnonzero(self.occupied)]
        return {
            "bins": self.bins,
            "n_groups": self.n_groups,
            "rng": rng_state(self.rng),
            "cells": cells,
            "genomes": [to_state(self.genomes[c]) for c in cells],
            "lineages": lineages_to_state([self.lineages[c] for c in cells]),
            "scores": np.stack([self.cell_scores[c] for c in cells]) if cells else None,
            "pending_seeds": [to_state(g) for g in self.pending_seeds],
            "next_id": self.next_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["bins"] != self.bins or state["n_groups"] != self.n_groups:
            raise ValueError("the checkpoint was written with a different MAP-Elites grid")
        self.rng = restore_rng(state["rng"])
        size = self.bins**self.n_groups
        self.genomes, self.lineages = [None] * size, [None] * size
        self.cell_scores, self.quality, self.occupied = {}, np.zeros(size), np.zeros(size, dtype=bool)
        lineages = lineages_from_state(state["lineages"])
        for i, cell in enumerate(state["cells"]):
            self.genomes[cell] = self.ops.from_state(state["genomes"][i])
            self.lineages[cell] = lineages[i]
            self.cell_scores[cell] = np.array(state["scores"][i], dtype=np.float64)
            self.quality[cell] = float(self.cell_scores[cell].mean())
            self.occupied[cell] = True
        self.pending_seeds = [self.ops.from_state(g) for g in state["pending_seeds"]]
        self.next_id = int(state["next_id"])
