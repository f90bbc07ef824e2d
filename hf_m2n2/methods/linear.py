"""Linear (weighted average) merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.methods._common import RandomStream, per_model, wide_dtype
from hf_m2n2.methods.base import REQUIRED, MergeMethod, Param, Scalar, register

_ZERO_WEIGHT_SUM = 1e-8


def linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """sum_i w_i * x_i, divided by sum_i w_i when `normalize` (skipped if that sum is ~0).

    Accumulates in float32 (float64 for float64 inputs) like mergekit, and returns the inputs' dtype.
    """
    weights = per_model(model_params, "weight")
    first = tensors[0]
    total = torch.zeros_like(first, dtype=wide_dtype(first.dtype))
    for x, weight in zip(tensors, weights):
        total.add_(x, alpha=weight)
    weight_sum = sum(weights)
    if params["normalize"] and abs(weight_sum) >= _ZERO_WEIGHT_SUM:
        total.div_(weight_sum)
    return total.to(first.dtype)


register(
    MergeMethod(
        name="linear",
        fn=linear,
        params=(Param("weight", REQUIRED, per_model=True), Param("normalize", True, kind="bool")),
        uses_base="never",
        min_models=1,
        elementwise=True,
        paper=(
            "Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
            "increasing inference time (https://arxiv.org/abs/2203.05482)"
        ),
        description="Weighted average of the models' parameters (weights normalized to sum to 1 by default).",
    )
)
