"""RAM and RAM+ (tensor-local): task vectors summed where one model changed a parameter, averaged where several did.

A parameter counts as changed by a model when |model - base| > epsilon. RAM is elementwise. RAM+ scales each
model's unique changes by 1 + r * clamp(shared_i / unique_i, 0, alpha), from counts over the whole tensor:
a streamed method whose statistics are those two counts per model (integers, so any block split gives the
same factors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_m2n2.methods.base import MergeMethod, Param, register
from hf_m2n2.methods.streaming import Block, Lazy, Streamed, TensorContext, whole_tensor_fn

_PAPER = "Reinforced Agent Merging (https://arxiv.org/abs/2601.13572)"


def _classified(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float):
    """(task vectors as (models, elements) with unchanged entries zeroed, changed mask, unique mask, shared mask,
    per-element count of models that changed it)."""
    deltas = torch.stack([x - base for x in tensors]).reshape(len(tensors), -1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return deltas * changed, changed, counts == 1, counts > 1, counts


def _ram(tensors, base, params, model_params, stream) -> torch.Tensor:
    """base + sum_i d_i * [i alone changed it] + sum_i d_i * [several changed it] / count, in the inputs' dtype."""
    if base is None:
        raise ValueError("ram needs a base tensor")
    deltas, _, unique, shared, counts = _classified(tensors, base, float(params["epsilon"]))
    merged = (deltas * unique + deltas * shared / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def _ramplus_statistics(context: TensorContext, blocks: Sequence[Lazy[Block]]) -> torch.Tensor:
    """Per model, 1 + r * clamp(shared / max(unique, epsilon), 0, alpha) (float32, as mergekit computes it)."""
    epsilon = float(context.params["epsilon"])
    shared_counts = unique_counts = 0
    for lazy in blocks:
        block = lazy.load()
        _, changed, unique, shared, _ = _classified(block.tensors, block.base, epsilon)
        shared_counts = shared_counts + (changed & shared).sum(dim=1)
        unique_counts = unique_counts + (changed & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    return 1 + float(context.params["r"]) * rho.clamp(min=0, max=float(context.params["alpha"]))


def _ramplus_apply(block: Block, factors: torch.Tensor) -> torch.Tensor:
    base = block.base
    deltas, _, unique, shared, counts = _classified(
        block.tensors, base, float(block.context.params["epsilon"])
    )
    factors = factors.to(deltas.device)
    merged = (deltas * unique * factors.unsqueeze(-1) + deltas * shared / counts.clamp(min=1)).sum(dim=0)
    return (base + merged.reshape(base.shape)).to(base.dtype)


RAMPLUS = Streamed(apply=_ramplus_apply, statistics=_ramplus_statistics)


def _ramplus_tl(tensors, base, params, model_params, stream) -> torch.Tensor:
    if base is None:
        raise ValueError("ramplus_tl needs a base tensor")
    return whole_tensor_fn(RAMPLUS)(tensors, base, params, model_params, stream)


_EPSILON = Param("epsilon", 1e-5)

register(
    MergeMethod(
        name="ram",
        fn=_ram,
        params=(_EPSILON,),
        uses_base="required",
        min_models=1,
        elementwise=True,
        paper=_PAPER,
        description=(
            "Task vectors: a parameter changed (|delta| > epsilon) by one model takes its change, one changed by "
            "several the mean of their changes, others stay at the base."
        ),
    )
)
register(
    MergeMethod(
        name="ramplus_tl",
        fn=_ramplus_tl,
        params=(Param("r", 0.1), Param("alpha", 0.2), _EPSILON),
        uses_base="required",
        min_models=1,
        streamed=RAMPLUS,
        paper=_PAPER,
        description=(
            "RAM with each model's unique changes scaled by 1 + r * min(shared / unique, alpha), counted per "
            "tensor (mergekit's tensor-local RAM+)."
        ),
    )
)
