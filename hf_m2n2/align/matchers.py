"""Matchers: from statistics of two models' units to a merge (M) and an unmerge (U) per space.

- `identity`: M = [I/2, I/2], U = [I; I]: plain linear averaging.
- `permute`: unit u of A with unit pi(u) of B, pi the assignment maximizing the summed cross-correlation
  (`scipy.optimize.linear_sum_assignment`).
- `weight_matching`: Git Re-Basin's data-free matching (Ainsworth et al., 2023): coordinate descent over the spaces,
  each step an assignment maximizing the inner product of A's weights with B's, given the other spaces'
  current permutations.
- `zipit`: ZipIt!'s greedy matching (Stoica et al., 2024, section 4.3) over both models' features: the most
  correlated pair of features is merged, within a model too, until 2n features are n. A merged feature may be
  merged again, its correlation with every other becoming alpha times the smaller of its two parts' ("repeated
  matching"; alpha in (0, 1]); within-model merges (two features holding units of one model) are limited to
  beta x n/2 per model (beta = 0: none, so every merged feature is one unit of A and one of B).
  Defaults alpha 0.3, beta 0.125 are the reference implementation's; choose them on a validation split, never on
  the test split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_m2n2.align.spaces import SpaceGraph, entries

ZIPIT_ALPHA = 0.3
ZIPIT_BETA = 0.125


@dataclass
class Match:
    """A merge of two models' units in one space.

    Attributes:
        merge: M, (k x 2n): row r forms merged unit r from the stacked units (A's, then B's); rows sum to 1.
        unmerge: U, (2n x k): each model's unit as the merged units.
        stats: what the card shows (mean correlation of the merged pairs, within-model merges, ...).
    """

    merge: np.ndarray
    unmerge: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        return self.merge, self.unmerge


def identity(n: int, n_models: int = 2) -> Match:
    """Plain averaging of the models' units in order."""
    eye = np.eye(n)
    return Match(np.hstack([eye / n_models] * n_models), np.vstack([eye] * n_models), {"method": "identity"})


def from_permutation(perm: np.ndarray) -> Match:
    """The merge of unit u of A with unit perm[u] of B (their average)."""
    n = len(perm)
    p = np.zeros((n, n))
    p[np.arange(n), perm] = 1.0
    return Match(np.hstack([np.eye(n) / 2, p / 2]), np.vstack([np.eye(n), p.T]))


def permute(correlation: np.ndarray, n: int) -> Match:
    """The assignment of B's units to A's maximizing their summed correlation (two models).

    Args:
        correlation: the (2n x 2n) correlation of the stacked features (A's, then B's).
        n: units per model.
    """
    from scipy.optimize import linear_sum_assignment

    _check_square(correlation, 2 * n)
    cross = np.asarray(correlation, dtype=np.float64)[:n, n:]
    rows, cols = linear_sum_assignment(cross, maximize=True)
    perm = np.empty(n, dtype=np.int64)
    perm[rows] = cols
    match = from_permutation(perm)
    match.stats = {"method": "permute", "mean_matched_correlation": float(cross[rows, cols].mean())}
    return match


def zipit(correlation: np.ndarray, n: int, *, alpha: float = ZIPIT_ALPHA, beta: float = ZIPIT_BETA) -> Match:
    """ZipIt!'s greedy matching of two models' 2n features down to n merged features.

    Args:
        correlation: the (2n x 2n) correlation of the stacked features (A's, then B's).
        n: units per model.
        alpha: repeated matching: a merged feature's correlation with others is alpha x the smaller of its parts'.
        beta: within-model merges allowed per model, as a fraction of n/2 (0: features merge across models only).

    Raises:
        ValueError: alpha <= 0 (or > 1), beta < 0, or a matrix of the wrong shape.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"zipit alpha must lie in (0, 1], got {alpha}")
    if beta < 0:
        raise ValueError(f"zipit beta must be >= 0, got {beta}")
    _check_square(correlation, 2 * n)
    size = 2 * n
    corr = np.array(correlation, dtype=np.float64)
    np.fill_diagonal(corr, -np.inf)
    members: list[list[int]] = [[f] for f in range(size)]  # per slot: the original features merged into it
    alive = np.ones(size, dtype=bool)
    has = np.zeros((2, size), dtype=bool)  # has[m, slot]: the slot holds a feature of model m
    has[0, :n] = has[1, n:] = True
    budget = [int(n // 2 * beta + 1e-9)] * 2
    within, values = 0, []
    for model in (0, 1):  # a model without budget: none of its features merge with each other
        if budget[model] <= 0:
            corr[np.ix_(has[model], has[model])] = -np.inf
    # the best pair is found from each row's cached maximum; a merge changes one row and one column, so only the
    # rows whose maximum was there (or that a new ban touched) are scanned again: O(n) per merge, not O(n^2)
    row_max, row_arg = corr.max(axis=1), corr.argmax(axis=1)
    for _ in range(n):
        i = int(np.argmax(row_max))
        j = int(row_arg[i])
        if not np.isfinite(row_max[i]):
            raise ValueError("zipit: no pair of features is left to merge")
        i, j = min(i, j), max(i, j)
        values.append(float(corr[i, j]))
        shared = [m for m in (0, 1) if has[m, i] and has[m, j]]  # a within-model merge for these models
        merged_row = alpha * np.minimum(corr[i], corr[j])
        members[i] += members[j]
        has[:, i] |= has[:, j]
        has[:, j] = alive[j] = False
        corr[j, :] = corr[:, j] = -np.inf
        merged_row[~alive] = merged_row[i] = -np.inf
        rescan = {i, *np.flatnonzero(np.isin(row_arg, (i, j))).tolist()}
        if shared:
            within += 1
            for m in shared:
                budget[m] -= 1
        for m in (0, 1):  # no budget left: the merged feature cannot join another holding that model's
            if budget[m] <= 0 and has[m, i]:
                merged_row[has[m]] = -np.inf
        corr[i, :] = corr[:, i] = merged_row
        for m in shared:
            if (
                budget[m] == 0
            ):  # just spent: every pair of features holding that model's is banned from now on
                held = np.flatnonzero(has[m] & alive)
                corr[np.ix_(held, held)] = -np.inf
                rescan.update(held.tolist())
        row_max[j] = -np.inf
        better = alive & (corr[:, i] > row_max)
        row_max[better], row_arg[better] = corr[better, i], i
        for r in rescan - {j}:
            row_max[r], row_arg[r] = corr[r].max(), corr[r].argmax()
    groups = [members[slot] for slot in np.flatnonzero(alive)]
    merge = np.zeros((n, 2 * n))
    unmerge = np.zeros((2 * n, n))
    for r, members in enumerate(groups):
        merge[r, members] = 1.0 / len(members)
        unmerge[members, r] = 1.0
    stats = {
        "method": "zipit",
        "alpha": alpha,
        "beta": beta,
        "within_model_merges": within,
        "mean_merged_correlation": float(np.mean(values)) if values else 0.0,
    }
    return Match(merge, unmerge, stats)


def _check_square(matrix: np.ndarray, size: int) -> None:
    if np.shape(matrix) != (size, size):
        raise ValueError(f"expected a ({size} x {size}) correlation matrix, got {np.shape(matrix)}")


def weight_matching(
    graph: SpaceGraph,
    states: Sequence[Mapping[str, np.ndarray]],
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> dict[str, Match]:
    """Git Re-Basin's weight matching of model B to model A (data-free), as one permutation match per space.

    Each step picks a space (a seeded random order, repeated until no permutation changes or `max_iter` sweeps)
    and solves the assignment maximizing sum over the space's uses of <A's tensor, B's tensor> with B's other
    axes permuted by their spaces' current permutations.

    Args:
        graph: the spaces.
        states: the two models' tensors as float64 numpy arrays (`hf_m2n2.align.apply.as_numpy_state`).
        seed: seed of the order of the spaces.
        max_iter: sweeps over all spaces at most.
    """
    from scipy.optimize import linear_sum_assignment

    a, b = states
    perms = {s.name: np.arange(s.size) for s in graph.spaces}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for index in rng.permutation(len(graph.spaces)):
            space = graph.spaces[index]
            cost = np.zeros((space.size, space.size))
            for use in space.uses:
                wa = _units_first(a[use.tensor], use.axis, space.unit)
                wb = _units_first(
                    _permute_others(graph, b, use.tensor, use.axis, perms), use.axis, space.unit
                )
                cost += wa @ wb.T
            rows, cols = linear_sum_assignment(cost, maximize=True)
            new = np.empty(space.size, dtype=np.int64)
            new[rows] = cols
            if (
                cost[np.arange(space.size), new].sum()
                > cost[np.arange(space.size), perms[space.name]].sum() + 1e-12
            ):
                perms[space.name], changed = new, True
        if not changed:
            break
    return {name: _named(from_permutation(p), "weight_matching") for name, p in perms.items()}


def _named(match: Match, method: str) -> Match:
    match.stats = {"method": method}
    return match


def _units_first(tensor: np.ndarray, axis: int, unit: int) -> np.ndarray:
    """The tensor as (units, everything else)."""
    moved = np.moveaxis(tensor, axis, 0)
    return moved.reshape(moved.shape[0] // unit, -1)


def _permute_others(
    graph: SpaceGraph, state: Mapping[str, np.ndarray], name: str, axis: int, perms: Mapping[str, np.ndarray]
) -> np.ndarray:
    """`state[name]` with every axis but `axis` permuted by its space's current permutation."""
    tensor = state[name]
    for other in range(tensor.ndim):
        space = graph.space_of(name, other)
        if other == axis or space is None:
            continue
        tensor = np.take(tensor, entries(perms[space.name], space.unit), axis=other)
    return tensor
