"""Python-callable evaluators: `evaluate: {kind: python, callable: "module:function", ...}`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate.base import EvaluationContext, EvaluatorConfig, Report

_CALLABLE_HELP = "expected 'module:function' (e.g. hf_m2n2.tasks.digits:train_scores)"


def check_callable_reference(value: str | None) -> str | None:
    """A pydantic validator: `module:function` with identifiers on both sides (None passes)."""
    if value is None:
        return None
    module, sep, attr = value.partition(":")
    if (
        not sep
        or not module
        or not attr
        or not all(p.isidentifier() for p in module.split(".") + attr.split("."))
    ):
        raise ValueError(f"{_CALLABLE_HELP}, got {value!r}")
    return value


class PythonEvaluateConfig(EvaluatorConfig):
    """`evaluate: {kind: python, ...}`: Python functions of the materialized candidate.

    Attributes:
        callable: `module:function`, `function(model, **kwargs)` returning per-example scores (1-D, >= 0).
        test_callable: `function(model, **kwargs)` returning one held-out score, logged (not a forward pass).
        groups_callable: `function(**kwargs)` returning per-example group ids (MAP-Elites descriptors).
        kwargs: keyword arguments passed to the three functions.
    """

    kind: Literal["python"]
    callable: str
    test_callable: str | None = None
    groups_callable: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    _callables = field_validator("callable", "test_callable", "groups_callable")(check_callable_reference)

    def provides_groups(self) -> bool:
        return self.groups_callable is not None


def resolve_callable(reference: str, path: str) -> Callable[..., Any]:
    """Import `module:function` (the function part may be dotted: `module:Class.method`).

    Args:
        reference: the `module:function` string.
        path: YAML path named in errors.

    Returns:
        The callable.

    Raises:
        SpecError: the module cannot be imported or has no such callable.
    """
    module_name, _, attr = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise SpecError(path, f"cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SpecError(path, f"{module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(path, f"{reference!r} is not callable")
    return target


class PythonEvaluator:
    """Calls Python functions on the materialized candidate.

    Args:
        scores_fn: `fn(model, **kwargs)` -> per-example scores.
        test_fn: `fn(model, **kwargs)` -> held-out score, or None.
        groups_fn: `fn(**kwargs)` -> per-example group ids, or None.
        kwargs: keyword arguments for the three functions.

    Example:
        >>> evaluator = PythonEvaluator(lambda v: (v > 0).float().numpy())
        >>> import torch
        >>> evaluator.scores(torch.tensor([1.0, -1.0]))
        array([1., 0.], dtype=float32)
    """

    def __init__(
        self,
        scores_fn: Callable[..., Any],
        test_fn: Callable[..., Any] | None = None,
        groups_fn: Callable[..., Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ):
        self._scores = scores_fn
        self._test = test_fn
        self._groups = groups_fn
        self._kwargs = dict(kwargs or {})

    @classmethod
    def from_config(cls, config: Any, prefix: str = "evaluate") -> PythonEvaluator:
        """Build from a `PythonEvaluateConfig` (resolving its callables).

        Raises:
            SpecError: a callable cannot be imported (the message names `evaluate.callable`, ...).
        """
        resolve = {
            name: None
            if getattr(config, name) is None
            else resolve_callable(getattr(config, name), f"{prefix}.{name}")
            for name in ("callable", "test_callable", "groups_callable")
        }
        return cls(resolve["callable"], resolve["test_callable"], resolve["groups_callable"], config.kwargs)

    def scores(self, model: Any) -> Any:
        return self._scores(model, **self._kwargs)

    def test_score(self, model: Any) -> float | None:
        return None if self._test is None else float(self._test(model, **self._kwargs))

    def example_groups(self) -> np.ndarray | None:
        return None if self._groups is None else np.asarray(self._groups(**self._kwargs))

    def report(self, model: Any) -> Report:
        """`{"test": the held-out score}`, or the mean fitness score without a test callable."""
        test = self.test_score(model)
        return Report({"test": float(test if test is not None else np.mean(self.scores(model)))})


def build_python_evaluator(config: PythonEvaluateConfig, context: EvaluationContext) -> PythonEvaluator:
    """The registry's factory: resolve the section's callables (the context is not needed)."""
    return PythonEvaluator.from_config(config, context.prefix)


def check_python_config(config: PythonEvaluateConfig, spec_dir: Any = None) -> None:
    """`hf-m2n2 validate`: every callable the section names imports (none is called)."""
    PythonEvaluator.from_config(config)
