"""The `evolve:` spec section (a strict pydantic model) and its cross-field checks.

Every error names its YAML path (`evolve.archive_size: ...`). The whole spec (`models:`, `genome:`, `evaluate:`)
is `hf_m2n2.evolve.spec`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic import Field

from hf_m2n2.errors import SpecError
from hf_m2n2.evolve.m2n2 import M2N2Config
from hf_m2n2.spec import StrictModel

ALGORITHMS = ("m2n2", "ga", "cma_es", "map_elites", "sweep", "evomerge_ps", "evomerge_dfs", "nsga2")
# What each algorithm evolves, for the errors that refuse an algorithm a genome kind cannot take.
ALGORITHM_DESCRIPTIONS = {
    "m2n2": "evolves genomes by crossover",
    "ga": "evolves genomes by crossover",
    "cma_es": "evolves dense vectors",
    "map_elites": "evolves genomes by crossover",
    "sweep": "interpolates two genomes",
    "evomerge_ps": "evolves merge-method parameters",
    "evomerge_dfs": "evolves paths through the seeds' layers",
    "nsga2": "evolves bounded vectors (merge-method parameters or paths)",
}
# M2N2's own settings (M2N2Config's fields but the two it shares with other algorithms): the GA uses them too.
M2N2_SETTINGS = tuple(f.name for f in fields(M2N2Config) if f.name not in ("split_point", "mutation_std"))
_M2N2 = M2N2Config()


class CMAOptions(StrictModel):
    """CMA-ES settings: popsize, initial step size, separable (diagonal) covariance."""

    popsize: int = Field(20, ge=2)
    sigma0: float = Field(0.01, gt=0)
    diagonal: bool = False


class EvomergeOptions(StrictModel):
    """evomerge_ps settings (Akiba et al.): CMA-ES popsize (None: 4 + floor(3 ln n)), initial step size and mean."""

    popsize: int | None = Field(None, ge=2)
    sigma0: float = Field(1.0 / 6.0, gt=0)
    x0: float = Field(0.5, ge=0, le=1)


class DFSOptions(StrictModel):
    """evomerge_dfs settings: CMA-ES over the indicator and the scaling matrix (Akiba et al.: population 128 for 100
    generations, each candidate scored on 200 training examples; their step sizes are not published, these are
    ours). The indicator starts at +1 (on) / -1 (off), so `indicator_sigma` 0.5 flips about 2% of the slots per
    sample at first; W starts at 1 with `scale_sigma`."""

    popsize: int = Field(128, ge=2)
    indicator_sigma: float = Field(0.5, gt=0)
    scale_sigma: float = Field(0.1, gt=0)


class NSGA2Options(StrictModel):
    """NSGA-II settings (pymoo): the population size (one objective per evaluator part or task group)."""

    popsize: int = Field(40, ge=2)


class MapElitesOptions(StrictModel):
    """MAP-Elites settings: bins per descriptor axis (descriptors: mean score per example group)."""

    bins: int = Field(10, ge=1)


class WorkerResources(StrictModel):
    """What Ray reserves for each worker: GPUs (1 = one actor per GPU) and CPUs (fractions allowed)."""

    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)


class ExecutorConfig(StrictModel):
    """The `executor:` section: where candidates are evaluated.

    Attributes:
        kind: `local` (one candidate at a time in this process, the default) or `ray` (workers on a Ray cluster,
            each holding the seeds and a live model; only genomes travel).
        address: the Ray cluster (`auto`, `ray://host:10001`, `host:6379`); None: `RAY_ADDRESS`, else a local
            instance started for the run.
        workers: Ray actors evaluating candidates.
        resources_per_worker: what Ray reserves per worker.
        in_flight_per_worker: candidates queued on each worker (2 hides the round trip between two candidates).
        lookahead: candidates asked and not yet told (default: workers x in_flight_per_worker). More keeps the
            workers busy under `deterministic` ordering (a result that arrives early no longer leaves its worker
            idle until the earlier ones are told), at the price of children drawn from an older archive.
        ordering: `deterministic` (told in ask order: a seed gives the same run whatever the timing, and one
            worker equals the local executor) or `completion` (told on arrival: the highest throughput; the
            order is logged in `tells.jsonl`).
        max_restarts: times Ray restarts a worker whose process died (its candidate goes to another worker).
        start_timeout_s: seconds the workers may take to start (build their seeds, model and evaluator).
    """

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int = Field(1, ge=1)
    resources_per_worker: WorkerResources = Field(default_factory=WorkerResources)
    in_flight_per_worker: int = Field(1, ge=1)
    lookahead: int | None = Field(None, ge=1)
    ordering: Literal["deterministic", "completion"] = "deterministic"
    max_restarts: int = Field(2, ge=0)
    start_timeout_s: float = Field(600.0, gt=0)


def check_executor(config: ExecutorConfig, prefix: str = "executor") -> None:
    """Refuse Ray settings on the local executor (they would be silently ignored).

    Raises:
        SpecError: naming the offending key.
    """
    if config.kind == "local":
        for key in sorted(config.model_fields_set - {"kind"}):
            raise SpecError(f"{prefix}.{key}", "only used by the ray executor (executor: {kind: ray, ...})")
    slots = config.workers * config.in_flight_per_worker
    if config.lookahead is not None and config.lookahead < slots:
        raise SpecError(
            f"{prefix}.lookahead",
            f"must be at least workers x in_flight_per_worker ({slots}): fewer would leave workers idle",
        )


class EvolveConfig(StrictModel):
    """The `evolve:` section.

    Attributes:
        algorithm: m2n2, ga (M2N2 with alpha 0 and no attraction), cma_es, map_elites, sweep, evomerge_ps,
            evomerge_dfs or nsga2.
        budget: forward passes (candidate evaluations, seeds included) for every algorithm.
        seed: seed of the run (run r of `--runs` uses seed + r).
        archive_size, alpha, epsilon, capacity, crossover, attraction: M2N2 settings (`M2N2Config`'s defaults).
        split_point: crossover with a random split point (m2n2, ga, map_elites).
        mutation_std: Gaussian noise on every child; default 0.01 with random seeds, none otherwise.
        log_every: a history line (and the test score) every this many forward passes.
        checkpoint_every_s: checkpoint when this many seconds passed since the last one (None: off).
        checkpoint_every_steps: checkpoint every this many forward passes (None: off). Always at the end.
        threads: torch threads (results are bit-for-bit reproducible for a given count).
        cma: CMA-ES settings (cma_es only).
        map_elites: MAP-Elites settings (map_elites only).
        evomerge_ps: CMA-ES settings of evomerge_ps (model specs with a method genome only).
        evomerge_dfs: CMA-ES settings of evomerge_dfs (model specs with a route genome only).
        nsga2: NSGA-II settings (method and route genomes).
    """

    algorithm: Literal[
        "m2n2", "ga", "cma_es", "map_elites", "sweep", "evomerge_ps", "evomerge_dfs", "nsga2"
    ] = "m2n2"
    budget: int = Field(gt=0)
    seed: int = 42
    archive_size: int = Field(_M2N2.archive_size, ge=1)
    alpha: float = Field(_M2N2.alpha, ge=0)
    epsilon: float = Field(_M2N2.epsilon, ge=0)
    capacity: Literal["one", "max"] = _M2N2.capacity
    crossover: bool = _M2N2.crossover
    split_point: bool = _M2N2.split_point
    attraction: bool = _M2N2.attraction
    mutation_std: float | None = Field(None, ge=0)
    log_every: int = Field(100, ge=1)
    checkpoint_every_s: float | None = Field(30.0, gt=0)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    threads: int = Field(1, ge=1)
    cma: CMAOptions | None = None
    map_elites: MapElitesOptions | None = None
    evomerge_ps: EvomergeOptions | None = None
    evomerge_dfs: DFSOptions | None = None
    nsga2: NSGA2Options | None = None


_USES = {
    "split_point": ("m2n2", "ga", "map_elites"),
    "mutation_std": ("m2n2", "ga", "map_elites"),
    "cma": ("cma_es",),
    "map_elites": ("map_elites",),
    "evomerge_ps": ("evomerge_ps",),
    "evomerge_dfs": ("evomerge_dfs",),
    "nsga2": ("nsga2",),
    **{key: ("m2n2", "ga") for key in M2N2_SETTINGS},
}


def check_evolve(config: EvolveConfig, prefix: str = "evolve") -> None:
    """Cross-field checks: options given for an algorithm that does not use them, GA's fixed settings.

    Raises:
        SpecError: naming the offending key.
    """
    given = config.model_fields_set
    for key, algorithms in _USES.items():
        if key in given and config.algorithm not in algorithms:
            raise SpecError(
                f"{prefix}.{key}", f"not used by {config.algorithm} (only by {', '.join(algorithms)})"
            )
    if config.algorithm == "ga":
        if "alpha" in given and config.alpha != 0:
            raise SpecError(f"{prefix}.alpha", "ga is M2N2 with alpha 0; leave alpha out or use m2n2")
        if "attraction" in given and config.attraction:
            raise SpecError(
                f"{prefix}.attraction", "ga samples both parents by fitness; leave attraction out"
            )
