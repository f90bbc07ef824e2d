"""A routed causal LM: stored decoder layers visited along a path, each hop scaling the hidden state it receives.

This is the model of Evolutionary Model Merge in data-flow space (Akiba et al., 2025): the merged model keeps
the seeds' layers as they are and evolves the path tokens take through them. It is also the modeling code an
exported routed model ships (copied next to its weights as `modeling_hf_m2n2_routed.py` and referenced by the
config's `auto_map`), so it imports nothing but torch and transformers.

The stored layers are an ordinary decoder of the base architecture (`model.layers.{i}`, the embeddings, final norm
and head of model A), so the checkpoint's tensor names are the base architecture's. A hop is a shallow copy of
its stored layer (the parameters are shared, never copied) whose attention has its own `layer_idx`, so the cache
holds one key/value entry per hop even when a layer is visited twice; the hop multiplies the hidden state it is
handed by its scale. The decoder's own forward runs over the hops, so masks, rotary embeddings and caching are
exactly the base architecture's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "hf_m2n2_routed"
# keys of the base config that describe the stack of layers, not one layer: the routed config sets its own
_STACK_KEYS = (
    "num_hidden_layers",
    "layer_types",
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
)


class RoutedConfig(PretrainedConfig):
    """The config of a routed model.

    Args:
        base_config: the stored decoder's config (model A's, with `num_hidden_layers` the number of stored layers
            and, where the family has them, `layer_types` per stored layer).
        path: the stored layer each hop runs, in order.
        scales: the factor each hop multiplies its input hidden state by (1.0 each by default).
        layer_sources: for each stored layer, where it was taken from (`{"seed": name, "layer": index}`).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        base_config: dict[str, Any] | None = None,
        path: list[int] | None = None,
        scales: list[float] | None = None,
        layer_sources: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ):
        self.base_config = dict(base_config or {})
        self.path = [int(p) for p in (path or [])]
        self.scales = [float(s) for s in scales] if scales is not None else [1.0] * len(self.path)
        self.layer_sources = list(layer_sources or [])
        for key, value in self.base_config.items():  # one layer's settings, read by generation and evaluators
            if key not in _STACK_KEYS:
                kwargs.setdefault(key, value)
        kwargs.update(hop_stack(self.base_config.get("layer_types"), self.path))
        super().__init__(**kwargs)

    def stored_config(self) -> PretrainedConfig:
        """The config of the stored decoder (model A's architecture, one layer per stored layer)."""
        fields = {
            k: v for k, v in self.base_config.items() if k not in ("model_type", "architectures", "auto_map")
        }
        config = AutoConfig.for_model(self.base_config["model_type"], **fields)
        config._attn_implementation = (
            getattr(self, "_attn_implementation", None) or config._attn_implementation
        )
        return config


def hop_stack(stored_types: list[str] | None, path: list[int]) -> dict[str, Any]:
    """The config fields of a stack of hops: one layer (and one cache entry) per hop, each of its stored layer's
    type where the family has `layer_types`."""
    fields: dict[str, Any] = {"num_hidden_layers": len(path)}
    if stored_types:
        fields["layer_types"] = [stored_types[p] for p in path if 0 <= p < len(stored_types)]
    return fields


def check_route(path: list[int], scales: list[float], stored: int) -> None:
    """Raise ValueError unless `path` is a non-empty list of stored-layer indices with one scale per hop."""
    if not path:
        raise ValueError("the path is empty: a routed model needs at least one hop")
    bad = [p for p in path if not 0 <= p < stored]
    if bad:
        raise ValueError(
            f"the path visits layer {bad[0]}, but there are {stored} stored layers (0..{stored - 1})"
        )
    if len(scales) != len(path):
        raise ValueError(f"the path has {len(path)} hops but {len(scales)} scales")


class Hop(nn.Module):
    """One step of the path: a stored layer (shared, not copied) run on its input times `scale`."""

    def __init__(self, layer: nn.Module, hop: int, scale: float):
        super().__init__()
        routed = copy.copy(layer)  # a new module object over the same parameters and submodules
        routed._modules = dict(layer._modules)
        for name, child in layer._modules.items():
            if child is not None and hasattr(child, "layer_idx"):  # attention: its own cache entry
                child = copy.copy(child)
                child.layer_idx = hop
                routed._modules[name] = child
        if hasattr(routed, "layer_idx"):
            routed.layer_idx = hop
        self.layer = routed
        self.scale = float(scale)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # the decoder may read its layers' attributes (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


class RoutedForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose forward runs the stored layers along `config.path`, scaled by `config.scales`."""

    config_class = RoutedConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: RoutedConfig):
        super().__init__(config)
        stored = config.stored_config()
        self.model = AutoModel.from_config(
            stored, dtype=torch.get_default_dtype()
        )  # as from_pretrained's dtype set it
        self.lm_head = nn.Linear(stored.hidden_size, stored.vocab_size, bias=False)
        self._route_cache: Any = None
        check_route(config.path, config.scales, len(self.model.layers))
        self.post_init()

    def set_route(self, path: list[int], scales: list[float]) -> None:
        """Route tokens along `path` with `scales` from now on (nothing is copied; the next forward uses it)."""
        check_route(list(path), list(scales), len(self.model.layers))
        self.config.path = [int(p) for p in path]
        self.config.scales = [float(s) for s in scales]
        for key, value in hop_stack(self.config.base_config.get("layer_types"), self.config.path).items():
            setattr(self.config, key, value)

    def _router(self) -> nn.Module:
        """The decoder over the hops: a shallow copy of the stored decoder (same embeddings, norm, rotary
        embedding) whose `layers` are the hops; kept out of the module tree so that no tensor is listed twice."""
        route = (tuple(self.config.path), tuple(self.config.scales))
        if self._route_cache is None or self._route_cache[0] != route:
            decoder = copy.copy(self.model)
            decoder._modules = dict(self.model._modules)
            layers = self.model.layers
            hops = [Hop(layers[p], h, s) for h, (p, s) in enumerate(zip(*route))]
            decoder._modules["layers"] = nn.ModuleList(hops)
            decoder.config = copy.copy(self.model.config)
            stack = hop_stack(getattr(self.model.config, "layer_types", None), list(route[0]))
            for key, value in stack.items():
                setattr(decoder.config, key, value)
            self._route_cache = (route, decoder)  # rebuilt when the config's path or scales change
        return self._route_cache[1]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool
        | None = None,  # taken here, not passed on: the output is always a CausalLMOutputWithPast
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self._router()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)
