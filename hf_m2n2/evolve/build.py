"""Build the genome ops, seeds, evaluator and strategy of a run from a validated spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate.python import PythonEvaluator, resolve_callable
from hf_m2n2.evolve.config import (
    CMAOptions,
    DenseGenomeConfig,
    EvolveConfig,
    EvolveSpec,
    EvomergeOptions,
    MapElitesOptions,
    PythonSeeds,
)
from hf_m2n2.evolve.genome import DenseVectorOps, GenomeOps
from hf_m2n2.evolve.strategy import Strategy, make_rng

DEFAULT_MUTATION_STD = 0.01


@dataclass
class RunParts:
    """Everything a run loop needs, built from a spec and a seed."""

    ops: GenomeOps
    evaluator: PythonEvaluator
    strategy: Strategy
    mutation_std: float


def build_ops(genome: DenseGenomeConfig) -> DenseVectorOps:
    """The genome operations of a `genome:` section."""
    return DenseVectorOps(genome.size, genome.slerp_scope)


def build_seeds(genome: DenseGenomeConfig, ops: DenseVectorOps, rng: np.random.Generator) -> list[Any]:
    """The seed genomes: random N(0, std^2) vectors from `rng`, or the vectors a Python function returns.

    Raises:
        SpecError: the seed function fails or returns vectors of the wrong size (naming `genome.seeds`).
    """
    seeds = genome.seeds
    if not isinstance(seeds, PythonSeeds):
        return [ops.random(seeds.std, rng) for _ in range(seeds.count)]
    fn = resolve_callable(seeds.callable, "genome.seeds.callable")
    try:
        vectors = list(fn(**seeds.kwargs))
    except Exception as exc:
        raise SpecError(
            "genome.seeds.callable", f"{seeds.callable} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not vectors:
        raise SpecError("genome.seeds.callable", f"{seeds.callable} returned no seeds")
    try:
        return [ops.from_array(v) for v in vectors]
    except ValueError as exc:
        raise SpecError("genome.seeds.callable", f"{seeds.callable} returned a bad seed: {exc}") from None


def default_mutation_std(config: EvolveConfig, genome: DenseGenomeConfig) -> float:
    """`evolve.mutation_std`, or 0.01 for from-scratch runs (random seeds) and 0 otherwise (the reference)."""
    if config.mutation_std is not None:
        return config.mutation_std
    return DEFAULT_MUTATION_STD if not isinstance(genome.seeds, PythonSeeds) else 0.0


def build_strategy(
    config: EvolveConfig,
    ops: GenomeOps,
    seeds: list[Any],
    *,
    seed: np.random.SeedSequence,
    mutation_std: float,
    groups: np.ndarray | None = None,
) -> Strategy:
    """The strategy named by `evolve.algorithm`.

    Args:
        config: the `evolve:` section.
        ops: genome operations.
        seeds: initial genomes.
        seed: seed of the strategy's generator.
        mutation_std: noise added to children (0: none).
        groups: per-example group ids (MAP-Elites only).

    Returns:
        The strategy.

    Raises:
        SpecError: the algorithm cannot run with these seeds or genomes.
    """
    algorithm = config.algorithm
    if algorithm in ("m2n2", "ga"):
        from hf_m2n2.evolve.m2n2 import M2N2, M2N2Config

        ga = algorithm == "ga"
        m2n2 = M2N2Config(
            archive_size=config.archive_size,
            alpha=0.0 if ga else config.alpha,
            epsilon=config.epsilon,
            capacity=config.capacity,
            crossover=config.crossover,
            split_point=config.split_point,
            attraction=False if ga else config.attraction,
            mutation_std=mutation_std,
        )
        return M2N2(ops, seeds, m2n2, seed, name=algorithm)
    if algorithm == "cma_es":
        from hf_m2n2.evolve.cma_es import CMAES

        if not isinstance(ops, DenseVectorOps):
            raise SpecError("evolve.algorithm", "cma_es needs a dense genome")
        options = config.cma or CMAOptions()
        return CMAES(
            ops,
            seeds[0],
            popsize=options.popsize,
            sigma0=options.sigma0,
            diagonal=options.diagonal,
            seed=seed,
        )
    if algorithm == "evomerge_ps":
        from hf_m2n2.evolve.evomerge_ps import EvomergePS

        if getattr(ops, "kind", None) != "method":
            raise SpecError(
                "genome.kind", "evomerge_ps evolves a method genome (genome: {kind: method, ...})"
            )
        options = config.evomerge_ps or EvomergeOptions()
        return EvomergePS(ops, popsize=options.popsize, sigma0=options.sigma0, x0=options.x0, seed=seed)
    if algorithm == "map_elites":
        from hf_m2n2.evolve.map_elites import MapElites

        if groups is None:
            raise SpecError("evaluate.groups_callable", "required by map_elites (per-example group ids)")
        options = config.map_elites or MapElitesOptions()
        try:
            return MapElites(
                ops,
                seeds,
                groups,
                bins=options.bins,
                split_point=config.split_point,
                mutation_std=mutation_std,
                seed=seed,
            )
        except ValueError as exc:
            raise SpecError("evaluate.groups_callable", str(exc)) from None
    from hf_m2n2.evolve.sweep import Sweep

    if len(seeds) != 2:
        raise SpecError("genome.seeds", f"the sweep needs exactly two seeds, got {len(seeds)}")
    return Sweep(ops, seeds, config.budget)


def build_run(spec: EvolveSpec, seed: int) -> RunParts:
    """Ops, evaluator, seeds and strategy for one run of a spec.

    The run seed feeds a `numpy.random.SeedSequence` spawning two independent streams: one draws the random seed
    genomes, the other drives the strategy.

    Args:
        spec: the validated spec.
        seed: the run's seed.

    Returns:
        The parts.

    Raises:
        SpecError: a callable cannot be imported, the seeds are bad, or the algorithm cannot run on them.
    """
    ops = build_ops(spec.genome)
    evaluator = PythonEvaluator.from_config(spec.evaluate)
    seeds_stream, strategy_stream = np.random.SeedSequence(seed).spawn(2)
    seeds = build_seeds(spec.genome, ops, make_rng(seeds_stream))
    mutation_std = default_mutation_std(spec.evolve, spec.genome)
    groups = evaluator.example_groups() if spec.evolve.algorithm == "map_elites" else None
    strategy = build_strategy(
        spec.evolve, ops, seeds, seed=strategy_stream, mutation_std=mutation_std, groups=groups
    )
    return RunParts(ops, evaluator, strategy, mutation_std)
