"""Space graphs, built: by tracing a torch classifier (`classifier_graph`) or from a decoder's architecture data
(`decoder_ffn_graph`).

A space's `feature` is always `"<module>:input"`: the first positional input of the first Linear or Conv2d that
consumes the space (so calibration sees what that layer sees: after the activation, the norm, the residual add).
Its units are the last axis of a Linear's input and axis 1 of a conv feature map.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hf_m2n2.align.spaces import Space, SpaceGraph, Use
from hf_m2n2.errors import HfM2n2Error

_PASS_MODULES = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
)
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.sigmoid, torch.tanh}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_GLOBAL_POOL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class _Spaces:
    """Union-find over provisional spaces, collecting their uses in order of creation."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.uses: list[list[Use]] = []
        self.consumers: list[list[str]] = []
        self.sizes: list[int] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.uses.append([])
        self.consumers.append([])
        self.sizes.append(size)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.sizes[a] != self.sizes[b]:
                raise HfM2n2Error(f"{where}: adds {self.sizes[a]} and {self.sizes[b]} units")
            self.parent[max(a, b)] = min(a, b)
        return min(a, b)


def classifier_graph(model: nn.Module, example_input: torch.Tensor | None = None) -> SpaceGraph:
    """The spaces of a torch classifier made of Linear, Conv2d, BatchNorm, LayerNorm, elementwise activations,
    dropout, pooling, flatten (after a global pooling or of 1x1 maps) and residual adds, traced with torch.fx.

    The network's input and its logits are in no space. A residual add joins its inputs into one space.

    Raises:
        HfM2n2Error: an operation the tracer does not know, a grouped conv, or a flatten of spatial maps.
    """
    from torch import fx

    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    spaces = _Spaces()
    space_of: dict[str, int | None] = {}
    spatial: dict[str, bool] = {}  # whether the node's value still has spatial extent > 1 (unknown: True)
    order: list[int] = []
    batchnorms: list[str] = []

    def source(node: Any) -> int | None:
        return space_of.get(node.name) if isinstance(node, fx.Node) else None

    output_space: int | None = None
    pinned: set[int] = set()  # spaces joined with something shared (the input): not spaces after all
    for node in traced.graph.nodes:
        args = node.args
        if node.op == "placeholder":
            space_of[node.name], spatial[node.name] = None, True
        elif node.op == "call_module":
            module, name = modules[node.target], str(node.target)
            s_in = source(args[0])
            spatial[node.name] = spatial.get(args[0].name, True)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    raise HfM2n2Error(f"{name}: grouped convolutions are not supported")
                if s_in is not None:
                    spaces.uses[spaces.find(s_in)].append(Use(f"{name}.weight", 1, "in"))
                    spaces.consumers[spaces.find(s_in)].append(name)
                s_out = spaces.new(module.weight.shape[0])
                order.append(s_out)
                spaces.uses[s_out].append(Use(f"{name}.weight", 0, "out"))
                if module.bias is not None:
                    spaces.uses[s_out].append(Use(f"{name}.bias", 0, "out"))
                space_of[node.name] = s_out
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                if s_in is None:
                    raise HfM2n2Error(f"{name}: a norm of the network's input is not supported")
                tensors = ["weight", "bias"] + (
                    ["running_mean", "running_var"]
                    if isinstance(module, nn.modules.batchnorm._BatchNorm)
                    else []
                )
                for t in tensors:
                    if getattr(module, t, None) is not None:
                        spaces.uses[spaces.find(s_in)].append(Use(f"{name}.{t}", 0, "out"))
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    batchnorms.append(name)
                space_of[node.name] = s_in
            elif isinstance(module, _PASS_MODULES):
                space_of[node.name] = s_in
            elif isinstance(module, _GLOBAL_POOL):
                space_of[node.name] = s_in
                size = module.output_size
                spatial[node.name] = any(d != 1 for d in (size if isinstance(size, tuple) else (size,)))
            elif isinstance(module, nn.Flatten):
                if s_in is not None and spatial.get(args[0].name, True):
                    raise HfM2n2Error(f"{name}: flattening spatial maps is not supported (pool to 1x1 first)")
                space_of[node.name], spatial[node.name] = s_in, False
            else:
                raise HfM2n2Error(f"{name}: {type(module).__name__} is not supported by the space tracer")
        elif node.op in ("call_function", "call_method"):
            target = node.target
            first = args[0] if args else None
            s_in = source(first)
            spatial[node.name] = spatial.get(getattr(first, "name", ""), True)
            if target in (operator.add, torch.add) or target == "add":
                other = source(args[1])
                tensors = [a for a in args[:2] if isinstance(a, fx.Node)]
                if s_in is not None and other is not None:
                    space_of[node.name] = spaces.union(s_in, other, f"the add {node.name}")
                elif (
                    len(tensors) == 2
                ):  # a space added to the input (or another shared value): it cannot move
                    for side in (s_in, other):
                        if side is not None:
                            pinned.add(side)
                    space_of[node.name] = None
                else:  # plus a constant
                    space_of[node.name] = s_in if s_in is not None else other
            elif target in _PASS_FUNCTIONS or target in _PASS_METHODS:
                space_of[node.name] = s_in
            elif target in (torch.flatten, "flatten", "view", "reshape"):
                if s_in is not None and spatial[node.name]:
                    raise HfM2n2Error(
                        f"{node.name}: flattening spatial maps is not supported (pool to 1x1 first)"
                    )
                space_of[node.name], spatial[node.name] = s_in, False
            else:
                raise HfM2n2Error(f"{node.name}: {target} is not supported by the space tracer")
        elif node.op == "get_attr":
            space_of[node.name] = None
        elif node.op == "output":
            output_space = source(args[0])
    if output_space is not None:
        pinned.add(output_space)  # the logits are shared
    return _finish(spaces, order, pinned, batchnorms)


def _finish(spaces: _Spaces, order: list[int], pinned: set[int], batchnorms: list[str]) -> SpaceGraph:
    """The union-find's roots as spaces, in creation order; those joined with a shared value dropped."""
    dropped = {spaces.find(p) for p in pinned}
    roots: list[int] = []
    for s in order:
        root = spaces.find(s)
        if root not in roots and root not in dropped:
            roots.append(root)
    members: dict[int, list[Use]] = {r: [] for r in roots}
    consumers: dict[int, list[str]] = {r: [] for r in roots}
    for s in range(len(spaces.parent)):
        root = spaces.find(s)
        if root in members:
            members[root] += spaces.uses[s]
            consumers[root] += spaces.consumers[s]
    built = []
    for depth, root in enumerate(roots):
        feature = f"{consumers[root][0]}:input" if consumers[root] else None
        built.append(
            Space(f"space{depth}", spaces.sizes[root], tuple(members[root]), feature=feature, depth=depth)
        )
    return SpaceGraph(tuple(built), tuple(batchnorms), depth=len(built))


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


def decoder_ffn_graph(config: Mapping[str, Any], tensor_names: Iterable[str]) -> SpaceGraph:
    """The FFN intermediate units of every layer of a decoder, from its architecture data: Llama-family
    `gate_proj`/`up_proj` rows -> `down_proj` columns; GPT-2 `c_fc` (Conv1D: outputs on axis 1) -> `c_proj` rows.

    Raises:
        HfM2n2Error: a model type without FFN data here.
    """
    names = set(tensor_names)
    model_type = str(config.get("model_type", ""))
    spaces = []
    if model_type in _LLAMA_LIKE:
        size = int(config["intermediate_size"])
        for layer in range(int(config["num_hidden_layers"])):
            mlp = f"model.layers.{layer}.mlp"
            uses = [Use(f"{mlp}.gate_proj.weight", 0, "out"), Use(f"{mlp}.up_proj.weight", 0, "out")]
            uses += [
                Use(f"{mlp}.{p}.bias", 0, "out")
                for p in ("gate_proj", "up_proj")
                if f"{mlp}.{p}.bias" in names
            ]
            uses.append(Use(f"{mlp}.down_proj.weight", 1, "in"))
            spaces.append(
                Space(f"layers.{layer}.mlp", size, tuple(uses), feature=f"{mlp}.down_proj:input", depth=layer)
            )
    elif model_type == "gpt2":
        size = int(config.get("n_inner") or 4 * int(config["n_embd"]))
        prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
        for layer in range(int(config["n_layer"])):
            mlp = f"{prefix}h.{layer}.mlp"
            uses = (
                Use(f"{mlp}.c_fc.weight", 1, "out"),
                Use(f"{mlp}.c_fc.bias", 0, "out"),
                Use(f"{mlp}.c_proj.weight", 0, "in"),
            )
            spaces.append(Space(f"h.{layer}.mlp", size, uses, feature=f"{mlp}.c_proj:input", depth=layer))
    else:
        raise HfM2n2Error(
            f"model type {model_type!r}: no FFN space data (supported: {', '.join(_LLAMA_LIKE)}, gpt2)"
        )
    missing = sorted({u.tensor for s in spaces for u in s.uses} - names)
    if missing:
        raise HfM2n2Error(f"model type {model_type!r}: tensor {missing[0]!r} is missing from the checkpoint")
    return SpaceGraph(tuple(spaces), depth=len(spaces))
