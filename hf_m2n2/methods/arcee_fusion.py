"""Arcee Fusion: keep the other model's changes whose importance is an outlier, the base elsewhere.

Whole-tensor: the importance threshold is a set of quantiles of the whole tensor's importance scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.methods._common import RandomStream
from hf_m2n2.methods.base import MergeMethod, Scalar, register

_SOFTMAX_EPS = 1e-8
_QUARTILES = (0.25, 0.5, 0.75)


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|model - base| times KL(softmax(model) || softmax(base)) of its vector along the last dimension."""
    p = torch.softmax(model, dim=-1) + _SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + _SOFTMAX_EPS
    return (model - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


def quantiles(values: torch.Tensor, qs: Sequence[float]) -> list[torch.Tensor]:
    """The elements at sorted positions int(q * (n - 1)) of `values` (exact: every element is ranked)."""
    flat = values.reshape(-1)
    positions = (torch.tensor(qs) * (flat.numel() - 1)).long()  # float32 products, as mergekit rounds them
    return [torch.kthvalue(flat, int(i) + 1).values for i in positions]


def arcee_fusion(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """base + (model - base) where importance >= median + 1.5 * IQR of the tensor's importance scores."""
    if base is None:
        raise ValueError("arcee_fusion needs a base tensor")
    model = tensors[0]
    scores = importance(model, base)
    q1, median, q3 = quantiles(scores, _QUARTILES)
    keep = (scores >= median + 1.5 * (q3 - q1)).float()
    return (base + (model - base) * keep).to(base.dtype)


register(
    MergeMethod(
        name="arcee_fusion",
        fn=arcee_fusion,
        params=(),
        uses_base="required",
        min_models=1,
        max_models=1,
        paper=(
            "Arcee Fusion (https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-"
            "multi-gpu-acceleration)"
        ),
        description=(
            "Takes the other model's change where its importance (|delta| x KL divergence of the rows' "
            "softmaxes) exceeds median + 1.5 IQR over the tensor, the base elsewhere."
        ),
    )
)
