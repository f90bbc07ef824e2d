"""The evaluator protocol, the evaluator registry and the validation of returned score vectors.

An evaluator kind is registered once, with the config model of its `evaluate:` section, a factory that builds
the evaluator for a run, and an optional offline check (what `hf-m2n2 validate` can verify without models or
network). Adding a kind is one new file plus one `register_evaluator` line in `hf_m2n2/evaluate/__init__.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, Field

from hf_m2n2.errors import EvaluationError, SpecError
from hf_m2n2.registry import Registry
from hf_m2n2.spec import StrictModel

__all__ = [
    "EvaluationContext",
    "EvaluationError",
    "Evaluator",
    "EvaluatorConfig",
    "EvaluatorKind",
    "Report",
    "check_scores",
    "evaluator_kind",
    "evaluator_kinds",
    "register_evaluator",
]


class EvaluatorConfig(StrictModel):
    """The base of every `evaluate:` section: strict (unknown keys are errors), frozen, and a `weight`.

    Attributes:
        weight: in a list of parts, how many times this part's examples appear in the fitness vector (a repeat,
            not a scale: under M2N2's resource competition a constant scale cancels out, a repeat does not).
    """

    weight: int = Field(1, ge=1)

    def provides_groups(self) -> bool:
        """Whether the evaluator gives per-example group ids (MAP-Elites' descriptors)."""
        return True

    def default_capacity(self) -> str:
        """M2N2's per-example capacity when `evolve.capacity` is not given: `one` for pass/fail scores, `max` for
        continuous ones (a spec's own `capacity` always wins)."""
        return "one"


@dataclass(frozen=True)
class Report:
    """Held-out (or, without a held-out split, fitness) scores of one model, one figure per named part.

    Attributes:
        scores: `{part or task name: mean score}`, in a stable order.
        metric: the name of what was measured (e.g. `exact_match`), for the card.
        metrics: per name, where names measure different things (a reward and a success rate): `{name: metric}`.
    """

    scores: dict[str, float]
    metric: str = "score"
    metrics: dict[str, str] | None = None

    def metric_of(self, name: str) -> str:
        """What `name`'s figure measures."""
        return (self.metrics or {}).get(name, self.metric)


@runtime_checkable
class Evaluator(Protocol):
    """Scores materialized candidates.

    An evaluator may also define `candidate_scored(candidate_id: int, scores: np.ndarray) -> None`: the executor
    calls it right after `scores` computed a candidate's fitness (not for a cached score, nor a held-out call),
    so that what the evaluator keeps of that call (the images it drew) can be tied to the candidate. It must not
    change scores.
    """

    def scores(self, model: Any) -> np.ndarray:
        """Per-example scores of one candidate: a 1-D array of finite values >= 0 (one per example)."""
        ...

    def test_score(self, model: Any) -> float | None:
        """A held-out score for logging (None when there is no test split)."""
        ...

    def example_groups(self) -> np.ndarray | None:
        """Per-example group ids 0..G-1, or None."""
        ...

    def report(self, model: Any) -> Report:
        """Per-part held-out scores for the final table (the fitness split when there is no held-out one)."""
        ...


@dataclass(frozen=True)
class EvaluationContext:
    """What a factory may use to build an evaluator for a run.

    Attributes:
        model: the live model candidates are written into (a causal LM), or None for dense genomes.
        reference_dir: the directory of the seed whose tokenizer and configs the target was built from.
        spec_dir: the spec's folder (relative paths in the section resolve against it).
        device: where the target lives.
        prefix: the YAML path of the section being built (`evaluate`, or `evaluate[1]` in a list), for errors.
        trust_remote_code: the seeds' custom code may run (the spec's `trust_remote_code`).
        reference_name: the reference seed's name in errors (its repo id: a Hub seed's directory is a sha).
        evolved: the names of the tensors candidates write (e.g. `unet/...`: a text encoder among them means prompt
            embeddings change per candidate).
        model_kind: the kind of the live model (`causal_lm`, `pipeline`), None without one.
        run_dir: the run directory, where an evaluator may keep views of what it drew (e.g. the CLIP evaluator's
            `preview/` of the best candidate so far); None outside a run. Nothing there is read back for scores.
    """

    model: Any = None
    reference_dir: Path | None = None
    spec_dir: Path | None = None
    device: str = "cpu"
    prefix: str = "evaluate"
    trust_remote_code: bool = False
    reference_name: str | None = None
    evolved: tuple[str, ...] = ()
    model_kind: str | None = None
    run_dir: Path | None = None

    @classmethod
    def of_seed(
        cls,
        model: Any,
        seed: Any,
        spec_dir: Path | None,
        device: str,
        trust_remote_code: bool,
        evolved: tuple[str, ...] = (),
    ):
        """The context of a live model built from `seed` (its directory and name are the reference's)."""
        return cls(
            model,
            seed.model.path,
            spec_dir,
            device,
            trust_remote_code=trust_remote_code,
            reference_name=seed.name,
            evolved=tuple(evolved),
            model_kind=seed.kind,
        )

    def tokenizer(self) -> Any:
        """The reference seed's tokenizer (transformers' AutoTokenizer, local files only; its custom code runs
        only with the spec's `trust_remote_code`)."""
        from transformers import AutoTokenizer

        from hf_m2n2.custom_code import is_custom_code_error, refusal

        if self.reference_dir is None:
            raise SpecError("evaluate", "this evaluator needs a model with a tokenizer (a spec with models:)")
        try:
            return AutoTokenizer.from_pretrained(
                str(self.reference_dir), trust_remote_code=self.trust_remote_code
            )
        except ValueError as exc:
            if is_custom_code_error(exc):
                name = self.reference_name or Path(self.reference_dir).name
                raise refusal(self.reference_dir, name) from None
            raise


@dataclass(frozen=True)
class EvaluatorKind:
    """One registered kind of `evaluate:` section.

    Attributes:
        kind: the `kind:` value.
        config: the section's pydantic model (its `kind` field a Literal of `kind`).
        factory: `factory(config, context) -> Evaluator`.
        offline_check: `offline_check(config, spec_dir)`, what `hf-m2n2 validate` checks without models.
        needs_target: the evaluator scores a live model (a spec with `models:`), not a bare genome.
        model_kinds: the model kinds (`hf_m2n2.models`) it can score (None: any), e.g. `("pipeline",)`.
    """

    kind: str
    config: type[BaseModel]
    factory: Callable[[Any, EvaluationContext], Any]
    offline_check: Callable[[Any, Path | None], None] | None = None
    needs_target: bool = False
    model_kinds: tuple[str, ...] | None = None


EVALUATOR_KINDS = Registry[EvaluatorKind]("evaluator kind", "evaluate.kind")


def register_evaluator(
    kind: str,
    config: type[BaseModel],
    factory: Callable[[Any, EvaluationContext], Any],
    offline_check: Callable[[Any, Path | None], None] | None = None,
    *,
    needs_target: bool = False,
    model_kinds: tuple[str, ...] | None = None,
) -> EvaluatorKind:
    """Register an evaluator kind (replacing one of the same name).

    Args:
        kind: the `evaluate: {kind: ...}` value.
        config: the section's pydantic model.
        factory: builds the evaluator from a validated section and the run's context.
        offline_check: optional check run by `hf-m2n2 validate` (raises SpecError).
        needs_target: whether it scores a live model rather than a bare genome.
        model_kinds: the model kinds it can score (None: any).

    Returns:
        The registered entry.

    Example:
        >>> register_evaluator("python", PythonEvaluateConfig, build_python_evaluator)  # doctest: +SKIP
    """
    entry = EvaluatorKind(kind, config, factory, offline_check, needs_target, model_kinds)
    return EVALUATOR_KINDS.add(kind, entry)


def evaluator_kind(kind: str) -> EvaluatorKind:
    """The registered entry of `kind` (SpecError naming `evaluate.kind` if none)."""
    return EVALUATOR_KINDS.get(kind)


def evaluator_kinds() -> dict[str, EvaluatorKind]:
    """Every registered kind, by name, in registration order."""
    return EVALUATOR_KINDS.all()


def check_scores(raw: Any, n_examples: int | None) -> np.ndarray:
    """Validate what an evaluator returned.

    Args:
        raw: the returned value (array-like).
        n_examples: the expected length, or None when not known yet.

    Returns:
        The scores as a float64 array.

    Raises:
        ValueError: not 1-D, wrong length, empty, non-finite (NaN, inf) or negative values.
    """
    scores = np.asarray(raw, dtype=np.float64)
    if scores.ndim != 1 or not scores.size:
        raise ValueError(f"expected a non-empty 1-D score vector, got shape {scores.shape}")
    if n_examples is not None and scores.shape[0] != n_examples:
        raise ValueError(f"expected {n_examples} scores, got {scores.shape[0]}")
    if not math.isfinite(scores.sum()):  # one reduction catches NaN and inf
        raise ValueError("scores contain NaN or inf")
    if scores.min() < 0:
        raise ValueError("scores must be >= 0")
    return scores
