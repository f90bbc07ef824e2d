"""Spherical linear interpolation between the base and one other model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from hf_m2n2.methods._common import RandomStream, wide_dtype
from hf_m2n2.methods.base import REQUIRED, MergeMethod, Param, Scalar, register
from hf_m2n2.methods.streaming import (
    Block,
    Lazy,
    Streamed,
    TensorContext,
    whole_tensor_fn,
)

DOT_THRESHOLD = 0.9995  # |cos| above this: (anti)parallel, interpolate linearly
_NORM_EPS = 1e-8
_CHUNK = 1 << 20  # elements per chunk: bounds the float32 scratch for half-precision inputs


def slerp_coefficients(t: float, cos: float, work: torch.dtype = torch.float32) -> tuple[float, float]:
    """(c0, c1) with slerp = c0 * v0 + c1 * v1 for the cosine `cos` of v0, v1; linear when (anti)parallel.

    Computed in `work` (float32, float64 for float64 inputs), as mergekit does: coefficients rounded from
    float64 arithmetic differ from its float32 ones in the last bit, which float32 outputs show."""
    cos_t = torch.tensor(cos, dtype=work).clamp(-1.0, 1.0)
    t_t = torch.tensor(t, dtype=work)
    if abs(float(cos_t)) > DOT_THRESHOLD:
        return float(1 - t_t), float(t_t)
    theta = torch.acos(cos_t)
    sin_theta = torch.sin(theta)
    return float(torch.sin((1 - t_t) * theta) / sin_theta), float(torch.sin(t_t * theta) / sin_theta)


def _flat_chunks(blocks: Sequence[Lazy[Block]]) -> Iterator[tuple[torch.Tensor, ...]]:
    """(base, model) pieces of the flattened tensors, `_CHUNK` elements each (the last one shorter), in the
    inputs' wide dtype, whatever the row blocks: a piece straddling two blocks is joined.
    Every piece is a fresh copy, so its alignment, and with it BLAS's summation order, is the same however the
    tensor is split into blocks."""
    carry: tuple[torch.Tensor, ...] = ()
    for lazy in blocks:
        block = lazy.load()
        flats = [block.base.reshape(-1), block.tensors[0].reshape(-1)]
        work = wide_dtype(flats[0].dtype)
        first = 0
        if carry:
            first = _CHUNK - carry[0].numel()
            carry = tuple(torch.cat([c, f[:first].to(work)]) for c, f in zip(carry, flats))
            if carry[0].numel() < _CHUNK:
                continue
            yield carry
            carry = ()
        for start in range(first, flats[0].numel(), _CHUNK):
            pieces = tuple(f[start : start + _CHUNK].to(work, copy=True) for f in flats)
            if pieces[0].numel() < _CHUNK and lazy is not blocks[-1]:
                carry = pieces
            else:
                yield pieces
    if carry:
        yield carry


def _statistics(context: TensorContext, blocks: Sequence[Lazy[Block]]) -> tuple[float, float]:
    """(c0, c1) from the angle between the whole (flattened) base and model tensors, in one pass.

    In float32 (float64 for float64 inputs) over fixed chunks of the flattened tensors: each chunk's three dot
    products (x.x, y.y, x.y: one BLAS pass each, no temporaries); the norms are the square roots of the summed
    squares, the cosine the sum of the chunks' dot products over the product of the norms. Chunks are cut from
    the flat tensor, not from the row blocks, so any block size gives the same angle. A tensor of norm ~0 is
    treated as having norm 1 (its cosine with the other is then ~0). mergekit sums the products of the
    normalized tensors instead: the cosines agree to float32 rounding, so outputs differ from mergekit's by at
    most one bf16 rounding step, in rare elements (0.002% of the 1B bench model's).
    """
    squares_a, squares_b, dots = [], [], []
    for x, y in _flat_chunks(blocks):
        squares_a.append(torch.dot(x, x))
        squares_b.append(torch.dot(y, y))
        dots.append(torch.dot(x, y))
    norm_a = float(torch.stack(squares_a).sum().sqrt()) if squares_a else 0.0
    norm_b = float(torch.stack(squares_b).sum().sqrt()) if squares_b else 0.0
    norm_a = norm_a if norm_a > _NORM_EPS else 1.0
    norm_b = norm_b if norm_b > _NORM_EPS else 1.0
    dot = float(torch.stack(dots).sum()) if dots else 0.0
    work = torch.float64 if squares_a and squares_a[0].dtype == torch.float64 else torch.float32
    return slerp_coefficients(float(context.params["t"]), dot / norm_a / norm_b, work)


def _apply(block: Block, coefficients: tuple[float, float]) -> torch.Tensor:
    """c0 * base + c1 * model over the block, in float32 (float64 for float64), returned in the base's dtype."""
    c0, c1 = coefficients
    v0, v1 = block.base, block.tensors[0]
    work = wide_dtype(v0.dtype)
    a, b = v0.reshape(-1), v1.reshape(-1)
    out = torch.empty_like(a)
    for start in range(0, a.numel(), _CHUNK):
        # private copies (copy=True: a float32 input's .to() is the input itself), scaled in place
        x = a[start : start + _CHUNK].to(work, copy=True).mul_(c0)
        y = b[start : start + _CHUNK].to(work, copy=True).mul_(c1)
        torch.add(x, y, out=out[start : start + _CHUNK])
    return out.reshape(v0.shape)


STREAMED = Streamed(apply=_apply, statistics=_statistics, block_temporaries=False)
_whole = whole_tensor_fn(STREAMED)


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of the whole (flattened) tensors v0 -> v1 at `t`, in float32, returned in v0's dtype."""
    return _whole([v1], v0, {"t": t}, [{}], None)


def slerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """Slerp from the base (t=0) to the single other model (t=1)."""
    if base is None:
        raise ValueError("slerp needs a base tensor")
    return _whole(tensors, base, params, model_params, stream)


register(
    MergeMethod(
        name="slerp",
        fn=slerp,
        params=(Param("t", REQUIRED),),
        uses_base="required",
        min_models=1,
        max_models=1,
        streamed=STREAMED,
        paper="Slerp, spherical linear interpolation (https://en.wikipedia.org/wiki/Slerp)",
        description=(
            "Spherical interpolation between the base (t=0) and the other model (t=1) over each whole tensor; "
            "linear interpolation when they are (anti)parallel."
        ),
    )
)
