"""`hf-m2n2 merge` for text-to-image pipelines: which components are merged and which come from one seed, the
plan (the LLM plan over the merged components' `COMPONENT/KEY` tensors) and the output folder.

The output is a diffusers folder `DiffusionPipeline.from_pretrained` loads: model_index.json and the components
that are not merged (tokenizers, scheduler, VAE, text encoders by default) from the donor seed (the base, else the
first model, unless `components:` names another), merged components streamed through the sharded writer with the
reference seed's configs, all in a temporary sibling renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hf_m2n2.errors import CheckpointError, SpecError
from hf_m2n2.outdir import set_config_dtype
from hf_m2n2.pipeline_seeds import (
    WEIGHT_STEMS,
    PipelineSeed,
    check_families,
    check_reference,
    custom_pipeline,
    listed_components,
    pipeline_class_name,
)
from hf_m2n2.recipe import MethodRecipe
from hf_m2n2.spec import MergeSpec, model_ref_string
from hf_m2n2.writer import PlannedTensor, ShardedSafetensorsWriter

MERGED_BY_DEFAULT = ("unet",)
# what an original-layout single file holds (a safety checker or image encoder has no place in it)
SINGLE_FILE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class PipelinePlan:
    """Everything decided before a tensor is read.

    Attributes:
        merged: the merged components, in model_index order.
        donors: every other component listed in model_index.json -> the seed it is taken from.
        reference: the seed whose model_index.json and merged components' configs the output takes.
        seeds: the seeds narrowed to the merged components (what the recipe reads).
        recipe: the tensor plan.
    """

    merged: list[str]
    donors: dict[str, int]
    reference: int
    seeds: list[PipelineSeed]
    recipe: MethodRecipe


def _check_spec(spec: MergeSpec) -> None:
    if spec.slices is not None:
        raise SpecError("slices", "pipelines are merged with models: (a UNet's blocks cannot be restacked)")
    for key in ("tokenizer", "tokenizer_source", "chat_template"):
        if getattr(spec, key) is not None:
            raise SpecError(
                key,
                "not for pipelines: take tokenizers from a seed with components: {tokenizer: {from: MODEL}}",
            )


def plan_components(
    spec: MergeSpec, seeds: list[PipelineSeed], seed_index: dict[str, int]
) -> tuple[list[str], dict[str, int], int]:
    """(merged components, donor seed per other component, reference seed) from `components:` and the defaults.

    Raises:
        SpecError: an unknown component, a donor that is not one of the spec's models, `merge` on a component
            without weights, or text encoders of different architectures to merge.
    """
    merged_refs = [model_ref_string(m.model) for m in spec.models or []]
    reference = seed_index[spec.base_ref()] if spec.base_model is not None else seed_index[merged_refs[0]]
    check_reference(
        seeds[reference],
        "base_model" if spec.base_model is not None else "models",
        "make a seed that has them the base_model (or the first model)",
    )
    listed = listed_components(seeds[reference].config)
    choices: dict[str, Any] = {name: "merge" for name in MERGED_BY_DEFAULT if name in listed}
    for name, choice in (spec.components or {}).items():
        if name not in listed:
            raise SpecError(
                f"components.{name}",
                f"not a component of {seeds[reference].name} (its components: {', '.join(listed)})",
            )
        choices[name] = choice
    merged, donors = [], {}
    for name in listed:
        choice = choices.get(name)
        if choice == "merge":
            if name not in seeds[reference].components:
                raise SpecError(f"components.{name}", "has no weights to merge: take it {from: MODEL}")
            merged.append(name)
        elif choice is None:
            donors[name] = reference
        else:
            ref = model_ref_string(choice.from_)
            if ref not in seed_index:
                known = ", ".join(seed_index)
                raise SpecError(
                    f"components.{name}.from", f"{ref!r} is not one of the spec's models ({known})"
                )
            donors[name] = seed_index[ref]
    for name, donor in donors.items():
        _check_donor(seeds[donor], name)
    if not merged:
        raise SpecError("components", "no component is merged")
    used = [
        seed_index[r] for r in dict.fromkeys(merged_refs + ([spec.base_ref()] if spec.base_model else []))
    ]
    for name in merged:
        _check_same_component(name, [seeds[i] for i in used])
    return merged, donors, reference


def _check_donor(seed: PipelineSeed, name: str) -> None:
    """The donor has the component to copy (checked before anything is written)."""
    folder = seed.folder or Path(seed.model.path)
    if name not in seed.components and not (folder / name).is_dir():
        raise CheckpointError(
            f"{seed.name}: component {name} is missing ({folder / name}): nothing to take it from"
        )
    if name not in seed.components and (folder / name / "config.json").is_file():
        raise CheckpointError(f"{seed.name}: component {name} has a config but no weights ({folder / name})")


def _check_same_component(name: str, seeds: list[PipelineSeed]) -> None:
    """A merged component must be the same architecture in every seed (JSDXL's Japanese text encoder is not
    SDXL's CLIP)."""
    signatures = {}
    for seed in seeds:
        component = seed.components.get(name)
        if component is None or name not in seed.checkpoint.parts:
            raise CheckpointError(f"{seed.name} has no {name} weights to merge")
        config = component.config
        signatures[seed.name] = (
            component.class_name,
            config.get("model_type") or config.get("_class_name"),
            *(config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")),
        )
    if len(set(signatures.values())) > 1:
        detail = "; ".join(f"{n}: {sig[0]}/{sig[1]}" for n, sig in signatures.items())
        shapes = len({sig[1:] for sig in signatures.values()}) > 1
        raise SpecError(
            f"components.{name}",
            f"the seeds' {name}s differ ({detail}{', other sizes' if shapes else ''}): take it from one seed "
            "with {from: MODEL}",
        )


def plan_pipeline_merge(
    spec: MergeSpec, seeds: list[PipelineSeed], seed_index: dict[str, int], options
) -> PipelinePlan:
    """Check the seeds and the spec, decide the components, plan every merged tensor (nothing is written)."""
    from hf_m2n2.plan import plan_merge

    check_families(seeds)
    _check_spec(spec)
    merged, donors, reference = plan_components(spec, seeds, seed_index)
    narrowed = [replace(s, checkpoint=s.checkpoint.only(merged)) for s in seeds]
    recipe = plan_merge(
        spec,
        narrowed,
        seed_index,
        random_seed=options.random_seed,
        allow_crimes=options.allow_crimes,
        align_rows=False,
        lenient_parameters=options.lenient_parameters,
    )
    return PipelinePlan(merged, donors, reference, narrowed, recipe)


class ComponentSink:
    """A materialize sink that routes `COMPONENT/KEY` tensors to one sharded writer per merged component."""

    def __init__(self, writers: dict[str, ShardedSafetensorsWriter]):
        self.writers = writers

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        component, _, key = name.partition("/")
        self.writers[component].write(key, tensor, row_start)


def write_merged_components(out: Path, plan: PipelinePlan, options, shard_size: int) -> list[PlannedTensor]:
    """Materialize the merged components into `out/COMPONENT/` (weights and configs); returns what was planned."""
    from hf_m2n2.merge import run_tasks

    reference = plan.seeds[plan.reference]
    planned = [PlannedTensor(t.name, t.shape, t.out_dtype) for t in plan.recipe.tasks]
    writers = {}
    try:
        for name in plan.merged:
            component = reference.components[name]
            (out / name).mkdir()
            mine = [
                replace(p, name=p.name.split("/", 1)[1]) for p in planned if p.name.startswith(f"{name}/")
            ]
            writers[name] = ShardedSafetensorsWriter(out / name, mine, shard_size, stem=component.stem)
        run_tasks(plan.recipe, plan.seeds, ComponentSink(writers), None, options)
        for writer in writers.values():
            writer.finish()
    finally:
        for writer in writers.values():
            writer.abort()
    for name in plan.merged:
        component = reference.components[name]
        config = dict(component.config)
        dtypes = {p.dtype for p in planned if p.name.startswith(f"{name}/") and p.dtype.is_floating_point}
        if component.library == "transformers" and len(dtypes) == 1:
            set_config_dtype(config, dtypes.pop())
        (out / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return planned


def copy_component(seed: PipelineSeed, name: str, dst: Path, shard_size: int) -> None:
    """Copy one component whole from a donor seed into `dst/NAME/` (hard-linked where the file system allows),
    its variant's weights under the plain names; a single-file donor's tensors are streamed out instead."""
    target = dst / name
    component = seed.components.get(name)
    source = (seed.folder or seed.model.path) / name
    if component is None:  # tokenizer, scheduler, ...: the folder as it is
        if not source.is_dir():
            raise CheckpointError(f"{seed.name}: component {name} is missing ({source})")
        shutil.copytree(source, target, copy_function=_link_or_copy)
        return
    target.mkdir()
    for file in source.iterdir():
        if file.is_file() and file.suffix not in (".safetensors", ".bin") and ".index" not in file.name:
            _link_or_copy(file, target / file.name)
    if not component.files:  # the weights are the single file's
        _stream_component(seed, name, target, shard_size)
        return
    renames = {f.name: _plain_name(f.name, seed.variant) for f in component.files}
    for file in component.files:
        _link_or_copy(file, target / renames[file.name])
    if component.index is not None:  # its shards' index, under the plain name, naming the renamed shards
        index = json.loads(component.index.read_text())
        index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
        plain = _plain_name(component.index.name, seed.variant)
        (target / plain).write_text(json.dumps(index, indent=2) + "\n")


def copy_pipeline_code(seed: PipelineSeed, dst: Path) -> None:
    """A custom pipeline's code into `dst`: the `.py` files at the root of the seed's folder (the module its
    `_class_name` names and those it imports), so that the output loads as the seed does (with
    `trust_remote_code`); nothing for a pipeline of diffusers' classes."""
    if seed.folder is None or custom_pipeline(seed.config) is None:
        return
    for file in sorted(Path(seed.folder).glob("*.py")):
        _link_or_copy(file, dst / file.name)


def _plain_name(file_name: str, variant: str | None) -> str:
    """`model.fp16.safetensors` -> `model.safetensors`; `x.fp16-00001-of-00002.safetensors` -> `x-00001-...`."""
    return file_name.replace(f".{variant}.", ".").replace(f".{variant}-", "-") if variant else file_name


def _stream_component(seed: PipelineSeed, name: str, target: Path, shard_size: int) -> None:
    part = seed.checkpoint.parts[name]
    planned = [PlannedTensor(k, part.info(k).shape, part.info(k).dtype) for k in part.names]
    writer = ShardedSafetensorsWriter(target, planned, shard_size, stem=seed.components[name].stem)
    try:
        for p in planned:
            writer.write(p.name, part.get(p.name))
        writer.finish()
    finally:
        writer.abort()


def _link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_pipeline(
    out: Path, plan: PipelinePlan, seeds: list[PipelineSeed], options, shard_size: int
) -> list[PlannedTensor]:
    """The whole output folder in `out` (a fresh temporary): merged components, donors, model_index.json."""
    planned = write_merged_components(out, plan, options, shard_size)
    for name, donor in plan.donors.items():
        copy_component(seeds[donor], name, out, shard_size)
    copy_pipeline_code(seeds[plan.reference], out)
    (out / "model_index.json").write_text(json.dumps(output_model_index(plan, seeds), indent=2) + "\n")
    return planned


def output_model_index(plan: PipelinePlan, seeds: list[PipelineSeed]) -> dict[str, Any]:
    """The reference's model_index.json, each donated component's [library, class] the donor's."""
    index = dict(seeds[plan.reference].config)
    for name, donor in plan.donors.items():
        index[name] = list(listed_components(seeds[donor].config).get(name, index[name]))
    return index


def export_single_file(folder: Path, out_file: Path) -> None:
    """Write a diffusers folder's weights as one `.safetensors` in the original layout (A1111 / ComfyUI /
    `from_single_file`), tensor by tensor."""
    from hf_m2n2.hub import ResolvedModel
    from hf_m2n2.pipeline_seeds import open_pipeline_folder
    from hf_m2n2.single_file import write_single_file

    seed = open_pipeline_folder(ResolvedModel(ref=str(folder), path=folder))
    try:
        kept = [c for c in seed.components if c in SINGLE_FILE_COMPONENTS]  # no safety checker in the layout
        configs = {name: seed.components[name].config for name in kept}
        names = [n for n in seed.checkpoint.names if n.split("/", 1)[0] in kept]
        dtype = seed.checkpoint.info(
            next(n for n in names if n.startswith("unet/"))
        ).dtype  # the merged UNet's
        write_single_file(out_file, names, seed.checkpoint.get, configs, dtype=dtype)
    finally:
        seed.checkpoint.close()


def merge_pipelines(spec, seeds, refs, out_dir: Path, options, spec_text, target):
    """`hf-m2n2 merge` of pipeline seeds into a diffusers folder at `out_dir` (atomic)."""
    from hf_m2n2.merge import MergeResult
    from hf_m2n2.outdir import atomic_output_dir

    seed_index = {ref: i for i, ref in enumerate(refs)}
    plan = plan_pipeline_merge(spec, seeds, seed_index, options)
    single_file = options.output_format == "single_file"
    with atomic_output_dir(out_dir, options.overwrite) as tmp:
        folder = tmp / ".pipeline" if single_file else tmp
        folder.mkdir(exist_ok=True)
        planned = write_pipeline(folder, plan, seeds, options, options.out_shard_size)
        if single_file:  # the whole pipeline, merged and donated parts, in the original layout
            export_single_file(folder, tmp / f"{out_dir.name}.safetensors")
            shutil.rmtree(folder)
        recipe_text = spec_text if spec_text is not None and spec.output is None else spec.to_yaml()
        (tmp / "merge_config.yaml").write_text(recipe_text)
        model_id = target.repo_id if target else str(out_dir)
        file = f"{out_dir.name}.safetensors" if single_file else None
        _write_card(tmp, out_dir.name, spec, seeds, seed_index, plan, model_id, file)
    return MergeResult(
        out_dir, [s.model for s in seeds], len(planned), sum(p.nbytes for p in planned), plan.recipe.notes
    )


def _write_card(
    tmp: Path,
    model_name: str,
    spec,
    seeds,
    seed_index,
    plan: PipelinePlan,
    model_id: str,
    single_file: str | None = None,
) -> None:
    """README.md and card.json of a merged pipeline: a diffusers text-to-image card whose base models are every
    seed (role: base, merged, donor), with each component merged or taken from which seed, the recipe and a
    diffusers usage snippet (`from_single_file` when the output is the one file `single_file`)."""
    from hf_m2n2.card import CardComponent, CardModel, pipeline_merge_card_info, write_card
    from hf_m2n2.methods import get_method

    base, merged_refs = spec.base_ref(), {model_ref_string(m.model) for m in spec.models or []}
    position = {i: n for n, i in enumerate(seed_index.values())}  # seed index -> its row in the card's models
    models = []
    for ref, i in seed_index.items():
        role = "base" if ref == base else "merged" if ref in merged_refs else "donor"
        if role != "donor" and i in plan.donors.values():
            role += ", donor"
        models.append(CardModel(seeds[i].model, role))
    reference = seeds[plan.reference]
    components = []
    for name, (_, class_name) in listed_components(output_model_index(plan, seeds)).items():
        donor = plan.donors.get(name)
        via = None
        if (
            donor is not None
            and seeds[donor].single_file is not None
            and name not in seeds[donor].checkpoint.parts
        ):
            # a single file holds weights only: what it lacks comes from its config folder
            folder = seeds[donor].folder
            owner = next((s for s in seeds if Path(s.model.path) == folder), None)
            config_ref = spec.single_file_config and model_ref_string(spec.single_file_config)
            via = owner.name if owner else config_ref or folder.name
        components.append(CardComponent(name, class_name, None if donor is None else position[donor], via))
    family = reference.family
    info = pipeline_merge_card_info(
        model_name=model_name,
        method=plan.recipe.method,
        paper=get_method(plan.recipe.method).paper,
        models=models,
        pipeline_class=pipeline_class_name(reference.config) or family.pipeline_class,
        custom_code=custom_pipeline(reference.config) is not None,
        family=family.label,
        components=components,
        config_yaml=(tmp / "merge_config.yaml").read_text(),
        notes=plan.recipe.notes,
        variant=spec.variant,
        single_file=single_file,
        tags=[family.hub_tag],
        model_id=model_id,
    )
    write_card(tmp, info)


__all__ = [
    "WEIGHT_STEMS",
    "ComponentSink",
    "PipelinePlan",
    "check_families",
    "copy_component",
    "merge_pipelines",
    "plan_components",
    "plan_pipeline_merge",
    "write_pipeline",
]
