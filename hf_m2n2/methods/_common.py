"""Small helpers shared by the merge-method modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.methods.base import Scalar

_HALF_TYPES = (torch.float16, torch.bfloat16)


def per_model(model_params: Sequence[Mapping[str, Scalar]], key: str) -> list[float]:
    """The per-model parameter `key` of every input, as floats."""
    return [float(mp[key]) for mp in model_params]


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the precision linear and slerp compute in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch accumulates sums of `dtype` in (float32 for half types)."""
    return torch.float32 if dtype in _HALF_TYPES else dtype


def round_to(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype`, so scalar arithmetic matches a tensor of that dtype."""
    return float(torch.tensor(value, dtype=dtype))


def keep_mask(
    probs: torch.Tensor | float, shape: torch.Size, generator: torch.Generator | None
) -> torch.Tensor:
    """A boolean mask keeping each element with probability `probs` (a scalar or a tensor of `shape`).

    One float32 uniform draw per element compared with the probability (3x faster than materializing a
    probability tensor for bernoulli_). Draws always happen on the CPU with `generator`, so a seed gives the
    same mask on any device.
    """
    if generator is None:
        raise ValueError("a randomized merge method needs a seeded torch.Generator")
    uniform = torch.rand(shape, generator=generator)
    if isinstance(probs, torch.Tensor):
        return uniform < probs.to("cpu", torch.float32)
    return uniform < probs
