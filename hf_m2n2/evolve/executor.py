"""Executors: between the loop and the evaluation. The loop submits candidates and collects their scores; the
executor writes each genome into its target, runs the evaluator, and decides what a failure means.

Two kinds of failure, never confused:
- a candidate failure (the write or the evaluator raises, or returns something that is not a score vector):
  collected as a failure, which the loop scores 0 on every example; the run goes on;
- an infrastructure failure (`InfrastructureError`: a server down, workers lost): raised, so the loop
  checkpoints and the run stops with one line; `--resume` continues.

`LocalExecutor` runs one candidate at a time in this process (`parallelism` 1): submit, then collect, in order.
`hf_m2n2.evolve.ray_executor.RayExecutor` keeps several in flight on Ray workers and collects them as they finish.
`build_executor` picks one from the spec's `executor:` section (the registry `EXECUTORS`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from hf_m2n2.errors import ContractError, InfrastructureError
from hf_m2n2.evaluate.base import Report
from hf_m2n2.evolve.strategy import Candidate

Split = Literal["fit", "test"]


@dataclass
class Scored:
    """A collected candidate: its raw scores, or the one-line error that made it a candidate failure; which worker
    evaluated it and in how many seconds, where the executor says (`tells.jsonl`)."""

    candidate: Candidate
    scores: Any = None
    error: str | None = None
    worker: int | None = None
    seconds: float | None = None


class Executor(Protocol):
    """Evaluates candidates for the loop.

    Attributes:
        parallelism: how many candidates the loop may keep submitted and not yet collected.
    """

    parallelism: int

    def submit(self, candidate: Candidate) -> None:
        """Start evaluating a candidate's fitness."""
        ...

    def collect(self) -> Scored:
        """A submitted candidate, scored (blocking until one is): the oldest for a one-at-a-time executor, the
        first to finish for one with several workers."""
        ...

    def score(self, genome: Any, split: Split) -> Any:
        """Evaluate a genome now: `fit` scores or the `test` score (the logged held-out figure)."""
        ...

    def report(self, genome: Any) -> Report:
        """The held-out report of a genome (the final table's row)."""
        ...


@dataclass
class CandidateTiming:
    """Seconds per scored candidate: writing it into the target (materialize) vs running the evaluator.

    Only score-cache misses are timed (hits are counted). In memory: a resumed run times the candidates of its last
    session only. On an accelerator, kernels still running after the write are counted as evaluation.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    cache_hits: int = 0

    def add(self, kind: str, materialize_s: float, evaluate_s: float, **evaluation: float) -> None:
        """One record; `evaluation` splits `evaluate_s` where the evaluator says how (`generate_s`, `score_s`)."""
        record = {"kind": kind, "materialize_s": round(materialize_s, 4), "evaluate_s": round(evaluate_s, 4)}
        record.update({part: round(float(seconds), 4) for part, seconds in evaluation.items()})
        self.records.append(record)

    def to_dict(self) -> dict[str, Any]:
        """`{"fit": {...}, "test": {...}, "cache_hits": n, "records": [...]}`: count, total and mean seconds of
        materialize and evaluate (and of the evaluator's own parts, e.g. generate and score) for fitness (`fit`)
        and held-out (`test`) calls, then every record in order."""
        out: dict[str, Any] = {}
        for kind in ("fit", "test"):
            rows = [r for r in self.records if r["kind"] == kind]
            stats: dict[str, Any] = {"count": len(rows)}
            parts = dict.fromkeys(
                ["materialize_s", "evaluate_s", *(k for r in rows for k in r if k.endswith("_s"))]
            )
            for part in parts:
                total = sum(r.get(part, 0.0) for r in rows)
                stats[f"{part}_total"] = round(total, 3)
                stats[f"{part}_mean"] = round(total / len(rows), 4) if rows else None
            out[kind] = stats
        return {**out, "cache_hits": self.cache_hits, "records": self.records}


class ScoreCache:
    """Scores of genomes already evaluated, by split and recipe hash (a recipe seen again costs nothing); hits are
    counted in the timing. Disabled, it keeps nothing.

    Args:
        ops: genome operations (their `hash` is the key).
        enabled: cache at all.
        timing: where hits are counted (None: not counted).
    """

    def __init__(self, ops: Any, enabled: bool, timing: CandidateTiming | None):
        self.ops = ops
        self.enabled = enabled
        self.timing = timing
        self._entries: dict[tuple[str, str], Any] = {}

    def key(self, genome: Any, split: str) -> tuple[str, str] | None:
        return (split, self.ops.hash(genome)) if self.enabled else None

    def get(self, key: tuple[str, str] | None) -> tuple[bool, Any]:
        """(True, the scores) for a cached key, counting the hit; else (False, None)."""
        if key is None or key not in self._entries:
            return False, None
        if self.timing is not None:
            self.timing.cache_hits += 1
        return True, self._entries[key]

    def put(self, key: tuple[str, str] | None, value: Any) -> None:
        if key is not None:
            self._entries[key] = value


class LocalExecutor:
    """Scores candidates one at a time in this process.

    Args:
        ops: genome operations (their `hash` keys the score cache when `cache_scores`).
        target: writes a genome where the evaluator sees it (`target.write(genome) -> model`).
        evaluator: scores what the target returns.
        cache_scores: score each distinct genome once per split (a recipe seen again costs nothing).
        timed: record the seconds of every write and evaluation in `timing`.

    After a candidate's fitness is computed (not taken from the cache), the evaluator's optional
    `candidate_scored(candidate_id, scores)` hook is called (e.g. the CLIP evaluator's previews).
    """

    parallelism = 1

    def __init__(
        self, ops: Any, target: Any, evaluator: Any, *, cache_scores: bool = False, timed: bool = False
    ):
        self.ops = ops
        self.target = target
        self.evaluator = evaluator
        self.timing = CandidateTiming() if timed else None
        self.cache = ScoreCache(ops, cache_scores, self.timing)
        self._queue: deque[Candidate] = deque()

    def submit(self, candidate: Candidate) -> None:
        if len(self._queue) >= self.parallelism:
            raise ContractError("submit beyond the executor's parallelism: collect first")
        self._queue.append(candidate)

    def collect(self) -> Scored:
        if not self._queue:
            raise ContractError("collect without a submitted candidate")
        candidate = self._queue.popleft()
        try:
            scores, fresh = self._score(candidate.genome, "fit")
        except InfrastructureError:
            raise
        except Exception as exc:
            return Scored(candidate, error=f"{type(exc).__name__}: {exc}")
        hook = getattr(self.evaluator, "candidate_scored", None)  # optional (see evaluate.base.Evaluator)
        if fresh and hook is not None:
            hook(candidate.lineage.id, scores)
        return Scored(candidate, scores)

    def score(self, genome: Any, split: Split) -> Any:
        return self._score(genome, split)[0]

    def _score(self, genome: Any, split: Split) -> tuple[Any, bool]:
        """The genome's `fit` scores or `test` score, and whether the evaluator computed them now (not cached)."""
        key = self.cache.key(genome, split)
        hit, cached = self.cache.get(key)
        if hit:
            return cached, False
        start = time.perf_counter()
        model = self.target.write(genome)
        written = time.perf_counter()
        result = self.evaluator.scores(model) if split == "fit" else self.evaluator.test_score(model)
        if self.timing is not None:
            parts = getattr(self.evaluator, "last_timing", None) or {}  # e.g. a CLIP fitness's generate/score
            self.timing.add(split, written - start, time.perf_counter() - written, **parts)
        self.cache.put(key, result)
        return result, True

    def report(self, genome: Any) -> Report:
        return self.evaluator.report(self.target.write(genome))

    def images(self, genome: Any, limit: int | None = None) -> list[tuple[Any, list]] | None:
        """What the evaluator draws for a genome (an image evaluator's `images(model, limit=...)`: per prompt,
        its row and images), None when it draws none."""
        draw = getattr(self.evaluator, "images", None)
        return None if draw is None else draw(self.target.write(genome), limit=limit)

    def describe(self) -> dict[str, Any] | None:
        """How the evaluator scores, for the card (its `describe()`), None when it does not say."""
        describe = getattr(self.evaluator, "describe", None)
        return None if describe is None else describe()

    def example_groups(self) -> np.ndarray | None:
        return self.evaluator.example_groups()

    def part_means(self, scores: np.ndarray) -> dict[str, float] | None:
        """Per part of a list of evaluators, the mean of a fitness vector's scores on it (None for one evaluator)."""
        split = getattr(self.evaluator, "part_means", None)
        return None if split is None else split(scores)
