"""The evaluator protocol and the validation of returned score vectors."""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hf_m2n2.errors import HfM2n2Error


class EvaluationError(HfM2n2Error):
    """The evaluator cannot score candidates at all (it failed before producing any valid score vector)."""


@runtime_checkable
class Evaluator(Protocol):
    """Scores materialized candidates."""

    def scores(self, model: Any) -> np.ndarray:
        """Per-example scores of one candidate: a 1-D array of finite values >= 0 (one per example)."""
        ...

    def test_score(self, model: Any) -> float | None:
        """A held-out score for logging (None when there is no test split)."""
        ...

    def example_groups(self) -> np.ndarray | None:
        """Per-example group ids 0..G-1, or None."""
        ...


def check_scores(raw: Any, n_examples: int | None) -> np.ndarray:
    """Validate what an evaluator returned.

    Args:
        raw: the returned value (array-like).
        n_examples: the expected length, or None when not known yet.

    Returns:
        The scores as a float64 array.

    Raises:
        ValueError: not 1-D, wrong length, empty, non-finite (NaN, inf) or negative values.
    """
    scores = np.asarray(raw, dtype=np.float64)
    if scores.ndim != 1 or not scores.size:
        raise ValueError(f"expected a non-empty 1-D score vector, got shape {scores.shape}")
    if n_examples is not None and scores.shape[0] != n_examples:
        raise ValueError(f"expected {n_examples} scores, got {scores.shape[0]}")
    if not math.isfinite(scores.sum()):  # one reduction catches NaN and inf
        raise ValueError("scores contain NaN or inf")
    if scores.min() < 0:
        raise ValueError("scores must be >= 0")
    return scores
