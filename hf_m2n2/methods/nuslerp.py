"""NuSLERP: slerp between two models (or their task vectors), weighted, whole-tensor or per row/column."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.methods._common import RandomStream, per_model
from hf_m2n2.methods.base import REQUIRED, MergeMethod, Param, Scalar, register

_UNIT_EPS = 1e-7
_COLINEAR_EPS = 1e-8
_ZERO_WEIGHT_SUM = 1e-6


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=_UNIT_EPS)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool) -> torch.Tensor:
    """Slerp v0 -> v1 at `t` over vectors along `dim` (or the whole flattened tensors), in the inputs' dtype.

    Exactly (anti)parallel vectors (1 - cos^2 <= 1e-16) are interpolated linearly.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = _unit(v0).mul_(_unit(v1)).sum(dim=-1, keepdim=True).clamp_(-1, 1)
    colinear = (1 - cos.square()) <= _COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = v0 * torch.sin((1 - t) * theta)
    out.add_(v1 * torch.sin(t * theta)).div_(torch.sin(theta))
    if bool(colinear.any()):
        out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """Slerp model 0 -> model 1 at t = w1 / (w0 + w1) (0.5 if the sum is ~0); with a base, on task vectors."""
    w0, w1 = per_model(model_params, "weight")
    total = w0 + w1
    t = 0.5 if abs(total) < _ZERO_WEIGHT_SUM else w1 / total
    dim = 0 if params["nuslerp_row_wise"] else -1
    flatten = bool(params["nuslerp_flatten"])
    if base is None:
        return nuslerp_vectors(t, tensors[0], tensors[1], dim, flatten)
    return nuslerp_vectors(t, tensors[0] - base, tensors[1] - base, dim, flatten).add_(base)


register(
    MergeMethod(
        name="nuslerp",
        fn=nuslerp,
        params=(
            Param("weight", REQUIRED, per_model=True),
            Param("nuslerp_flatten", True, kind="bool"),
            Param("nuslerp_row_wise", False, kind="bool"),
        ),
        uses_base="optional",
        min_models=2,
        max_models=2,
        description=(
            "Slerp between two models at t = w2 / (w1 + w2); with a base model, slerp of their task vectors "
            "added back to the base. nuslerp_flatten: false interpolates vectors along the last dimension "
            "(nuslerp_row_wise: true, along the first)."
        ),
    )
)
