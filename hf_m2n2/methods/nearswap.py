"""NearSwap: move the base toward the other model where the two are already close."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.methods._common import RandomStream
from hf_m2n2.methods.base import REQUIRED, MergeMethod, Param, Scalar, register

_MIN_DIFF = 1e-6


def nearswap(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """w * model + (1 - w) * base with w = clamp(t / max(|base - model|, 1e-6), 0, 1), per element.

    Computed in the inputs' dtype, as mergekit does (so bf16 inputs give mergekit's bf16 bytes).
    """
    if base is None:
        raise ValueError("nearswap needs a base tensor")
    other = tensors[0]
    weight = (float(params["t"]) / (base - other).abs_().clamp_(min=_MIN_DIFF)).clamp_(0, 1)
    return weight * other + (1 - weight) * base


register(
    MergeMethod(
        name="nearswap",
        fn=nearswap,
        params=(Param("t", REQUIRED),),
        uses_base="required",
        min_models=1,
        max_models=1,
        elementwise=True,
        paper="NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)",
        description=(
            "Takes the other model's value where it is within t of the base (weight t / |base - model|, "
            "capped at 1), the base elsewhere."
        ),
    )
)
