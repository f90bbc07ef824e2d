"""The evolve spec: what to evolve (`models:`, `genome:`), how (`evolve:`), how to score it (`evaluate:`), and
where the result goes (`output:`). One schema for every genome kind and evaluator kind, built from their
registries.

Every section rejects unknown keys; every error names its YAML path (`evolve.archive_size: ...`).

Example, from scratch (`examples/digits/scratch/m2n2.yaml`):

```yaml
name: m2n2
genome: {kind: dense, size: 19210, seeds: {kind: random, count: 2, std: 0.01}}
evolve: {algorithm: m2n2, budget: 50000, seed: 42, log_every: 100}
evaluate:
  kind: python
  callable: hf_m2n2.tasks.digits:train_scores
  test_callable: hf_m2n2.tasks.digits:test_accuracy
```

Example, pretrained seeds (`examples/specialists/spec.yaml`):

```yaml
name: m2n2
models:
  - model: build/add
  - model: build/rev
genome: {kind: blend, block_size: 1024}
evolve: {algorithm: m2n2, budget: 60, seed: 42}
evaluate:
  kind: lm_eval
  include_path: build/tasks
  tasks: [specialists_add_fit, specialists_rev_fit]
  metric: exact_match
```
"""

from __future__ import annotations

import os
from functools import cache
from typing import Annotated, Any, Union

from pydantic import Discriminator, Field, Tag, model_validator

from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate import evaluate_parts, evaluator_kind, evaluator_kinds
from hf_m2n2.evolve.config import (
    ALGORITHM_DESCRIPTIONS,
    EvolveConfig,
    ExecutorConfig,
    check_evolve,
    check_executor,
)
from hf_m2n2.genomes import check_algorithm, default_genome_kind, genome_kind, genome_kinds
from hf_m2n2.spec import (
    InputModel,
    MergeSpec,
    OutputConfig,
    StrictModel,
    is_evolve_spec,
    model_ref_string,
    parse_model,
    parse_spec,
    parse_yaml,
    read_spec_text,
)


class EvolveSpec(StrictModel):
    """An evolve spec. `genome` and `evaluate` are sections of the registered kinds (see `spec_model`).

    Attributes:
        name: label of the run (plots, summaries, the merged model's name); defaults to the algorithm.
        models: the seeds, mergekit style, for genome kinds that evolve pretrained models (blend, method).
        genome: the genome section (default: blend with `models:`, dense without).
        evolve: the strategy and budget.
        evaluate: one evaluator section, or a list of parts whose score vectors concatenate.
        executor: where candidates are evaluated (this process, or workers on a Ray cluster).
        output: where the exported model is pushed.
        trust_remote_code: let the seeds' own Python code (`auto_map`) run to load them (as `--trust-remote-code`).
    """

    name: str | None = None
    models: list[InputModel] | None = Field(None, min_length=2)
    genome: Any = None
    evolve: EvolveConfig
    evaluate: Any
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    output: OutputConfig | None = None
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_genome_kind(cls, data: Any) -> Any:
        if isinstance(data, dict):
            genome = data.get("genome", {} if data.get("models") is not None else None)
            if isinstance(genome, dict) and "kind" not in genome:
                genome = {"kind": default_genome_kind(data.get("models") is not None), **genome}
            data = {**data, "genome": genome} if genome is not None else data
        return data

    @property
    def label(self) -> str:
        return self.name or self.evolve.algorithm

    @property
    def kind(self) -> Any:
        """The genome kind (its registry entry)."""
        return genome_kind(self.genome.kind)

    def seed_refs(self) -> list[str]:
        return [model_ref_string(m.model) for m in self.models or []]


def _tagged_union(entries: dict[str, Any], what: str) -> Any:
    def tag(value: Any) -> str | None:
        kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
        return f"{kind}_{what}" if kind in entries else None  # tags must not collide with field names

    members = tuple(Annotated[config, Tag(f"{name}_{what}")] for name, config in entries.items())
    names = list(entries)
    known = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return Annotated[
        members[0] if len(members) == 1 else _union(members),
        Discriminator(
            tag,
            custom_error_type=f"invalid_{what}_kind",
            custom_error_message=f"unknown {what} kind (expected {known})",
        ),
    ]


def _one_or_list(part: Any) -> Any:
    """One part or a list of parts, told apart by the data (so errors follow the shape that was written)."""
    shapes = (Annotated[part, Tag("single_part")], Annotated[list[part], Tag("part_list")])
    return Annotated[
        _union(shapes), Discriminator(lambda v: "part_list" if isinstance(v, list) else "single_part")
    ]


def _union(members: tuple[Any, ...]) -> Any:
    return Union[members]  # noqa: UP007 (a union built from a runtime tuple)


@cache
def _spec_model(
    genomes: tuple[tuple[str, type], ...], evaluators: tuple[tuple[str, type], ...]
) -> type[EvolveSpec]:
    genome_union = _tagged_union(dict(genomes), "genome")
    part = _tagged_union(dict(evaluators), "evaluator")
    return type(
        "EvolveSpec",
        (EvolveSpec,),
        {
            "__annotations__": {"genome": genome_union, "evaluate": _one_or_list(part)},
            "__module__": __name__,
            "__doc__": EvolveSpec.__doc__,
        },
    )


def spec_model() -> type[EvolveSpec]:
    """The EvolveSpec model over the genome and evaluator kinds registered now."""
    genomes = tuple((name, kind.config) for name, kind in genome_kinds().items())
    return _spec_model(genomes, tuple((name, kind.config) for name, kind in evaluator_kinds().items()))


def parse_evolve_spec(data: Any, *, source: str = "spec") -> EvolveSpec:
    """Validate an evolve spec given as the parsed YAML mapping, then check its sections against each other.

    Raises:
        SpecError: with the YAML path of the first problem.
    """
    spec = parse_model(spec_model(), data, source=source)
    if spec.genome is None:
        raise SpecError("genome", "required")
    check_evolve(spec.evolve)
    check_executor(spec.executor)
    kind = spec.kind
    check_algorithm(kind, spec.evolve.algorithm, ALGORITHM_DESCRIPTIONS)
    if kind.uses_models and spec.models is None:
        raise SpecError("models", f"required by {kind.name} genomes (the seeds)")
    if not kind.uses_models and spec.models is not None:
        raise SpecError("models", f"not used by {kind.name} genomes (their initial genomes are genome.seeds)")
    _check_evaluate(spec, kind)
    kind.check(spec)
    return _default_capacity(spec)


def _default_capacity(spec: EvolveSpec) -> EvolveSpec:
    """M2N2 without `evolve.capacity`: `max` when an evaluator part scores continuously (CLIP scores, WebShop
    rewards), else `one` (pass/fail examples). On a pass/fail part `max` gives the same shares as `one`: an example
    no model solves holds nothing either way."""
    if spec.evolve.algorithm != "m2n2" or "capacity" in spec.evolve.model_fields_set:
        return spec
    wanted = {part.default_capacity() for part in evaluate_parts(spec.evaluate)}
    capacity = "max" if "max" in wanted else "one"
    if capacity == spec.evolve.capacity:
        return spec
    return spec.model_copy(update={"evolve": spec.evolve.model_copy(update={"capacity": capacity})})


def _check_evaluate(spec: EvolveSpec, kind: Any) -> None:
    parts = evaluate_parts(spec.evaluate)
    listed = isinstance(spec.evaluate, list)
    if listed and not parts:
        raise SpecError("evaluate", "a list of parts needs at least one part")
    for i, part in enumerate(parts):
        where = f"evaluate[{i}]" if listed else "evaluate"
        if not listed and "weight" in part.model_fields_set:
            raise SpecError(f"{where}.weight", "weights apply to parts of a list (evaluate: [...])")
        if evaluator_kind(part.kind).needs_target and not kind.uses_models:
            raise SpecError(f"{where}.kind", f"{part.kind} scores a model: it needs a spec with models:")
        if spec.evolve.algorithm == "map_elites" and not part.provides_groups():
            raise SpecError(f"{where}.groups_callable", "required by map_elites (per-example group ids)")


def load_evolve_spec(path: str | os.PathLike[str]) -> tuple[EvolveSpec, str]:
    """Read and validate an evolve spec file.

    Returns:
        The spec and the file's text (for the spec hash and the copy kept in the run directory).

    Raises:
        SpecError: unreadable file, malformed YAML or invalid spec (the message names the YAML path).
    """
    text = read_spec_text(path)
    data = parse_yaml(text, path)
    if isinstance(data, dict) and not is_evolve_spec(data):
        raise SpecError("", f"{path}: a merge spec (no evolve: section): use hf-m2n2 merge")
    return parse_evolve_spec(data, source=str(path)), text


def load_any_spec(path: str | os.PathLike[str]) -> tuple[MergeSpec | EvolveSpec, str]:
    """Read and validate any spec file: an evolve spec or a merge spec (`is_evolve_spec` tells them apart).

    Returns:
        The spec and the file's text.

    Raises:
        SpecError: unreadable file, malformed YAML or invalid spec (the message names the YAML path).
    """
    text = read_spec_text(path)
    data = parse_yaml(text, path)
    if is_evolve_spec(data):
        return parse_evolve_spec(data, source=str(path)), text
    return parse_spec(data, source=str(path)), text
