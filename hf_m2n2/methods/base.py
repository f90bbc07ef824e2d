"""Merge-method declarations: each method is a small pure function plus its parameters, declared once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from hf_m2n2.errors import UnknownMethodError

if TYPE_CHECKING:
    from hf_m2n2.methods._common import RandomStream
    from hf_m2n2.methods.streaming import Streamed

Scalar = float | int | bool | str


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Param:
    """One method parameter.

    Args:
        name: key in the YAML `parameters` mapping.
        default: value when the spec gives none, or REQUIRED.
        per_model: True for tensor parameters read per input model (weight, density), False for global ones (t, lambda).
        kind: how a YAML value is coerced.
    """

    name: str
    default: Scalar | _Required | None
    per_model: bool = False
    kind: Literal["float", "bool", "int", "str"] = "float"

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


# fn(tensors, base, params, model_params, stream) -> merged tensor.
#   tensors:      the input models' tensors (base excluded when the method uses a base), all the same shape/dtype
#   base:         the base model's tensor, or None
#   params:       global parameters resolved for this tensor {name: scalar}
#   model_params: one {name: scalar} per entry of `tensors`
#   stream:       the tensor's seeded RandomStream for randomized methods (None for deterministic ones)
MergeFn = Callable[
    [
        Sequence[torch.Tensor],
        "torch.Tensor | None",
        Mapping[str, Scalar],
        Sequence[Mapping[str, Scalar]],
        "RandomStream | None",
    ],
    torch.Tensor,
]


# check(values) -> None when fine, else (the parameter to blame, what is wrong): `values` are one input model's
# resolved parameters, global and per-model together. The planner runs it before anything is written, so a value
# the method would reject while merging is reported with its YAML path by `validate` and `merge` alike.
ParamCheck = Callable[[Mapping[str, Scalar]], "tuple[str, str] | None"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    `min_models` / `max_models` count the entries of `tensors` given to `fn`: the base is not counted
    when the method uses one (uses_base "required", or "optional" and a base is given).
    `fn` may return one of its inputs unchanged (no copy); callers must not modify the result in place.
    """

    name: str
    fn: MergeFn
    params: tuple[Param, ...] = ()
    uses_base: Literal["required", "optional", "never"] = "never"
    randomized: bool = False
    min_models: int = 1
    max_models: int | None = None
    paper: str = ""
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    elementwise: bool = (
        False  # output element i depends only on input elements i: rows can be merged in chunks
    )
    # Not elementwise, but as whole-tensor statistics + an elementwise apply (`fn` runs both on one block):
    # big tensors are merged in row blocks too. See hf_m2n2.methods.streaming.
    streamed: Streamed | None = None
    check: ParamCheck | None = None

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    for key in (method.name, *method.aliases):
        if key in _REGISTRY:
            raise ValueError(f"merge method {key!r} registered twice")
        _REGISTRY[key] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Return the registered method `name`. Raises UnknownMethodError listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted({m.name for m in _REGISTRY.values()}))
        raise UnknownMethodError(f"unknown merge method {name!r} (known: {known})") from None


def all_methods() -> list[MergeMethod]:
    return sorted({id(m): m for m in _REGISTRY.values()}.values(), key=lambda m: m.name)
