"""Run directories for `hf-m2n2 evolve`: start one run or N seeded runs from a spec, resume them.

A run directory is self-contained: `spec.yaml` (a copy of the spec), `run.json` (seed, run index, spec hash),
plus what the loop writes (history, checkpoint, archive, summary), so `--resume DIR` needs nothing else. With
`--runs N`, DIR holds `runs.json` and one run directory per seed, `run-0` (seed s) ... `run-<N-1>` (seed s+N-1),
run one after the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hf_m2n2.errors import HfM2n2Error, OutputError
from hf_m2n2.evolve.config import EvolveSpec, load_evolve_spec
from hf_m2n2.evolve.loop import CHECKPOINT, SUMMARY, LoopSettings, run_loop
from hf_m2n2.outdir import atomic_write_text
from hf_m2n2.spec import read_spec_text, spec_hash

SPEC_COPY = "spec.yaml"
RUN_INFO = "run.json"
RUNS_INFO = "runs.json"
PUSHED = "push.json"  # the upload of the exported model succeeded (resume pushes again otherwise)

Reporter = Callable[[Path, dict[str, Any]], None]


def load_run_spec(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """A standalone evolve spec (dense genomes) or a model evolution spec (`models:` seeds), and its text."""
    from hf_m2n2.evolve.models import is_model_spec, parse_model_spec
    from hf_m2n2.spec import parse_yaml

    text = read_spec_text(path)
    data = parse_yaml(text, path)
    if is_model_spec(data):
        return parse_model_spec(data), text
    return load_evolve_spec(path)


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

    Returns:
        The summaries, one per run.

    Raises:
        SpecError: the spec is invalid.
        OutputError: `out_dir` exists and is not empty (without `overwrite`).
        PushError: the upload failed (the run directory is complete; retry with `hf-m2n2 push`).
    """
    spec, text = load_run_spec(spec_path)
    spec_dir = str(Path(spec_path).resolve().parent)
    if runs is not None and runs < 1:
        raise HfM2n2Error(f"--runs must be at least 1, got {runs}")
    target = _push_target(spec, push_to_hub, private, runs)
    out = Path(out_dir)
    _prepare_dir(out, overwrite)
    if runs is None:
        return [_start_one(out, spec, text, spec.evolve.seed, None, progress, on_done, spec_dir, target)]
    info = {"runs": runs, "seed": spec.evolve.seed, "spec_dir": spec_dir}
    atomic_write_text(out / RUNS_INFO, json.dumps(info) + "\n")
    atomic_write_text(out / SPEC_COPY, text)
    summaries = []
    for index in range(runs):
        run_dir = out / f"run-{index}"
        run_dir.mkdir()
        summaries.append(
            _start_one(run_dir, spec, text, spec.evolve.seed + index, index, progress, on_done, spec_dir)
        )
    return summaries


def resume_runs(
    out_dir: str | os.PathLike[str],
    *,
    runs: int | None = None,
    progress: bool = True,
    on_done: Reporter | None = None,
) -> list[dict[str, Any]]:
    """Continue the run(s) in `out_dir`: finished runs are kept, interrupted ones resume from their checkpoint,
    runs that never checkpointed start over.

    Args:
        out_dir: a directory written by `start_runs`.
        runs: for a directory of runs, raise the number of runs to this (the new ones get the next seeds).
        progress: show progress bars.
        on_done: called with (run directory, summary) after each run.

    Returns:
        The summaries, one per run.

    Raises:
        HfM2n2Error: `out_dir` is not an evolve run directory, or `runs` is lower than its number of runs.
    """
    out = Path(out_dir)
    if (out / RUNS_INFO).is_file():
        info = json.loads((out / RUNS_INFO).read_text())
        if runs is not None:
            if runs < info["runs"]:
                raise HfM2n2Error(f"{out} already has {info['runs']} runs; --runs can only raise it")
            info["runs"] = runs
            atomic_write_text(out / RUNS_INFO, json.dumps(info) + "\n")
        dirs = [out / f"run-{index}" for index in range(int(info["runs"]))]
        for run_dir in dirs:
            run_dir.mkdir(exist_ok=True)
            if not (run_dir / RUN_INFO).is_file():  # killed before this run started
                spec, text = load_run_spec(out / SPEC_COPY)
                index = dirs.index(run_dir)
                _write_run_info(run_dir, text, spec.evolve.seed + index, index, info.get("spec_dir"))
        return [_resume_one(run_dir, progress, on_done) for run_dir in dirs]
    if (out / RUN_INFO).is_file():
        if runs is not None:
            raise HfM2n2Error(f"{out} is a single run (started without --runs); --runs does not apply")
        return [_resume_one(out, progress, on_done)]
    raise HfM2n2Error(f"{out} is not an hf-m2n2 evolve run directory (no {RUN_INFO} or {RUNS_INFO})")


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            resumable = (out / RUN_INFO).exists() or (out / RUNS_INFO).exists()
            hint = (
                "continue it with --resume DIR, or replace it with --overwrite"
                if resumable
                else "use --overwrite"
            )
            raise OutputError(f"{out} already exists and is not empty ({hint})")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None


def _push_target(spec: EvolveSpec, repo_id: str | None, private: bool | None, runs: int | None):
    from hf_m2n2.evolve.models import ModelEvolveSpec
    from hf_m2n2.push import PushTarget

    target = PushTarget.resolve(getattr(spec, "output", None), repo_id, private)
    if target is not None and not isinstance(spec, ModelEvolveSpec):
        raise HfM2n2Error("--push publishes models: this spec evolves dense vectors, not Hub models")
    if target is not None and runs is not None:
        raise HfM2n2Error(
            "--push publishes one model: drop --runs (or push a run's model/ with hf-m2n2 push)"
        )
    return target


def _write_run_info(
    run_dir: Path, text: str, seed: int, index: int | None, spec_dir: str | None = None, target=None
) -> None:
    atomic_write_text(run_dir / SPEC_COPY, text)
    # spec_dir: relative model paths and include_path resolve against the original spec's folder
    info = {"seed": seed, "run": index, "spec_hash": spec_hash(text), "spec_dir": spec_dir}
    if target is not None:  # --push given on the command line: a resumed run still publishes there
        info["push"] = {"repo_id": target.repo_id, "private": target.private, "revision": target.revision}
    atomic_write_text(run_dir / RUN_INFO, json.dumps(info) + "\n")


def _start_one(
    run_dir: Path,
    spec: EvolveSpec,
    text: str,
    seed: int,
    index: int | None,
    progress: bool,
    on_done: Reporter | None,
    spec_dir: str | None = None,
    target=None,
) -> dict[str, Any]:
    _write_run_info(run_dir, text, seed, index, spec_dir, target)
    return _execute(
        run_dir, spec, text, seed, index, progress, on_done, resume=False, spec_dir=spec_dir, target=target
    )


def _resume_one(run_dir: Path, progress: bool, on_done: Reporter | None) -> dict[str, Any]:
    info = json.loads((run_dir / RUN_INFO).read_text())
    spec, text = load_run_spec(run_dir / SPEC_COPY)
    if spec_hash(text) != info["spec_hash"]:
        raise HfM2n2Error(f"{run_dir / SPEC_COPY} was modified after the run started (spec hash differs)")
    from hf_m2n2.evolve.models import MODEL_DIR, ModelEvolveSpec

    exported = not isinstance(spec, ModelEvolveSpec) or (run_dir / MODEL_DIR).is_dir()
    if (run_dir / SUMMARY).is_file() and exported:
        summary = json.loads((run_dir / SUMMARY).read_text())
        target = _stored_target(spec, info) if isinstance(spec, ModelEvolveSpec) else None
        if target is not None and not (run_dir / PUSHED).is_file():  # finished, but the upload failed
            summary = {**summary, "push": _push(target, run_dir / MODEL_DIR, run_dir)}
        if on_done:
            on_done(run_dir, summary)
        return summary
    resume = (run_dir / CHECKPOINT).is_file()
    return _execute(
        run_dir,
        spec,
        text,
        info["seed"],
        info["run"],
        progress,
        on_done,
        resume=resume,
        spec_dir=info.get("spec_dir"),
        target=_stored_target(spec, info),
    )


def _stored_target(spec: EvolveSpec, info: dict[str, Any]):
    from hf_m2n2.push import PushTarget

    if "push" in info:
        return PushTarget(**info["push"])
    return PushTarget.resolve(getattr(spec, "output", None))


def _blas_threads(threads: int) -> contextlib.AbstractContextManager:
    """Limit numpy's BLAS to `threads` threads during the run (when threadpoolctl, a scikit-learn dependency, is
    installed): small dot products gain nothing from more and would compete with torch for the cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _execute(
    run_dir: Path,
    spec: EvolveSpec,
    text: str,
    seed: int,
    index: int | None,
    progress: bool,
    on_done: Reporter | None,
    *,
    resume: bool,
    spec_dir: str | None = None,
    target=None,
) -> dict[str, Any]:
    import torch

    from hf_m2n2.evolve.build import build_run
    from hf_m2n2.evolve.models import MODEL_DIR, ModelEvolveSpec, build_model_run, finish_model_run
    from hf_m2n2.spec import OutputConfig

    torch.set_num_threads(spec.evolve.threads)
    model_run = None
    if isinstance(spec, ModelEvolveSpec):
        if target is not None:  # the card's usage snippet names the repo
            output = OutputConfig(
                push_to_hub=target.repo_id, private=target.private, revision=target.revision
            )
            spec = spec.model_copy(update={"output": output})
        parts, model_run = build_model_run(spec, seed, run_dir, Path(spec_dir) if spec_dir else None)
    else:
        parts = build_run(spec, seed)
    evolve = spec.evolve
    settings = LoopSettings(
        budget=evolve.budget,
        log_every=evolve.log_every,
        checkpoint_every_s=evolve.checkpoint_every_s,
        checkpoint_every_steps=evolve.checkpoint_every_steps,
        progress=progress,
        label=spec.label if index is None else f"{spec.label} run {index}",
        lineage=model_run is not None,
    )
    info = {
        "name": spec.label,
        "algorithm": evolve.algorithm,
        "seed": seed,
        "run": index,
        "spec_hash": spec_hash(text),
        "threads": evolve.threads,
        "mutation_std": parts.mutation_std,
        "slerp_scope": spec.genome.slerp_scope,
    }
    with _blas_threads(evolve.threads):
        summary = run_loop(
            parts.strategy, parts.ops, parts.evaluator, run_dir, settings, info=info, resume=resume
        )
        if model_run is not None:
            finish_model_run(model_run, run_dir, summary, parts.strategy, progress=progress)
    if target is not None and model_run is not None:
        summary = {**summary, "push": _push(target, run_dir / MODEL_DIR, run_dir)}
    if on_done:
        on_done(run_dir, summary)
    return summary


def _push(target, model_dir: Path, run_dir: Path) -> dict[str, Any]:
    result = asdict(target.push(model_dir))
    atomic_write_text(run_dir / PUSHED, json.dumps(result) + "\n")
    return result
