"""Per-tensor merge methods. Importing this package registers every method."""

from hf_m2n2.errors import MethodParameterError, UnknownMethodError
from hf_m2n2.methods import (  # noqa: F401  (imported to register the methods)
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
from hf_m2n2.methods.base import REQUIRED, MergeMethod, Param, all_methods, get_method

__all__ = [
    "REQUIRED",
    "MergeMethod",
    "MethodParameterError",
    "Param",
    "UnknownMethodError",
    "all_methods",
    "get_method",
]
