"""Resource competition and attraction over a per-example score matrix (rows: models, columns: examples).

Each example j is a resource of capacity c_j shared by the models that solve it:
`z_j = (sum_k s_kj) ** alpha` (reference code; `z_j = 0` counts as 1) or `z_j + epsilon` when epsilon > 0 (the
paper), and `F_ij = c_j * s_ij / z_j`. A model's fitness is `sum_j F_ij`; its attraction to parent 1 is
`sum_j max(0, F_kj - F_p1,j)`, the resources it holds that parent 1 lacks. `alpha = 0` turns competition off
(fitness = summed score, the GA baseline). Capacity is 1 (default) or, for continuous scores, `max_k s_kj`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Capacity = Literal["one", "max"]


def resource_weights(
    total: np.ndarray,
    *,
    alpha: float = 1.0,
    epsilon: float = 0.0,
    capacity: np.ndarray | None = None,
) -> np.ndarray:
    """The per-example factor `c_j / z_j` that turns scores into shares: `F_ij = s_ij * weights_j`.

    Args:
        total: `sum_k s_kj` over the competing models, shape (n,).
        alpha: competition exponent (0: no competition).
        epsilon: added to z when positive; otherwise z = 0 is replaced by 1 (reference code).
        capacity: c_j, shape (n,); None means 1 everywhere.

    Returns:
        Float64 weights, shape (n,).
    """
    z = np.power(total, alpha, dtype=np.float64) if alpha != 1.0 else total.astype(np.float64, copy=True)
    if epsilon > 0:
        z += epsilon
    else:
        z[z == 0] = 1.0
    weights = np.reciprocal(z, out=z)
    if capacity is not None:
        weights *= capacity
    return weights


def competition_weights(
    scores: np.ndarray,
    *,
    alpha: float = 1.0,
    epsilon: float = 0.0,
    capacity: Capacity = "one",
    child: np.ndarray | None = None,
) -> np.ndarray:
    """`resource_weights` for the models in `scores` (P x n), plus `child` (n,) when given.

    Args:
        scores: per-example scores of the archive members.
        alpha: competition exponent.
        epsilon: see `resource_weights`.
        capacity: `one` or `max` (c_j = max_k s_kj over the competitors).
        child: scores of one more competitor (a candidate for replacement).

    Returns:
        Weights of shape (n,).
    """
    total = scores.sum(axis=0)
    cap = None
    if child is not None:
        total += child
    if capacity == "max":
        cap = scores.max(axis=0)
        if child is not None:
            np.maximum(cap, child, out=cap)
    return resource_weights(total, alpha=alpha, epsilon=epsilon, capacity=cap)


def fitness(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`fitness_i = sum_j s_ij * weights_j` for scores (P x n), or a scalar for one vector (n,)."""
    return scores @ weights


def attraction(scores: np.ndarray, weights: np.ndarray, parent: int) -> np.ndarray:
    """`attraction_k = sum_j max(0, F_kj - F_parent,j)` with `F = scores * weights`.

    Args:
        scores: (P x n) per-example scores.
        weights: competition weights (n,).
        parent: row index of parent 1.

    Returns:
        Non-negative attraction per row, shape (P,); 0 for the parent itself.
    """
    gain = scores - scores[parent]  # max(0, w (a - b)) = w max(0, a - b) as w >= 0: one product at the end
    np.maximum(gain, 0.0, out=gain)
    return gain @ weights
