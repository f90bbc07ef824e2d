"""Run directories for `hf-m2n2 evolve`: start one run or N seeded runs from a spec, resume them.

A run directory is self-contained: `spec.yaml` (a copy of the spec), `run.json` (seed, run index, spec hash),
plus what the loop writes (history, checkpoint, archive, summary), so `--resume DIR` needs nothing else. With
`--runs N`, DIR holds `runs.json` and one run directory per seed, `run-0` (seed s) ... `run-<N-1>` (seed s+N-1),
run one after the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hf_m2n2 import locks
from hf_m2n2.errors import CheckpointError, HfM2n2Error, OutputError
from hf_m2n2.evaluate import check_offline
from hf_m2n2.evolve.loop import CHECKPOINT, HISTORY, LINEAGE, SUMMARY, LoopSettings, run_loop
from hf_m2n2.evolve.outcome import MODEL_DIR, is_finished
from hf_m2n2.evolve.spec import EvolveSpec, load_evolve_spec
from hf_m2n2.outdir import atomic_write_text, sweep_killed
from hf_m2n2.spec import spec_hash

SPEC_COPY = "spec.yaml"
RUN_INFO = "run.json"
RUNS_INFO = "runs.json"
RUN_OWNER = "another evolve"
PUSHED = "push.json"  # the upload of the exported model succeeded (resume pushes again otherwise)

logger = logging.getLogger(__name__)

Reporter = Callable[[Path, dict[str, Any]], None]


@dataclass
class RunInfo:
    """One run's identity, as `run.json` holds it.

    Attributes:
        seed: the run seed.
        run: its index in a directory of runs (None: a single run).
        spec_hash: the hash of `spec.yaml`'s text (a modified copy refuses to resume).
        spec_dir: the original spec's folder: relative model paths and include_path resolve against it.
        push: the `--push` target given on the command line (a resumed run still publishes there).
        executor: the `--executor/--workers/--ray-address` given on the command line (a resumed run keeps them).
    """

    seed: int
    run: int | None
    spec_hash: str
    spec_dir: str | None = None
    push: dict[str, Any] | None = None
    executor: dict[str, Any] | None = None

    def save(self, run_dir: Path, spec_text: str) -> None:
        """Write the run directory's `spec.yaml` (the spec's text) and `run.json`."""
        atomic_write_text(run_dir / SPEC_COPY, spec_text)
        data = {"seed": self.seed, "run": self.run, "spec_hash": self.spec_hash, "spec_dir": self.spec_dir}
        if self.push is not None:
            data["push"] = self.push
        if self.executor is not None:
            data["executor"] = self.executor
        atomic_write_text(run_dir / RUN_INFO, json.dumps(data) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> RunInfo:
        data = _read_json(run_dir / RUN_INFO)
        return cls(
            data["seed"],
            data["run"],
            data["spec_hash"],
            data.get("spec_dir"),
            data.get("push"),
            data.get("executor"),
        )

    @property
    def label_suffix(self) -> str:
        return "" if self.run is None else f" run {self.run}"


def start_runs(
    spec_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    runs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_done: Reporter | None = None,
    push_to_hub: str | None = None,
    private: bool | None = None,
    trust_remote_code: bool = False,
    executor: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Start the run(s) of a spec in `out_dir`.

    Args:
        spec_path: the evolve spec (YAML).
        out_dir: the run directory (or, with `runs`, the directory of the run directories). It must not exist
            or be empty, unless `overwrite`.
        runs: None for one run in `out_dir` with the spec's seed; N for N runs with seeds seed..seed+N-1.
        overwrite: delete `out_dir` first if it exists.
        progress: show progress bars.
        on_done: called with (run directory, summary) after each run.
        push_to_hub, private: publish the exported model there (overriding the spec's `output:` section);
            the summary then has `push` (repo_url, commit_oid, commit_url).
        trust_remote_code: let the seeds' own code run (`--trust-remote-code`; or the spec's `trust_remote_code`).
        executor: `executor:` settings overriding the spec's (`{"kind": "ray", "workers": 8}`), kept for resume.

    Returns:
        The summaries, one per run.

    Raises:
        SpecError: the spec is invalid.
        OutputError: `out_dir` exists and is not empty (without `overwrite`).
        PushError: the upload failed (the run directory is complete; retry with `hf-m2n2 push`).
    """
    spec, text = load_evolve_spec(spec_path)
    spec = _with_executor(with_trust(spec, trust_remote_code), executor)
    spec_dir = str(Path(spec_path).resolve().parent)
    if runs is not None and runs < 1:
        raise HfM2n2Error(f"--runs must be at least 1, got {runs}")
    target = _push_target(spec, push_to_hub, private, runs)
    out = Path(out_dir)
    _refuse_busy(out, overwrite)
    # everything that can be checked without running is checked before anything is written
    spec.kind.preflight(spec, Path(spec_dir))
    check_offline(spec.evaluate, Path(spec_dir))
    _make_dir(out)
    with locks.hold(out, RUN_OWNER):  # held until the run ends: a second evolve into `out` is refused
        _clear(out, overwrite)  # outside the `try`: what it refuses to empty is not ours to delete below
        try:
            return _start(out, spec, text, spec_dir, runs, progress, on_done, target, executor)
        except Exception:
            if not any(out.glob(f"**/{CHECKPOINT}")):  # failed before its first checkpoint: nothing to resume
                shutil.rmtree(out, ignore_errors=True)
            raise


def _start(out, spec, text, spec_dir, runs, progress, on_done, target, executor) -> list[dict[str, Any]]:
    if runs is None:
        push = None if target is None else _target_record(target)
        info = RunInfo(spec.evolve.seed, None, spec_hash(text), spec_dir, push, executor)
        return [_start_one(out, spec, text, info, progress, on_done, target)]
    index_info = {"runs": runs, "seed": spec.evolve.seed, "spec_dir": spec_dir}
    if executor:
        index_info["executor"] = executor
    atomic_write_text(out / RUNS_INFO, json.dumps(index_info) + "\n")
    atomic_write_text(out / SPEC_COPY, text)
    summaries = []
    for index in range(runs):
        run_dir = out / f"run-{index}"
        run_dir.mkdir()
        info = RunInfo(spec.evolve.seed + index, index, spec_hash(text), spec_dir, executor=executor)
        with locks.hold(run_dir, RUN_OWNER):
            summaries.append(_start_one(run_dir, spec, text, info, progress, on_done))
    return summaries


def resume_runs(
    out_dir: str | os.PathLike[str],
    *,
    runs: int | None = None,
    progress: bool = True,
    on_done: Reporter | None = None,
    trust_remote_code: bool = False,
    executor: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Continue the run(s) in `out_dir`: finished runs are kept, interrupted ones resume from their checkpoint,
    runs that never checkpointed start over.

    Args:
        out_dir: a directory written by `start_runs`.
        runs: for a directory of runs, raise the number of runs to this (the new ones get the next seeds).
        progress: show progress bars.
        on_done: called with (run directory, summary) after each run.
        trust_remote_code: let the seeds' own code run (not recorded in the run: give it again to resume).
        executor: `executor:` settings overriding those the runs started with (recorded for the next resume).

    Returns:
        The summaries, one per run.

    Raises:
        HfM2n2Error: `out_dir` is not an evolve run directory, or `runs` is lower than its number of runs.
    """
    out = Path(out_dir)
    if out.is_dir():  # a run starting in it has not written run.json yet
        locks.check_free(out, RUN_OWNER)
    if not (out / RUNS_INFO).is_file() and not (out / RUN_INFO).is_file():
        raise HfM2n2Error(f"{out} is not an hf-m2n2 evolve run directory (no {RUN_INFO} or {RUNS_INFO})")
    with locks.hold(out, RUN_OWNER):  # held until the runs end: a second evolve into `out` is refused
        return _resume(out, runs, progress, on_done, trust_remote_code, executor)


def _resume(
    out: Path,
    runs: int | None,
    progress: bool,
    on_done: Reporter | None,
    trust_remote_code: bool,
    executor: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    if (out / RUNS_INFO).is_file():
        _sweep(out)
        index_info = _read_json(out / RUNS_INFO)
        if runs is not None:
            if runs < index_info["runs"]:
                raise HfM2n2Error(f"{out} already has {index_info['runs']} runs; --runs can only raise it")
            index_info["runs"] = runs
            atomic_write_text(out / RUNS_INFO, json.dumps(index_info) + "\n")
        dirs = [out / f"run-{index}" for index in range(int(index_info["runs"]))]
        for index, run_dir in enumerate(dirs):
            run_dir.mkdir(exist_ok=True)
            if not (run_dir / RUN_INFO).is_file():  # killed before this run started
                spec, text = load_evolve_spec(out / SPEC_COPY)
                info = RunInfo(
                    spec.evolve.seed + index,
                    index,
                    spec_hash(text),
                    index_info.get("spec_dir"),
                    executor=index_info.get("executor"),
                )
                info.save(run_dir, text)
        summaries = []
        for run_dir in dirs:
            with locks.hold(run_dir, RUN_OWNER):  # also refuses a --resume of this run alone meanwhile
                summaries.append(_resume_one(run_dir, progress, on_done, trust_remote_code, executor))
        return summaries
    if runs is not None:
        raise HfM2n2Error(f"{out} is a single run (started without --runs); --runs does not apply")
    return [_resume_one(out, progress, on_done, trust_remote_code, executor)]


def with_trust(spec: EvolveSpec, trust_remote_code: bool) -> EvolveSpec:
    """The spec with `--trust-remote-code` applied (the flag only adds trust; the spec's own value stays)."""
    return spec.model_copy(update={"trust_remote_code": True}) if trust_remote_code else spec


def _with_executor(spec: EvolveSpec, overrides: dict[str, Any] | None) -> EvolveSpec:
    """The spec with command-line executor settings applied over its `executor:` section.

    Raises:
        HfM2n2Error: the settings do not make a valid executor section (`--workers 0`, `--workers` without ray).
    """
    from pydantic import ValidationError

    from hf_m2n2.errors import SpecError
    from hf_m2n2.evolve.config import ExecutorConfig, check_executor

    if not overrides:
        return spec
    given = spec.executor.model_dump(exclude_unset=True)
    if overrides.get("kind") == "local":
        given = {}  # the spec's Ray settings do not apply to a local run
    try:
        config = ExecutorConfig(**{**given, **overrides})
        check_executor(config)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise HfM2n2Error(f"executor.{where} (from the command line): {error['msg']}") from None
    except SpecError as exc:
        raise HfM2n2Error(f"{exc} (from the command line: add --executor ray)") from None
    return spec.model_copy(update={"executor": config})


def _refuse_busy(out: Path, overwrite: bool, held: bool = False) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory")
    if out.is_dir() and not held:
        locks.check_free(out, RUN_OWNER)
    if out.is_dir() and any(p.name != locks.LOCK_FILE for p in out.iterdir()) and not overwrite:
        resumable = (out / RUN_INFO).exists() or (out / RUNS_INFO).exists()
        hint = (
            "continue it with --resume DIR, or replace it with --overwrite"
            if resumable
            else "use --overwrite"
        )
        raise OutputError(f"{out} already exists and is not empty ({hint})")


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None


def _clear(out: Path, overwrite: bool) -> None:
    """Empty `out` for a new run (its lock, which this process holds, stays).

    Raises:
        OutputError: `out` filled up since it was checked (without `overwrite`), or a run directory in it is
            held by a live `evolve --resume` of that run alone.
    """
    _refuse_busy(out, overwrite, held=True)
    with contextlib.ExitStack() as held:
        paths = list(out.iterdir())
        # every run directory's lock is taken before anything is deleted, and held meanwhile: no resume starts
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                held.enter_context(locks.hold(path, RUN_OWNER))
        for path in paths:
            if path.name == locks.LOCK_FILE:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _sweep(run_dir: Path) -> None:
    """Remove what a killed process left in a run directory: temporary files and an export's directories (after
    putting back an exported model that a kill between two renames left only in a swap directory)."""
    sweep_killed(run_dir)


def _push_target(spec: EvolveSpec, repo_id: str | None, private: bool | None, runs: int | None):
    from hf_m2n2.push import PushTarget

    target = PushTarget.resolve(spec.output, repo_id, private)
    if target is not None and not spec.kind.uses_models:
        raise HfM2n2Error("--push publishes models: this spec evolves dense vectors, not Hub models")
    if target is not None and runs is not None:
        raise HfM2n2Error(
            "--push publishes one model: drop --runs (or push a run's model/ with hf-m2n2 push)"
        )
    return target


def _target_record(target) -> dict[str, Any]:
    return {"repo_id": target.repo_id, "private": target.private, "revision": target.revision}


def _start_one(
    run_dir: Path,
    spec: EvolveSpec,
    text: str,
    info: RunInfo,
    progress: bool,
    on_done: Reporter | None,
    target=None,
) -> dict[str, Any]:
    info.save(run_dir, text)
    return _execute(run_dir, spec, info, progress, on_done, resume=False, target=target)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is damaged ({exc}): restore it, or start again with --overwrite"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} is damaged (not a JSON object): restore it, or start again with --overwrite"
        )
    return data


def _resume_one(
    run_dir: Path,
    progress: bool,
    on_done: Reporter | None,
    trust_remote_code: bool = False,
    executor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    _sweep(run_dir)
    info = RunInfo.load(run_dir)
    spec, text = load_evolve_spec(run_dir / SPEC_COPY)
    if spec_hash(text) != info.spec_hash:
        raise HfM2n2Error(f"{run_dir / SPEC_COPY} was modified after the run started (spec hash differs)")
    if executor:  # given again: replaces what the run started with, for this and later resumes
        local = executor.get("kind") == "local"
        info.executor = executor if local else {**(info.executor or {}), **executor}
        info.save(run_dir, text)
    spec = _with_executor(with_trust(spec, trust_remote_code), info.executor)
    exports = spec.kind.uses_models
    if is_finished(run_dir, exports):
        summary = _read_json(run_dir / SUMMARY)
        target = _stored_target(spec, info) if exports else None
        if target is not None and not (run_dir / PUSHED).is_file():  # finished, but the upload failed
            summary = {**summary, "push": _push(target, run_dir / MODEL_DIR, run_dir)}
        if on_done:
            on_done(run_dir, summary)
        return summary
    resume = (run_dir / CHECKPOINT).is_file()
    if not resume and any(
        (run_dir / log).is_file() and (run_dir / log).stat().st_size for log in (HISTORY, LINEAGE)
    ):
        # killed before its first checkpoint, or the checkpoint was deleted: the history goes with the restart
        logger.warning("%s is missing: the run starts over (its history is cleared)", run_dir / CHECKPOINT)
    return _execute(run_dir, spec, info, progress, on_done, resume=resume, target=_stored_target(spec, info))


def _stored_target(spec: EvolveSpec, info: RunInfo):
    from hf_m2n2.push import PushTarget

    if info.push is not None:
        return PushTarget(**info.push)
    return PushTarget.resolve(spec.output)


def _blas_threads(threads: int) -> contextlib.AbstractContextManager:
    """Limit numpy's BLAS to `threads` threads during the run (when threadpoolctl, a scikit-learn dependency, is
    installed): small dot products gain nothing from more and would compete with torch for the cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


@contextlib.contextmanager
def closing_executor(executor: Any):
    """Stop the executor's workers when the run ends, however it ends (the local executor has none)."""
    try:
        yield executor
    finally:
        close = getattr(executor, "close", None)
        if close is not None:
            close()


def _execute(
    run_dir: Path,
    spec: EvolveSpec,
    info: RunInfo,
    progress: bool,
    on_done: Reporter | None,
    *,
    resume: bool,
    target=None,
) -> dict[str, Any]:
    import torch

    from hf_m2n2.evolve.build import build_run
    from hf_m2n2.evolve.outcome import finish_model_run
    from hf_m2n2.spec import OutputConfig

    torch.set_num_threads(spec.evolve.threads)
    exports = spec.kind.uses_models
    if target is not None and exports:  # the card's usage snippet names the repo
        output = OutputConfig(push_to_hub=target.repo_id, private=target.private, revision=target.revision)
        spec = spec.model_copy(update={"output": output})
    parts = build_run(spec, info.seed, run_dir, Path(info.spec_dir) if info.spec_dir else None)
    evolve = spec.evolve
    settings = LoopSettings(
        budget=evolve.budget,
        log_every=evolve.log_every,
        checkpoint_every_s=evolve.checkpoint_every_s,
        checkpoint_every_steps=evolve.checkpoint_every_steps,
        progress=progress,
        label=spec.label + info.label_suffix,
        lineage=exports,
        ordering=spec.executor.ordering,
        tell_log=spec.executor.kind != "local",
    )
    summary_info = {
        "name": spec.label,
        "algorithm": evolve.algorithm,
        "seed": info.seed,
        "run": info.run,
        "spec_hash": info.spec_hash,
        "threads": evolve.threads,
        "mutation_std": parts.genome.mutation_std,
        "slerp_scope": spec.kind.slerp_scope(spec.genome),
    }
    with _blas_threads(evolve.threads), closing_executor(parts.executor):
        summary = run_loop(
            parts.strategy, parts.ops, parts.executor, run_dir, settings, info=summary_info, resume=resume
        )
        if exports:
            finish_model_run(spec, parts, run_dir, summary, progress=progress)
    if target is not None and exports:
        summary = {**summary, "push": _push(target, run_dir / MODEL_DIR, run_dir)}
    if on_done:
        on_done(run_dir, summary)
    return summary


def _push(target, model_dir: Path, run_dir: Path) -> dict[str, Any]:
    result = asdict(target.push(model_dir))
    atomic_write_text(run_dir / PUSHED, json.dumps(result) + "\n")
    return result
