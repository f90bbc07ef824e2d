"""materialize(recipe, seeds, sink): the one hot loop that turns a recipe into tensors.

Each output tensor is computed from its seed tensors (read lazily, cast to the compute dtype) and handed to a
sink: a sharded safetensors directory, or (for evolution) a live model's parameters. A few tensors are in
flight at once on a small thread pool, so reading, math and writing overlap; memory stays bounded by those few
tensors, not by shard or model size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hf_m2n2.errors import CheckpointError
from hf_m2n2.methods import get_method
from hf_m2n2.recipe import SourceTensor, TensorTask
from hf_m2n2.seeds import Seed
from hf_m2n2.vocab import VocabPlan, align_rows


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
    loaded = [
        load_source(seeds, s, allow_nonfinite, rows).to(device=device, dtype=compute_dtype)
        for s in task.sources
    ]
    if task.align_rows and vocab is not None:
        loaded = _align(task.sources, loaded, vocab)
    base = loaded[0] if task.base is not None else None
    inputs = loaded[1:] if task.base is not None else loaded
    method = get_method(task.method)
    # A CPU generator: the same draws on any device.
    generator = torch.Generator().manual_seed(task.rng_seed) if method.randomized else None
    out = method.fn(inputs, base, task.params, task.model_params, generator)
    return out.to(task.out_dtype)


def _align(
    sources: Sequence[SourceTensor], tensors: list[torch.Tensor], vocab: VocabPlan
) -> list[torch.Tensor]:
    aligned = [align_rows(t, vocab.row_maps[s.seed].to(t.device)) for s, t in zip(sources, tensors)]
    fill = next((a for s, a in zip(sources, aligned) if s.seed == vocab.fill_seed), None)
    out = []
    for tensor, missing in aligned:
        if fill is not None and missing.any():
            usable = missing & ~fill[1]
            tensor[usable] = fill[0][usable]
        out.append(tensor)
    return out


@dataclass(frozen=True)
class WorkItem:
    """A unit of work: a whole recipe task, or rows [start, stop) of an elementwise one.

    Attributes:
        task: the recipe task (anything with a `.name`).
        rows: a block of rows along dim 0, or None for the whole tensor.
        cost: estimated peak bytes while it is computed (for the memory budget).
    """

    task: Any
    rows: tuple[int, int] | None = None
    cost: int = 0

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


def materialize(
    items: Sequence[Any],
    compute: Callable[[Any], torch.Tensor],
    sink: Sink,
    *,
    workers: int = 2,
    budget_bytes: int | None = None,
    on_done: Callable[[Any], None] | None = None,
) -> None:
    """Compute every item and write it to the sink, up to `workers` at a time (plus one queued).

    Items are recipe tasks (anything with a `.name`) or WorkItems (a block of rows, with a cost). With a budget,
    an item starts only while the estimated bytes of those in flight stay within it (a bigger one runs alone),
    so peak memory is bounded by the budget, not by the largest tensors all at once. The first error stops the
    submission of new items and is re-raised once the running ones finish.
    """

    def run(item: Any) -> Any:
        rows = getattr(item, "rows", None)
        if rows is None:
            sink.write(item.name, compute(item))
        else:
            sink.write(item.name, compute(item), rows[0])
        return item

    if workers <= 1:
        for item in items:
            run(item)
            if on_done:
                on_done(item)
        return
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
