"""Streamed methods: a non-elementwise method as statistics over row blocks, then an elementwise apply per block.

A method whose output element depends on a whole-tensor quantity (slerp's angle, TIES's magnitude cut-off, an
L1 rescale factor, a random stream) declares that quantity as `statistics`: a sequential scan over the
tensor's row blocks, each read on request, returning a small value. With it fixed, `apply` computes any block
of the output from the same rows of the inputs. The engine (`hf_m2n2.materialize.work_items`) then holds one
block of rows at a time, whatever the tensor's size; `whole_tensor_fn` runs the same two functions on a single
block (the whole tensor), so a method's one-pass and streamed results are the same computation.

Sums over a tensor are taken per row (float64), then over the rows: a row's sum does not depend on how the
rows are grouped into blocks, so streamed results equal the one-pass result bit for bit for any block size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from hf_m2n2.methods._common import RandomStream
from hf_m2n2.methods.base import MergeFn, Scalar

T = TypeVar("T")


@dataclass(frozen=True)
class TensorContext:
    """What a streamed method knows about the whole tensor while it sees one block.

    Attributes:
        shape: the whole tensor's shape.
        params, model_params: as for a MergeFn.
        stream: the tensor's seeded random stream (randomized methods), addressed by position, so a block's
            draws are those a whole-tensor computation makes at the block's elements.
    """

    shape: tuple[int, ...]
    params: Mapping[str, Scalar]
    model_params: Sequence[Mapping[str, Scalar]]
    stream: RandomStream | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Block:
    """Rows [rows[0], rows[1]) of every input (block number `index` of the tensor's blocks)."""

    context: TensorContext
    tensors: Sequence[torch.Tensor]
    base: torch.Tensor | None
    index: int
    rows: tuple[int, int]


@dataclass(frozen=True)
class Lazy(Generic[T]):
    """Block number `index` (of `shape`), not read yet: `load()` reads it."""

    index: int
    shape: tuple[int, ...]
    load: Callable[[], T]


# statistics(context, blocks) -> stats: blocks in row order, each read on request (`load()`), as often as needed
Statistics = Callable[[TensorContext, Sequence[Lazy[Block]]], Any]
# apply(block, stats) -> the output's rows of `block`
Apply = Callable[[Block, Any], torch.Tensor]


@dataclass(frozen=True)
class Streamed:
    """A method split into whole-tensor statistics (None: none needed) and an elementwise apply."""

    apply: Apply
    statistics: Statistics | None = None
    # whether statistics and apply hold block-sized temporaries per model beside the base (task vectors' deltas,
    # masks, signs); False when they work through fixed-size pieces (slerp), so bigger blocks cost no more scratch
    block_temporaries: bool = True


def whole_tensor_fn(streamed: Streamed) -> MergeFn:
    """The MergeFn computing a whole tensor as a single block (the registry's `fn` of a streamed method)."""

    def fn(
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        params: Mapping[str, Scalar],
        model_params: Sequence[Mapping[str, Scalar]],
        stream: RandomStream | None,
    ) -> torch.Tensor:
        like = base if base is not None else tensors[0]
        shape = tuple(like.shape)
        context = TensorContext(shape, params, model_params, stream)
        rows = (0, shape[0] if shape else 1)
        block = Block(context, tensors, base, 0, rows)
        stats = None
        if streamed.statistics is not None:
            stats = streamed.statistics(context, [Lazy(0, shape, lambda: block)])
        return streamed.apply(block, stats)

    return fn


def block_shape(shape: Sequence[int], rows: tuple[int, int]) -> tuple[int, ...]:
    return (rows[1] - rows[0], *shape[1:]) if shape else ()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as a 2-D (rows, elements) view: rows along dim 0; a 0-d or 1-d tensor is one row."""
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """float64 sum of each row of `x` (see `as_rows`), on the CPU."""
    return as_rows(x).sum(dim=1, dtype=torch.float64).cpu()


def total(row_sums_per_block: Sequence[torch.Tensor]) -> float:
    """The sum of a tensor from its per-row sums (`row_sums` of each block, in row order): the same for any
    grouping of the rows into blocks."""
    return float(torch.cat(list(row_sums_per_block)).sum()) if row_sums_per_block else 0.0


def row_chunks(x: torch.Tensor, max_elements: int) -> Iterator[torch.Tensor]:
    """`x` as 2-D row views (see `as_rows`) of about `max_elements` each (at least one row)."""
    rows = as_rows(x)
    step = max(1, max_elements // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        yield rows[start : start + step]
