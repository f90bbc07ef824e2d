"""Task-vector methods: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear.

All share one core: delta_i = model_i - base, sparsified per model, weighted, optionally reduced to the entries
agreeing with the elected sign (TIES consensus), summed, optionally normalized by the summed weights, scaled by
lambda and added to the base. Sums accumulate like torch reductions (float32 for half types, rounded once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from hf_m2n2.methods import sparsify
from hf_m2n2.methods._common import RandomStream, accumulate_dtype, per_model, round_to
from hf_m2n2.methods.base import REQUIRED, MergeMethod, Param, Scalar, register
from hf_m2n2.methods.sparsify import Sparsifier
from hf_m2n2.methods.streaming import Block, Lazy, Streamed, TensorContext, whole_tensor_fn

_ZERO_WEIGHT_SUM = 1e-8

# sparsify(model index, delta) -> the model's sparsified delta (may be the delta itself, modified or not)
Sparsify = Callable[[int, torch.Tensor], torch.Tensor]


def weighted_deltas(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[Mapping[str, Scalar]],
    sparsify: Sparsify | None,
) -> Iterator[tuple[torch.Tensor, float]]:
    """Yield (w_i * sparsify(model_i - base), w_i) per model, in order, one at a time."""
    for i, (x, weight) in enumerate(zip(tensors, per_model(model_params, "weight"))):
        delta = x - base
        if sparsify is not None:
            delta = sparsify(i, delta)
        weight = round_to(weight, delta.dtype)  # mergekit holds the weights in the tensors' dtype
        yield delta.mul_(weight), weight


def _plain_sum(
    deltas: Iterable[tuple[torch.Tensor, float]], like: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Sum of the weighted deltas, and the divisor for normalizing (sum of weights; 1 if ~0)."""
    total = torch.zeros_like(like, dtype=accumulate_dtype(like.dtype))
    weights = []
    for delta, weight in deltas:
        total.add_(delta)
        weights.append(weight)
        del delta
    divisor = float(torch.tensor(weights, dtype=like.dtype).sum())
    return total.to(like.dtype), 1.0 if abs(divisor) < _ZERO_WEIGHT_SUM else divisor


def _consensus_sum(
    deltas: Iterable[tuple[torch.Tensor, float]], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES disjoint merge: elect each element's sign by summed weighted mass (ties go to +), then sum the
    deltas that agree with it (mergekit's `delta * mask`); the divisor is the per-element sum of the agreeing
    models' weights (1 where 0)."""
    kept = list(deltas)
    acc_dtype = accumulate_dtype(like.dtype)
    total = torch.zeros_like(like, dtype=acc_dtype)
    for delta, _ in kept:
        total.add_(delta)
    elected = (total >= 0).to(acc_dtype).mul_(2).sub_(1)  # +1 / -1: a delta agrees when delta * elected > 0
    total.zero_()
    divisor = torch.zeros_like(total)
    for delta, weight in kept:
        agree = torch.mul(delta, elected).gt_(0)  # multiplications and compares: 3x faster than torch.where
        divisor.add_(agree, alpha=weight)
        total.add_(delta.mul_(agree))
        del agree
    del kept, elected
    divisor = divisor.to(like.dtype)
    return total.to(like.dtype), divisor.masked_fill_(divisor == 0, 1)


def _merge_deltas(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    sparsify: Sparsify | None,
    consensus: bool,
) -> torch.Tensor:
    """base + lambda * merge_i(w_i * sparsify(model_i - base)) [/ summed weights when normalize]."""
    if base is None:
        raise ValueError("task-vector methods need a base tensor")
    if not tensors:
        return base
    deltas = weighted_deltas(tensors, base, model_params, sparsify)
    merge = _consensus_sum if consensus else _plain_sum
    mixed, divisor = merge(deltas, base)
    if params["normalize"]:
        mixed /= divisor
    lam = float(params["lambda"])
    if lam != 1:
        mixed *= lam
    return mixed.add_(base)


class _LastRead:
    """The block read last, kept until another is read: the models' deltas of one block share a read when a
    scan takes them in turn."""

    def __init__(self) -> None:
        self.index: int | None = None
        self.block: Block | None = None

    def delta(self, lazy: Lazy[Block], model: int) -> torch.Tensor:
        if self.index != lazy.index:
            self.block = None  # free the previous block before reading the next
            self.block, self.index = lazy.load(), lazy.index
        if self.block.base is None:
            raise ValueError("task-vector methods need a base tensor")
        return self.block.tensors[model] - self.block.base


def streamed_task_arithmetic(sparsifier: Sparsifier, consensus: bool) -> Streamed:
    """A sparsifying task-vector method as statistics (the sparsifier's, over every model's delta blocks) and an
    elementwise apply (sparsify each block's deltas with them, then merge)."""

    def statistics(context: TensorContext, blocks: Sequence[Lazy[Block]]) -> list[Any]:
        last = _LastRead()
        deltas = [
            [Lazy(b.index, b.shape, partial(last.delta, b, i)) for b in blocks]
            for i in range(len(context.model_params))
        ]
        return sparsifier.statistics(deltas, context.model_params, bool(context.params["rescale"]), context)

    def apply(block: Block, stats: list[Any]) -> torch.Tensor:
        def sparsify(i: int, delta: torch.Tensor) -> torch.Tensor:
            return delta if stats[i] is None else sparsifier.apply(delta, block.index, stats[i])

        context = block.context
        return _merge_deltas(
            block.tensors, block.base, context.params, context.model_params, sparsify, consensus
        )

    return Streamed(apply=apply, statistics=statistics)


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
) -> torch.Tensor:
    """base + lambda * merge_i(w_i * sparsify(model_i - base)) [/ summed weights when normalize]."""
    if sparsifier is None:
        return _merge_deltas(tensors, base, params, model_params, None, consensus)
    if base is None:
        raise ValueError("task-vector methods need a base tensor")
    fn = whole_tensor_fn(streamed_task_arithmetic(sparsifier, consensus))
    return fn(tensors, base, params, model_params, stream)


def _params(normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    return (
        Param("int8_mask", False, kind="bool"),  # memory-only in mergekit; no effect on values
        Param("normalize", normalize, kind="bool"),
        Param("rescale", rescale, kind="bool"),
        Param("lambda", 1.0),
        Param("weight", REQUIRED, per_model=True),
        Param("density", 1.0, per_model=True),
        *extra,
    )


def _della_check(values: Mapping[str, Scalar]) -> tuple[str, str] | None:
    problem = sparsify.della_problem(float(values["density"]), float(values["epsilon"]))
    return None if problem is None else ("epsilon", problem)


_GAMMA = (Param("gamma", 0.01, per_model=True),)
_EPSILON = (Param("epsilon", 0.15, per_model=True),)
_TASK_ARITHMETIC = "Editing Models with Task Arithmetic (https://arxiv.org/abs/2212.04089)"
_TIES = "TIES-Merging: Resolving Interference When Merging Models (https://arxiv.org/abs/2306.01708)"
_DARE = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch "
    "(https://arxiv.org/abs/2311.03099)"
)
_BREADCRUMBS = (
    "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (https://arxiv.org/abs/2312.06795)"
)
_DELLA = (
    "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling "
    "(https://arxiv.org/abs/2406.11617)"
)

# name, sparsifier, sign consensus, normalize default, rescale default, extra params, paper, description
_VARIANTS: tuple[tuple[str, Sparsifier | None, bool, bool, bool, tuple[Param, ...], str, str], ...] = (
    ("task_arithmetic", None, False, False, False, (), _TASK_ARITHMETIC,
     "Adds the weighted task vectors (model - base) to the base, scaled by lambda."),
    ("ties", sparsify.MAGNITUDE, True, True, False, (), _TIES,
     "Keeps the top-density magnitudes of each task vector, elects a sign per element, averages the agreeing ones."),
    ("dare_ties", sparsify.RANDOM, True, False, True, (), _DARE,
     "Randomly drops task-vector entries (keep rate density, L1 rescale), then TIES sign consensus."),
    ("dare_linear", sparsify.RANDOM, False, False, True, (), _DARE,
     "Randomly drops task-vector entries (keep rate density, L1 rescale), then a weighted sum."),
    ("breadcrumbs", sparsify.OUTLIERS, False, False, False, _GAMMA, _BREADCRUMBS,
     "Drops the largest (gamma) and smallest magnitudes of each task vector, keeping density; weighted sum."),
    ("breadcrumbs_ties", sparsify.OUTLIERS, True, False, False, _GAMMA, _BREADCRUMBS,
     "Breadcrumbs sparsification followed by TIES sign consensus."),
    ("della", sparsify.DELLA, True, True, True, _EPSILON, _DELLA,
     "Drops entries with probability falling with magnitude rank (density +/- epsilon), then TIES consensus."),
    ("della_linear", sparsify.DELLA, False, False, True, _EPSILON, _DELLA,
     "DELLA magnitude-ranked random dropping, then a weighted sum."),
)  # fmt: skip

for _name, _sparsifier, _consensus, _normalize, _rescale, _extra, _paper, _description in _VARIANTS:
    _streamed = None if _sparsifier is None else streamed_task_arithmetic(_sparsifier, _consensus)
    register(
        MergeMethod(
            name=_name,
            fn=(
                partial(generalized_task_arithmetic, sparsifier=None, consensus=_consensus)
                if _streamed is None
                else whole_tensor_fn(_streamed)
            ),
            params=_params(_normalize, _rescale, _extra),
            uses_base="required",
            randomized=_sparsifier in (sparsify.RANDOM, sparsify.DELLA),
            elementwise=_sparsifier is None,
            streamed=_streamed,
            min_models=1,
            paper=_paper,
            description=_description,
            check=_della_check if _sparsifier is sparsify.DELLA else None,
        )
    )
