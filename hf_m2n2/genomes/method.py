"""Method genomes: merge-method parameters per seed and per layer group, evolved by `evomerge_ps` (or `nsga2`).

A method genome is a vector in [0, 1]^n: the evolved per-model parameters (e.g. TIES/DARE `weight` and `density`)
of every seed in every layer group, ordered group by group, then seed by seed, then parameter by parameter:
`x[(g * K + k) * P + p]`; evolved global parameters (slerp's `t`), one value per group, follow each group's
per-model values: `x[g * (K * P + Q) + K * P + q]`. For causal LMs it stands for a mergekit merge spec with one
slice per layer group (as mergekit-evolve writes them): each slice lists every seed over the group's layers with
the genome's values as its scalar parameters (plus the base model, for task-vector methods), and the global ones
as the slice's parameters. Embeddings and other tensors before the layers take the first group's values, the
final norm and the output head the last group's (mergekit's planning).

Text-to-image pipelines cannot be sliced (a UNet's blocks are not restacked): their layers are the UNet's blocks
(IN00.., M00, OUT..; `hf_m2n2.unet_blocks`), and the spec lists the seeds under `models:` with every evolved
parameter given as one `{filter: BLOCK, value}` per block, the UNet's tensors outside the blocks (`BASE`: time and
class embeddings) taking the first group's value. Only the UNet is merged; text encoders and VAE are the
reference seed's (the base, else the first model), as in `hf-m2n2 merge` of pipelines.

A candidate is materialized by planning that spec as `hf-m2n2 merge` does (the seeds' model kind's
`recipe`) and computing every tensor with `compute_task`, the functions of `hf-m2n2 merge`, into the resident
live model. The best genome is exported by `hf-m2n2 merge` itself: its spec is written as `merge_config.yaml`
next to the weights, and `hf-m2n2 merge merge_config.yaml OUT` reproduces them bit for bit (DARE's masks come
from merge's default `--random-seed 0`; give `--device` when the run's `genome.device` was not the CPU).

Example genome section (`examples/specialists/compare/evomerge_ps.yaml`):

```yaml
genome:
  kind: method
  method: dare_ties
  base_model: ../build/base
  parameters: [weight, density]
  layer_groups: 2          # omitted: one group per layer (per UNet block for pipelines)
```
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field

from hf_m2n2.errors import HfM2n2Error, SpecError
from hf_m2n2.evaluate.base import EvaluationContext
from hf_m2n2.genomes.base import GenomeKind, GenomeRun
from hf_m2n2.seeds import Seed
from hf_m2n2.spec import StrictModel

MERGE_CONFIG = "merge_config.yaml"
EVOMERGE_PAPER = "Evolutionary Optimization of Model Merging Recipes (https://arxiv.org/abs/2403.13187)"


class MethodGenomeConfig(StrictModel):
    """`genome: {kind: method, ...}`: per-seed, per-layer-group parameters of one merge method.

    Attributes:
        method: a registered merge method with float parameters (ties, dare_ties, dare_linear, task_arithmetic,
            linear, breadcrumbs, della, slerp, ...).
        base_model: the base of task-vector methods (required by them; not one of `models`).
        parameters: the parameters evolved, each in [0, 1]: per-model ones (`weight`, `density`) take a value per
            model and layer group, global ones (slerp's `t`) a value per layer group.
        layer_groups: contiguous groups of layers (of UNet blocks, for pipelines) sharing values (None: one group
            per layer).
        method_parameters: fixed parameters of the method (the merge spec's global `parameters:`, e.g.
            `{lambda: 1.0, normalize: true}`, or a fixed `weight` when only `density` evolves).
        dtype: dtype of the merge arithmetic, of the live model and of the exported weights.
        device: where the live model lives and the merge arithmetic runs.
    """

    kind: Literal["method"]
    method: str
    base_model: str | None = None
    parameters: list[str] = Field(default_factory=lambda: ["weight", "density"], min_length=1)
    layer_groups: int | None = Field(None, ge=1)
    method_parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


def check_method_spec(spec: Any) -> None:
    """Checks of a model evolution spec with a method genome (the parsed spec's other sections are valid).

    Raises:
        SpecError: naming the offending YAML path.
    """
    from hf_m2n2.methods import UnknownMethodError, get_method
    from hf_m2n2.spec import check_setting

    genome: MethodGenomeConfig = spec.genome
    try:
        method = get_method(genome.method)
    except UnknownMethodError as exc:
        raise SpecError("genome.method", str(exc)) from None
    evolvable = {p.name: p for p in method.params if p.kind == "float"}
    for i, name in enumerate(genome.parameters):
        if name not in evolvable:
            choices = ", ".join(evolvable) or "none"
            raise SpecError(
                f"genome.parameters[{i}]",
                f"{name!r} is not a per-model parameter of {method.name}, nor a global number "
                f"(evolvable: {choices})",
            )
        if name in genome.parameters[:i]:
            raise SpecError(f"genome.parameters[{i}]", f"{name!r} is listed twice")
    known = {p.name for p in method.params}
    for key, value in genome.method_parameters.items():
        if key not in known:
            raise SpecError(f"genome.method_parameters.{key}", f"not a parameter of {method.name}")
        if key in genome.parameters:
            raise SpecError(f"genome.method_parameters.{key}", "is evolved (listed in genome.parameters)")
        check_setting(f"genome.method_parameters.{key}", value)
    for p in method.params:
        if p.required and p.name not in genome.parameters and p.name not in genome.method_parameters:
            raise SpecError(
                "genome.parameters",
                f"{p.name} is required by {method.name}: evolve it or set it in genome.method_parameters",
            )
    n = len(spec.models)
    if first_model_is_base(method, genome):
        if n != 2:
            raise SpecError(
                "models", f"{method.name} goes from the first model (its base) to the second: list 2, got {n}"
            )
        return
    if method.uses_base == "required" and genome.base_model is None:
        raise SpecError("genome.base_model", f"required by {method.name}")
    if method.uses_base == "never" and genome.base_model is not None:
        raise SpecError("genome.base_model", f"not used by {method.name}")
    if genome.base_model is not None and genome.base_model in spec.seed_refs():
        raise SpecError("genome.base_model", "is one of the models; list only the models merged onto it")
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        most = "" if method.max_models is None else f" and at most {method.max_models}"
        raise SpecError("models", f"{method.name} takes at least {method.min_models}{most} models, got {n}")


def first_model_is_base(method: Any, genome: MethodGenomeConfig) -> bool:
    """Whether the merge's base is the first of the spec's `models:`: a method from a base to one other model
    (slerp, nearswap, arcee_fusion) with no `genome.base_model` (an evolve spec lists at least two models; the
    merge goes from the first, t = 0, to the second)."""
    return genome.base_model is None and method.uses_base == "required" and method.max_models == 1


@dataclass(frozen=True)
class SeedPick:
    """A pseudo-genome standing for seed `index` itself, unmerged (for the held-out report)."""

    index: int


@dataclass(frozen=True)
class MethodTemplate:
    """The fixed part of a method genome's merge spec: everything but the evolved values.

    Attributes:
        method: merge method.
        models: the merged seeds' references (pinned), in genome order.
        base: the base model's reference (pinned), or None.
        parameters: evolved per-model parameter names (one value per model and group).
        groups: [start, end) layer ranges, one per layer group.
        fixed: the spec's global `parameters:`.
        dtype: compute and output dtype.
        filters: for seeds whose layers are named rather than sliced (a pipeline's UNet blocks,
            `Architecture.layer_filters`): the filter of the tensors outside the layers, then one per layer; None
            (causal LMs): one `layer_range` slice per group.
        shared: evolved global parameter names (one value per group, e.g. slerp's `t`).
    """

    method: str
    models: tuple[str, ...]
    base: str | None
    parameters: tuple[str, ...]
    groups: tuple[tuple[int, int], ...]
    fixed: dict[str, Any]
    dtype: str
    filters: tuple[str, ...] | None = None
    shared: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.groups) * (len(self.models) * len(self.parameters) + len(self.shared))

    def labels(self) -> list[str]:
        """One readable name per genome coordinate, e.g. `layers[0:2].<model>.weight`, `layers[0:2].t`
        (`IN00-IN02.<model>.weight` for named layers)."""
        labels = []
        for start, end in self.groups:
            group = self._group_name(start, end)
            labels += [f"{group}.{model}.{name}" for model in self.models for name in self.parameters]
            labels += [f"{group}.{name}" for name in self.shared]
        return labels

    def _group_name(self, start: int, end: int) -> str:
        if self.filters is None:
            return f"layers[{start}:{end}]"
        first, last = self.filters[1 + start], self.filters[end]
        return first if end - start == 1 else f"{first}-{last}"

    def _values(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Genome x as (per-model values [group, model, parameter], shared values [group, parameter])."""
        groups, per_model = len(self.groups), len(self.models) * len(self.parameters)
        rows = np.asarray(x, dtype=np.float64).reshape(groups, per_model + len(self.shared))
        values = rows[:, :per_model].reshape(groups, len(self.models), len(self.parameters))
        return values, rows[:, per_model:]

    def merge_config(self, x: np.ndarray) -> dict[str, Any]:
        """The mergekit merge spec (as a YAML mapping) of genome x."""
        values, shared = self._values(x)
        config: dict[str, Any] = {"merge_method": self.method}
        if self.base is not None:
            config["base_model"] = self.base
        config["dtype"] = self.dtype
        config["out_dtype"] = self.dtype
        if self.filters is not None:
            return {**config, **self._block_sections(values, shared, self.filters)}
        slices = []
        for g, (start, end) in enumerate(self.groups):
            sources: list[dict[str, Any]] = [
                {"model": model, "layer_range": [start, end]}
                | self._own({name: float(values[g, k, p]) for p, name in enumerate(self.parameters)})
                for k, model in enumerate(self.models)
            ]
            if self.base is not None:
                sources.append({"model": self.base, "layer_range": [start, end]})
            slices.append({"sources": sources})
            if self.shared:
                slices[-1]["parameters"] = {name: float(shared[g, q]) for q, name in enumerate(self.shared)}
        if self.fixed:
            config["parameters"] = dict(self.fixed)
        config["slices"] = slices
        return config

    def _block_sections(
        self, values: np.ndarray, shared: np.ndarray, filters: tuple[str, ...]
    ) -> dict[str, Any]:
        """`parameters:` and `models:` of named layers: every evolved parameter is a list of one filter per layer,
        the tensors outside the layers taking the first group's value (as a sliced spec gives them), so that the
        planner resolves each tensor to exactly its layer's entry (a UNet block's tensors alias the block)."""
        group_of = [g for g, (start, end) in enumerate(self.groups) for _ in range(start, end)]
        owners = [0, *group_of]  # the outside filter, then one per layer

        def per_layer(column: np.ndarray) -> list[dict[str, Any]]:
            return [{"filter": flt, "value": float(column[g])} for flt, g in zip(filters, owners)]

        sections: dict[str, Any] = {}
        globals_ = {**self.fixed, **{name: per_layer(shared[:, q]) for q, name in enumerate(self.shared)}}
        if globals_:
            sections["parameters"] = globals_
        sections["models"] = [
            {"model": model}
            | self._own({name: per_layer(values[:, k, p]) for p, name in enumerate(self.parameters)})
            for k, model in enumerate(self.models)
        ]
        return sections

    @staticmethod
    def _own(parameters: dict[str, Any]) -> dict[str, Any]:
        """A source's `parameters:` entry, left out when the method evolves none per model (slerp's `t` only)."""
        return {"parameters": parameters} if parameters else {}


def layer_groups(num_layers: int, groups: int | None) -> tuple[tuple[int, int], ...]:
    """Contiguous [start, end) ranges splitting `num_layers` layers into `groups` near-equal groups.

    Example:
        >>> layer_groups(5, 2)
        ((0, 3), (3, 5))
    """
    groups = num_layers if groups is None else groups
    if not 1 <= groups <= num_layers:
        raise SpecError("genome.layer_groups", f"{groups} groups for {num_layers} layers")
    bounds = [round(i * num_layers / groups) for i in range(groups + 1)]
    return tuple((bounds[i], bounds[i + 1]) for i in range(groups))


def pinned_ref(seed: Seed) -> str:
    """How a merge spec names the seed again: `repo_id@commit` for Hub seeds, the absolute directory otherwise
    (`BASE+ADAPTER` of those for a LoRA seed)."""
    return seed.model.locator


def genome_hash(x: np.ndarray) -> str:
    """The recipe hash of a genome (the evaluator's score-cache key)."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()[:20]


class MethodOps:
    """GenomeOps over method genomes: vectors in [0, 1]^n standing for merge specs (no crossover: evomerge_ps).

    Args:
        template: the merge spec without the evolved values.
        num_seeds: the opened seeds (the models, then the base): `seed_genomes` has one `SeedPick` each.
    """

    kind = "method"
    slerp_scope = None

    def __init__(self, template: MethodTemplate, num_seeds: int):
        self.template = template
        self.num_seeds = num_seeds

    @property
    def size(self) -> int:
        return self.template.size

    def from_array(self, values: Any) -> np.ndarray:
        """A genome from n numbers in [0, 1] (float64).

        Raises:
            ValueError: wrong length, non-finite values or values outside [0, 1].
        """
        x = np.array(values, dtype=np.float64).reshape(-1)
        if x.size != self.size:
            raise ValueError(f"expected {self.size} values, got {x.size}")
        if not np.isfinite(x).all() or (x < 0).any() or (x > 1).any():
            raise ValueError("method genome values must lie in [0, 1]")
        return x

    def to_state(self, x: np.ndarray) -> np.ndarray:
        return x

    def from_state(self, state: Any) -> np.ndarray:
        return self.from_array(state)

    def initial_array(self) -> np.ndarray:
        """0.5 everywhere, where evomerge_ps starts (nsga2's first individual)."""
        return np.full(self.size, 0.5)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Every parameter in [0, 1]."""
        return np.zeros(self.size), np.ones(self.size)

    def crossover(self, x: Any, y: Any, w: float, split: int) -> Any:
        raise HfM2n2Error("method genomes are evolved by evomerge_ps (CMA-ES) or nsga2, not by crossover")

    def mutate(self, x: Any, std: float, rng: np.random.Generator) -> Any:
        raise HfM2n2Error("method genomes are evolved by evomerge_ps (CMA-ES), not by mutation")

    def random(self, std: float, rng: np.random.Generator) -> Any:
        raise HfM2n2Error("method genomes start at 0.5 everywhere (evomerge_ps), not from random vectors")

    def hash(self, x: Any) -> str:
        return f"seed-{x.index}" if isinstance(x, SeedPick) else genome_hash(x)

    def seed_genomes(self) -> list[SeedPick]:
        """Every seed as itself (for the held-out report)."""
        return [SeedPick(k) for k in range(self.num_seeds)]

    def merge_config(self, x: np.ndarray) -> dict[str, Any]:
        return self.template.merge_config(x)


def plan_genome(
    template: MethodTemplate, seeds: list[Seed], seed_index: dict[str, int], x: np.ndarray
) -> Any:
    """The MethodRecipe `hf-m2n2 merge` plans for genome x's merge spec (merge's default options: random seed 0),
    through the seeds' model kind (a pipeline's plan covers the merged components only, the UNet by default);
    `seed_index` maps each seed's `pinned_ref` to its position."""
    from hf_m2n2.merge import MergeOptions, seeds_kind
    from hf_m2n2.spec import parse_spec

    spec = parse_spec(template.merge_config(x), source="method genome")
    return seeds_kind(spec, seeds).recipe(spec, seeds, seed_index, MergeOptions(progress=False))


def seed_positions(seeds: list[Seed]) -> dict[str, int]:
    """Each seed's position by the reference a method genome's merge spec names it with (`pinned_ref`)."""
    return {pinned_ref(s): i for i, s in enumerate(seeds)}


class MethodTarget:
    """Writes method genomes into the live model: `hf-m2n2 merge` of the genome's spec, in place.

    Args:
        template: the merge spec without the evolved values.
        seeds: the opened seeds (`template.models`, then the base).
        live: the resident model candidates are written into.
        device: where the merge arithmetic runs.
        merge_options: `hf-m2n2 merge`'s options whose computation the live model mirrors (default: merge's
            defaults on `device`).
        merged: the tensors every genome writes (its plan's); a seed pick writes only these too, so the rest stay
            the reference's, as in the export (a pipeline's text encoders and VAE). None: all of the seed's.
    """

    def __init__(
        self,
        template: MethodTemplate,
        seeds: list[Seed],
        live: Any,
        device: str = "cpu",
        merge_options=None,
        merged: tuple[str, ...] | None = None,
    ):
        from hf_m2n2.merge import MergeOptions

        self.template = template
        self.seeds = seeds
        self.seed_index = seed_positions(seeds)
        self.live = live
        self.merge_options = merge_options or MergeOptions(device=device, progress=False)
        self.merged = None if merged is None else frozenset(merged)
        self._last: np.ndarray | None = None

    def plan(self, x: np.ndarray) -> Any:
        """`plan_genome` of x over this target's seeds."""
        return plan_genome(self.template, self.seeds, self.seed_index, x)

    def write(self, x: np.ndarray | SeedPick) -> Any:
        """Write genome x's merged tensors (or a seed's own) into the live model in place."""
        if isinstance(x, SeedPick):
            self._write_seed(x.index)
            return self.live.model
        if self._last is not None and np.array_equal(self._last, x):
            return self.live.model
        import torch

        from hf_m2n2.materialize import compute_item, materialize, work_items

        recipe = self.plan(x)
        options = self.merge_options
        self._last = None

        def compute(item: Any) -> torch.Tensor | None:
            return compute_item(item, self.seeds, compute_dtype=recipe.compute_dtype, device=options.device)

        # Exactly as `hf-m2n2 merge` computes: the same work items (row blocks, streamed statistics), workers of
        # one thread each, so reductions such as DARE's L1 rescale sum in the same order and the evaluated
        # weights are those the exported spec reproduces.
        threads = torch.get_num_threads()
        if options.workers > 1:
            torch.set_num_threads(1)
        try:
            materialize(
                work_items(recipe, options.chunk_elements),
                compute,
                self.live,
                workers=options.workers,
                budget_bytes=options.memory_budget,
            )
        finally:
            torch.set_num_threads(threads)
        self._last = np.array(x, copy=True)
        return self.live.model

    def _write_seed(self, k: int) -> None:
        self._last = None
        seed, names = self.seeds[k], set(self.live.names)
        for name in seed.checkpoint.names:
            if name in names and (self.merged is None or name in self.merged):
                self.live.write(name, seed.checkpoint.get(name).to(self.live.dtype))


class MethodKind(GenomeKind):
    """`genome: {kind: method, ...}`: evomerge_ps over merge-method parameters; the export is `hf-m2n2 merge`
    of the best genome's spec, written next to the weights as merge_config.yaml."""

    name = "method"
    config = MethodGenomeConfig
    algorithms = ("evomerge_ps", "nsga2")
    uses_models = True

    def check(self, spec: Any) -> None:
        check_method_spec(spec)

    def build(
        self, spec: Any, rng: np.random.Generator, run_dir: Path, spec_dir: Path | None, live: bool = True
    ) -> GenomeRun:
        """Open the seeds (the models, then the base), build the live model (unless `live` is False) and the ops.

        Raises:
            SpecError: the seeds' layer counts differ, the layer groups do not fit, or the merge cannot be
                planned.
        """
        from hf_m2n2.models import model_kind
        from hf_m2n2.plan import torch_dtype

        genome: MethodGenomeConfig = spec.genome
        seeds, template, reference, merged = self._open(spec, spec_dir)
        ops = MethodOps(template, len(seeds))
        if not live:
            return GenomeRun(ops, None, [], seeds=seeds, cache_scores=True)
        live = model_kind(seeds[reference].kind).live_target(
            seeds[reference],
            dtype=torch_dtype(genome.dtype),
            device=genome.device,
            trust_remote_code=spec.trust_remote_code,
        )
        target = MethodTarget(template, seeds, live, genome.device, merged=merged)
        context = EvaluationContext.of_seed(
            live.model, seeds[reference], spec_dir, genome.device, spec.trust_remote_code, evolved=merged
        )
        return GenomeRun(
            ops,
            target,
            [],
            context=context,
            seeds=seeds,
            cache_scores=True,
        )

    def preflight(self, spec: Any, spec_dir: Path | None, resolve: bool = True) -> None:
        if resolve:
            for seed in self._open(spec, spec_dir)[0]:
                seed.checkpoint.close()

    def _open(
        self, spec: Any, spec_dir: Path | None
    ) -> tuple[list[Seed], MethodTemplate, int, tuple[str, ...]]:
        """The opened seeds (the models, then the base), the merge template (planned once at 0.5 everywhere, so
        that a merge that cannot be planned fails now, not at the first candidate), the reference seed and the
        merged tensors (that plan's)."""
        from hf_m2n2.methods import get_method
        from hf_m2n2.seeds import open_seeds

        genome: MethodGenomeConfig = spec.genome
        refs = spec.seed_refs() + ([genome.base_model] if genome.base_model is not None else [])
        seeds = open_seeds(refs, base_dir=spec_dir, trust_remote_code=spec.trust_remote_code)
        index = seed_positions(seeds)
        pinned = list(index)
        if len(index) != len(seeds):
            raise SpecError("models", "two references resolve to the same model")
        counts = {s.name: s.num_layers for s in seeds}
        if len(set(counts.values())) != 1:
            detail = ", ".join(f"{name}: {n}" for name, n in counts.items())
            raise SpecError("models", f"the models have different layer counts ({detail})")
        n_models = len(spec.models)
        method = get_method(genome.method)
        per_model = {p.name for p in method.model_params}
        if first_model_is_base(method, genome):  # slerp from models[0] to models[1]
            models, base, reference = tuple(pinned[1:]), pinned[0], 0
        else:
            models = tuple(pinned[:n_models])
            base = pinned[n_models] if genome.base_model is not None else None
            reference = n_models if genome.base_model is not None else 0
        template = MethodTemplate(
            method=genome.method,
            models=models,
            base=base,
            parameters=tuple(name for name in genome.parameters if name in per_model),
            groups=layer_groups(seeds[0].num_layers, genome.layer_groups),
            fixed=dict(genome.method_parameters),
            dtype=genome.dtype,
            filters=seeds[0].arch.layer_filters(),
            shared=tuple(name for name in genome.parameters if name not in per_model),
        )
        from hf_m2n2.models import model_kind

        model_kind(seeds[reference].kind).check_reference(
            seeds[reference],
            "genome.base_model" if genome.base_model is not None else "models",
            "make a seed that has them the base_model (or the first model)",
        )
        try:
            recipe = plan_genome(template, seeds, index, np.full(template.size, 0.5))
        except SpecError as exc:
            raise SpecError(
                "genome", f"the {genome.method} merge of these models cannot be planned: {exc}"
            ) from None
        return seeds, template, reference, tuple(task.name for task in recipe.tasks)

    def export(self, run: GenomeRun, spec: Any, outcome: Any, model_dir: Path) -> None:
        """`model_dir` is `hf-m2n2 merge` of the best genome's spec (written there as merge_config.yaml) plus the
        lineage card and fitness plot."""
        best, summary = outcome.best, outcome.summary
        genome: MethodGenomeConfig = spec.genome
        score = float(np.mean(best.scores))
        header = (
            f"{outcome.merged_name}: evolved by hf-m2n2 {spec.evolve.algorithm} "
            f"({_SEARCH.get(spec.evolve.algorithm, spec.evolve.algorithm)} over {genome.method} "
            f"{', '.join(genome.parameters)} per {_per(run.ops.template)}), run seed {summary['seed']}, "
            f"candidate {best.lineage.id} of {summary['forward_passes']} (mean fitness {score:.4f}).\n"
            f"The weights next to this file are `hf-m2n2 merge {MERGE_CONFIG} OUT_DIR"
            + ("" if genome.device == "cpu" else f" --device {genome.device}")
            + "`, bit for bit."
        )
        text = recipe_text(run.ops.merge_config(best.genome), header)

        def extras(out: Path) -> None:
            outcome.write_card(
                out,
                recipe_file=MERGE_CONFIG,
                rebuild_command=f"hf-m2n2 merge {MERGE_CONFIG} OUT_DIR",
                paper=EVOMERGE_PAPER,
                merge_device=None if genome.device == "cpu" else genome.device,
            )

        merge_recipe(
            text,
            model_dir,
            overwrite=True,
            device=genome.device,
            extras=extras,
            trust_remote_code=spec.trust_remote_code,
        )

    def export_again(
        self, model_dir: Path, out_dir: Path, overwrite: bool, *, trust_remote_code: bool = False
    ) -> Path | None:
        """`hf-m2n2 export`: merge the run's merge_config.yaml again (on the device its card records), with its
        card and plot. The seeds' custom code may run if the run's spec says `trust_remote_code: true` or
        `trust_remote_code` is given (a run started with `--trust-remote-code`, which the run does not record)."""
        from hf_m2n2.evolve.runs import SPEC_COPY
        from hf_m2n2.evolve.spec import load_evolve_spec

        if not (model_dir / MERGE_CONFIG).is_file():
            return None
        text = (model_dir / MERGE_CONFIG).read_text()
        device = merge_device(model_dir)
        run_spec = model_dir.parent / SPEC_COPY
        if not trust_remote_code and run_spec.is_file():
            trust_remote_code = load_evolve_spec(run_spec)[0].trust_remote_code

        from hf_m2n2.card import copy_card

        return merge_recipe(
            text,
            out_dir,
            overwrite=overwrite,
            device=device,
            extras=lambda out: copy_card(model_dir, out),
            trust_remote_code=trust_remote_code,
        )


_SEARCH = {"evomerge_ps": "CMA-ES", "nsga2": "NSGA-II"}


def _per(template: MethodTemplate) -> str:
    """What one evolved value covers, for the export's header: `model and layer group` (`UNet block group`)."""
    group = "layer group" if template.filters is None else "UNet block group"
    return f"model and {group}" if template.parameters else group


def merge_device(model_dir: Path) -> str:
    """The device an exported method-genome model was merged on: its card's `merge_device` (absent: the CPU)."""
    card = model_dir / "card.json"
    if not card.is_file():
        return "cpu"
    return json.loads(card.read_text()).get("details", {}).get("merge_device") or "cpu"


def recipe_text(config: dict[str, Any], header: str) -> str:
    """The YAML of a merge spec with a comment header; it must parse back to exactly `config`."""
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    text = lines + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120)
    if yaml.safe_load(text) != config:
        raise HfM2n2Error("the merge spec does not survive a YAML round trip")
    return text


def merge_recipe(
    text: str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    device: str = "cpu",
    extras: Any = None,
    trust_remote_code: bool = False,
) -> Path:
    """`hf-m2n2 merge` of a merge spec's text into `out_dir`, then `extras(dir)` (card, plot), all or nothing."""
    from hf_m2n2.merge import MergeOptions, merge
    from hf_m2n2.outdir import atomic_output_dir
    from hf_m2n2.spec import parse_spec, parse_yaml

    spec = parse_spec(parse_yaml(text, MERGE_CONFIG), source=MERGE_CONFIG)
    out = Path(out_dir)
    with atomic_output_dir(out, overwrite) as tmp:
        staging = Path(tempfile.mkdtemp(prefix=".merge-", dir=tmp))
        merged = staging / "model"
        options = MergeOptions(device=device, progress=False, trust_remote_code=trust_remote_code)
        merge(spec, merged, options, spec_text=text)
        for item in merged.iterdir():
            os.replace(item, tmp / item.name)
        shutil.rmtree(staging)
        if extras is not None:
            extras(tmp)
    return out
