"""A fitness of controlled cost for dense genomes: it exists to benchmark schedulers (`bench/executor_bench.py`).

Each evaluation sleeps for a duration drawn from a lognormal distribution (skewed: most evaluations are short, a
few are several times the mean, as GPU evaluations of different lengths are), then returns real per-example
scores. The duration is seeded by the genome's bytes, so a candidate costs the same whatever scheduler evaluates
it, and the same seed gives the same run on every scheduler that tells in the same order.

The scores: the vector is cut into `examples` contiguous slices (`numpy.array_split`); example i scores
`exp(-||slice_i - target_i||^2 / (len(slice_i) * width^2))`, with targets drawn once from `target_seed`. A search
improves them (every slice has its own optimum, so crossover can combine specialists); they are never constant.

Use it as `evaluate: {kind: python, callable: hf_m2n2.demo.tasks.timed:scores, test_callable:
hf_m2n2.demo.tasks.timed:test_score, kwargs: {mean_s: 0.5, sigma: 0.75}}` with `genome: {kind: dense, size: N}`.

Example:
    >>> import numpy as np
    >>> vector = np.zeros(64, np.float32)
    >>> scores(vector, mean_s=0.0).shape
    (16,)
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from typing import Any

import numpy as np

DEFAULT_EXAMPLES = 16
DEFAULT_WIDTH = 0.05
DEFAULT_TARGET_STD = 0.05


def _vector(model: Any) -> np.ndarray:
    """The candidate as a float32 numpy vector (a dense target hands the evaluator a torch view of it)."""
    if hasattr(model, "detach"):
        model = model.detach().cpu().numpy()
    return np.ascontiguousarray(model, dtype=np.float32).reshape(-1)


def cost_seconds(model: Any, mean_s: float = 0.5, sigma: float = 0.75) -> float:
    """The seconds an evaluation of this genome sleeps: a lognormal draw with mean `mean_s` and log-std `sigma`,
    seeded by the genome's float32 bytes.

    Args:
        model: the candidate's vector (numpy array or torch tensor).
        mean_s: the distribution's mean in seconds (0: no sleep).
        sigma: the standard deviation of the log of the duration (0: every evaluation costs `mean_s`).

    Returns:
        The duration in seconds.

    Raises:
        ValueError: a negative `mean_s` or `sigma`.

    Example:
        >>> import numpy as np
        >>> cost_seconds(np.ones(4, np.float32), 0.5, 0.0)
        0.5
    """
    if mean_s < 0 or sigma < 0:
        raise ValueError(f"mean_s and sigma must be >= 0, got mean_s={mean_s}, sigma={sigma}")
    if mean_s == 0:
        return 0.0
    digest = hashlib.sha256(_vector(model).tobytes()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    # a lognormal's mean is exp(mu + sigma^2 / 2): mu chosen so that the mean is mean_s
    return float(rng.lognormal(math.log(mean_s) - sigma**2 / 2, sigma)) if sigma > 0 else float(mean_s)


@functools.lru_cache(maxsize=8)
def _targets(size: int, examples: int, target_seed: int, target_std: float) -> tuple[np.ndarray, ...]:
    if not 1 <= examples <= size:
        raise ValueError(f"examples must be in [1, {size}] (the genome's size), got {examples}")
    rng = np.random.default_rng(target_seed)
    return tuple(rng.normal(0.0, target_std, part.size) for part in np.array_split(np.empty(size), examples))


def _closeness(
    vector: np.ndarray, examples: int, width: float, target_seed: int, target_std: float
) -> np.ndarray:
    targets = _targets(vector.size, examples, target_seed, target_std)
    parts = np.array_split(vector.astype(np.float64), examples)
    return np.array([math.exp(-np.sum((p - t) ** 2) / (p.size * width**2)) for p, t in zip(parts, targets)])


def scores(
    model: Any,
    mean_s: float = 0.5,
    sigma: float = 0.75,
    examples: int = DEFAULT_EXAMPLES,
    width: float = DEFAULT_WIDTH,
    target_seed: int = 0,
    target_std: float = DEFAULT_TARGET_STD,
) -> np.ndarray:
    """Sleep `cost_seconds(model, mean_s, sigma)`, then return one score in (0, 1] per example (see the module).

    Args:
        model: the candidate's vector.
        mean_s, sigma: the cost distribution (`cost_seconds`).
        examples: number of examples (slices of the vector), at most its size.
        width: how far from its target a slice may be and still score (per coordinate).
        target_seed, target_std: the targets, N(0, target_std^2) per coordinate.

    Returns:
        float64 scores, shape (examples,).

    Raises:
        ValueError: `examples` outside [1, size], negative cost settings.
    """
    vector = _vector(model)
    time.sleep(cost_seconds(vector, mean_s, sigma))
    return _closeness(vector, examples, width, target_seed, target_std)


def test_score(
    model: Any,
    mean_s: float = 0.5,
    sigma: float = 0.75,
    examples: int = DEFAULT_EXAMPLES,
    width: float = DEFAULT_WIDTH,
    target_seed: int = 0,
    target_std: float = DEFAULT_TARGET_STD,
) -> float:
    """The held-out figure: the mean closeness at half the width (a stricter test of the same targets). It does
    not sleep: the benchmark times fitness evaluations, the logged test call is not a forward pass.

    Args:
        model, examples, width, target_seed, target_std: as for `scores`.
        mean_s, sigma: accepted (the evaluator passes the same kwargs to both callables) and unused.

    Returns:
        A float in (0, 1].
    """
    return float(np.mean(_closeness(_vector(model), examples, width / 2, target_seed, target_std)))
