"""The `genome:`, `evolve:` and `evaluate:` spec sections (strict pydantic models), and standalone evolve specs.

Every section rejects unknown keys; every error names its YAML path (`evolve.archive_size: ...`). The sections
are self-contained so that a merge spec can carry them too.

Example spec (`examples/digits/scratch/m2n2.yaml`):

```yaml
name: m2n2
genome: {kind: dense, size: 19210, seeds: {kind: random, count: 2, std: 0.01}}
evolve: {algorithm: m2n2, budget: 50000, seed: 42, log_every: 100}
evaluate:
  kind: python
  callable: hf_m2n2.tasks.digits:train_scores
  test_callable: hf_m2n2.tasks.digits:test_accuracy
```
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hf_m2n2.errors import SpecError
from hf_m2n2.spec import parse_yaml, read_spec_text, validation_error

ALGORITHMS = ("m2n2", "ga", "cma_es", "map_elites", "sweep", "evomerge_ps")
_CALLABLE_HELP = "expected 'module:function' (e.g. hf_m2n2.tasks.digits:train_scores)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_callable(value: str | None) -> str | None:
    if value is None:
        return None
    module, sep, attr = value.partition(":")
    if (
        not sep
        or not module
        or not attr
        or not all(p.isidentifier() for p in module.split(".") + attr.split("."))
    ):
        raise ValueError(f"{_CALLABLE_HELP}, got {value!r}")
    return value


class RandomSeeds(_Strict):
    """`count` seed vectors drawn from N(0, std^2) with the run's seed (from-scratch runs)."""

    kind: Literal["random"]
    count: int = Field(2, ge=1)
    std: float = Field(0.01, gt=0)


class PythonSeeds(_Strict):
    """Seed vectors returned by a Python function `callable(**kwargs) -> list of 1-D arrays`."""

    kind: Literal["python"]
    callable: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    _callable = field_validator("callable")(_check_callable)


SeedsConfig = Annotated[RandomSeeds | PythonSeeds, Field(discriminator="kind")]


class DenseGenomeConfig(_Strict):
    """A genome that is one flat float32 vector (models evolved from scratch, e.g. the digits MLP).

    Attributes:
        size: number of parameters N.
        seeds: where the initial genomes come from.
        slerp_scope: SLERP angle from the full vectors (`global`, reference code) or per segment (`segment`).
    """

    kind: Literal["dense"] = "dense"
    size: int = Field(gt=0)
    seeds: SeedsConfig = RandomSeeds(kind="random")
    slerp_scope: Literal["global", "segment"] = "global"


class CMAOptions(_Strict):
    """CMA-ES settings: popsize, initial step size, separable (diagonal) covariance."""

    popsize: int = Field(20, ge=2)
    sigma0: float = Field(0.01, gt=0)
    diagonal: bool = False


class EvomergeOptions(_Strict):
    """evomerge_ps settings (Akiba et al.): CMA-ES popsize (None: 4 + floor(3 ln n)), initial step size and mean."""

    popsize: int | None = Field(None, ge=2)
    sigma0: float = Field(1.0 / 6.0, gt=0)
    x0: float = Field(0.5, ge=0, le=1)


class MapElitesOptions(_Strict):
    """MAP-Elites settings: bins per descriptor axis (descriptors: mean score per example group)."""

    bins: int = Field(10, ge=1)


class EvolveConfig(_Strict):
    """The `evolve:` section.

    Attributes:
        algorithm: m2n2, ga (M2N2 with alpha 0 and no attraction), cma_es, map_elites, sweep or evomerge_ps.
        budget: forward passes (candidate evaluations, seeds included) for every algorithm.
        seed: seed of the run (run r of `--runs` uses seed + r).
        archive_size, alpha, epsilon, capacity, crossover, attraction: M2N2 settings.
        split_point: crossover with a random split point (m2n2, ga, map_elites).
        mutation_std: Gaussian noise on every child; default 0.01 with random seeds, none otherwise.
        log_every: a history line (and the test score) every this many forward passes.
        checkpoint_every_s: checkpoint when this many seconds passed since the last one (None: off).
        checkpoint_every_steps: checkpoint every this many forward passes (None: off). Always at the end.
        threads: torch threads (results are bit-for-bit reproducible for a given count).
        cma: CMA-ES settings (cma_es only).
        map_elites: MAP-Elites settings (map_elites only).
        evomerge_ps: CMA-ES settings of evomerge_ps (model specs with a method genome only).
    """

    algorithm: Literal["m2n2", "ga", "cma_es", "map_elites", "sweep", "evomerge_ps"] = "m2n2"
    budget: int = Field(gt=0)
    seed: int = 42
    archive_size: int = Field(20, ge=1)
    alpha: float = Field(1.0, ge=0)
    epsilon: float = Field(0.0, ge=0)
    capacity: Literal["one", "max"] = "one"
    crossover: bool = True
    split_point: bool = True
    attraction: bool = True
    mutation_std: float | None = Field(None, ge=0)
    log_every: int = Field(100, ge=1)
    checkpoint_every_s: float | None = Field(30.0, gt=0)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    threads: int = Field(1, ge=1)
    cma: CMAOptions | None = None
    map_elites: MapElitesOptions | None = None
    evomerge_ps: EvomergeOptions | None = None


class PythonEvaluateConfig(_Strict):
    """`evaluate: {kind: python, ...}`: Python functions of the materialized candidate.

    Attributes:
        callable: `module:function`, `function(model, **kwargs)` returning per-example scores (1-D, >= 0).
        test_callable: `function(model, **kwargs)` returning one held-out score, logged (not a forward pass).
        groups_callable: `function(**kwargs)` returning per-example group ids (MAP-Elites descriptors).
        kwargs: keyword arguments passed to the three functions.
    """

    kind: Literal["python"]
    callable: str
    test_callable: str | None = None
    groups_callable: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    _callables = field_validator("callable", "test_callable", "groups_callable")(_check_callable)


class EvolveSpec(_Strict):
    """A standalone evolution spec: what to evolve, how, and how to score it.

    Attributes:
        name: label of the run (plots, summaries); defaults to the algorithm.
    """

    name: str | None = None
    genome: DenseGenomeConfig
    evolve: EvolveConfig
    evaluate: PythonEvaluateConfig

    @property
    def label(self) -> str:
        return self.name or self.evolve.algorithm


_M2N2_ONLY = ("archive_size", "alpha", "epsilon", "capacity", "crossover", "attraction")
_USES = {
    "split_point": ("m2n2", "ga", "map_elites"),
    "mutation_std": ("m2n2", "ga", "map_elites"),
    "cma": ("cma_es",),
    "map_elites": ("map_elites",),
    "evomerge_ps": ("evomerge_ps",),
    **{key: ("m2n2", "ga") for key in _M2N2_ONLY},
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


def check_evolve_spec(spec: EvolveSpec) -> None:
    """Checks across sections of a standalone spec.

    Raises:
        SpecError: naming the offending key.
    """
    check_evolve(spec.evolve)
    if spec.evolve.algorithm == "evomerge_ps":
        raise SpecError(
            "evolve.algorithm",
            "evomerge_ps evolves merge-method parameters of pretrained models: a spec with models: and "
            "genome: {kind: method, ...}",
        )
    if spec.evolve.algorithm == "map_elites" and spec.evaluate.groups_callable is None:
        raise SpecError("evaluate.groups_callable", "required by map_elites (per-example group ids)")
    seeds = spec.genome.seeds
    if spec.evolve.algorithm == "sweep" and isinstance(seeds, RandomSeeds) and seeds.count != 2:
        raise SpecError("genome.seeds.count", "the sweep needs exactly two seeds")


def parse_evolve_spec(data: Any, *, source: str = "spec") -> EvolveSpec:
    """Validate a standalone evolve spec given as the parsed YAML mapping.

    Raises:
        SpecError: with the YAML path of the first problem.
    """
    if not isinstance(data, dict):
        raise SpecError("", f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        spec = EvolveSpec(**data)
    except ValidationError as exc:
        raise validation_error(exc, data) from None
    check_evolve_spec(spec)
    return spec


def load_evolve_spec(path: str | os.PathLike[str]) -> tuple[EvolveSpec, str]:
    """Read and validate an evolve spec file.

    Args:
        path: the YAML file.

    Returns:
        The spec and the file's text (for the spec hash and the copy kept in the run directory).

    Raises:
        SpecError: unreadable file, malformed YAML or invalid spec (the message names the YAML path).
    """
    text = read_spec_text(path)
    return parse_evolve_spec(parse_yaml(text, path), source=str(path)), text
