"""Sparsification of task vectors: magnitude top-k (TIES), magnitude window (breadcrumbs), random (DARE), DELLA.

Magnitude selection never sorts a whole tensor: a fixed-seed sample brackets the cut-off value, then an exact
linear-time selection (`torch.kthvalue`) runs on the few elements inside the bracket. Exactly the requested
number of elements is kept; elements whose magnitudes tie at the cut-off are taken in index order.
"""

from __future__ import annotations

import math

import torch

from hf_m2n2.methods._common import keep_mask
from hf_m2n2.methods.base import MethodParameterError

_DIRECT_SELECT = 1 << 20  # below this many elements, select on the whole tensor
_SAMPLE_SIZE = 1 << 16
_SAMPLE_SIGMAS = 4.0
_RESCALE_EPS = 1e-7


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank`-th smallest element (1-based) of the 1-D tensor `values`, as a 0-dim tensor."""
    n = values.numel()
    if n <= _DIRECT_SELECT:
        return torch.kthvalue(values, rank).values
    lo, hi = _sample_bracket(values, rank)
    if lo is None and hi is None:
        return torch.kthvalue(values, rank).values
    inside = values >= lo if lo is not None else torch.ones_like(values, dtype=torch.bool)
    below = n - int(torch.count_nonzero(inside))
    if hi is not None:
        inside.logical_and_(values <= hi)
    candidates = values[inside]
    del inside
    local_rank = rank - below
    if 1 <= local_rank <= candidates.numel():
        return torch.kthvalue(candidates, local_rank).values
    return torch.kthvalue(values, rank).values  # the sample missed: rare, still exact


def _sample_bracket(values: torch.Tensor, rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Values that bracket the `rank`-th smallest with overwhelming probability (None: unbounded side)."""
    n, size = values.numel(), _SAMPLE_SIZE
    generator = torch.Generator().manual_seed(0)
    sample = values[torch.randint(n, (size,), generator=generator).to(values.device)]
    q = rank / n
    margin = _SAMPLE_SIGMAS * math.sqrt(size * q * (1.0 - q)) + 8.0
    lo_rank, hi_rank = math.floor(q * size - margin), math.ceil(q * size + margin)
    lo = torch.kthvalue(sample, lo_rank).values if lo_rank >= 1 else None
    hi = torch.kthvalue(sample, hi_rank).values if hi_rank <= size else None
    return lo, hi


def _tie_positions(values: torch.Tensor, value: torch.Tensor, count: int, from_end: bool) -> torch.Tensor:
    """Indices of the first (or last) `count` elements of `values` equal to `value`."""
    positions = (values == value).nonzero().squeeze(1)
    return positions[-count:] if from_end else positions[:count]


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the `k` largest entries of the 1-D `magnitudes` (zero-valued ties at the cut-off may be left out)."""
    n = magnitudes.numel()
    if k >= n:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    cut = kth_smallest(magnitudes, n - k + 1)
    mask = magnitudes > cut
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0 and cut > 0:
        mask[_tie_positions(magnitudes, cut, missing, from_end=False)] = True
    return mask


def rank_window_mask(magnitudes: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the entries of the 1-D `magnitudes` whose ascending rank lies in [start, stop).

    Ties are ranked in index order; zero-valued ties at the window's edges may be kept (they carry no value).
    """
    n = magnitudes.numel()
    stop = min(stop, n)
    if stop <= start:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    if start <= 0 and stop >= n:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    lo = kth_smallest(magnitudes, start + 1)
    hi = kth_smallest(magnitudes, stop)
    mask = magnitudes >= lo
    below = n - int(torch.count_nonzero(mask))
    mask.logical_and_(magnitudes <= hi)
    extra_low = start - below  # ties at `lo` ranked before the window
    extra_high = below + int(torch.count_nonzero(mask)) - stop  # ties at `hi` ranked after it
    if extra_low > 0 and lo > 0:
        mask[_tie_positions(magnitudes, lo, extra_low, from_end=False)] = False
    if extra_high > 0 and hi > 0:
        mask[_tie_positions(magnitudes, hi, extra_high, from_end=True)] = False
    return mask


def apply_mask(
    x: torch.Tensor, mask: torch.Tensor, rescale: bool, magnitudes: torch.Tensor | None = None
) -> torch.Tensor:
    """`x * mask`; with `rescale`, scaled so its L1 norm equals that of `x` (skipped when either norm is ~0)."""
    kept = x * mask
    if not rescale:
        return kept
    before = (x.abs() if magnitudes is None else magnitudes).sum()
    after = kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept.mul_(before / after)


def magnitude(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the `density` fraction of `x` with the largest magnitudes (at least one element when density > 0)."""
    if density >= 1:
        return x
    n = x.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(x)
    magnitudes = x.abs().reshape(-1)
    mask = top_k_mask(magnitudes, max(1, int(density * n))).reshape(x.shape)
    return apply_mask(x, mask, rescale, magnitudes)


def magnitude_outliers(x: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` fraction of largest magnitudes, then the smallest, keeping `density` of `x`.

    When gamma + density > 1 fewer outliers are dropped, so the kept fraction is always `density`.
    """
    if density >= 1:
        return x
    n = x.numel()
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    magnitudes = x.abs().reshape(-1)
    mask = rank_window_mask(magnitudes, bottom, bottom + keep).reshape(x.shape)
    return apply_mask(x, mask, rescale, magnitudes)


def random_drop(
    x: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: keep each element of `x` with probability `density`; `rescale` restores the L1 norm."""
    if density >= 1:
        return x
    mask = keep_mask(float(density), x.shape, generator).to(x.device)
    return apply_mask(x, mask, rescale)


def della_magprune(
    x: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DELLA: keep each element with a probability rising linearly with its magnitude rank within its row.

    Probabilities span [density - epsilon, density + epsilon] over each row (dim 1; a 1-D tensor is one row).
    """
    if density >= 1:
        return x
    if density <= 0:
        return torch.zeros_like(x)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MethodParameterError(
            f"della: epsilon={epsilon} with density={density} puts keep probabilities outside (0, 1); "
            "choose epsilon < min(density, 1 - density)"
        )
    rows = x.unsqueeze(0) if x.dim() < 2 else x
    probs = _rank_probabilities(rows, density, epsilon, torch.float32)
    mask = keep_mask(probs, rows.shape, generator).to(rows.device)
    return apply_mask(rows, mask, rescale).reshape(x.shape)


def _rank_probabilities(
    rows: torch.Tensor, density: float, epsilon: float, dtype: torch.dtype
) -> torch.Tensor:
    """Keep probabilities from each element's magnitude rank along dim 1, in `dtype`."""
    width = rows.shape[1]
    order = rows.abs().argsort(dim=1, stable=True)  # ties ranked by index: same draws on any device
    positions = torch.arange(width, device=rows.device).to(dtype).add_(1)
    lo, hi = positions.min(), positions.max()
    shape = (1, width) + (1,) * (rows.dim() - 2)
    ranks = torch.empty(rows.shape, dtype=dtype, device=rows.device)
    ranks.scatter_(1, order, positions.view(shape).expand(order.shape))
    del order
    if width == 1:
        return ranks.fill_(density)
    ranks.sub_(lo).div_(hi - lo).clamp_(0, 1)
    return ranks.mul_(2).mul_(epsilon).add_(density - epsilon)
