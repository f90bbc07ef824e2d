"""materialize(recipe, seeds, sink): the one hot loop that turns a recipe into tensors.

Each output tensor is computed from its seed tensors (read lazily, cast to the compute dtype) and handed to a
sink: a sharded safetensors directory, or (for evolution) a live model's parameters. A few tensors are in
flight at once on a small thread pool, so reading, math and writing overlap; memory stays bounded by those few
tensors, not by shard or model size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Protocol

import torch

from hf_m2n2.errors import CheckpointError
from hf_m2n2.methods import get_method
from hf_m2n2.recipe import SourceTensor, TensorTask
from hf_m2n2.seeds import Seed
from hf_m2n2.vocab import VocabPlan, align_rows


class Sink(Protocol):
    def write(self, name: str, tensor: torch.Tensor) -> None: ...


def load_source(seeds: Sequence[Seed], source: SourceTensor, allow_nonfinite: bool) -> torch.Tensor:
    seed = seeds[source.seed]
    tensor = seed.checkpoint.get(source.name)
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
) -> torch.Tensor:
    """Compute one output tensor of a MethodRecipe (returned in `task.out_dtype`, on `device`)."""
    if not task.out_dtype.is_floating_point:  # integer buffers are copied, never blended
        return load_source(seeds, task.sources[0], allow_nonfinite)
    loaded = [
        load_source(seeds, s, allow_nonfinite).to(device=device, dtype=compute_dtype) for s in task.sources
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


def materialize(
    tasks: Sequence[TensorTask],
    compute: Callable[[TensorTask], torch.Tensor],
    sink: Sink,
    *,
    workers: int = 2,
    on_done: Callable[[TensorTask], None] | None = None,
) -> None:
    """Compute every task and write it to the sink, `workers` tensors at a time (plus one queued).

    The first error stops the submission of new tasks and is re-raised once the running ones finish.
    """

    def run(task: TensorTask) -> TensorTask:
        sink.write(task.name, compute(task))
        return task

    if workers <= 1:
        for task in tasks:
            run(task)
            if on_done:
                on_done(task)
        return
    pending: set[Future[TensorTask]] = set()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="materialize") as pool:
        try:
            for task in tasks:
                if len(pending) > workers:
                    pending = _drain(pending, on_done, FIRST_COMPLETED)
                pending.add(pool.submit(run, task))
            _drain(pending, on_done, ALL_COMPLETED)
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _drain(pending: set[Future[TensorTask]], on_done, return_when: str) -> set[Future[TensorTask]]:
    done, rest = wait(pending, return_when=return_when)
    for f in done:
        task = f.result()  # re-raises the task's error
        if on_done:
            on_done(task)
    return set(rest)
