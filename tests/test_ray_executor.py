"""The Ray executor on a local Ray instance: one worker in ask order equals the local executor; Blend genomes
travel as recipes; a killed worker process loses nothing; interrupted and SIGKILLed runs resume; failing
evaluations score 0 as locally; all workers lost or the cluster unreachable checkpoint and stop; resume goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import sigkill_evolve
from test_specialists import SMALL

from hf_m2n2.demo.specialists import build_specialists
from hf_m2n2.errors import InfrastructureError, SpecError
from hf_m2n2.evolve.build import build_run
from hf_m2n2.evolve.loop import LoopSettings, run_loop, stop_when
from hf_m2n2.evolve.runs import resume_runs, start_runs
from hf_m2n2.evolve.spec import load_evolve_spec, parse_evolve_spec

TESTS = Path(__file__).resolve().parent
DIGITS_EVAL = {
    "kind": "python",
    "callable": "hf_m2n2.tasks.digits:train_scores",
    "test_callable": "hf_m2n2.tasks.digits:test_accuracy",
}


def digits_spec(budget: int, executor: dict | None = None, **evolve) -> dict:
    spec = {
        "name": "ray-m2n2",
        "genome": {"kind": "dense", "size": 19210, "seeds": {"kind": "random", "count": 2, "std": 0.01}},
        "evolve": {"algorithm": "m2n2", "budget": budget, "seed": 7, "log_every": 25, **evolve},
        "evaluate": DIGITS_EVAL,
    }
    if executor is not None:
        spec["executor"] = executor
    return spec


@pytest.fixture(scope="module")
def ray_address(monkeypatch_module):
    """A local Ray instance for this module (4 logical CPUs: two workers and their restarts); its GCS address."""
    import ray

    monkeypatch_module.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch_module.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="session")
def built(tmp_path_factory, session_builds):
    """test_specialists' reduced build (the same folder and parameters: whichever test file runs first builds it)."""
    session_builds.take("specialists")
    return build_specialists(tmp_path_factory.getbasetemp() / "specialists-small", SMALL)


def blend_spec(built, budget: int, executor: dict) -> dict:
    return {
        "name": "ray-blend",
        "models": [{"model": str(built.models["add"])}, {"model": str(built.models["rev"])}],
        "genome": {"kind": "blend", "block_size": 1024},
        "evolve": {"algorithm": "m2n2", "budget": budget, "archive_size": 6, "seed": 3, "log_every": 4},
        "evaluate": {
            "kind": "lm_eval",
            "include_path": str(built.tasks_dir),
            "tasks": built.fitness_tasks,
            "test_tasks": built.test_tasks,
            "metric": "exact_match",
            "limit": 10,
            "batch_size": 64,
        },
        "executor": executor,
    }


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def same_files(a: Path, b: Path, names: tuple[str, ...]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def tells(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "tells.jsonl").read_text().splitlines()]


UNDISTURBED_SETTINGS = LoopSettings(
    budget=150, log_every=25, progress=False, tell_log=True, checkpoint_every_s=None
)


def kill_workers(run: Path, executor, choose) -> tuple[threading.Thread, list[dict]]:
    """A started thread that SIGKILLs the worker processes `choose(executor.workers())` names, at the first moment
    it names any once 40 candidates are told; the list of those it killed."""
    killed: list[dict] = []

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            told = (run / "tells.jsonl").read_text().count("\n") if (run / "tells.jsonl").exists() else 0
            for worker in choose(executor.workers()) if told >= 40 else []:
                os.kill(worker["pid"], signal.SIGKILL)
                killed.append(worker)
            time.sleep(0.002)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread, killed


@pytest.fixture(scope="module")
def two_workers_undisturbed(ray_address, tmp_path_factory):
    """A digits run (20 ms per evaluation) with two workers, two candidates queued on each and two more asked
    ahead, told in ask order: the spec and its finished run directory."""
    root = tmp_path_factory.mktemp("two-workers")
    executor = {
        "kind": "ray",
        "workers": 2,
        "in_flight_per_worker": 2,
        "lookahead": 6,
        "address": ray_address,
    }
    spec = digits_spec(150, executor)
    spec["evaluate"] = {**DIGITS_EVAL, "callable": "ray_tasks:slow_train_scores"}
    path = write(root / "spec.yaml", spec)
    start_runs(path, root / "run", progress=False)
    return path, root / "run"


def test_one_worker_in_ask_order_equals_the_local_executor(ray_address, tmp_path):
    """The same run bit for bit, its failing evaluations (raised on the worker) scored 0 as locally."""
    spec = digits_spec(100)
    spec["evaluate"] = {**DIGITS_EVAL, "callable": "ray_tasks:breaks_some"}
    path = write(tmp_path / "spec.yaml", spec)
    [local] = start_runs(path, tmp_path / "local", progress=False)
    [summary] = start_runs(path, tmp_path / "ray", progress=False, executor={"kind": "ray", "workers": 1})
    same_files(tmp_path / "local", tmp_path / "ray", ("history.jsonl", "archive.npz"))
    assert summary["failures"] == local["failures"] > 0
    assert summary["failure_examples"] == local["failure_examples"]
    assert [t["id"] for t in tells(tmp_path / "ray")] == list(range(100))
    stats = summary["executor"]
    assert stats["workers"] == 1 and stats["candidates_sent"] == 100 and stats["workers_lost"] == 0
    # a dense genome is its parameters: 19210 float32 values and a few hundred bytes of lineage
    assert 19210 * 4 < stats["bytes_sent_per_candidate"] < 19210 * 4 + 2000
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["executor"] == {
        "kind": "ray",
        "workers": 1,
    }


def test_blend_recipes_travel_to_two_workers(ray_address, built, tmp_path):
    """A model run on two workers: only recipes (kilobytes) are sent, both workers score, the model is exported."""
    executor = {"kind": "ray", "workers": 2, "address": ray_address}
    spec_path = write(tmp_path / "spec.yaml", blend_spec(built, 8, executor))
    [summary] = start_runs(spec_path, tmp_path / "run", progress=False)
    stats = summary["executor"]
    weights = (tmp_path / "run" / "model" / "model.safetensors").stat().st_size
    assert stats["bytes_sent_max"] < 4096 and weights > 100 * 4096  # a recipe, not the weights
    assert {t["worker"] for t in tells(tmp_path / "run")} >= {0, 1}  # None: a recipe scored before
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report) == 3  # the two seeds and the merge, scored on the workers


def test_a_killed_worker_process_loses_nothing(two_workers_undisturbed, tmp_path):
    """A worker process SIGKILLed while it evaluates: its candidates go to the other worker, Ray restarts it, and the
    run ends with the undisturbed run's archive and history."""
    spec_path, undisturbed = two_workers_undisturbed
    spec, _ = load_evolve_spec(spec_path)
    run = tmp_path / "run"
    run.mkdir()
    parts = build_run(spec, spec.evolve.seed, run)
    killer, killed = kill_workers(
        run,
        parts.executor,
        lambda workers: workers[:1] if workers[0]["alive"] and workers[0]["queued"] == 2 else [],
    )
    try:
        summary = run_loop(parts.strategy, parts.ops, parts.executor, run, UNDISTURBED_SETTINGS)
    finally:
        killer.join()
        parts.executor.close()
    assert len(killed) == 1, "no worker was killed"
    assert summary["executor"]["workers_lost"] == 1
    assert summary["executor"]["candidates_resubmitted"] >= 1
    same_files(undisturbed, run, ("history.jsonl", "archive.npz"))


def test_completion_order_is_logged_and_an_interrupted_run_resumes(ray_address, tmp_path):
    executor = {"kind": "ray", "workers": 2, "ordering": "completion", "address": ray_address}
    spec = digits_spec(120, executor, checkpoint_every_steps=10)
    spec["evaluate"] = {**DIGITS_EVAL, "callable": "ray_tasks:slow_train_scores"}  # time to stop it midway
    path = write(tmp_path / "spec.yaml", spec)
    run = tmp_path / "run"
    stop = threading.Event()

    def stop_midway() -> None:
        while not stop.is_set():
            if (run / "tells.jsonl").exists() and (run / "tells.jsonl").read_text().count("\n") >= 50:
                stop.set()
            time.sleep(0.002)

    watcher = threading.Thread(target=stop_midway, daemon=True)
    watcher.start()
    with stop_when(stop), pytest.raises(KeyboardInterrupt):
        start_runs(path, run, progress=False)
    stop.set()
    before = (run / "tells.jsonl").read_bytes()
    [summary] = resume_runs(run, progress=False)
    after = tells(run)
    assert summary["forward_passes"] == 120 and summary["timing"]["sessions"] == 2
    assert (run / "tells.jsonl").read_bytes().startswith(before)
    assert [t["pass"] for t in after] == list(range(1, 121))
    assert len({t["id"] for t in after}) == 120  # each candidate told once, in the order the workers finished
    assert all(t["worker"] in (0, 1) and t["seconds"] > 0 for t in after)
    assert len((run / "history.jsonl").read_text().splitlines()) == 120 // 25 + 1


def test_cma_es_generations_run_in_parallel_and_equal_the_local_run(ray_address, tmp_path):
    """A generation's samples are scored on two workers and told together, in ask order even when the workers
    finish out of order: the run is the local one bit for bit."""
    spec = digits_spec(24, log_every=8)
    spec["genome"]["seeds"]["count"] = 1
    spec["evolve"].update(algorithm="cma_es", cma={"popsize": 6, "sigma0": 0.01, "diagonal": True})
    spec["evaluate"] = {**DIGITS_EVAL, "callable": "ray_tasks:slow_train_scores"}
    path = write(tmp_path / "spec.yaml", spec)
    start_runs(path, tmp_path / "local", progress=False)
    executor = {"kind": "ray", "workers": 2, "ordering": "completion", "address": ray_address}
    [summary] = start_runs(path, tmp_path / "ray", progress=False, executor=executor)
    same_files(tmp_path / "local", tmp_path / "ray", ("history.jsonl", "archive.npz"))
    assert {t["worker"] for t in tells(tmp_path / "ray")} == {0, 1}


def test_sigkill_of_the_driver_then_resume_equals_an_undisturbed_run(two_workers_undisturbed, tmp_path):
    spec, undisturbed = two_workers_undisturbed
    data = yaml.safe_load(spec.read_text())
    data["evolve"]["checkpoint_every_steps"] = 10  # a different spec hash, the same run
    killed_spec = write(tmp_path / "spec.yaml", data)
    at_kill = sigkill_evolve(killed_spec, tmp_path / "killed", min_passes=30, timeout=120)
    assert 30 <= at_kill < 150
    [summary] = resume_runs(tmp_path / "killed", progress=False)
    assert summary["timing"]["sessions"] == 2
    same_files(undisturbed, tmp_path / "killed", ("history.jsonl", "archive.npz"))


def test_all_workers_lost_checkpoints_and_resume_continues(two_workers_undisturbed, tmp_path):
    spec_path, undisturbed = two_workers_undisturbed
    spec, _ = load_evolve_spec(spec_path)
    spec = spec.model_copy(update={"executor": spec.executor.model_copy(update={"max_restarts": 0})})
    run = tmp_path / "run"
    run.mkdir()
    settings = UNDISTURBED_SETTINGS
    parts = build_run(spec, spec.evolve.seed, run)

    killer, killed = kill_workers(run, parts.executor, lambda workers: workers)
    try:
        with pytest.raises(InfrastructureError, match="Ray workers: all 2 were lost"):
            run_loop(parts.strategy, parts.ops, parts.executor, run, settings)
    finally:
        killer.join()
        parts.executor.close()
    assert len(killed) == 2
    assert (run / "checkpoint.npz").is_file()
    parts = build_run(spec, spec.evolve.seed, run)  # the cluster is still there: new workers
    try:
        summary = run_loop(parts.strategy, parts.ops, parts.executor, run, settings, resume=True)
    finally:
        parts.executor.close()
    assert summary["forward_passes"] == 150 and summary["timing"]["sessions"] == 2
    same_files(undisturbed, run, ("history.jsonl", "archive.npz"))


def test_an_unreachable_cluster_checkpoints_and_a_local_resume_finishes(tmp_path):
    """In a fresh process (this one's Ray instance would be used otherwise): exit 2, one line, a checkpoint of the
    candidate asked; `--resume --executor local` then ends as a local run would have."""
    path = write(tmp_path / "spec.yaml", digits_spec(40))
    start_runs(path, tmp_path / "local", progress=False)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "hf_m2n2.cli", "evolve", str(path), "--out", str(run), "-q"]
    command += ["--executor", "ray", "--ray-address", "127.0.0.1:1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 2
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert "Ray cluster at 127.0.0.1:1: unreachable" in line and "--resume" in line
    assert (run / "checkpoint.npz").is_file()
    [summary] = resume_runs(run, progress=False, executor={"kind": "local"})
    assert summary["forward_passes"] == 40
    same_files(tmp_path / "local", run, ("history.jsonl", "archive.npz"))


def test_ray_settings_on_the_local_executor_are_refused(cli, tmp_path):
    with pytest.raises(SpecError, match=r"executor\.workers: only used by the ray executor"):
        parse_evolve_spec(digits_spec(10, {"workers": 2}))
    with pytest.raises(
        SpecError, match=r"executor\.lookahead: must be at least workers x in_flight_per_worker \(4\)"
    ):
        parse_evolve_spec(
            digits_spec(10, {"kind": "ray", "workers": 2, "in_flight_per_worker": 2, "lookahead": 3})
        )
    path = write(tmp_path / "spec.yaml", digits_spec(10))
    code, _, err = cli("evolve", path, "--out", tmp_path / "run", "--workers", "2")
    assert code == 2 and "add --executor ray" in err and not (tmp_path / "run").exists()
    code, _, err = cli("evolve", path, "--out", tmp_path / "run", "--executor", "ray", "--workers", "0")
    assert code == 2 and "executor.workers" in err and not (tmp_path / "run").exists()


def test_workers_get_the_seeds_pinned_where_the_driver_found_them(seeds, cached_repo, tmp_path):
    """A Hub seed travels as `org/name@sha` (the commit the driver resolved; a worker never follows a branch that
    moved), a local seed as its absolute path, `fixed_from` along with it; a worker's build of the pinned spec
    opens the same commits and scores a candidate as the driver-side local build does."""
    import shutil

    from hf_m2n2.evolve.ray_executor import pinned_spec, ray_executor
    from hf_m2n2.evolve.scorer import build_scorer
    from hf_m2n2.evolve.strategy import Candidate, Lineage

    shutil.copytree(seeds["b"], tmp_path / "b")
    data = {
        "models": [{"model": cached_repo["repo_id"]}, {"model": "b"}],
        "genome": {"kind": "blend", "block_size": 2048, "fixed_from": cached_repo["repo_id"]},
        "evolve": {"algorithm": "m2n2", "budget": 4, "seed": 1},
        "evaluate": {
            "kind": "python",
            "callable": "hf_m2n2.demo.tasks.likelihood:token_likelihood",
            "kwargs": {"sequences": [[1, 40, 41, 42, 2], [1, 50, 51, 52, 2]]},
        },
        "executor": {"kind": "ray", "workers": 2},
    }
    spec = parse_evolve_spec(data)
    driver, executor = ray_executor(spec, 1, tmp_path, tmp_path)  # starts nothing until the first candidate
    assert driver.target is None and executor.workers() == []
    pinned = pinned_spec(spec, driver.seeds)
    at = f"{cached_repo['repo_id']}@{cached_repo['main']}"
    assert [m.model for m in pinned.models] == [at, str((tmp_path / "b").resolve())]
    assert pinned.genome.fixed_from == at
    (tmp_path / "worker").mkdir()
    (tmp_path / "local").mkdir()
    worker, scorer = build_scorer(pinned, 1, tmp_path / "worker", None, None)
    local, local_scorer = build_scorer(spec, 1, tmp_path / "local", tmp_path, None)
    assert [s.model.commit for s in worker.seeds] == [cached_repo["main"], None]
    child = driver.ops.crossover(*driver.initial, 0.3, driver.ops.size // 2)
    for one in (scorer, local_scorer):
        one.submit(Candidate(child, Lineage(0, "crossover")))
    assert np.array_equal(scorer.collect().scores, local_scorer.collect().scores)
