"""The causal LM model kind: a Hugging Face directory with `config.json` and safetensors (or `.bin`) weights,
evaluated as one resident `AutoModelForCausalLM` (`LiveModel`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_m2n2.errors import HfM2n2Error
from hf_m2n2.models.base import ModelKind, Seed, load_config


class CausalLMKind(ModelKind):
    """Seeds are causal-LM directories; the live target is a `LiveModel`."""

    name = "causal_lm"

    def recognizes(self, directory: Path) -> bool:
        return not (Path(directory) / "model_index.json").is_file()  # anything that is not a pipeline

    def open_seed(self, model: Any) -> Any:
        from hf_m2n2.architectures import detect_architecture, num_layers
        from hf_m2n2.lora import open_checkpoint

        checkpoint = open_checkpoint(model)  # a `base+adapter` seed applies its LoRA as tensors are read
        config = load_config(model.path)
        arch = detect_architecture(config, checkpoint.names)
        return Seed(model, checkpoint, config, arch, num_layers(config, arch, checkpoint.names), self.name)

    def check_fit(self, seeds: Sequence[Any], names: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
        shapes = []
        for name in names:
            shape = seeds[0].checkpoint.info(name).shape
            for seed in seeds[1:]:
                if name not in seed.checkpoint:
                    raise HfM2n2Error(f"tensor {name!r} is missing in seed {seed.name}")
                if seed.checkpoint.info(name).shape != shape:
                    raise HfM2n2Error(
                        f"tensor {name!r} has different shapes in {seeds[0].name} and {seed.name} "
                        f"({list(shape)} vs {list(seed.checkpoint.info(name).shape)}); exclude it from the genome "
                        "(genome.exclude) to take it from genome.fixed_from"
                    )
            shapes.append((name, shape))
        return shapes

    def live_target(self, reference: Any, **options: Any) -> Any:
        from hf_m2n2.live import LiveModel

        live = LiveModel(reference.model.path, **options)
        adapter = getattr(reference.checkpoint, "adapter", None)
        for name in adapter.changed if adapter is not None else ():  # the directory holds the base's weights
            live.write(name, reference.checkpoint.get(name))
        return live

    def save_configs(self, reference: Any, out_dir: Path, dtype: torch.dtype) -> None:
        from hf_m2n2.outdir import copy_generation_config, copy_tokenizer_files, set_config_dtype

        config = dict(reference.config)
        set_config_dtype(config, dtype)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_generation_config(reference.model.path, out_dir)
        copy_tokenizer_files(reference.model.path, out_dir)

    def plan(self, spec: Any, seeds: Sequence[Any], refs: Sequence[str], options: Any) -> Any:
        from hf_m2n2.merge import _plan

        return _plan(spec, list(seeds), {ref: i for i, ref in enumerate(refs)}, options)

    def recipe(self, spec: Any, seeds: Sequence[Any], seed_index: dict[str, int], options: Any) -> Any:
        """`plan_merge` of the spec without vocabulary alignment (a live model has the one vocabulary of its
        reference seed)."""
        from hf_m2n2.plan import plan_merge

        return plan_merge(
            spec,
            list(seeds),
            seed_index,
            random_seed=options.random_seed,
            allow_crimes=options.allow_crimes,
            lenient_parameters=options.lenient_parameters,
        )

    def merge(self, spec, seeds, refs, out_dir, options, spec_text, target):
        from hf_m2n2.merge import merge_causal_lm

        return merge_causal_lm(spec, list(seeds), list(refs), out_dir, options, spec_text, target)
