"""Build the parts of a run from a validated spec: the genome kind's parts, the evaluator, the executor and the
strategy, each from its registry.

The local executor holds the live target and the evaluator in this process. The Ray executor's workers build
them themselves (`hf_m2n2.evolve.scorer.build_scorer`, the same code), so the driver builds only what the
strategy and the export need (`GenomeKind.build(..., live=False)`).

The run seed feeds a `numpy.random.SeedSequence` spawning two independent streams: one draws whatever the genome
kind draws at the start (random initial vectors), the other drives the strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_m2n2.errors import SpecError
from hf_m2n2.evolve.config import (
    M2N2_SETTINGS,
    CMAOptions,
    DFSOptions,
    EvolveConfig,
    EvomergeOptions,
    MapElitesOptions,
    NSGA2Options,
)
from hf_m2n2.evolve.executor import Executor
from hf_m2n2.evolve.ray_executor import ray_executor
from hf_m2n2.evolve.scorer import local_executor
from hf_m2n2.evolve.strategy import Strategy
from hf_m2n2.genomes.base import GenomeOps, GenomeRun


@dataclass
class RunParts:
    """Everything a run needs, built from a spec and a run seed.

    Attributes:
        ops: the genome operations.
        executor: evaluates candidates (it holds the target and the evaluator).
        strategy: the ask/tell strategy.
        genome: what the genome kind built (seeds, target, what its export needs).
    """

    ops: GenomeOps
    executor: Executor
    strategy: Strategy
    genome: GenomeRun

    @property
    def target(self) -> Any:
        return self.genome.target


StrategyBuilder = Callable[..., Strategy]


def _m2n2(config, ops, initial, seed, mutation_std, groups, name) -> Strategy:
    from hf_m2n2.evolve.m2n2 import M2N2, M2N2Config

    settings = {key: getattr(config, key) for key in M2N2_SETTINGS}
    if name == "ga":  # the GA is M2N2 without competition and without attraction
        settings.update(alpha=0.0, attraction=False)
    m2n2 = M2N2Config(**settings, split_point=config.split_point, mutation_std=mutation_std)
    return M2N2(ops, initial, m2n2, seed, name=name)


def _cma_es(config, ops, initial, seed, mutation_std, groups, name) -> Strategy:
    from hf_m2n2.evolve.cma_es import CMAES

    options = config.cma or CMAOptions()
    return CMAES(
        ops,
        initial[0],
        popsize=options.popsize,
        sigma0=options.sigma0,
        diagonal=options.diagonal,
        rng_seed=seed,
    )


def _evomerge_ps(config, ops, initial, seed, mutation_std, groups, name) -> Strategy:
    from hf_m2n2.evolve.evomerge_ps import EvomergePS

    options = config.evomerge_ps or EvomergeOptions()
    return EvomergePS(ops, popsize=options.popsize, sigma0=options.sigma0, x0=options.x0, rng_seed=seed)


def _evomerge_dfs(config, ops, initial, seed, mutation_std, groups, name) -> Strategy:
    from hf_m2n2.evolve.evomerge_dfs import EvomergeDFS

    options = config.evomerge_dfs or DFSOptions()
    return EvomergeDFS(
        ops,
        popsize=options.popsize,
        indicator_sigma=options.indicator_sigma,
        scale_sigma=options.scale_sigma,
        rng_seed=seed,
    )


def _nsga2(config, ops, initial, seed, mutation_std, groups, name) -> Strategy:
    from hf_m2n2.evolve.nsga2 import NSGA2

    if groups is None:
        raise SpecError(
            "evaluate",
            "nsga2 needs per-example group ids (one objective per task or evaluator part); this fitness gives none",
        )
    if int(np.max(groups)) < 1:
        raise SpecError("evaluate", "nsga2 needs at least two objectives: this fitness has one task or part")
    options = config.nsga2 or NSGA2Options()
    lower, upper = ops.bounds()  # the genome kinds nsga2 evolves (method, route) box their vectors
    try:
        return NSGA2(
            ops,
            groups,
            lower=lower,
            upper=upper,
            popsize=options.popsize,
            x0=ops.initial_array(),
            rng_seed=seed,
        )
    except ValueError as exc:
        raise SpecError("evolve.nsga2", str(exc)) from None


def _map_elites(config, ops, initial, seed, mutation_std, groups, name) -> Strategy:
    from hf_m2n2.evolve.map_elites import MapElites

    if groups is None:  # an evaluator without groups_callable that may give none: known only once built
        raise SpecError(
            "evaluate",
            "map_elites needs per-example group ids and this fitness gives none "
            "(a clip fitness: a 'group' on every prompt row)",
        )
    options = config.map_elites or MapElitesOptions()
    try:
        return MapElites(
            ops,
            initial,
            groups,
            bins=options.bins,
            split_point=config.split_point,
            mutation_std=mutation_std,
            rng_seed=seed,
        )
    except ValueError as exc:
        raise SpecError("evaluate.groups_callable", str(exc)) from None


def _sweep(config, ops, initial, seed, mutation_std, groups, name) -> Strategy:
    from hf_m2n2.evolve.sweep import Sweep

    if len(initial) != 2:
        raise SpecError("genome.seeds", f"the sweep needs exactly two seeds, got {len(initial)}")
    return Sweep(ops, initial, config.budget)


# The strategy registry: `evolve.algorithm` -> builder(config, ops, initial genomes, seed, mutation_std, groups,
# name). Which genome kinds an algorithm can evolve is declared by the kinds (`hf_m2n2.genomes`).
STRATEGIES: dict[str, StrategyBuilder] = {
    "m2n2": _m2n2,
    "ga": _m2n2,
    "cma_es": _cma_es,
    "evomerge_ps": _evomerge_ps,
    "evomerge_dfs": _evomerge_dfs,
    "nsga2": _nsga2,
    "map_elites": _map_elites,
    "sweep": _sweep,
}


def build_strategy(
    config: EvolveConfig,
    ops: GenomeOps,
    initial: list[Any],
    *,
    seed: np.random.SeedSequence,
    mutation_std: float,
    groups: np.ndarray | None = None,
) -> Strategy:
    """The strategy named by `evolve.algorithm`.

    Args:
        config: the `evolve:` section.
        ops: genome operations.
        initial: initial genomes.
        seed: seed of the strategy's generator.
        mutation_std: noise added to children (0: none).
        groups: per-example group ids (MAP-Elites and NSGA-II only).

    Raises:
        SpecError: the algorithm cannot run with these initial genomes.
    """
    builder = STRATEGIES[config.algorithm]
    return builder(config, ops, initial, seed, mutation_std, groups, config.algorithm)


# The executor registry: `executor.kind` -> builder(spec, seed, run_dir, spec_dir) -> (genome parts, executor).
EXECUTORS: dict[str, Callable[..., tuple[GenomeRun, Executor]]] = {
    "local": local_executor,
    "ray": ray_executor,
}


def build_run(spec: Any, seed: int, run_dir: Path | None = None, spec_dir: Path | None = None) -> RunParts:
    """The parts of one run of a validated spec.

    Args:
        spec: the validated evolve spec.
        seed: the run's seed.
        run_dir: the run directory (kinds cache what they compute once there, e.g. Gram sums).
        spec_dir: the spec's folder (relative references resolve against it).

    Raises:
        SpecError: a callable cannot be imported, the seeds are bad, or the algorithm cannot run on them.
    """
    _, strategy_stream = np.random.SeedSequence(seed).spawn(2)
    genome, executor = EXECUTORS[spec.executor.kind](spec, seed, run_dir, spec_dir)
    groups = executor.example_groups() if spec.evolve.algorithm in ("map_elites", "nsga2") else None
    strategy = build_strategy(
        spec.evolve,
        genome.ops,
        genome.initial,
        seed=strategy_stream,
        mutation_std=genome.mutation_std,
        groups=groups,
    )
    return RunParts(genome.ops, executor, strategy, genome)
