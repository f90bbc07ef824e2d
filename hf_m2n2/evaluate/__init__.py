"""Evaluators: turn a materialized candidate into per-example scores (the only thing strategies see).

An evaluator has `scores(model) -> 1-D array` (one score >= 0 per example, usually in [0, 1]),
`test_score(model) -> float | None` (a held-out figure for logs, not a forward pass),
`example_groups() -> int array | None` (per-example group ids, e.g. MAP-Elites descriptors) and
`report(model) -> Report` (per-part held-out figures for the final table and the card).

Each kind of `evaluate:` section is registered below, one line each; `build_evaluator` makes the evaluator of a
spec's section (or of a list of parts) for a run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate.base import (
    EvaluationContext,
    EvaluationError,
    Evaluator,
    EvaluatorConfig,
    EvaluatorKind,
    Report,
    check_scores,
    evaluator_kind,
    evaluator_kinds,
    register_evaluator,
)
from hf_m2n2.evaluate.clip import ClipConfig, build_clip_evaluator, check_clip_config
from hf_m2n2.evaluate.lm_eval import LmEvalConfig
from hf_m2n2.evaluate.parts import PartsEvaluator
from hf_m2n2.evaluate.python import (
    PythonEvaluateConfig,
    PythonEvaluator,
    build_python_evaluator,
    check_python_config,
    resolve_callable,
)
from hf_m2n2.evaluate.webshop import WebshopConfig, build_webshop_evaluator


def _lm_eval(config: LmEvalConfig, context: EvaluationContext) -> Any:
    from hf_m2n2.evaluate.lm_eval import LmEvalEvaluator

    return LmEvalEvaluator(
        config, context.model, context.tokenizer(), base_dir=context.spec_dir, prefix=context.prefix
    )


def _lm_eval_check(config: LmEvalConfig, spec_dir: Path | None) -> None:
    from hf_m2n2.evaluate.lm_eval import check_lm_eval_config

    check_lm_eval_config(config, base_dir=spec_dir)


register_evaluator(
    "lm_eval", LmEvalConfig, _lm_eval, _lm_eval_check, needs_target=True, model_kinds=("causal_lm",)
)
register_evaluator("python", PythonEvaluateConfig, build_python_evaluator, check_python_config)
register_evaluator(
    "clip", ClipConfig, build_clip_evaluator, check_clip_config, needs_target=True, model_kinds=("pipeline",)
)
register_evaluator(
    "webshop", WebshopConfig, build_webshop_evaluator, needs_target=True, model_kinds=("causal_lm",)
)


def evaluate_parts(section: Any) -> list[Any]:
    """The parts of an `evaluate:` section: the list itself, or the one section."""
    return list(section) if isinstance(section, (list, tuple)) else [section]


def build_evaluator(section: Any, context: EvaluationContext) -> Any:
    """The evaluator of a validated `evaluate:` section: one part's own, or the parts' concatenation.

    Raises:
        SpecError: a part cannot score the live model's kind (lm_eval on a pipeline, clip on a causal LM).
    """
    if not isinstance(section, (list, tuple)):
        return _build_part(section, context)
    built = [_build_part(part, _part_context(context, i)) for i, part in enumerate(section)]
    return PartsEvaluator(built, [part.weight for part in section], part_names(section))


def part_names(section: Any) -> list[str]:
    """A name per part of a list of evaluators, for the history and its plot: the part's `name` where it has one,
    else its kind; a name two parts share gets its index (`lm_eval[0]`)."""
    names = [getattr(part, "name", None) or part.kind for part in section]
    return [f"{n}[{i}]" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _part_context(context: EvaluationContext, index: int) -> EvaluationContext:
    """Part `index`'s context: its YAML path, and a run directory of its own past the first part (RUN/part1/...),
    so that two parts never write views (previews) into the same folder."""
    run_dir = context.run_dir
    if run_dir is not None and index > 0:
        run_dir = Path(run_dir) / f"part{index}"
    return replace(context, prefix=f"evaluate[{index}]", run_dir=run_dir)


def _build_part(part: Any, context: EvaluationContext) -> Any:
    kind = evaluator_kind(part.kind)
    if (
        kind.model_kinds is not None
        and context.model_kind is not None
        and context.model_kind not in kind.model_kinds
    ):
        wanted = " or ".join(kind.model_kinds)
        raise SpecError(
            f"{context.prefix}.kind",
            f"{part.kind} scores {wanted} models; the seeds are {context.model_kind} models",
        )
    return kind.factory(part, context)


def check_offline(section: Any, spec_dir: Path | None) -> None:
    """What `hf-m2n2 validate` checks of every part without models or network (task names, metrics, callables)."""
    for part in evaluate_parts(section):
        check = evaluator_kind(part.kind).offline_check
        if check is not None:
            check(part, spec_dir)


__all__ = [
    "EvaluationContext",
    "EvaluationError",
    "Evaluator",
    "EvaluatorConfig",
    "EvaluatorKind",
    "PartsEvaluator",
    "PythonEvaluator",
    "Report",
    "build_evaluator",
    "check_offline",
    "check_scores",
    "evaluate_parts",
    "evaluator_kind",
    "evaluator_kinds",
    "part_names",
    "register_evaluator",
    "resolve_callable",
]
