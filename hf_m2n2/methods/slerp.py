"""Spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from hf_m2n2.methods._common import wide_dtype
from hf_m2n2.methods.base import REQUIRED, MergeMethod, Param, Scalar, register

DOT_THRESHOLD = 0.9995  # |cos| above this: (anti)parallel, interpolate linearly
_NORM_EPS = 1e-8
_CHUNK = 1 << 20  # elements per chunk: bounds the float32 scratch for half-precision inputs


def _chunks(flat: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK].to(dtype)


def _norm(flat: torch.Tensor, dtype: torch.dtype) -> float:
    parts = [torch.linalg.vector_norm(chunk) for chunk in _chunks(flat, dtype)]
    return float(torch.linalg.vector_norm(torch.stack(parts))) if parts else 0.0


def slerp_coefficients(t: float, cos: float) -> tuple[float, float]:
    """(c0, c1) with slerp = c0 * v0 + c1 * v1 for the cosine `cos` of v0, v1; linear when (anti)parallel."""
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of the whole (flattened) tensors v0 -> v1 at `t`, in float32, returned in v0's dtype.

    A tensor of norm ~0 is treated as having norm 1 (its cosine with the other is then ~0).
    """
    work = wide_dtype(v0.dtype)
    a, b = v0.reshape(-1), v1.reshape(-1)
    norm_a = _norm(a, work)
    norm_b = _norm(b, work)
    norm_a = norm_a if norm_a > _NORM_EPS else 1.0
    norm_b = norm_b if norm_b > _NORM_EPS else 1.0
    pairs = zip(_chunks(a, work), _chunks(b, work))
    cos = sum(float(((x / norm_a) * (y / norm_b)).sum()) for x, y in pairs)
    c0, c1 = slerp_coefficients(t, cos)
    out = torch.empty_like(a)
    for start, (x, y) in zip(range(0, a.numel(), _CHUNK), zip(_chunks(a, work), _chunks(b, work))):
        out[start : start + _CHUNK] = c0 * x + c1 * y
    return out.reshape(v0.shape)


def slerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Slerp from the base (t=0) to the single other model (t=1)."""
    if base is None:
        raise ValueError("slerp needs a base tensor")
    return slerp_tensors(float(params["t"]), base, tensors[0])


register(
    MergeMethod(
        name="slerp",
        fn=slerp,
        params=(Param("t", REQUIRED),),
        uses_base="required",
        min_models=1,
        max_models=1,
        paper="Slerp, spherical linear interpolation (https://en.wikipedia.org/wiki/Slerp)",
        description=(
            "Spherical interpolation between the base (t=0) and the other model (t=1) over each whole tensor; "
            "linear interpolation when they are (anti)parallel."
        ),
    )
)
