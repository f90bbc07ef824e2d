"""Sparsification of task vectors: magnitude top-k (TIES), magnitude window (breadcrumbs), random (DARE), DELLA.

Each sparsifier is whole-tensor statistics plus an elementwise apply (a `Sparsifier`), so a delta can be
sparsified in row blocks without ever being held whole (see `hf_m2n2.methods.streaming`):

* Magnitude selection is an exact radix select on the magnitudes' bit patterns (non-negative floats order
  like their bits): a histogram of the top 16-bit digit, then of the next digit among the elements sharing
  the selected prefix (one pass over the data for half types, two for float32). No sort, no copy of the
  tensor. Exactly the requested number of elements is kept; elements whose magnitudes tie at the cut-off are
  taken in index order (per-block counts of the tied elements make that order global).
* Random masks compare uniforms of the tensor's `RandomStream` with the keep probability: element e of model
  m's delta takes value m * numel + e of the stream, whichever block it lies in. With an L1 rescale one
  statistics scan reads each block once, draws every model's mask of it and keeps the masks bit-packed (1 bit
  per element) for the apply; without one, nothing is read or drawn until the apply.
* The L1 rescale factor (sum |x| / sum |kept|) is summed per row in float64 (see `streaming.total`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from hf_m2n2.errors import MethodParameterError
from hf_m2n2.methods._common import RandomStream, keep_mask
from hf_m2n2.methods.base import Scalar
from hf_m2n2.methods.streaming import Lazy, TensorContext, row_sums, total

_RESCALE_EPS = 1e-7
_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_BITS_DTYPE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
ZERO = "zero"  # statistics meaning: the sparsified delta is all zeros


# ----------------------------------------------------------------------------------------- radix select


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| flattened, as the integers of its bit patterns (ordered like the magnitudes)."""
    return x.abs().reshape(-1).view(_BITS_DTYPE[x.element_size()])


@dataclass(frozen=True)
class Selected:
    """The element of some ascending rank: its bit pattern, the count of smaller elements, and per block the
    count of elements equal to it."""

    bits: int
    below: int
    equal: tuple[int, ...]


def _histogram(bits: torch.Tensor, level: int, levels: int, prefix: int) -> torch.Tensor:
    """Counts of the `level`-th 16-bit digit (most significant first) among `bits` whose higher digits are
    `prefix`."""
    shift = _DIGIT_BITS * (levels - 1 - level)
    if level:
        bits = bits[(bits >> (shift + _DIGIT_BITS)) == prefix]
        digits = (bits >> shift) & (_BINS - 1)
    else:  # the top digit of a non-negative pattern is non-negative
        digits = bits >> shift if shift else bits
    return torch.bincount(digits, minlength=_BINS).cpu()


def select(blocks: Sequence[Lazy[torch.Tensor]], ranks: Sequence[int]) -> list[Selected]:
    """The elements of 1-based ascending `ranks` among the magnitude bits of all `blocks` (`magnitude_bits`).

    One pass over the blocks per 16-bit digit of the dtype; a single block is read once.
    """
    if len(blocks) == 1:
        bits = blocks[0].load()
        blocks = [Lazy(0, blocks[0].shape, lambda: bits)]
    levels = None
    prefix, rank, below = [0] * len(ranks), list(ranks), [0] * len(ranks)
    equal: list[tuple[int, ...]] = [()] * len(ranks)
    level = 0
    while levels is None or level < levels:
        wanted = sorted(set(prefix))
        sums: dict[int, torch.Tensor] = {}
        per_block: list[dict[int, torch.Tensor]] = []
        for lazy in blocks:
            bits = lazy.load()
            levels = bits.element_size() // 2
            hists = {p: _histogram(bits, level, levels, p) for p in wanted}
            for p, h in hists.items():
                sums[p] = sums[p] + h if p in sums else h
            if level == levels - 1:  # the last digit: per-block counts of the selected value are needed
                per_block.append(hists)
        for i, p in enumerate(prefix):
            cumulative = sums[p].cumsum(0)
            digit = int((cumulative < rank[i]).sum())  # the first digit reaching the rank
            before = int(cumulative[digit - 1]) if digit else 0
            below[i] += before
            rank[i] -= before
            if level == levels - 1:
                equal[i] = tuple(int(h[p][digit]) for h in per_block)
            prefix[i] = (p << _DIGIT_BITS) | digit
        level += 1
    return [Selected(prefix[i], below[i], equal[i]) for i in range(len(ranks))]


@dataclass(frozen=True)
class Tie:
    """Keep the elements equal to `bits` that are numbered [start, stop) in index order; `before[b]` and
    `count[b]` are how many of them lie in the blocks before block b and in block b."""

    bits: int
    start: int
    stop: int
    before: tuple[int, ...]
    count: tuple[int, ...]


def _tie(selected: Selected, start: int, stop: int) -> Tie:
    before, seen = [], 0
    for count in selected.equal:
        before.append(seen)
        seen += count
    return Tie(selected.bits, start, stop, tuple(before), selected.equal)


@dataclass(frozen=True)
class Keep:
    """A magnitude selection: everything, nothing, or the elements whose bits lie strictly between `above` and
    `below` (None: unbounded) plus ranges of the elements tied at the bounds."""

    mode: str = "select"  # "select" | "all" | "none"
    above: int | None = None
    below: int | None = None
    ties: tuple[Tie, ...] = ()

    def mask(self, bits: torch.Tensor, block: int) -> torch.Tensor:
        """The flat keep-mask of block number `block`, given its magnitude bits."""
        if self.mode != "select":
            return torch.full_like(bits, self.mode == "all", dtype=torch.bool)
        mask = bits > self.above if self.above is not None else torch.ones_like(bits, dtype=torch.bool)
        if self.below is not None:
            mask.logical_and_(bits < self.below)
        for tie in self.ties:
            lo = max(0, tie.start - tie.before[block])
            hi = min(tie.count[block], tie.stop - tie.before[block])
            if hi <= lo:
                continue
            equal = bits == tie.bits
            if lo == 0 and hi == tie.count[block]:
                mask.logical_or_(equal)
            else:
                mask[equal.nonzero().squeeze(1)[lo:hi]] = True
        return mask


ALL, NONE = Keep("all"), Keep("none")


def top_k_keep(n: int, k: int, chooser: Callable[[Sequence[int]], list[Selected]]) -> Keep:
    """The `k` largest of `n` magnitudes (ties at the cut-off in index order; zero-valued ones left out)."""
    if k >= n:
        return ALL
    if k <= 0:
        return NONE
    (cut,) = chooser([n - k + 1])
    missing = k - (n - cut.below - sum(cut.equal))  # elements above the cut-off number fewer than k
    return Keep(above=cut.bits, ties=(_tie(cut, 0, missing),) if missing > 0 and cut.bits > 0 else ())


def window_keep(n: int, start: int, stop: int, chooser: Callable[[Sequence[int]], list[Selected]]) -> Keep:
    """The magnitudes of ascending rank [start, stop) (ties in index order; zero-valued ones at the edges may
    be kept)."""
    stop = min(stop, n)
    if stop <= start:
        return NONE
    if start <= 0 and stop >= n:
        return ALL
    lo, hi = chooser([start + 1, stop])
    count_lo, count_hi = sum(lo.equal), sum(hi.equal)
    extra_low = start - lo.below  # ties at lo ranked before the window
    extra_high = hi.below + count_hi - stop  # ties at hi ranked after it
    drop_low = extra_low if extra_low > 0 and lo.bits > 0 else 0
    drop_high = extra_high if extra_high > 0 and hi.bits > 0 else 0
    if lo.bits == hi.bits:
        ties = (_tie(lo, drop_low, count_lo - drop_high),)
    else:
        ties = (_tie(lo, drop_low, count_lo), _tie(hi, 0, count_hi - drop_high))
    return Keep(above=lo.bits, below=hi.bits, ties=ties)


def _single(values: torch.Tensor) -> list[Lazy[torch.Tensor]]:
    """Non-negative float `values` as one block of magnitude bits."""
    if not values.is_floating_point():
        raise TypeError("magnitude selection needs a floating-point tensor")
    bits = values.reshape(-1).view(_BITS_DTYPE[values.element_size()])
    return [Lazy(0, tuple(values.shape), lambda: bits)]


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank`-th smallest (1-based) of the non-negative 1-D float tensor `values`, as a 0-dim tensor."""
    (selected,) = select(_single(values), [rank])
    bits = torch.tensor(selected.bits, dtype=_BITS_DTYPE[values.element_size()])
    return bits.view(values.dtype).to(values.device)


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the `k` largest entries of the 1-D `magnitudes` (zero-valued ties at the cut-off may be left out)."""
    blocks = _single(magnitudes)
    return top_k_keep(magnitudes.numel(), k, partial(select, blocks)).mask(blocks[0].load(), 0)


def rank_window_mask(magnitudes: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the entries of the 1-D `magnitudes` whose ascending rank lies in [start, stop).

    Ties are ranked in index order; zero-valued ties at the window's edges may be kept (they carry no value).
    """
    blocks = _single(magnitudes)
    return window_keep(magnitudes.numel(), start, stop, partial(select, blocks)).mask(blocks[0].load(), 0)


# ----------------------------------------------------------------------------------------- sparsifiers


@dataclass(frozen=True)
class Sparsifier:
    """A task-vector sparsification, as statistics and an elementwise apply.

    statistics(deltas, model_params, rescale, context) -> one stats value per model: `deltas[m]` are model m's
        delta row blocks in order (`load()` computes one; the callers make the models' blocks of one index
        share a read, so a scan taking the models of each block in turn reads every block once), `context` the
        tensor's (numel, random stream). A value None means: keep the delta as is; ZERO: drop all of it.
    apply(delta, block, stats) -> the sparsified rows of block number `block`, given the model's stats value.
    """

    statistics: Callable[
        [Sequence[Sequence[Lazy[torch.Tensor]]], Sequence[Mapping[str, Scalar]], bool, TensorContext],
        list[Any],
    ]
    apply: Callable[[torch.Tensor, int, Any], torch.Tensor]

    def whole(
        self,
        x: torch.Tensor,
        model_params: Mapping[str, Scalar],
        rescale: bool,
        stream: RandomStream | None = None,
    ) -> torch.Tensor:
        """Sparsify the whole tensor `x` (one block; the first model of the tensor)."""
        context = TensorContext(tuple(x.shape), {}, [model_params], stream)
        (stats,) = self.statistics([[Lazy(0, tuple(x.shape), lambda: x)]], [model_params], rescale, context)
        return x if stats is None else self.apply(x, 0, stats)


def _model_by_model(statistics: Callable[..., Any]) -> Callable[..., list[Any]]:
    """Sparsifier statistics from a one-model function `statistics(deltas, model_params, rescale)`."""

    def all_models(deltas, model_params, rescale, context) -> list[Any]:
        return [statistics(d, params, rescale) for d, params in zip(deltas, model_params)]

    return all_models


@dataclass(frozen=True)
class _Kept:
    keep: Keep
    ratio: torch.Tensor | None  # L1 rescale factor (None: none)


def _numel(blocks: Sequence[Lazy[Any]]) -> int:
    return sum(math.prod(lazy.shape) for lazy in blocks)


def _single_read(blocks: Sequence[Lazy[torch.Tensor]]) -> Sequence[Lazy[torch.Tensor]]:
    """A single block is computed once and reused by every pass."""
    if len(blocks) != 1:
        return blocks
    value = blocks[0].load()
    return [Lazy(0, blocks[0].shape, lambda: value)]


class _L1Sums:
    """Per-row sums of |x| and of |x * mask| over a tensor's blocks, added in row order: the L1 rescale factor."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.dtype: torch.dtype | None = None

    def add(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        magnitudes = x.abs()
        self.before.append(row_sums(magnitudes))
        self.after.append(row_sums(magnitudes.mul_(mask)))  # |x * mask| = |x| * mask
        self.dtype = x.dtype

    def ratio(self) -> torch.Tensor | None:
        """sum|x| / sum|kept|, in the blocks' dtype (None when either is ~0)."""
        before = torch.tensor(total(self.before), dtype=self.dtype)
        after = torch.tensor(total(self.after), dtype=self.dtype)
        if before < _RESCALE_EPS or after < _RESCALE_EPS:
            return None
        return before / after


def _selection(blocks: Sequence[Lazy[torch.Tensor]], keep_of: Callable[..., Keep], rescale: bool) -> Any:
    """Statistics of a magnitude selection: `keep_of(n, chooser)` picks the Keep; then the rescale factor."""
    blocks = _single_read(blocks)
    bits = [Lazy(b.index, b.shape, partial(lambda b: magnitude_bits(b.load()), b)) for b in blocks]
    keep = keep_of(_numel(blocks), partial(select, bits))
    if keep is ALL:
        return None  # x * 1 (rescaled by exactly 1) is x
    if not rescale:
        return _Kept(keep, None)
    sums = _L1Sums()
    for lazy in blocks:
        x = lazy.load()
        sums.add(x, keep.mask(magnitude_bits(x), lazy.index).reshape(x.shape))
    return _Kept(keep, sums.ratio())


def _kept_apply(x: torch.Tensor, block: int, stats: Any) -> torch.Tensor:
    if isinstance(stats, str):
        return torch.zeros_like(x)
    kept = x * stats.keep.mask(magnitude_bits(x), block).reshape(x.shape)
    return kept if stats.ratio is None else kept.mul_(stats.ratio)


def _magnitude_statistics(blocks, model_params, rescale) -> Any:
    density = float(model_params["density"])
    n = _numel(blocks)
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return ZERO
    k = max(1, int(density * n))
    return _selection(blocks, lambda n, chooser: top_k_keep(n, k, chooser), rescale)


def _outlier_statistics(blocks, model_params, rescale) -> Any:
    density, gamma = float(model_params["density"]), float(model_params["gamma"])
    if density >= 1:
        return None
    n = _numel(blocks)
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    return _selection(blocks, lambda n, chooser: window_keep(n, bottom, bottom + keep, chooser), rescale)


MAGNITUDE = Sparsifier(_model_by_model(_magnitude_statistics), _kept_apply)
OUTLIERS = Sparsifier(_model_by_model(_outlier_statistics), _kept_apply)


# --- random masks

# keep probability of each element of a delta block (a float, or a tensor of the block's shape)
Probability = Callable[[torch.Tensor], "torch.Tensor | float"]


@dataclass(frozen=True)
class _Drawn:
    probability: Probability
    stream: RandomStream
    starts: tuple[int, ...]  # each block's first position in the stream
    ratio: torch.Tensor | None
    masks: tuple[np.ndarray, ...] | None  # each block's mask, bit-packed (drawn by the statistics scan)


def _drawn_statistics(
    deltas: Sequence[Sequence[Lazy[torch.Tensor]]],
    plans: Sequence[Any],
    rescale: bool,
    context: TensorContext,
) -> list[Any]:
    """Per model, where each block's draws start in the tensor's stream; with `rescale`, every block's mask
    (drawn once, kept bit-packed) and the L1 rescale factor, from one scan over the blocks taking the models of
    each block in turn. `plans[m]` is model m's keep probability, or its final stats (None or ZERO)."""
    drawn = [m for m, plan in enumerate(plans) if callable(plan)]
    out = list(plans)
    if not drawn:
        return out
    stream = context.stream
    if stream is None:
        raise ValueError("a randomized merge method needs a seeded RandomStream")
    offsets = [0]
    for lazy in deltas[0]:
        offsets.append(offsets[-1] + math.prod(lazy.shape))
    starts = {m: tuple(m * offsets[-1] + offset for offset in offsets[:-1]) for m in drawn}
    if not rescale:  # nothing to read: every block draws its mask in the apply
        for m in drawn:
            out[m] = _Drawn(plans[m], stream, starts[m], None, None)
        return out
    masks: dict[int, list[np.ndarray]] = {m: [] for m in drawn}
    sums = {m: _L1Sums() for m in drawn}
    for block in range(len(offsets) - 1):
        for m in drawn:
            x = deltas[m][block].load()
            mask = keep_mask(plans[m](x), x.shape, stream, starts[m][block])
            sums[m].add(x, mask.to(x.device))
            del x
            masks[m].append(np.packbits(mask.reshape(-1).numpy()))
    for m in drawn:
        out[m] = _Drawn(plans[m], stream, starts[m], sums[m].ratio(), tuple(masks[m]))
    return out


def _drawn_apply(x: torch.Tensor, block: int, stats: Any) -> torch.Tensor:
    if isinstance(stats, str):
        return torch.zeros_like(x)
    if stats.masks is not None:
        bits = np.unpackbits(stats.masks[block], count=x.numel()).view(np.bool_)
        mask = torch.from_numpy(bits).view(x.shape)
    else:
        mask = keep_mask(stats.probability(x), x.shape, stats.stream, stats.starts[block])
    kept = x * mask.to(x.device)
    return kept if stats.ratio is None else kept.mul_(stats.ratio)


def _random_plan(model_params: Mapping[str, Scalar]) -> Any:
    density = float(model_params["density"])
    return None if density >= 1 else lambda x: density


def _della_plan(model_params: Mapping[str, Scalar]) -> Any:
    density, epsilon = float(model_params["density"]), float(model_params["epsilon"])
    if density >= 1:
        return None
    if density <= 0:
        return ZERO
    problem = della_problem(density, epsilon)
    if problem is not None:
        raise MethodParameterError(f"della: {problem}")

    def probability(x: torch.Tensor) -> torch.Tensor:
        rows = x.unsqueeze(0) if x.dim() < 2 else x
        return _rank_probabilities(rows, density, epsilon, torch.float32).reshape(x.shape)

    return probability


def della_problem(density: float, epsilon: float) -> str | None:
    """Why DELLA cannot sample with these values (keep probabilities density +/- epsilon outside (0, 1)), or None.
    A density of 1 or more keeps everything and one of 0 or less drops everything: epsilon is then unused."""
    if density >= 1 or density <= 0 or (density - epsilon > 0 and density + epsilon < 1):
        return None
    return (
        f"epsilon={epsilon} with density={density} puts keep probabilities outside (0, 1); "
        "choose epsilon < min(density, 1 - density)"
    )


def _drawn(plan_of: Callable[[Mapping[str, Scalar]], Any]) -> Callable[..., list[Any]]:
    """Sparsifier statistics drawing random masks with each model's keep probability (`plan_of`)."""

    def statistics(deltas, model_params, rescale, context) -> list[Any]:
        return _drawn_statistics(deltas, [plan_of(params) for params in model_params], rescale, context)

    return statistics


RANDOM = Sparsifier(_drawn(_random_plan), _drawn_apply)
DELLA = Sparsifier(_drawn(_della_plan), _drawn_apply)


# --- whole-tensor entry points


def magnitude(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the `density` fraction of `x` with the largest magnitudes (at least one element when density > 0)."""
    return MAGNITUDE.whole(x, {"density": density}, rescale)


def magnitude_outliers(x: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` fraction of largest magnitudes, then the smallest, keeping `density` of `x`.

    When gamma + density > 1 fewer outliers are dropped, so the kept fraction is always `density`.
    """
    return OUTLIERS.whole(x, {"density": density, "gamma": gamma}, rescale)


def random_drop(x: torch.Tensor, density: float, rescale: bool, stream: RandomStream | None) -> torch.Tensor:
    """DARE: keep each element of `x` with probability `density`; `rescale` restores the L1 norm."""
    return RANDOM.whole(x, {"density": density}, rescale, stream)


def della_magprune(
    x: torch.Tensor, density: float, epsilon: float, rescale: bool, stream: RandomStream | None
) -> torch.Tensor:
    """DELLA: keep each element with a probability rising linearly with its magnitude rank within its row.

    Probabilities span [density - epsilon, density + epsilon] over each row (dim 1; a 1-D tensor is one row).
    """
    return DELLA.whole(x, {"density": density, "epsilon": epsilon}, rescale, stream)


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
