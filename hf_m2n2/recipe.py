"""Recipes: how every output tensor is computed from the seed tensors.

A MethodRecipe is the static-merge recipe: one TensorTask per output tensor (a merge method, its resolved
parameters and the seed tensors it reads). Evolution adds other recipe kinds on the same materialize step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SourceTensor:
    """Tensor `name` of seed number `seed` (an index into the run's seed list)."""

    seed: int
    name: str


@dataclass(frozen=True)
class TensorTask:
    """Compute one output tensor.

    Attributes:
        name: output tensor name.
        shape: output shape.
        out_dtype: dtype written.
        method: registered merge method name.
        inputs: the method's input tensors (the base excluded when the method uses one).
        base: the base tensor, if the method uses one.
        params: global parameters resolved for this tensor.
        model_params: per-model parameters, one mapping per input.
        rng_seed: seed of this tensor's random stream (randomized methods), derived from the run seed and the name.
        align_rows: rows are token embeddings to be re-ordered by the run's vocabulary alignment.
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    method: str
    inputs: tuple[SourceTensor, ...]
    base: SourceTensor | None
    params: Mapping[str, Any] = field(default_factory=dict)
    model_params: tuple[Mapping[str, Any], ...] = ()
    rng_seed: int = 0
    align_rows: bool = False

    @property
    def sources(self) -> tuple[SourceTensor, ...]:
        return self.inputs if self.base is None else (self.base, *self.inputs)


@dataclass
class MethodRecipe:
    """A static merge: the ordered output tensors and the config/tokenizer decisions that go with them."""

    method: str
    tasks: list[TensorTask]
    compute_dtype: torch.dtype
    num_layers: int
    reference_seed: int
    base_seed: int | None
    notes: list[str] = field(default_factory=list)
