"""The pipeline model kind: a diffusers text-to-image pipeline (a folder with model_index.json, or a single-file
checkpoint in the original layout) as a seed; merges write a diffusers folder (`hf_m2n2.pipeline_merge`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_m2n2.errors import CheckpointError
from hf_m2n2.models.base import ModelKind


class PipelineKind(ModelKind):
    """Seeds are diffusers pipelines (folders or single files); merges write a diffusers folder."""

    name = "pipeline"

    def recognizes(self, directory: Path) -> bool:
        from hf_m2n2.pipeline_seeds import is_pipeline  # imported here: pipeline_seeds imports models.base

        return is_pipeline(directory)

    def open_seed(self, model: Any, *, variant: str | None = None, config_seed: Any = None) -> Any:
        from hf_m2n2.pipeline_seeds import open_pipeline_folder, open_single_file

        if Path(model.path).is_file():
            return open_single_file(model, config_seed)
        return open_pipeline_folder(model, variant)

    def check_fit(self, seeds: Sequence[Any], names: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
        from hf_m2n2.pipeline_seeds import check_families

        check_families(seeds)
        shapes = []
        for name in names:
            shape = seeds[0].checkpoint.info(name).shape
            for seed in seeds[1:]:
                if name not in seed.checkpoint or seed.checkpoint.info(name).shape != shape:
                    raise CheckpointError(
                        f"tensor {name!r} is missing or shaped differently in seed {seed.name}"
                    )
            shapes.append((name, shape))
        return shapes

    def check_reference(self, seed: Any, field: str, fix: str) -> None:
        """A component-only seed (`unet/` alone) cannot be the reference: the pipeline's other components come from
        the reference."""
        from hf_m2n2.pipeline_seeds import check_reference

        check_reference(seed, field, fix)

    def live_target(self, reference: Any, **options: Any) -> Any:
        """A `LivePipeline` of the reference seed (options: dtype, device, device_map, max_memory,
        offload_folder, trust_remote_code)."""
        from hf_m2n2.live_pipeline import LivePipeline

        return LivePipeline(reference, **options)

    def default_evolved(self, reference: Any) -> list[str]:
        """The merged-by-default components (the UNet), as in `hf-m2n2 merge`: text encoders and VAE stay the
        reference seed's unless `genome.include` names them."""
        from hf_m2n2.pipeline_merge import MERGED_BY_DEFAULT

        return [f"{name}/*" for name in MERGED_BY_DEFAULT if name in reference.components]

    def evolve_card(
        self, info: Any, seeds: Sequence[Any], fixed: int | None, evolved: Collection[str] | None
    ) -> Any:
        """A diffusers card (`hf_m2n2.card.pipeline_evolve_card_info`) whose component table says which
        components were evolved and which seed the others come from whole (when the genome says)."""
        from hf_m2n2.card import CardComponent, pipeline_evolve_card_info
        from hf_m2n2.pipeline_seeds import custom_pipeline, listed_components, pipeline_class_name

        reference = seeds[fixed or 0]
        components = None
        if fixed is not None and evolved is not None:
            written = {name.split("/", 1)[0] for name in evolved}
            components = [
                CardComponent(name, class_name, None if name in written else fixed)
                for name, (_, class_name) in listed_components(reference.config).items()
            ]
        family = reference.family
        scheduler = reference.config.get("scheduler")
        return pipeline_evolve_card_info(
            info,
            seeds=[s.model for s in seeds],
            pipeline_class=pipeline_class_name(reference.config) or family.pipeline_class,
            custom_code=custom_pipeline(reference.config) is not None,
            family=family.label,
            components=components,
            scheduler=scheduler[1] if isinstance(scheduler, list | tuple) and len(scheduler) == 2 else None,
            tags=[family.hub_tag],
        )

    def output_names(self, reference: Any, evolved: Collection[str]) -> list[str]:
        """The tensors of the components holding an evolved tensor; the others are copied whole by `save_configs`."""
        written = {name.split("/", 1)[0] for name in evolved}
        return [n for n in reference.checkpoint.names if n.split("/", 1)[0] in written]

    def open_output(self, reference: Any, out_dir: Path, planned: Sequence[Any], shard_size: int) -> Any:
        """One sharded writer per written component, in `out_dir/COMPONENT/` with its library's file stem."""
        from dataclasses import replace

        from hf_m2n2.writer import ShardedSafetensorsWriter

        writers = {}
        try:
            for component in dict.fromkeys(p.name.split("/", 1)[0] for p in planned):
                mine = [
                    replace(p, name=p.name.split("/", 1)[1])
                    for p in planned
                    if p.name.startswith(f"{component}/")
                ]
                (Path(out_dir) / component).mkdir()
                stem = reference.components[component].stem
                writers[component] = ShardedSafetensorsWriter(
                    Path(out_dir) / component, mine, shard_size, stem=stem
                )
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        return _ComponentOutput(writers)

    def save_configs(self, reference: Any, out_dir: Path, dtype: torch.dtype) -> None:
        """model_index.json, the written components' configs (a transformers one's `dtype` set to `dtype`), every
        other component (tokenizers, scheduler, components nothing was evolved in) copied whole from `reference`,
        and a custom pipeline's code: a folder `DiffusionPipeline.from_pretrained` loads."""
        from hf_m2n2.outdir import set_config_dtype
        from hf_m2n2.pipeline_merge import copy_component, copy_pipeline_code
        from hf_m2n2.pipeline_seeds import listed_components

        out_dir = Path(out_dir)
        for name in listed_components(reference.config):
            component = reference.components.get(name)
            if component is not None and (out_dir / name).is_dir():
                config = dict(component.config)
                if component.library == "transformers":
                    set_config_dtype(config, dtype)
                (out_dir / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            elif not (out_dir / name).exists():
                copy_component(reference, name, out_dir, _COPY_SHARD_SIZE)
        folder = Path(reference.folder or reference.model.path)
        copy_pipeline_code(reference, out_dir)
        shutil.copyfile(folder / "model_index.json", out_dir / "model_index.json")

    def merge(self, spec, seeds, refs, out_dir, options, spec_text, target):
        from hf_m2n2.pipeline_merge import merge_pipelines

        return merge_pipelines(spec, seeds, refs, out_dir, options, spec_text, target)

    def recipe(self, spec: Any, seeds: Sequence[Any], seed_index: dict[str, int], options: Any) -> Any:
        """The pipeline merge's tensor plan: the merged components only (the UNet by default); the others are the
        reference seed's, as `merge` copies them."""
        from hf_m2n2.pipeline_merge import plan_pipeline_merge

        return plan_pipeline_merge(spec, list(seeds), seed_index, options).recipe

    def plan(self, spec, seeds, refs, options):
        from hf_m2n2.pipeline_merge import plan_pipeline_merge

        return plan_pipeline_merge(spec, seeds, {r: i for i, r in enumerate(refs)}, options)


# the shard size of a single-file donor's component streamed out whole (diffusers' default)
_COPY_SHARD_SIZE = 5_000_000_000


class _ComponentOutput:
    """An export's sink over one writer per component: routes `COMPONENT/KEY`, finishes or aborts them all."""

    def __init__(self, writers: dict[str, Any]):
        from hf_m2n2.pipeline_merge import ComponentSink

        self.writers = writers
        self._sink = ComponentSink(writers)

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        self._sink.write(name, tensor, row_start)

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.finish()

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
