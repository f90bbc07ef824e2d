"""The routed model kind: decoder layers of several causal LMs visited along a path (data-flow space merging).

The live target holds model A's embeddings, final norm and head and every seed's layers once (A's, then B's, ...),
as the stored layers of one `RoutedForCausalLM` (`hf_m2n2.routed_modeling`); a candidate only changes the path
and the scales. An export stores the layers its path uses, the path and the scales, and ships the modeling code
(`auto_map`, loaded with `trust_remote_code=True`). An exported routed model is recognized as this kind, so that
using it as a merge seed fails with a clear line instead of a confusing tensor mismatch.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_m2n2.errors import CheckpointError, SpecError
from hf_m2n2.models.base import ModelKind

MODELING_FILE = "modeling_hf_m2n2_routed.py"
AUTO_MAP = {
    "AutoConfig": "modeling_hf_m2n2_routed.RoutedConfig",
    "AutoModelForCausalLM": "modeling_hf_m2n2_routed.RoutedForCausalLM",
}
DECODER_LAYERS = r"^model\.layers\.(\d+)\."
# what every seed's layers must agree on for one's hidden state to be handed to another's layer
_LAYER_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")


@dataclass(frozen=True)
class StoredLayer:
    """A layer a routed model stores: layer `layer` of seed `seed` (indices into the seeds and their layers)."""

    seed: int
    layer: int


def check_routable(seeds: Sequence[Any]) -> None:
    """Refuse seeds whose layers cannot be chained: another family, another hidden size or layer shape.

    Raises:
        SpecError: at `models`, naming the seeds and the field that differs.
    """
    first = seeds[0]
    for seed in seeds:
        if seed.arch.layer_pattern != DECODER_LAYERS:
            raise SpecError(
                "models",
                f"{seed.name} is a {seed.arch.name} model: data-flow routing supports decoders whose layers are "
                "model.layers.N (llama, mistral, qwen2, qwen3, gemma, ...)",
            )
        if seed.config.get("model_type") != first.config.get("model_type"):
            raise SpecError(
                "models",
                f"{first.name} is {first.config.get('model_type')!r} and {seed.name} is "
                f"{seed.config.get('model_type')!r}: routed layers must be of one family",
            )
        for key in _LAYER_FIELDS:
            if seed.config.get(key) != first.config.get(key):
                what = "hidden sizes" if key == "hidden_size" else f"{key} values"
                raise SpecError(
                    "models",
                    f"the models have different {what} ({first.name}: {first.config.get(key)}, {seed.name}: "
                    f"{seed.config.get(key)}): one model's hidden state cannot be handed to the other's layers",
                )
        if seed.num_layers < 1:
            raise SpecError("models", f"{seed.name} has no layers")


def layer_tensors(seed: Any, layer: int) -> list[str]:
    """The tensor names of one layer of a seed (`model.layers.{layer}.*`)."""
    prefix = f"model.layers.{layer}."
    return [name for name in seed.checkpoint.names if name.startswith(prefix)]


def stored_name(name: str, index: int) -> str:
    """A layer tensor's name as stored layer `index` of the routed model."""
    return re.sub(DECODER_LAYERS, f"model.layers.{index}.", name, count=1)


def check_layer_shapes(seeds: Sequence[Any]) -> None:
    """Every layer of every seed has the tensors and shapes of A's first layer (checked before any read).

    Raises:
        SpecError: at `models`, naming the tensor.
    """
    reference = {stored_name(n, 0): seeds[0].checkpoint.info(n).shape for n in layer_tensors(seeds[0], 0)}
    for seed in seeds:
        for layer in range(seed.num_layers):
            names = layer_tensors(seed, layer)
            found = {stored_name(n, 0): seed.checkpoint.info(n).shape for n in names}
            if found != reference:
                missing = sorted(set(reference) ^ set(found))
                detail = (
                    f"tensor {missing[0]!r} is in one and not the other"
                    if missing
                    else next(f"{n!r} has shape {list(found[n])}" for n in found if found[n] != reference[n])
                )
                raise SpecError(
                    "models",
                    f"layer {layer} of {seed.name} does not fit layer 0 of {seeds[0].name}: {detail}",
                )


def base_config(seeds: Sequence[Any], stored: Sequence[StoredLayer], dtype: torch.dtype) -> dict[str, Any]:
    """The stored decoder's config: model A's, with one layer per stored layer (and their `layer_types`)."""
    config = {k: v for k, v in seeds[0].config.items() if k not in ("auto_map", "quantization_config")}
    config["num_hidden_layers"] = len(stored)
    if any(s.config.get("layer_types") for s in seeds):
        config["layer_types"] = [seeds[s.seed].config["layer_types"][s.layer] for s in stored]
    dtype_name = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config["dtype"] = dtype_name
    return config


def routed_config(
    seeds: Sequence[Any],
    stored: Sequence[StoredLayer],
    path: Sequence[int],
    scales: Sequence[float],
    dtype: torch.dtype,
    **extra: Any,
) -> Any:
    """The `RoutedConfig` of `stored` layers of `seeds` visited along `path` with `scales`."""
    from hf_m2n2.routed_modeling import RoutedConfig

    return RoutedConfig(
        base_config=base_config(seeds, stored, dtype),
        path=list(path),
        scales=list(scales),
        layer_sources=[{"seed": seeds[s.seed].name, "layer": s.layer} for s in stored],
        **extra,
    )


def stored_tensors(seeds: Sequence[Any], stored: Sequence[StoredLayer]) -> list[tuple[str, int, str]]:
    """(name in the routed model, seed index, name in that seed) for every tensor a routed model stores: model A's
    tensors outside the layers, then each stored layer's."""
    reference = seeds[0]
    outside = [n for n in reference.checkpoint.names if re.search(DECODER_LAYERS, n) is None]
    items = [(n, 0, n) for n in outside]
    for index, layer in enumerate(stored):
        for name in layer_tensors(seeds[layer.seed], layer.layer):
            items.append((stored_name(name, index), layer.seed, name))
    return items


class RoutedLive:
    """The live routed model of a data-flow search: every seed's layers stored once, the path set per candidate.

    Args:
        seeds: the opened seeds, model A first.
        dtype: parameter dtype.
        device: where the model lives.
    """

    def __init__(self, seeds: Sequence[Any], dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from accelerate import init_empty_weights

        from hf_m2n2.live import fill_model
        from hf_m2n2.routed_modeling import RoutedForCausalLM

        self.stored = [StoredLayer(k, i) for k, seed in enumerate(seeds) for i in range(seed.num_layers)]
        initial = list(range(seeds[0].num_layers))
        with init_empty_weights():
            model = RoutedForCausalLM(routed_config(seeds, self.stored, initial, [1.0] * len(initial), dtype))
        sources = {
            name: (seeds[k].checkpoint, source) for name, k, source in stored_tensors(seeds, self.stored)
        }
        self.model = fill_model(model, sources, dtype, seeds[0].name).to(device).eval()
        self.dtype = dtype
        self.device = torch.device(device)

    def route(self, path: Sequence[int], scales: Sequence[float]) -> Any:
        """Set the path (indices into `stored`) and the scales; returns the model to evaluate."""
        self.model.set_route(list(path), list(scales))
        return self.model


def write_routed(
    out_dir: Path,
    seeds: Sequence[Any],
    stored: Sequence[StoredLayer],
    path: Sequence[int],
    scales: Sequence[float],
    dtype: torch.dtype,
    shard_size: int = 5 * 1024**3,
) -> None:
    """Write a routed model into the (empty, temporary) directory `out_dir`: the stored tensors streamed from the
    seeds, config.json with `auto_map`, the modeling code, and model A's tokenizer and generation config."""
    from hf_m2n2.outdir import copy_generation_config, copy_tokenizer_files
    from hf_m2n2.routed_modeling import check_route
    from hf_m2n2.writer import PlannedTensor, ShardedSafetensorsWriter

    try:
        check_route(list(path), list(scales), len(stored))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    items = stored_tensors(seeds, stored)
    tied = bool(seeds[0].config.get("tie_word_embeddings", False))
    if tied:
        items = [item for item in items if item[0] != "lm_head.weight"]
    planned = [
        PlannedTensor(name, tuple(seeds[k].checkpoint.info(src).shape), dtype) for name, k, src in items
    ]
    writer = ShardedSafetensorsWriter(out_dir, planned, shard_size)
    try:
        for name, k, source in items:
            writer.write(name, seeds[k].checkpoint.get(source).to(dtype))
        writer.finish()
    finally:
        writer.abort()
    config = routed_config(seeds, stored, path, scales, dtype, tie_word_embeddings=tied)
    config.architectures = ["RoutedForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out_dir)
    shutil.copyfile(Path(__file__).parents[1] / "routed_modeling.py", out_dir / MODELING_FILE)
    copy_generation_config(seeds[0].model.path, out_dir)
    copy_tokenizer_files(seeds[0].model.path, out_dir)


def is_routed_dir(directory: Path) -> bool:
    file = Path(directory) / "config.json"
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("model_type") == "hf_m2n2_routed"
    except ValueError:
        return False


class RoutedKind(ModelKind):
    """An exported routed model (config `model_type: hf_m2n2_routed`). It is loaded with transformers and its own
    code (`trust_remote_code=True`); it cannot be a seed: a merge or a route needs the models it was routed
    from."""

    name = "routed"

    def recognizes(self, directory: Path) -> bool:
        return is_routed_dir(directory)

    def open_seed(self, model: Any) -> Any:
        raise CheckpointError(
            f"{model.name} is a routed model (a data-flow merge: its layers are visited along a path, by its own "
            "code); it cannot be a seed: list the models it was routed from instead"
        )
