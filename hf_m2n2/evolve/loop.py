"""The evolution loop: ask, evaluate, tell, until the budget of forward passes is spent.

A run directory holds `history.jsonl` (one line per logged step), `checkpoint.npz` (the loop's and the
strategy's whole state, written atomically every `checkpoint_every_s` seconds or `checkpoint_every_steps`
passes, and at the end), and at the end `archive.npz` (the final members) and `summary.json`. A resumed run
reloads the checkpoint, truncates the history back to it and redoes the steps after it: every random draw
comes from the checkpointed generators, so it ends exactly as an uninterrupted run. A candidate whose
evaluation raises or returns NaN is logged and scored 0 on every example; the run goes on. A service failing
under the evaluation (`InfrastructureError`) checkpoints the run, candidates asked and not yet told included,
and stops it: resuming submits those candidates again first, so the run still ends as an uninterrupted one.

With several candidates in flight (an executor with several workers), `ordering` says when a result is told:
`deterministic` tells in ask order (a result that arrives early waits for the ones asked before it), so the run
depends on the seed and the number in flight, never on timing; `completion` tells results as they arrive, and
`tells.jsonl` logs that order (which worker, how long). Strategies that need their tells in ask order
(`told_in_order`: CMA-ES generations) get them so either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_m2n2 import __version__
from hf_m2n2.errors import CheckpointError, ContractError, EvaluationError, InfrastructureError
from hf_m2n2.evaluate.base import check_scores
from hf_m2n2.evolve.checkpoint import load_state, save_state
from hf_m2n2.evolve.executor import Executor, Scored
from hf_m2n2.evolve.strategy import Candidate, Lineage, Strategy
from hf_m2n2.genomes.base import GenomeOps
from hf_m2n2.outdir import atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.npz"
HISTORY = "history.jsonl"
LINEAGE = "lineage.jsonl"
TELLS = "tells.jsonl"
ARCHIVE = "archive.npz"
SUMMARY = "summary.json"
CHECKPOINT_FORMAT = 1
MAX_FAILURE_RECORDS = 20


@dataclass
class LoopSettings:
    """How long to run and how often to log and checkpoint.

    Attributes:
        budget: forward passes (evaluations) in total.
        log_every: a history line every this many passes (and at the last one).
        checkpoint_every_s: checkpoint when this many seconds passed since the last (None: off).
        checkpoint_every_steps: checkpoint every this many passes (None: off). Always at the end.
        progress: show a progress bar.
        label: progress bar label.
    """

    budget: int
    log_every: int = 100
    checkpoint_every_s: float | None = 30.0
    checkpoint_every_steps: int | None = None
    progress: bool = True
    label: str = "evolve"
    lineage: bool = False  # append every candidate's lineage to lineage.jsonl (for the exported card)
    ordering: str = "deterministic"  # or "completion": tell results as they arrive (see the module docstring)
    tell_log: bool = False  # append every tell (candidate, worker, seconds) to tells.jsonl


@dataclass
class LoopState:
    """The loop's own checkpointed counters."""

    passes: int = 0
    n_examples: int | None = None
    failures: int = 0
    failure_records: list[dict[str, Any]] = field(default_factory=list)
    history_bytes: int = 0
    lineage_bytes: int = 0
    # sha256 of the first history_bytes (None: a checkpoint from before it was kept)
    history_sha256: str | None = None
    lineage_sha256: str | None = None
    tells_bytes: int = 0
    tells_sha256: str | None = None
    elapsed_s: float = 0.0
    sessions: int = 0
    last_log: dict[str, Any] | None = None
    log_pending: bool = False  # the last pass's history line is still to write (its test score met an outage)


_STOP_EVENT: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("stop", default=None)


@contextlib.contextmanager
def stop_when(event: threading.Event):
    """Runs started in this context stop as on Ctrl-C once `event` is set (from any thread): the current step
    finishes, a checkpoint is written and `run_loop` raises KeyboardInterrupt. For runs in a worker thread (the
    Gradio app), where signals cannot reach them.

    Example:
        >>> with stop_when(event):  # doctest: +SKIP
        ...     start_runs("spec.yaml", "out")
    """
    token = _STOP_EVENT.set(event)
    try:
        yield event
    finally:
        _STOP_EVENT.reset(token)


class _StopRequest:
    """Ctrl-C / SIGTERM during a run: finish the current step, checkpoint, then stop. A second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.event: threading.Event | None = None  # set by `stop_when`
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopRequest:
        self.event = _STOP_EVENT.get()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _checked(scored: Scored, state: LoopState) -> np.ndarray:
    """The candidate's validated scores, or zeros on every example for a candidate failure (logged)."""
    candidate, message = scored.candidate, scored.error
    if message is None:
        try:
            scores = check_scores(scored.scores, state.n_examples)
        except ValueError as exc:
            message = f"{type(exc).__name__}: {exc}"
        else:
            if state.n_examples is None:
                state.n_examples = int(scores.shape[0])
            return scores
    if state.n_examples is None:
        raise EvaluationError(f"the first candidate could not be evaluated: {message}")
    state.failures += 1
    if len(state.failure_records) < MAX_FAILURE_RECORDS:
        state.failure_records.append({"candidate": candidate.lineage.id, "error": message})
    logger.warning(
        "candidate %d: evaluation failed (%s); scored 0 on every example", candidate.lineage.id, message
    )
    return np.zeros(state.n_examples)


def _test_score(executor: Executor, strategy: Strategy) -> float | None:
    best = strategy.best()
    if best is None:
        return None
    try:
        value = executor.score(best.genome, "test")
    except InfrastructureError:
        raise
    except Exception as exc:
        logger.warning(
            "test evaluation of candidate %d failed: %s: %s", best.lineage.id, type(exc).__name__, exc
        )
        return None
    return None if value is None or not math.isfinite(value) else float(value)


def _progress_bar(settings: LoopSettings, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=settings.budget,
        initial=initial,
        desc=settings.label,
        unit="pass",
        disable=not settings.progress,
        dynamic_ncols=True,
    )


def run_loop(
    strategy: Strategy,
    ops: GenomeOps,
    executor: Executor,
    run_dir: str | os.PathLike[str],
    settings: LoopSettings,
    *,
    info: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run (or continue) an evolution in `run_dir` until `settings.budget` forward passes are spent.

    Args:
        strategy: the ask/tell strategy (freshly built; on resume its state is loaded from the checkpoint).
        ops: operations on the strategy's genomes (checkpoints and the archive store genomes through them).
        executor: evaluates candidates; up to `executor.parallelism` are asked and not yet told at a time, and
            they are told in the order they were asked.
        run_dir: an existing directory for the history, checkpoint, archive and summary.
        settings: budget, logging and checkpoint intervals, progress bar.
        info: extra fields for the summary (name, seed, spec hash, ...).
        resume: continue from `run_dir/checkpoint.npz`.

    Returns:
        The summary (also written to `run_dir/summary.json`).

    Raises:
        EvaluationError: the very first candidate cannot be evaluated (the evaluator is broken).
        InfrastructureError: a service the evaluation needs failed; the run is checkpointed (its candidates in
            flight included) and `resume=True` continues it.
        CheckpointError: the checkpoint is damaged or does not match the settings, or the history does not
            match it.
        KeyboardInterrupt: Ctrl-C or SIGTERM, after a checkpoint of the last finished step.

    Example:
        >>> executor = LocalExecutor(ops, target, evaluator)  # doctest: +SKIP
        >>> summary = run_loop(strategy, ops, executor, "runs/m2n2", LoopSettings(budget=1000))  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    state = LoopState()
    in_flight: deque[Candidate] = deque()
    logs = {"history": _Log(run_dir / HISTORY)}
    if settings.lineage:
        logs["lineage"] = _Log(run_dir / LINEAGE)
    if settings.tell_log:
        logs["tells"] = _Log(run_dir / TELLS)
    if resume:
        state, saved_in_flight = _restore(run_dir / CHECKPOINT, strategy)
        in_flight.extend(
            Candidate(ops.from_state(c["genome"]), Lineage.from_dict(c["lineage"])) for c in saved_in_flight
        )
        for name, log in logs.items():
            log.resume(getattr(state, f"{name}_bytes"), getattr(state, f"{name}_sha256"))
    else:
        for log in logs.values():
            log.path.write_bytes(b"")
    state.sessions += 1
    session_start = time.perf_counter()
    elapsed_before = state.elapsed_s
    last_checkpoint, last_checkpoint_pass = session_start, state.passes
    in_order = settings.ordering == "deterministic" or getattr(strategy, "told_in_order", False)
    arrived: dict[int, Scored] = {}  # collected, not yet told (in ask order, a result waits for earlier ones)

    with (
        _StopRequest() as stop,
        contextlib.ExitStack() as opened,
        _progress_bar(settings, state.passes) as bar,
    ):
        for log in logs.values():
            opened.enter_context(log.open())

        def checkpoint() -> None:
            nonlocal last_checkpoint, last_checkpoint_pass
            for name, log in logs.items():
                size, digest = log.sync()
                setattr(state, f"{name}_bytes", size)
                setattr(state, f"{name}_sha256", digest)
            state.elapsed_s = elapsed_before + time.perf_counter() - session_start
            loop_state = asdict(state)
            saved = {"format": CHECKPOINT_FORMAT, "loop": loop_state, "strategy": strategy.state_dict()}
            if in_flight:  # asked, not told: submitted again first on resume
                saved["in_flight"] = [
                    {"genome": ops.to_state(c.genome), "lineage": c.lineage.to_dict()} for c in in_flight
                ]
            save_state(run_dir / CHECKPOINT, saved)
            last_checkpoint, last_checkpoint_pass = time.perf_counter(), state.passes

        def next_result() -> Scored:
            """The next result to tell: the oldest asked (in order) or the first arrived (completion)."""
            wanted = in_flight[0].lineage.id if in_order else None
            while (wanted not in arrived) if in_order else not arrived:
                scored = executor.collect()
                arrived[scored.candidate.lineage.id] = scored
            return arrived.pop(wanted if in_order else next(iter(arrived)))

        def log_step() -> None:
            """The history line of the pass just told (with the best member's test score)."""
            record = {"passes": state.passes, **_train_stats(strategy)}
            record["test"] = _test_score(executor, strategy)
            parts = _part_means(executor, strategy)
            if parts is not None:
                record["parts"] = parts
            record["failures"] = state.failures
            logs["history"].write(record)
            state.last_log, state.log_pending = record, False
            bar.update(state.passes - bar.n)
            bar.set_postfix(
                best=f"{record['best_train']:.4f}", mean=f"{record['mean_train']:.4f}", test=record["test"]
            )

        every_s, every_steps = settings.checkpoint_every_s, settings.checkpoint_every_steps
        try:  # from here on the state is always whole: a checkpoint on an outage resumes exactly
            for candidate in in_flight:
                executor.submit(candidate)
            if state.log_pending:  # checkpointed between a tell and its history line (its test score failed)
                log_step()
            while state.passes < settings.budget:
                if stop.requested or (stop.event is not None and stop.event.is_set()):
                    checkpoint()
                    raise KeyboardInterrupt
                while (
                    len(in_flight) < executor.parallelism
                    and state.passes + len(in_flight) < settings.budget
                    and (candidate := strategy.ask()) is not None
                ):
                    in_flight.append(
                        candidate
                    )  # before submitting: a failed submit leaves it in the checkpoint
                    executor.submit(candidate)
                if not in_flight:
                    raise ContractError(f"{strategy.name} asked no candidate while none was in flight")
                scored = next_result()
                position = next((i for i, c in enumerate(in_flight) if c is scored.candidate), None)
                if position is None:
                    raise ContractError("the executor collected a candidate that was not in flight")
                scores = _checked(scored, state)
                del in_flight[position]
                strategy.tell(scored.candidate, scores)
                state.passes += 1
                if "lineage" in logs:
                    logs["lineage"].write(
                        {**scored.candidate.lineage.to_dict(), "score": float(np.mean(scores))}
                    )
                if "tells" in logs:
                    seconds = None if scored.seconds is None else round(scored.seconds, 4)
                    record = {
                        "pass": state.passes,
                        "id": scored.candidate.lineage.id,
                        "worker": scored.worker,
                    }
                    logs["tells"].write({**record, "seconds": seconds})
                state.log_pending = state.passes % settings.log_every == 0 or state.passes == settings.budget
                if state.log_pending:
                    log_step()
                if (every_steps and state.passes - last_checkpoint_pass >= every_steps) or (
                    every_s is not None and time.perf_counter() - last_checkpoint >= every_s
                ):
                    checkpoint()
        except InfrastructureError:
            checkpoint()
            raise
        if state.passes - last_checkpoint_pass or not (run_dir / CHECKPOINT).exists():
            checkpoint()
        elapsed = elapsed_before + time.perf_counter() - session_start
    _write_archive(run_dir / ARCHIVE, strategy, ops)
    summary = _summary(strategy, state, settings, info or {}, elapsed)
    stats = getattr(executor, "stats", None)  # e.g. the Ray executor's workers, bytes sent, utilization
    if stats is not None:
        summary["executor"] = stats()
    atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


class _Log:
    """An append-only JSON-lines log of the run (history, lineage, tells) with the running sha256 of its bytes:
    a checkpoint records its size and digest, a resume cuts it back to them after checking them."""

    def __init__(self, path: Path):
        self.path = path
        self.digest = hashlib.sha256()
        self.handle: Any = None

    def resume(self, size: int, sha256: str | None) -> None:
        self.digest = _truncate(self.path, size, sha256)

    @contextlib.contextmanager
    def open(self):
        with open(self.path, "ab") as self.handle:
            yield self

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode()
        self.handle.write(line)
        self.digest.update(line)

    def sync(self) -> tuple[int, str]:
        """Flush to disk; the size and sha256 of what is written."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        return self.handle.tell(), self.digest.hexdigest()


def _part_means(executor: Executor, strategy: Strategy) -> dict[str, float] | None:
    """The best member's mean fitness score on each part of a list of evaluators (None for one evaluator)."""
    best, split = strategy.best(), getattr(executor, "part_means", None)
    return None if best is None or split is None else split(best.scores)


def _train_stats(strategy: Strategy) -> dict[str, float]:
    stats = strategy.stats()
    return {"best_train": stats["best"], "mean_train": stats["mean"]}


def _restore(path: Path, strategy: Strategy) -> tuple[LoopState, list[dict[str, Any]]]:
    """The loop state and the candidates in flight of a checkpoint; the strategy's state loaded into it.

    Raises:
        CheckpointError: the checkpoint is damaged, or was written by other settings than the spec's now give.
    """
    saved = load_state(path)
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else None
        raise CheckpointError(f"{path}: unsupported checkpoint format {found!r}")
    try:
        state = LoopState(**saved["loop"])
        in_flight = list(saved.get("in_flight", []))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a checkpoint of this hf-m2n2 version ({exc})") from None
    try:
        strategy.load_state_dict(saved["strategy"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        changed = _changed_settings(saved.get("strategy"), strategy)
        what = f"{changed} differ" if changed else str(exc)
        raise CheckpointError(
            f"{path}: written with other {strategy.name} settings than the spec gives now ({what}; "
            "a changed default?): resume with the hf-m2n2 version that started it, or start again with --overwrite"
        ) from None
    return state, in_flight


def _changed_settings(saved: Any, strategy: Strategy) -> str:
    """The names of the strategy settings that differ between a checkpoint and `strategy` (when both have them)."""
    try:
        before, now = saved["config"], strategy.state_dict()["config"]
    except (KeyError, TypeError, AttributeError):
        return ""
    if not isinstance(before, dict) or not isinstance(now, dict):
        return ""
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return ", ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in keys)


def _truncate(path: Path, size: int, sha256: str | None) -> Any:
    """Cut `path` back to the `size` bytes the checkpoint saw, after checking they are the ones it saw.

    Returns:
        The running sha256 of those bytes (the loop goes on appending to it).
    """
    digest = hashlib.sha256()
    try:
        with open(path, "r+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() < size:
                raise CheckpointError(
                    f"{path} is shorter than its checkpoint expects ({handle.tell()} < {size} bytes)"
                )
            handle.seek(0)
            remaining = size
            while remaining:
                chunk = handle.read(min(remaining, 1 << 20))
                digest.update(chunk)
                remaining -= len(chunk)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise CheckpointError(
                    f"{path} was changed after its last checkpoint (its checksum differs): restore it, "
                    "or start the run again with --overwrite"
                )
            handle.truncate(size)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; cannot resume") from None
    return digest


def _write_archive(path: Path, strategy: Strategy, ops: GenomeOps) -> None:
    members = strategy.members()
    best = strategy.best()
    best_index = next((i for i, m in enumerate(members) if best and m.lineage.id == best.lineage.id), None)
    save_state(
        path,
        {
            "genome_kind": ops.kind,
            "best": best_index,
            "members": [
                {
                    "genome": ops.to_state(m.genome),
                    "scores": np.asarray(m.scores),
                    "lineage": m.lineage.to_dict(),
                    "extra": m.extra,
                }
                for m in members
            ],
        },
    )


def _summary(
    strategy: Strategy, state: LoopState, settings: LoopSettings, info: dict[str, Any], elapsed: float
) -> dict[str, Any]:
    best = strategy.best()
    last = state.last_log or {}
    return {
        **info,
        "algorithm": info.get("algorithm", strategy.name),
        "budget": settings.budget,
        "forward_passes": state.passes,
        "best_train": last.get("best_train"),
        "mean_train": last.get("mean_train"),
        "test": last.get("test"),
        "best_candidate": None if best is None else best.lineage.to_dict(),
        "archive_members": len(strategy.members()),
        "failures": state.failures,
        "failure_examples": state.failure_records,
        "hf_m2n2_version": __version__,
        "timing": {
            "wall_time_s": round(elapsed, 3),
            "passes_per_s": round(state.passes / elapsed, 2) if elapsed > 0 else None,
            "sessions": state.sessions,
        },
    }


def load_archive(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The final archive of a finished run: `{"genome_kind", "best", "members": [{genome, scores, lineage, extra}]}`.

    Args:
        run_dir: the run directory.

    Returns:
        The archive; genomes as stored by their ops' `to_state` (a float32 array for dense genomes).
    """
    return load_state(Path(run_dir) / ARCHIVE)
