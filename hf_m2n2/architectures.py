"""Architecture knowledge as data: where layers are, which tensors are embeddings, tied weights, layer counts."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """How to read one family of checkpoints.

    Args:
        name: family name, for messages.
        layer_pattern: regex with one group capturing the layer index in a tensor name.
        embed_names: tensors whose rows are indexed by token id (input embeddings, output head).
        pre_names: non-layer tensors that come before the layers (their gradient position t is 0).
        tied_pairs: (output head, input embedding) pairs that share weights when `tie_word_embeddings`.
        num_layers_key: config.json key holding the layer count.
        vocab_key: config.json key holding the vocabulary size.
    """

    name: str
    layer_pattern: str
    embed_names: tuple[str, ...]
    pre_names: tuple[str, ...]
    tied_pairs: tuple[tuple[str, str], ...] = ()
    num_layers_key: str = "num_hidden_layers"
    vocab_key: str = "vocab_size"

    def layer_index(self, tensor_name: str) -> int | None:
        match = re.search(self.layer_pattern, tensor_name)
        return int(match.group(1)) if match else None

    def with_layer(self, tensor_name: str, index: int) -> str:
        """Rename a layer tensor to layer `index` (frankenmerge renumbering)."""
        match = re.search(self.layer_pattern, tensor_name)
        if match is None:
            raise ValueError(f"{tensor_name} is not a layer tensor")
        start, end = match.span(1)
        return f"{tensor_name[:start]}{index}{tensor_name[end:]}"

    def is_embed(self, tensor_name: str) -> bool:
        return tensor_name in self.embed_names

    def is_pre(self, tensor_name: str) -> bool:
        return tensor_name in self.pre_names

    def aliases(self, tensor_name: str) -> tuple[str, ...]:
        """Names a filter may give for this tensor besides substrings of its name (a UNet's block: `IN04`)."""
        return ()

    def layer_filters(self) -> tuple[str, ...] | None:
        """For architectures whose layers a merge spec addresses by name instead of restacking them with
        `layer_range` slices: the filter (an alias) of the tensors outside the layers, then one per layer in
        layer order (a UNet's `BASE`, `IN00`, ..., `M00`, `OUT00`, ...). None: layers are taken by slices."""
        return None


_DECODER = dict(
    layer_pattern=r"^model\.layers\.(\d+)\.",
    embed_names=("model.embed_tokens.weight", "lm_head.weight"),
    pre_names=("model.embed_tokens.weight",),
    tied_pairs=(("lm_head.weight", "model.embed_tokens.weight"),),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", **_DECODER),
    "mistral": Architecture("mistral", **_DECODER),
    "qwen2": Architecture("qwen2", **_DECODER),
    "qwen3": Architecture("qwen3", **_DECODER),
    "gemma": Architecture("gemma", **_DECODER),
    "gemma2": Architecture("gemma2", **_DECODER),
    "gpt2": Architecture(
        "gpt2",
        layer_pattern=r"^(?:transformer\.)?h\.(\d+)\.",
        embed_names=("wte.weight", "transformer.wte.weight", "lm_head.weight"),
        pre_names=("wte.weight", "wpe.weight", "transformer.wte.weight", "transformer.wpe.weight"),
        tied_pairs=(("lm_head.weight", "transformer.wte.weight"),),
        num_layers_key="n_layer",
    ),
}

# Used for model types not listed above: `*.layers.N.*` or `*.h.N.*`, embeddings found by name.
_FALLBACK_LAYER = r"(?:^|\.)(?:layers|h)\.(\d+)\."
_EMBED_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "lm_head", "embed_out")
_PRE_HINTS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "position_embeddings")


def _fallback(model_type: str, tensor_names: Iterable[str]) -> Architecture:
    names = [n for n in tensor_names if re.search(_FALLBACK_LAYER, n) is None]
    embed = tuple(n for n in names if any(h in n for h in _EMBED_HINTS) and n.endswith("weight"))
    pre = tuple(n for n in names if any(h in n for h in _PRE_HINTS))
    return Architecture(model_type or "unknown", _FALLBACK_LAYER, embed, pre)


def detect_architecture(config: Mapping[str, Any], tensor_names: Iterable[str]) -> Architecture:
    """Pick the architecture description for a checkpoint from its config.json `model_type`."""
    model_type = str(config.get("model_type", ""))
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return _fallback(model_type, tensor_names)


def architecture_signature(config: Mapping[str, Any]) -> tuple[str, ...]:
    """What must agree between seeds unless --allow-crimes: model_type and the architectures list."""
    return (str(config.get("model_type", "")), *sorted(config.get("architectures") or []))


def num_layers(config: Mapping[str, Any], arch: Architecture, tensor_names: Iterable[str]) -> int:
    """Layer count from config.json, or counted from tensor names if the key is absent."""
    if arch.num_layers_key in config:
        return int(config[arch.num_layers_key])
    indices = {arch.layer_index(n) for n in tensor_names}
    indices.discard(None)
    return max(indices) + 1 if indices else 0


def ties_word_embeddings(config: Mapping[str, Any]) -> bool:
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text_config = config.get("text_config")
    if isinstance(text_config, Mapping) and "tie_word_embeddings" in text_config:
        return bool(text_config["tie_word_embeddings"])
    return str(config.get("model_type", "")) in ("gpt2", "gemma", "gemma2")
