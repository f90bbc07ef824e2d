"""materialize(recipe, seeds, sink): the one hot loop that turns a recipe into tensors.

Each output tensor is computed from its seed tensors (read lazily, cast to the compute dtype) and handed to a
sink: a sharded safetensors directory, or (for evolution) a live model's parameters. A few tensors are in
flight at once on a small thread pool, so reading, math and writing overlap; memory stays bounded by those few
tensors, not by shard or model size.

Big tensors are computed in row blocks (`work_items` splits a recipe's tasks, each block at most
`CHUNK_ELEMENTS` elements of each input): an elementwise method's blocks independently; a streamed method's
(`MergeMethod.streamed`) after one statistics item has scanned the tensor's blocks (see `TensorStream`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hf_m2n2.errors import CheckpointError
from hf_m2n2.heap import RecycledHeap
from hf_m2n2.methods import MergeMethod, get_method
from hf_m2n2.methods._common import RandomStream
from hf_m2n2.methods.streaming import Block, Lazy, TensorContext, block_shape
from hf_m2n2.recipe import MethodRecipe, SourceTensor, TensorTask
from hf_m2n2.seeds import Seed
from hf_m2n2.vocab import VocabPlan, align_embeddings

# the most elements of one input a method sees at once: memory stays flat at any model size
CHUNK_ELEMENTS = 16 << 20
# Divisors of CHUNK_ELEMENTS, measured on bench/merge_bench.py's 1B model (see work_items)
_ELEMENTWISE_SHARE = 8
_TEMPORARIES_SHARE = 4
# without a memory budget, the heap still keeps at most half of this free between items
_DEFAULT_BUDGET = 768 << 20


class Sink(Protocol):
    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None: ...


def load_source(
    seeds: Sequence[Seed], source: SourceTensor, allow_nonfinite: bool, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    seed = seeds[source.seed]
    tensor = seed.checkpoint.get(source.name, rows)
    if not allow_nonfinite and tensor.is_floating_point() and tensor.numel() and not _finite(tensor):
        raise CheckpointError(
            f"{seed.name}: tensor {source.name!r} contains NaN or Inf (pass --allow-nonfinite to merge anyway)"
        )
    return tensor


def _finite(tensor: torch.Tensor) -> bool:
    low, high = torch.aminmax(tensor)  # one fused pass; NaN/Inf propagate (20x isfinite().all())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _random_stream(task: TensorTask) -> RandomStream | None:
    """The task's seeded stream of random draws when its method is randomized (the same draws on any device)."""
    return RandomStream(task.rng_seed) if get_method(task.method).randomized else None


def compute_task(
    task: TensorTask,
    seeds: Sequence[Seed],
    *,
    compute_dtype: torch.dtype,
    device: str | torch.device = "cpu",
    vocab: VocabPlan | None = None,
    allow_nonfinite: bool = False,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Compute one output tensor of a MethodRecipe, or its `rows` for an elementwise method (returned in
    `task.out_dtype`, on `device`)."""
    if not task.out_dtype.is_floating_point:  # integer buffers are copied, never blended
        return load_source(seeds, task.sources[0], allow_nonfinite, rows)
    inputs, base = load_inputs(task, seeds, compute_dtype, device, vocab, allow_nonfinite, rows)
    out = get_method(task.method).fn(inputs, base, task.params, task.model_params, _random_stream(task))
    return out.to(task.out_dtype)


def load_inputs(
    task: TensorTask,
    seeds: Sequence[Seed],
    compute_dtype: torch.dtype,
    device: str | torch.device = "cpu",
    vocab: VocabPlan | None = None,
    allow_nonfinite: bool = False,
    rows: tuple[int, int] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The method's inputs and base (or None) for `task`, or their `rows`, in the compute dtype on `device`."""
    loaded = [
        load_source(seeds, s, allow_nonfinite, rows).to(device=device, dtype=compute_dtype)
        for s in task.sources
    ]
    if task.align_rows and vocab is not None:
        loaded = _align(task, loaded, vocab)
    if task.base is not None:
        return loaded[1:], loaded[0]
    return loaded, None


class TensorStream:
    """One big tensor of a streamed method, computed in row blocks: its statistics (set once by its statistics
    item, awaited by its block items) and its blocks.

    Work items are ordered so that a tensor's statistics item comes before its blocks; with first-in first-out
    workers a block item therefore starts only once the statistics item has started, and waits at most for it.
    """

    def __init__(self, task: TensorTask, blocks: Sequence[tuple[int, int]]):
        method = get_method(task.method)
        assert method.streamed is not None, task.method
        self.task = task
        self.streamed = method.streamed
        self.blocks = list(blocks)
        self.context = TensorContext(tuple(task.shape), task.params, task.model_params, _random_stream(task))
        self._done = threading.Event()
        self._stats: Any = None
        self._error: BaseException | None = None
        if self.streamed.statistics is None:
            self._done.set()

    def compute_statistics(self, read: Callable[[int], Block]) -> None:
        lazies = [
            Lazy(i, block_shape(self.task.shape, rows), lambda i=i: read(i))
            for i, rows in enumerate(self.blocks)
        ]
        try:
            self._stats = self.streamed.statistics(self.context, lazies)
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._done.set()

    def statistics(self) -> Any:
        """The statistics, once computed (raises the statistics item's error if it failed)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._stats


def compute_item(
    item: WorkItem,
    seeds: Sequence[Seed],
    *,
    compute_dtype: torch.dtype,
    device: str | torch.device = "cpu",
    vocab: VocabPlan | None = None,
    allow_nonfinite: bool = False,
) -> torch.Tensor | None:
    """Compute a work item: a tensor or a block of its rows (in `task.out_dtype`), or nothing for a statistics
    item (it records its tensor's statistics)."""
    stream = item.stream
    if stream is None:
        return compute_task(
            item.task,
            seeds,
            compute_dtype=compute_dtype,
            device=device,
            vocab=vocab,
            allow_nonfinite=allow_nonfinite,
            rows=item.rows,
        )

    def read(index: int) -> Block:
        rows = stream.blocks[index]
        tensors, base = load_inputs(item.task, seeds, compute_dtype, device, None, allow_nonfinite, rows)
        return Block(stream.context, tensors, base, index, rows)

    if item.statistics:
        stream.compute_statistics(read)
        return None
    stats = stream.statistics()
    return stream.streamed.apply(read(item.block), stats).to(item.task.out_dtype)


def _align(task: TensorTask, tensors: list[torch.Tensor], vocab: VocabPlan) -> list[torch.Tensor]:
    """Re-order token rows to the output vocabulary and fill the rows a seed lacks (see `hf_m2n2.vocab`)."""
    base = task.base.seed if task.base is not None else vocab.base
    return align_embeddings([s.seed for s in task.sources], tensors, vocab, base)


@dataclass(frozen=True)
class WorkItem:
    """A unit of work: a whole recipe task, rows [start, stop) of an elementwise or streamed one, or the
    statistics of a streamed one.

    Attributes:
        task: the recipe task (anything with a `.name`).
        rows: a block of rows along dim 0, or None for the whole tensor.
        cost: estimated peak bytes while it is computed (for the memory budget).
        stream: the streamed tensor this item belongs to (None: not streamed).
        block: the number of the block `rows` among the stream's blocks.
        statistics: this item computes the stream's statistics and writes nothing.
    """

    task: Any
    rows: tuple[int, int] | None = None
    cost: int = 0
    stream: TensorStream | None = None
    block: int = 0
    statistics: bool = False

    @property
    def name(self) -> str:
        return self.task.name


def row_blocks(shape: Sequence[int], max_elements: int) -> list[tuple[int, int] | None]:
    """Row ranges of at most `max_elements` elements each ([None] when the tensor is small enough)."""
    numel = math.prod(shape)
    if numel <= max_elements or len(shape) < 2:
        return [None]
    per_row = numel // shape[0]
    step = max(1, max_elements // per_row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def work_items(recipe: MethodRecipe, chunk_elements: int = CHUNK_ELEMENTS) -> list[WorkItem]:
    """The recipe's tasks as work items; every item holds at most `chunk_elements` elements of each input.

    Big tensors are split into row blocks when the method is elementwise (independent blocks) or streamed
    (a statistics item scanning the blocks, then independent blocks). A streamed tensor's statistics item is
    placed before the blocks of the tensor before it, so the two overlap instead of waiting on each other.
    Tensors whose rows are re-ordered by vocabulary alignment are computed whole.
    """
    stages: list[list[list[WorkItem]]] = []  # per task: its items in order of dependency
    for task in recipe.tasks:
        method = get_method(task.method)
        split = (method.elementwise or method.streamed is not None) and not task.align_rows
        chunk = _block_elements(method, len(task.sources), chunk_elements)
        blocks = row_blocks(task.shape, chunk) if split else [None]
        per_element = _bytes_per_element(task, recipe.compute_dtype)
        costs = [
            per_element
            * (math.prod(task.shape) if rows is None else (rows[1] - rows[0]) * math.prod(task.shape[1:]))
            for rows in blocks
        ]
        if len(blocks) == 1 or method.elementwise:
            stages.append([[WorkItem(task, rows, cost) for rows, cost in zip(blocks, costs)]])
            continue
        stream = TensorStream(task, blocks)
        apply = [WorkItem(task, rows, cost, stream, i) for i, (rows, cost) in enumerate(zip(blocks, costs))]
        if method.streamed.statistics is None:
            stages.append([apply])
        else:
            stages.append([[WorkItem(task, None, max(costs), stream, statistics=True)], apply])
    return _pipeline(stages)


def _block_elements(method: MergeMethod, sources: int, chunk_elements: int) -> int:
    """Elements per row block: small where each element needs full-size temporaries, so the heap stays small and
    is reused instead of trimmed and faulted in again after every item; big where a block holds only inputs and
    output, so more tensors are read once (a streamed tensor of several blocks is read twice).

    Elementwise methods keep float32 sums: 1/8 of the chunk (vs the whole chunk: half the peak RSS, same wall
    time). Task-vector methods keep deltas, masks and signs per model beside the base and run a statistics item
    beside the blocks: 1/4 of the chunk per such model. Slerp works through fixed pieces: the whole chunk (1B
    bench: every MLP matrix read once; ~10% faster than half the chunk).
    """
    if method.elementwise:
        return max(1, chunk_elements // _ELEMENTWISE_SHARE)
    if method.streamed is not None and not method.streamed.block_temporaries:
        return chunk_elements
    return max(1, chunk_elements // (_TEMPORARIES_SHARE * max(1, sources - 1)))


def _pipeline(stages: list[list[list[WorkItem]]]) -> list[WorkItem]:
    """Interleave the tasks' stages: step s holds stage 0 of task s, stage 1 of task s - 1, ... (in that order),
    so every item still follows the items it depends on."""
    depth = max((len(s) for s in stages), default=0)
    items: list[WorkItem] = []
    for step in range(len(stages) + depth - 1):
        for stage in range(depth):
            task = step - stage
            if 0 <= task < len(stages) and stage < len(stages[task]):
                items.extend(stages[task][stage])
    return items


def _bytes_per_element(task: TensorTask, compute_dtype: torch.dtype) -> int:
    """Rough peak bytes per output element while computing: inputs as read and cast, two temporaries, output."""
    k = len(task.sources)
    return k * (task.out_dtype.itemsize + compute_dtype.itemsize) + 2 * 4 + task.out_dtype.itemsize


def materialize(
    items: Sequence[Any],
    compute: Callable[[Any], torch.Tensor],
    sink: Sink,
    *,
    workers: int = 2,
    budget_bytes: int | None = None,
    on_done: Callable[[Any], None] | None = None,
    recycle_heap: bool = True,
) -> None:
    """Compute every item and write it to the sink, up to `workers` at a time (plus one queued).

    Items are recipe tasks (anything with a `.name`) or WorkItems (a block of rows, with a cost). With a budget,
    an item starts only while the estimated bytes of those in flight stay within it (a bigger one runs alone),
    so peak memory is bounded by the budget, not by the largest tensors all at once. Items start in order (an
    item may wait for an earlier one, never for a later one); one whose compute returns None writes nothing.
    The first error stops the submission of new items and is re-raised once the running ones finish.
    `recycle_heap` keeps freed buffers on the heap for the next items (`RecycledHeap`); a caller whose items
    allocate nothing big (writes in place into a live model) turns it off and leaves glibc's settings alone.
    """

    def run(item: Any) -> Any:
        out = compute(item)
        rows = getattr(item, "rows", None)
        if out is None:
            pass
        elif rows is None:
            sink.write(item.name, out)
        else:
            sink.write(item.name, out, rows[0])
        del out
        heap.item_done()
        return item

    with RecycledHeap(max_free=(budget_bytes or _DEFAULT_BUDGET) // 2, enabled=recycle_heap) as heap:
        if workers <= 1:
            for item in items:
                run(item)
                if on_done:
                    on_done(item)
            return
        _run_pool(items, run, workers, budget_bytes, on_done)


def _run_pool(
    items: Sequence[Any],
    run: Callable[[Any], Any],
    workers: int,
    budget_bytes: int | None,
    on_done: Callable[[Any], None] | None,
) -> None:
    pending: dict[Future[Any], int] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="materialize") as pool:
        try:
            for item in items:
                cost = getattr(item, "cost", 0)
                while pending and (
                    len(pending) > workers
                    or (budget_bytes is not None and sum(pending.values()) + cost > budget_bytes)
                ):
                    _drain(pending, on_done, FIRST_COMPLETED)
                pending[pool.submit(run, item)] = cost
            _drain(pending, on_done, ALL_COMPLETED)
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _drain(pending: dict[Future[Any], int], on_done, return_when: str) -> None:
    done, _ = wait(pending, return_when=return_when)
    for f in done:
        del pending[f]
        item = f.result()  # re-raises the item's error
        if on_done:
            on_done(item)
