"""Small helpers shared by the merge-method modules."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
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


class RandomStream:
    """A seeded stream of float32 uniforms in [0, 1), addressed by position.

    numpy's counter-based Philox computes value i without drawing the values before it, so every row block of a
    tensor draws its own part of the stream, in any order and on any thread, and a tensor's draws do not depend
    on how it is split into blocks. Draws happen on the CPU, so a seed gives the same values on any device.
    (1.5x faster than torch's CPU Mersenne Twister, which also has to draw every value before the one wanted.)

    Args:
        seed: the stream's key, an integer in [0, 2**128).

    Example:
        >>> stream = RandomStream(7)
        >>> torch.equal(stream.uniform(5, 3), stream.uniform(0, 8)[5:])
        True
    """

    _PER_COUNTER = 8  # Philox4x64 makes four 64-bit words, i.e. eight float32 draws, per counter step

    def __init__(self, seed: int):
        if not 0 <= seed < 1 << 128:
            raise ValueError(f"a RandomStream seed must lie in [0, 2**128), got {seed}")
        self.seed = int(seed)

    def uniform(self, start: int, count: int) -> torch.Tensor:
        """Values [start, start + count) of the stream, as a 1-D float32 CPU tensor."""
        skip = start % self._PER_COUNTER
        bits = np.random.Philox(key=self.seed, counter=start // self._PER_COUNTER)
        values = np.random.Generator(bits).random(count + skip, dtype=np.float32)
        return torch.from_numpy(values[skip:])

    def __repr__(self) -> str:
        return f"RandomStream({self.seed})"


def keep_mask(
    probs: torch.Tensor | float, shape: Sequence[int], stream: RandomStream, start: int
) -> torch.Tensor:
    """A CPU boolean mask of `shape` keeping each element with probability `probs` (a scalar or a tensor of
    `shape`): uniform values [start, start + numel) of `stream`, compared with the probability."""
    uniform = stream.uniform(start, math.prod(shape)).view(tuple(shape))
    if isinstance(probs, torch.Tensor):
        return uniform < probs.to("cpu", torch.float32)
    return uniform < probs
