"""The Blend genome: piecewise-constant seed coefficients over the canonically flattened parameters.

A Blend with breakpoints 0 = p0 < p1 < ... < pm = n_blocks and coefficients C (m x K) stands for the vector
`blend(i) = sum_k C[j, k] * seed_k(i)` for i in segment j. Breakpoints are block indices: every tensor is cut
into blocks of `block_size` elements (its last block may be shorter), so tensor boundaries are always block
boundaries and split points snap to them.

SLERP crossover needs only inner products between blends, and those follow exactly from the seeds' Gram prefix
sums `G[b, k, l] = sum over the first b blocks of seed_k(i) * seed_l(i)`, computed once in one streaming pass.
So an archive member costs O(segments x K) numbers, crossover costs nothing, and the only O(N) work is
materializing a candidate.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hf_m2n2.outdir import atomic_write_bytes

logger = logging.getLogger(__name__)

SLERP_SCOPES = ("global", "segment", "tensor")
SIN_EPS = 1e-6  # below this sin(omega) the reference code falls back to linear interpolation


@dataclass(frozen=True)
class LayoutTensor:
    name: str
    shape: tuple[int, ...]
    offset: int  # first flattened coordinate
    first_block: int
    num_blocks: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SeedLayout:
    """Canonical order of the evolved tensors, their flattened offsets and their blocks.

    Args:
        tensors: (name, shape) of every evolved tensor, in canonical order.
        block_size: elements per block (the granularity of split points and Gram sums).
    """

    def __init__(self, tensors: Sequence[tuple[str, tuple[int, ...]]], block_size: int):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.tensors: list[LayoutTensor] = []
        offset = block = 0
        starts: list[int] = []
        for name, shape in tensors:
            numel = math.prod(shape)
            n_blocks = max(1, -(-numel // block_size))
            starts.extend(offset + j * block_size for j in range(n_blocks))
            self.tensors.append(LayoutTensor(name, tuple(shape), offset, block, n_blocks))
            offset += numel
            block += n_blocks
        self.num_params = offset
        self.num_blocks = block
        self.block_starts = np.array(
            [*starts, offset], dtype=np.int64
        )  # element offset of each block boundary
        self.tensor_boundaries = np.array([t.first_block for t in self.tensors] + [block], dtype=np.int64)

    def block_slice(self, tensor: LayoutTensor, first: int, last: int) -> slice:
        """Element slice (within the flattened tensor) covering global blocks [first, last)."""
        base = self.block_starts[tensor.first_block]
        return slice(int(self.block_starts[first] - base), int(self.block_starts[last] - base))

    def snap(self, position: float) -> int:
        """The block boundary nearest to flattened coordinate `position` (a split point)."""
        idx = int(np.searchsorted(self.block_starts, position))
        if idx >= len(self.block_starts):
            return self.num_blocks
        if idx > 0 and position - self.block_starts[idx - 1] < self.block_starts[idx] - position:
            idx -= 1
        return idx

    def fingerprint(self) -> str:
        data = json.dumps([self.block_size, [(t.name, t.shape) for t in self.tensors]])
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def select_tensors(
    names: Sequence[str], include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> list[str]:
    """Names matching any `include` glob and no `exclude` glob (order kept)."""
    return [
        n
        for n in names
        if any(fnmatch.fnmatchcase(n, p) for p in include)
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]


# --- Gram prefix sums --------------------------------------------------------------------------------------


def gram_prefix(layout: SeedLayout, read: Callable[[int, str], torch.Tensor], num_seeds: int) -> np.ndarray:
    """One streaming pass: G[b] = sum over blocks < b of the seeds' pairwise inner products (float64).

    Args:
        read: read(seed_index, tensor_name) -> the seed's tensor.

    Returns:
        array of shape (num_blocks + 1, K, K).
    """
    per_block = np.zeros((layout.num_blocks, num_seeds, num_seeds), dtype=np.float64)
    for t in layout.tensors:
        flats = [read(k, t.name).reshape(-1).to(torch.float64) for k in range(num_seeds)]
        padded = t.num_blocks * layout.block_size
        blocks = [torch.nn.functional.pad(f, (0, padded - f.numel())).view(t.num_blocks, -1) for f in flats]
        rows = slice(t.first_block, t.first_block + t.num_blocks)
        for k in range(num_seeds):
            for m in range(k, num_seeds):
                dots = (blocks[k] * blocks[m]).sum(dim=1).numpy()
                per_block[rows, k, m] = dots
                per_block[rows, m, k] = dots
    out = np.zeros((layout.num_blocks + 1, num_seeds, num_seeds), dtype=np.float64)
    np.cumsum(per_block, axis=0, out=out[1:])
    return out


def load_or_compute_gram(path: Path, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Gram prefix sums cached in `path` (npz), recomputed when `key` (seeds + layout) differs."""
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) == key:
                    return data["gram"]
        except Exception:  # a damaged cache (truncated by a kill or a full disk) is recomputed, never trusted
            logger.warning("%s is damaged; recomputing it", path)
    gram = compute()
    atomic_write_bytes(path, lambda handle: np.savez(handle, gram=gram, key=np.array(key)))
    return gram


# --- the genome ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blend:
    """Piecewise-constant seed coefficients: `breakpoints` (m+1 block indices) and `coefs` (m x K)."""

    breakpoints: np.ndarray
    coefs: np.ndarray

    @staticmethod
    def seed(k: int, num_seeds: int, num_blocks: int) -> Blend:
        coefs = np.zeros((1, num_seeds))
        coefs[0, k] = 1.0
        return Blend(np.array([0, num_blocks], dtype=np.int64), coefs)

    @property
    def nbytes(self) -> int:
        return self.breakpoints.nbytes + self.coefs.nbytes

    def coefs_at(self, blocks: np.ndarray) -> np.ndarray:
        """Coefficient rows of the segments containing each block index."""
        return self.coefs[np.searchsorted(self.breakpoints, blocks, side="right") - 1]

    def refined(self, breakpoints: np.ndarray) -> np.ndarray:
        """Coefficients on a finer set of breakpoints (which must include this blend's)."""
        return self.coefs_at(breakpoints[:-1])

    def simplified(self) -> Blend:
        """Merge neighbouring segments with identical coefficients."""
        keep = np.ones(len(self.coefs), dtype=bool)
        keep[1:] = np.any(self.coefs[1:] != self.coefs[:-1], axis=1)
        return Blend(np.append(self.breakpoints[:-1][keep], self.breakpoints[-1]), self.coefs[keep])

    def to_json(self) -> dict:
        return {"breakpoints": self.breakpoints.tolist(), "coefs": self.coefs.tolist()}

    @staticmethod
    def from_json(data: dict) -> Blend:
        return Blend(np.array(data["breakpoints"], dtype=np.int64), np.array(data["coefs"], dtype=np.float64))


def _union(*arrays: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate(arrays)).astype(np.int64)


def inner_products(x: Blend, y: Blend, gram: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """<x, y> over each interval [bounds[i], bounds[i+1]) of block indices, exactly, from the Gram sums."""
    bp = _union(x.breakpoints, y.breakpoints, bounds)
    cx, cy = x.refined(bp), y.refined(bp)
    seg_gram = gram[bp[1:]] - gram[bp[:-1]]  # (segments, K, K)
    per_segment = np.einsum("sk,skl,sl->s", cx, seg_gram, cy)
    which = np.searchsorted(bounds, bp[:-1], side="right") - 1
    return np.bincount(which, weights=per_segment, minlength=len(bounds) - 1)


def slerp_coefficients(t: float, xx: float, yy: float, xy: float) -> tuple[float, float]:
    """The scalars (a, b) of `slerp(t, x, y) = a * x + b * y` from the inner products of x and y.

    `a = sin((1 - t) w) / sin w`, `b = sin(t w) / sin w` with `cos w = <x, y> / (|x| |y|)`; linear
    interpolation `(1 - t, t)` when sin w <= 1e-6 or either vector is zero (as the reference code).

    Args:
        t: interpolation position; 0 gives x, 1 gives y.
        xx: <x, x>.
        yy: <y, y>.
        xy: <x, y>.

    Returns:
        (a, b).
    """
    if xx <= 0.0 or yy <= 0.0 or not math.isfinite(xx * yy):
        return 1.0 - t, t
    cos = min(1.0, max(-1.0, xy / math.sqrt(xx * yy)))
    omega = math.acos(cos)
    sin = math.sin(omega)
    if not sin > SIN_EPS:
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / sin, math.sin(t * omega) / sin


def crossover(
    x: Blend,
    y: Blend,
    w: float,
    split: int,
    gram: np.ndarray,
    layout: SeedLayout,
    scope: str = "global",
    use_split: bool = True,
) -> Blend:
    """M2N2's SLERP crossover of two Blends: t = w before the split block, 1 - w after.

    Args:
        w: mixing ratio in [0, 1].
        split: split point, a block index in [0, num_blocks].
        scope: where the SLERP angle comes from: `global` (the two full vectors, as the reference code),
            `segment` (each side of the split separately, as the paper), or `tensor` (each tensor separately).
        use_split: False for the "no split point" ablation (t = w everywhere).

    Returns:
        the child Blend (exact: materializing it equals SLERP of the materialized parents).
    """
    if scope not in SLERP_SCOPES:
        raise ValueError(f"slerp scope must be one of {SLERP_SCOPES}")
    n = layout.num_blocks
    cuts = [0, split, n] if use_split and 0 < split < n else [0, n]
    if scope == "global":
        angle_bounds = np.array([0, n], dtype=np.int64)
    elif scope == "segment":
        angle_bounds = np.array(cuts, dtype=np.int64)
    else:
        angle_bounds = layout.tensor_boundaries
    bp = _union(x.breakpoints, y.breakpoints, np.array(cuts, dtype=np.int64), angle_bounds)
    xx = inner_products(x, x, gram, angle_bounds)
    yy = inner_products(y, y, gram, angle_bounds)
    xy = inner_products(x, y, gram, angle_bounds)
    starts = bp[:-1]
    angle_idx = np.searchsorted(angle_bounds, starts, side="right") - 1
    t = np.where(starts < split, w, 1 - w) if len(cuts) == 3 else np.full(len(starts), w)
    pairs = [slerp_coefficients(float(ti), xx[k], yy[k], xy[k]) for ti, k in zip(t, angle_idx)]
    a, b = (np.array(column) for column in zip(*pairs))
    coefs = a[:, None] * x.refined(bp) + b[:, None] * y.refined(bp)
    return Blend(bp, coefs).simplified()


# --- materialization ----------------------------------------------------------------------------------------


def blend_tensor(
    blend: Blend,
    tensor: LayoutTensor,
    layout: SeedLayout,
    seeds: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tensor of a Blend: per segment, sum_k C[j,k] * seed_k, computed in the seeds' dtype.

    Args:
        seeds: this tensor in each seed (same shape).
        out: optional destination (any dtype/device of the right shape), written in place.
    """
    first, last = tensor.first_block, tensor.first_block + tensor.num_blocks
    inner = blend.breakpoints[(blend.breakpoints > first) & (blend.breakpoints < last)]
    bounds = np.concatenate([[first], inner, [last]]).astype(np.int64)
    coefs = blend.coefs_at(bounds[:-1])
    result = torch.empty_like(seeds[0]) if out is None or out.dtype != seeds[0].dtype else out
    flat_out = result.view(-1)
    flats = [s.reshape(-1) for s in seeds]
    for j in range(len(bounds) - 1):
        part = layout.block_slice(tensor, int(bounds[j]), int(bounds[j + 1]))
        target = flat_out[part]
        torch.mul(flats[0][part], float(coefs[j, 0]), out=target)
        for k in range(1, len(seeds)):
            target.add_(flats[k][part], alpha=float(coefs[j, k]))
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result


def iter_blend(
    blend: Blend, layout: SeedLayout, read: Callable[[int, str], torch.Tensor], num_seeds: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every evolved tensor of a Blend, one at a time."""
    for t in layout.tensors:
        yield t.name, blend_tensor(blend, t, layout, [read(k, t.name) for k in range(num_seeds)])
