"""Evaluators: turn a materialized candidate into per-example scores (the only thing strategies see).

An evaluator has `scores(model) -> 1-D array` (one score >= 0 per example, usually in [0, 1]),
`test_score(model) -> float | None` (a held-out figure for logs, not a forward pass) and
`example_groups() -> int array | None` (per-example group ids, e.g. MAP-Elites descriptors).
"""

from hf_m2n2.evaluate.base import EvaluationError, Evaluator, check_scores
from hf_m2n2.evaluate.python import PythonEvaluator, resolve_callable

__all__ = ["EvaluationError", "Evaluator", "PythonEvaluator", "check_scores", "resolve_callable"]
