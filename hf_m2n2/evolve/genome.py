"""Genome operations: what strategies may do to a genome without knowing what it is.

Strategies see genomes only through a `GenomeOps` object: split-point SLERP crossover, Gaussian mutation, random
initialisation, the flattened size N (split points are positions in [0, N] of the flattened parameter vector,
N meaning "no split"), conversion to what the evaluator receives, and conversion to/from checkpoint arrays.

M2N2's crossover is, per segment, `child = a * x + b * y` where the scalars (a, b) come from the SLERP formula
with t = w before the split point and 1 - w after it, and the angle from inner products of the parents
(`slerp_coefficients`). The angle is measured over the two full vectors (`slerp_scope="global"`, the reference
code) or separately over each segment (`"segment"`, the paper). `DenseVectorOps` implements this on one flat
float32 numpy vector; a Blend genome implements the same contract from Gram prefix sums.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from hf_m2n2.blend import slerp_coefficients  # the one M2N2 SLERP rule, shared with Blend genomes

G = TypeVar("G")
SlerpScope = Literal["global", "segment"]


@runtime_checkable
class GenomeOps(Protocol[G]):
    """Operations on opaque genomes of one kind. Implementations hold no random state: every draw comes from the
    `numpy.random.Generator` passed in, which the strategy owns and checkpoints."""

    kind: str
    slerp_scope: SlerpScope

    @property
    def size(self) -> int:
        """N, the number of flattened parameters; split points lie in [0, N] (N: no split)."""
        ...

    def crossover(self, x: G, y: G, w: float, split: int) -> G:
        """SLERP x towards y with t = w on [0, split) and t = 1 - w on [split, N); angles per `slerp_scope`."""
        ...

    def mutate(self, x: G, std: float, rng: np.random.Generator) -> G:
        """x plus N(0, std^2) noise on every parameter (a new genome; x is unchanged)."""
        ...

    def random(self, std: float, rng: np.random.Generator) -> G:
        """A genome with every parameter drawn from N(0, std^2)."""
        ...

    def materialize(self, x: G) -> Any:
        """What the evaluator receives for genome x (a parameter vector, a live model, ...)."""
        ...

    def to_state(self, x: G) -> Any:
        """x as checkpointable data: numpy arrays, numbers, strings, lists and dicts of them."""
        ...

    def from_state(self, state: Any) -> G:
        """Inverse of `to_state`."""
        ...


class DenseVectorOps:
    """GenomeOps over one flat float32 numpy vector of `size` parameters (models evolved from scratch).

    Genomes are never modified in place; `materialize` hands the evaluator a torch view of the vector.

    Args:
        size: number of parameters.
        slerp_scope: `global` (one angle from the full vectors, the reference code) or `segment` (one angle per
            segment, the paper).

    Example:
        >>> ops = DenseVectorOps(4)
        >>> x, y = np.array([1, 0, 0, 0], np.float32), np.array([0, 1, 0, 0], np.float32)
        >>> ops.crossover(x, y, 0.5, 4).round(4)  # no split: t = 0.5 everywhere, a = b = sin(pi/4) / sin(pi/2)
        array([0.7071, 0.7071, 0.    , 0.    ], dtype=float32)
    """

    kind = "dense"

    def __init__(self, size: int, slerp_scope: SlerpScope = "global"):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if slerp_scope not in ("global", "segment"):
            raise ValueError(f"slerp_scope must be 'global' or 'segment', got {slerp_scope!r}")
        self._size = size
        self.slerp_scope: SlerpScope = slerp_scope
        # torch draws normals ~2.5x faster than numpy; reseeded from the caller's rng at every use: no state
        self._generator = torch.Generator()

    @property
    def size(self) -> int:
        return self._size

    def crossover(self, x: np.ndarray, y: np.ndarray, w: float, split: int) -> np.ndarray:
        """Split-point SLERP of x and y (see the module docstring).

        Args:
            x: first parent.
            y: second parent.
            w: mixing ratio in [0, 1].
            split: split point in [0, N]; N means no split (t = w everywhere).

        Returns:
            A new vector.
        """
        if not 0 <= split <= self._size:
            raise ValueError(f"split point {split} outside [0, {self._size}]")
        out = np.empty_like(x)
        whole = None
        if self.slerp_scope == "global":
            whole = (float(x @ x), float(y @ y), float(x @ y))
        for lo, hi, t in ((0, split, w), (split, self._size, 1.0 - w)):
            if hi <= lo:
                continue
            xs, ys, segment = x[lo:hi], y[lo:hi], out[lo:hi]
            a, b = slerp_coefficients(t, *(whole or (float(xs @ xs), float(ys @ ys), float(xs @ ys))))
            np.multiply(xs, np.float32(a), out=segment)
            segment += np.float32(b) * ys
        return out

    def mutate(self, x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
        noise = self._normal(rng)
        noise *= np.float32(std)
        noise += x
        return noise

    def random(self, std: float, rng: np.random.Generator) -> np.ndarray:
        noise = self._normal(rng)
        noise *= np.float32(std)
        return noise

    def _normal(self, rng: np.random.Generator) -> np.ndarray:
        self._generator.manual_seed(int(rng.integers(2**63)))
        return torch.randn(self._size, generator=self._generator).numpy()

    def materialize(self, x: np.ndarray) -> torch.Tensor:
        """A float32 torch tensor sharing x's memory (the evaluator must not modify it)."""
        return torch.from_numpy(x)

    def to_state(self, x: np.ndarray) -> np.ndarray:
        return x

    def from_state(self, state: Any) -> np.ndarray:
        return self.from_array(state)

    def from_array(self, values: Any) -> np.ndarray:
        """A genome from any array-like of `size` numbers (seed vectors, CMA-ES samples, torch tensors).

        Raises:
            ValueError: wrong length or non-finite values.
        """
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        vector = np.array(values, dtype=np.float32).reshape(-1)
        if vector.size != self._size:
            raise ValueError(f"expected {self._size} values, got {vector.size}")
        if not np.isfinite(vector).all():
            raise ValueError("the vector has non-finite values")
        return vector
