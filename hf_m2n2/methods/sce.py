"""SCE (select, calculate, erase): variance-selected task vectors, weighted by their energy, TIES sign consensus.

Whole-tensor: the top-variance selection and the per-model weights (mean squared task vector) are taken over
the whole tensor, so the engine merges it in one piece.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.methods._common import RandomStream
from hf_m2n2.methods.base import MergeMethod, Param, Scalar, register
from hf_m2n2.methods.sparsify import top_k_mask

_ZERO_WEIGHT_SUM = 1e-6
_MIN_DIVISOR = 1e-6


def select_by_variance(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask (deltas' element shape, their dtype) of the `fraction` of positions whose variance over the models
    is largest: k = int(fraction * #positions with nonzero variance); ties at the cut-off in index order."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    if fraction >= 1:
        return torch.ones_like(deltas[0])
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)
    keep = (
        top_k_mask(variance.reshape(-1), k)
        if k > 0
        else torch.zeros(variance.numel(), dtype=torch.bool, device=variance.device)
    )
    return keep.reshape(variance.shape).to(deltas.dtype)


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared task vector over the sum of them (equal weights when that sum is ~0)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < _ZERO_WEIGHT_SUM:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """base + sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6), d_i the variance-selected task vectors, w_i their
    energy weights, m_i whether d_i's sign agrees with the elected sign (sign of sum_i d_i, + on ties).

    In the inputs' dtype, in mergekit's order of operations: bf16 inputs give mergekit's bf16 bytes unless
    variances tie at the selection cut-off (which tied positions are kept moves the energy weights, so elements
    far from the tied ones may differ too).
    """
    if base is None:
        raise ValueError("sce needs a base tensor")
    if not tensors:
        return base
    deltas = torch.stack([x - base for x in tensors])
    if float(params["select_topk"]) < 1:
        deltas = deltas * select_by_variance(deltas, float(params["select_topk"])).unsqueeze(0)
    return merge_selected(base, deltas)


def merge_selected(base: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """SCE's calculate and erase steps on the selected task vectors `deltas` (models stacked on dim 0)."""
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agree = deltas.sign() == elected
    weights = energy_weights(deltas).reshape(-1, *([1] * (deltas.dim() - 1)))
    kept = weights * agree
    return base + (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=_MIN_DIVISOR)


register(
    MergeMethod(
        name="sce",
        fn=sce,
        params=(
            Param("int8_mask", False, kind="bool"),  # memory-only in mergekit; no effect on values
            Param("select_topk", 1.0),
        ),
        uses_base="required",
        min_models=1,
        paper="FuseChat: Knowledge Fusion of Chat Models (https://arxiv.org/abs/2408.07990)",
        description=(
            "Keeps the select_topk fraction of positions with the largest variance across the task vectors, "
            "weights each task vector by its mean square, averages those agreeing with the elected sign."
        ),
    )
)
