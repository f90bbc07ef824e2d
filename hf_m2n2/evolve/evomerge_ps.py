"""`evomerge_ps`: Sakana's Evolutionary Model Merge in parameter space (Akiba et al., 2024) as an ask/tell strategy.

CMA-ES (the `cma` package) over a vector of merge-method parameters in [0, 1] (TIES/DARE weight and density per
seed and per layer group, see `hf_m2n2.genomes.method`), with the paper's settings: every coordinate starts at
0.5, sigma0 = 1/6 (so +/- 3 sigma spans [0, 1]), and `popsize = 4 + floor(3 ln n)` samples per generation.

Bounds (repair and penalize): CMA-ES samples an unconstrained y; the candidate evaluated (and exported) is its
projection clip(y, 0, 1), and `cma` is told `-mean score + ||y - clip(y, 0, 1)||^2`. The penalty keeps the search
distribution from drifting on the flat plateau outside the box; it never enters the logged scores.

Checkpoints hold no pickle: the CMA-ES is rebuilt by replaying the f-values it was told (see
`hf_m2n2.evolve.cma_es.ReplayedCMA`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hf_m2n2.evolve.cma_es import ReplayedCMA

DEFAULT_SIGMA0 = 1.0 / 6.0
DEFAULT_X0 = 0.5


def default_popsize(n: int) -> int:
    """CMA-ES's default population size for `n` dimensions, `4 + floor(3 ln n)` (the paper's setting).

    Example:
        >>> default_popsize(8), default_popsize(100)
        (10, 17)
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return 4 + math.floor(3 * math.log(n))


class EvomergePS(ReplayedCMA):
    """CMA-ES over a bounded vector genome of merge-method parameters.

    Args:
        ops: genome operations with `size` (n) and `from_array` (a vector in [0, 1]^n to a genome).
        popsize: samples per generation (None: `default_popsize(n)`).
        sigma0: initial step size (1/6).
        x0: initial value of every coordinate (0.5).
        rng_seed: seed of the sampling generator.
    """

    name = "evomerge_ps"

    def __init__(
        self,
        ops: Any,
        *,
        popsize: int | None = None,
        sigma0: float = DEFAULT_SIGMA0,
        x0: float = DEFAULT_X0,
        rng_seed: int | np.random.SeedSequence = 0,
    ):
        n = int(ops.size)
        if not 0.0 <= x0 <= 1.0:
            raise ValueError(f"x0 must lie in [0, 1], got {x0}")
        popsize = int(popsize) if popsize is not None else default_popsize(n)
        super().__init__(ops, np.full(n, float(x0)), sigma0=sigma0, popsize=popsize, rng_seed=rng_seed)

    def genome_of(self, sample: np.ndarray) -> Any:
        """The projection of the sample onto [0, 1]^n (repair)."""
        return self.ops.from_array(np.clip(sample, 0.0, 1.0))

    def fvalue(self, sample: np.ndarray, mean_score: float) -> float:
        """Minus the mean score plus the squared distance of the sample to the box (penalty)."""
        return -mean_score + float(np.sum((sample - np.clip(sample, 0.0, 1.0)) ** 2))
