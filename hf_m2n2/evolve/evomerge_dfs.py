"""`evomerge_dfs`: Sakana's Evolutionary Model Merge in data-flow space (Akiba et al., 2025) as an ask/tell strategy.

CMA-ES (the `cma` package) over a route genome (`hf_m2n2.genomes.route`): the indicator of the T = M x r slots,
then the scaling matrix W. It starts at model A's own path (A's first repetition on: +1, everything else -1;
W = 1), with one step size for the indicator and another for W (`cma`'s per-coordinate `CMA_stds`). The sample
is the genome: a slot is on when its value is positive, and the scales are used as they are. `cma` is told minus
the mean score. Checkpoints replay the told generations (`hf_m2n2.evolve.cma_es.ReplayedCMA`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_m2n2.evolve.cma_es import ReplayedCMA


class EvomergeDFS(ReplayedCMA):
    """CMA-ES over the indicator and the scaling matrix of a route genome.

    Args:
        ops: route genome operations (`initial_array`, `from_array`, `layout`).
        popsize: samples per generation (the paper: 128).
        indicator_sigma: step size of the indicator coordinates.
        scale_sigma: step size of the scaling-matrix coordinates.
        rng_seed: seed of the sampling generator.
    """

    name = "evomerge_dfs"

    def __init__(
        self,
        ops: Any,
        *,
        popsize: int = 128,
        indicator_sigma: float = 0.5,
        scale_sigma: float = 0.1,
        rng_seed: int | np.random.SeedSequence = 0,
    ):
        if not indicator_sigma > 0 or not scale_sigma > 0:
            raise ValueError("indicator_sigma and scale_sigma must be positive")
        slots = ops.layout.slots
        stds = np.full(ops.size, float(scale_sigma))
        stds[:slots] = float(indicator_sigma)
        options = {"CMA_stds": stds.tolist()} if stds.size > slots else {}
        super().__init__(
            ops,
            ops.initial_array(),
            sigma0=1.0 if options else float(indicator_sigma),
            popsize=popsize,
            rng_seed=rng_seed,
            options=options,
        )
