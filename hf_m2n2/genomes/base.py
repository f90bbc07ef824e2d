"""Genome kinds: what a run evolves, behind one registry.

A genome kind declares once everything the rest of the house needs to know about it: the config model of its
`genome:` section, the algorithms that can evolve it, whether its seeds are the spec's `models:`, the checks
across spec sections, how a run's parts are built (genome operations, the target a candidate is written into,
the initial genomes), and how the best genome is exported and exported again. Nothing outside this package
asks which kind a genome is: a new kind is one new file plus one `register_genome_kind` line in
`hf_m2n2/genomes/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
from pydantic import BaseModel

from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate.base import EvaluationContext
from hf_m2n2.registry import Registry

G = TypeVar("G")
SlerpScope = Literal["global", "segment"]


@runtime_checkable
class GenomeOps(Protocol[G]):
    """Operations on opaque genomes of one kind, on the driver, holding no model tensors. Implementations hold
    no random state: every draw comes from the `numpy.random.Generator` passed in, which the strategy owns and
    checkpoints."""

    kind: str
    slerp_scope: SlerpScope

    @property
    def size(self) -> int:
        """N, the number of flattened parameters; split points lie in [0, N] (N: no split)."""
        ...

    def crossover(self, x: G, y: G, w: float, split: int) -> G:
        """SLERP x towards y with t = w on [0, split) and t = 1 - w on [split, N); angles per `slerp_scope`."""
        ...

    def mutate(self, x: G, std: float, rng: np.random.Generator) -> G:
        """x plus N(0, std^2) noise on every parameter (a new genome; x is unchanged)."""
        ...

    def random(self, std: float, rng: np.random.Generator) -> G:
        """A genome with every parameter drawn from N(0, std^2)."""
        ...

    def to_state(self, x: G) -> Any:
        """x as checkpointable data: numpy arrays, numbers, strings, lists and dicts of them."""
        ...

    def from_state(self, state: Any) -> G:
        """Inverse of `to_state`."""
        ...


class Target(Protocol):
    """Where a genome becomes something an evaluator can score (a live model, a parameter vector)."""

    def write(self, genome: Any) -> Any:
        """Put the genome in place and return what the evaluator receives."""
        ...


@dataclass
class GenomeRun:
    """What a genome kind builds for one run.

    Attributes:
        ops: the genome operations the strategy uses.
        target: writes a genome where the evaluator sees it.
        initial: the initial genomes, asked first by strategies that take seeds.
        mutation_std: Gaussian noise on every child (0: none).
        context: what the evaluator factory may use (the live model, the reference seed, the spec's folder).
        seeds: the opened input models (empty for dense genomes), in genome order; the kind's ops give one
            genome per seed standing for it unmerged (`ops.seed_genomes()`, the held-out report's rows).
        cache_scores: score each distinct genome once (its recipe hash keys the cache).
        timed: record the seconds of every write and evaluation (the run's `timing.json`).
        export: what the kind's `export` needs besides the spec (tensor names, the reference seed, ...).
    """

    ops: Any
    target: Target | None
    initial: list[Any]
    mutation_std: float = 0.0
    context: EvaluationContext = field(default_factory=EvaluationContext)
    seeds: list[Any] = field(default_factory=list)
    cache_scores: bool = False
    timed: bool = False
    export: dict[str, Any] = field(default_factory=dict)


class GenomeKind:
    """One kind of genome. Subclasses set the class attributes and implement `build` (and, for kinds whose
    result is a model, `export` and `export_again`).

    Attributes:
        name: the `genome: {kind: ...}` value.
        config: the section's pydantic model (its `kind` field a Literal of `name`).
        algorithms: the `evolve.algorithm` values that can evolve it.
        uses_models: its seeds are the spec's `models:` (and a run exports a model); else `models:` is refused.
    """

    name: str = ""
    config: type[BaseModel] = BaseModel
    algorithms: tuple[str, ...] = ()
    uses_models: bool = False

    def check(self, spec: Any) -> None:
        """Checks across the spec's sections beyond the section's own model (raises SpecError)."""

    def preflight(self, spec: Any, spec_dir: Path | None, resolve: bool = True) -> None:
        """What `hf-m2n2 validate` checks before a run, short of building it: what the section names imports,
        and (with `resolve`) the seeds open and fit together. Raises what `build` would."""

    def slerp_scope(self, config: Any) -> str | None:
        """Where the section measures SLERP angles (for the run summary; None: the kind has no crossover)."""
        return getattr(config, "slerp_scope", None)

    def build(
        self, spec: Any, rng: np.random.Generator, run_dir: Path, spec_dir: Path | None, live: bool = True
    ) -> GenomeRun:
        """The run's parts; `rng` draws whatever the kind draws at the start (random initial genomes).

        `live` False: the driver of workers that hold the live model themselves (the Ray executor): build the ops,
        the initial genomes, the seeds and what `export` needs, not the live model (`target` may be None)."""
        raise NotImplementedError

    def export(self, run: GenomeRun, spec: Any, outcome: Any, model_dir: Path) -> None:
        """Write the best genome's model to `model_dir` (all or nothing), with `outcome.write_card`."""

    def export_again(
        self, model_dir: Path, out_dir: Path, overwrite: bool, *, trust_remote_code: bool = False
    ) -> Path | None:
        """`hf-m2n2 export`: write a finished run's model again from its recipe, if `model_dir` is this kind's
        (`trust_remote_code`: the seeds' custom code may run, as `--trust-remote-code`)."""
        return None


def check_distinct_seeds(spec: Any) -> None:
    """Refuse a spec listing one seed twice (at `models`)."""
    refs = spec.seed_refs()
    if len(set(refs)) != len(refs):
        raise SpecError("models", "a seed is listed twice")


GENOME_KINDS = Registry[GenomeKind]("genome kind", "genome.kind")


def register_genome_kind(kind: GenomeKind) -> GenomeKind:
    """Register a genome kind (replacing one of the same name).

    Example:
        >>> register_genome_kind(DenseKind())  # doctest: +SKIP
    """
    return GENOME_KINDS.add(kind.name, kind)


def genome_kind(name: str) -> GenomeKind:
    """The registered kind called `name` (SpecError naming `genome.kind` if none)."""
    return GENOME_KINDS.get(name)


def genome_kinds() -> dict[str, GenomeKind]:
    """Every registered kind, by name, in registration order."""
    return GENOME_KINDS.all()


def default_genome_kind(uses_models: bool) -> str:
    """The kind a `genome:` section without `kind:` gets: the first registered one that takes (or refuses)
    `models:` as the spec does (blend with models, dense without)."""
    return next(k.name for k in GENOME_KINDS.all().values() if k.uses_models == uses_models)


def check_algorithm(kind: GenomeKind, algorithm: str, describe: dict[str, str]) -> None:
    """Refuse an algorithm the kind cannot evolve, pointing at the kind (or the spec shape) that it needs.

    Args:
        kind: the spec's genome kind.
        algorithm: `evolve.algorithm`.
        describe: what each algorithm evolves, e.g. `{"cma_es": "evolves dense vectors"}`.

    Raises:
        SpecError: at `evolve.algorithm` (change the algorithm) or `genome.kind` (change the genome).
    """
    if algorithm in kind.algorithms:
        return
    if len(kind.algorithms) == 1:
        raise SpecError(
            "evolve.algorithm", f"a {kind.name} genome is evolved by {kind.algorithms[0]}, not {algorithm}"
        )
    what = f"{algorithm} {describe.get(algorithm, 'is not available')}"
    owners = [k for k in GENOME_KINDS.all().values() if algorithm in k.algorithms]
    same_shape = [k for k in owners if k.uses_models == kind.uses_models]
    if same_shape:
        raise SpecError("genome.kind", f"{what}: use genome: {{kind: {same_shape[0].name}, ...}}")
    if owners:
        owner = owners[0]
        shape = "models: and " if owner.uses_models else "no models: and "
        raise SpecError(
            "evolve.algorithm", f"{what}: it needs a spec with {shape}genome: {{kind: {owner.name}}}"
        )
    choices = ", ".join(kind.algorithms)
    raise SpecError("evolve.algorithm", f"{what}; {kind.name} genomes use {choices}")
