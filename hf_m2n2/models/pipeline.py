"""The pipeline model kind: a diffusers text-to-image pipeline (a folder with model_index.json, or a single-file
checkpoint in the original layout) as a seed; merges write a diffusers folder (`hf_m2n2.pipeline_merge`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

    def merge(self, spec, seeds, refs, out_dir, options, spec_text, target):
        from hf_m2n2.pipeline_merge import merge_pipelines

        return merge_pipelines(spec, seeds, refs, out_dir, options, spec_text, target)

    def plan(self, spec, seeds, refs, options):
        from hf_m2n2.pipeline_merge import plan_pipeline_merge

        return plan_pipeline_merge(spec, seeds, {r: i for i, r in enumerate(refs)}, options)
