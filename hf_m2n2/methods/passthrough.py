"""Passthrough: copy the single input tensor, optionally scaled."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.methods._common import RandomStream
from hf_m2n2.methods.base import MergeMethod, Param, Scalar, register


def passthrough(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """The single input times its `scale` (the input itself, uncopied, when scale is unset)."""
    scale = model_params[0]["scale"]
    return tensors[0] if scale is None else tensors[0] * float(scale)


register(
    MergeMethod(
        name="passthrough",
        fn=passthrough,
        params=(Param("scale", None, per_model=True),),
        uses_base="never",
        min_models=1,
        elementwise=True,
        max_models=1,
        description="Copies tensors from a single model unchanged (optionally scaled); used to stack layers.",
    )
)
