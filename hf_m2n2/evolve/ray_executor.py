"""The Ray executor: candidates scored by workers on a Ray cluster; only genomes travel.

Each worker is a Ray actor that builds, once, what the local executor builds in-process (`build_scorer`): the
seeds, opened from its node's own files or HF cache at the commits the driver pinned; the live model; the
evaluator. It then scores the genomes it is sent and returns their score vectors and timings. The driver keeps
the strategy, the archive, the checkpoint and the logs. A Blend genome is a few kilobytes whatever the model's
size (`stats()` reports the bytes sent per candidate). Nothing outside this module imports Ray.

Faults, kept apart as everywhere in the loop:
- a candidate whose evaluation raises on a worker comes back as a candidate failure (scored 0 by the loop);
- a worker process that dies: its candidates go to the other workers, and Ray restarts it (`max_restarts`),
  after which it gets work again;
- every worker lost, a service failing under a worker's evaluation, or the cluster unreachable:
  `InfrastructureError`, so the loop checkpoints and the run stops; `--resume` continues.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_m2n2.errors import ContractError, EvaluationError, HfM2n2Error, InfrastructureError, first_line
from hf_m2n2.evaluate.base import Report
from hf_m2n2.evolve.executor import CandidateTiming, ScoreCache, Scored, Split
from hf_m2n2.evolve.strategy import Candidate
from hf_m2n2.spec import model_ref_string

logger = logging.getLogger(__name__)

# what a worker needs from the driver's environment (never a token: workers log in on their own nodes)
_PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "PYTHONPATH")


class ScoringWorker:
    """The body of a Ray worker (wrapped by `ray.remote` when the executor starts, so importing this module needs
    no Ray). Build failures are kept and reported by `ready`, so that the driver can tell a bad spec (one line)
    from a lost machine."""

    def __init__(
        self,
        spec: Any,
        seed: int,
        run_dir: str | None,
        spec_dir: str | None,
        threads: int,
        env: dict[str, str],
    ):
        # set before anything reads them (a fresh worker process has imported only Ray); not a Ray runtime_env,
        # which would start a new process instead of taking one of the idle ones Ray keeps ready
        os.environ.update(env)
        sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        import torch

        torch.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits

            self._blas = threadpool_limits(limits=threads, user_api="blas")
        except ImportError:
            self._blas = None
        self.scratch = Path(tempfile.mkdtemp(prefix="hf-m2n2-worker-"))  # the kind's caches (Gram sums)
        evaluation_dir = Path(run_dir) if run_dir and Path(run_dir).is_dir() else self.scratch
        self.failure: dict[str, str] | None = None
        try:
            from hf_m2n2.evolve.scorer import build_scorer

            _, self.scorer = build_scorer(
                spec, seed, self.scratch, Path(spec_dir) if spec_dir else None, evaluation_dir
            )
        except InfrastructureError as exc:
            self.failure = {"kind": "infrastructure", "message": first_line(exc)}
        except HfM2n2Error as exc:
            self.failure = {"kind": "user", "message": first_line(exc)}
        except Exception as exc:
            self.failure = {"kind": "bug", "message": f"{type(exc).__name__}: {first_line(exc)}"}

    def ready(self) -> dict[str, Any]:
        """Where the worker runs (process id, node), and why it could not start, if it could not."""
        return {"pid": os.getpid(), "node": socket.gethostname(), "failure": self.failure}

    def fit(self, candidate: Candidate) -> dict[str, Any]:
        """A candidate's fitness scores (or its one-line failure), seconds spent, and the timing record."""
        start = time.perf_counter()

        def score() -> dict[str, Any]:
            self.scorer.submit(candidate)
            scored = self.scorer.collect()  # a candidate failure comes back as `error`, not raised
            return {"scores": scored.scores, "error": scored.error, "seconds": time.perf_counter() - start}

        return self._timed(score)

    def call(self, method: str, *args: Any) -> dict[str, Any]:
        """Run one of the local executor's other methods (`score`, `report`, `images`, ...)."""
        try:
            return self._timed(lambda: {"value": getattr(self.scorer, method)(*args)})
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {first_line(exc)}"}

    def _timed(self, work: Any) -> dict[str, Any]:
        """`work()`'s answer with the timing record it added, if any; an outage as `infrastructure`."""
        timing = self.scorer.timing
        before = len(timing.records) if timing is not None else 0
        try:
            out = work()
        except InfrastructureError as exc:
            return {"infrastructure": first_line(exc)}
        if timing is not None and len(timing.records) > before:
            out["timing"] = timing.records[-1]
        return out

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass(eq=False)
class _Worker:
    """The driver's view of one worker: its actor, the candidates queued on it, and whether it is alive."""

    index: int
    handle: Any
    load: int = 0
    alive: bool = True
    restarting: Any = None  # the pending `ready` call while Ray restarts the worker's process
    node: str = ""
    pid: int | None = None


def pinned_spec(spec: Any, seeds: list[Any]) -> Any:
    """The spec with every seed reference replaced by where the driver found it: `org/name@commit` for Hub
    models (each worker downloads or finds that exact commit in its node's cache), the absolute path for local
    ones (which must exist on every node)."""
    pins = {seed.model.ref: seed.model.locator for seed in seeds}
    if not pins:
        return spec
    models = [
        m.model_copy(update={"model": pins.get(model_ref_string(m.model), m.model)})
        for m in spec.models or []
    ]
    genome = spec.genome.model_copy(
        update={key: pins[value] for key, value in spec.genome if isinstance(value, str) and value in pins}
    )
    return spec.model_copy(update={"models": models or spec.models, "genome": genome})


def ray_executor(
    spec: Any, seed: int, run_dir: Path | None, spec_dir: Path | None
) -> tuple[Any, RayExecutor]:
    """The Ray executor's builder (`executor: {kind: ray}`): the driver's genome parts without a live model, and
    the executor whose workers build the live model themselves."""
    from hf_m2n2.evolve.strategy import make_rng

    seeds_stream, _ = np.random.SeedSequence(seed).spawn(2)
    genome = spec.kind.build(spec, make_rng(seeds_stream), run_dir or Path("."), spec_dir, live=False)
    return genome, RayExecutor(spec, seed, run_dir, spec_dir, genome)


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an unreachable `host:port` cluster address (`ray.init` waits minutes before giving up).

    Raises:
        InfrastructureError: nothing answers there.
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # `auto` and other forms: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InfrastructureError(
            f"Ray cluster at {address}", f"unreachable ({exc.strerror or exc})"
        ) from None


def worker_env(threads: int) -> dict[str, str]:
    """The environment variables every worker gets: its thread count, and the driver's Hub settings and Python
    path."""
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.update({name: os.environ[name] for name in _PASSED_ENV if name in os.environ})
    return env


class RayExecutor:
    """Scores candidates on `executor.workers` Ray actors, up to `in_flight_per_worker` queued on each (and up to
    `lookahead` submitted in all: those past the workers' slots wait here for the first free one).

    `collect` returns candidates as they finish (the loop tells them in ask order or on arrival, as
    `executor.ordering` says). A recipe scored before is answered from the driver's cache without a round trip.
    The workers start at the first candidate (inside the loop, so that an unreachable cluster checkpoints).

    Args:
        spec: the validated evolve spec (its `executor:` section configures this).
        seed: the run's seed (the workers build the same parts from it).
        run_dir: the run directory (the workers' evaluators write previews there when their node sees it).
        spec_dir: the spec's folder.
        genome: the driver's genome parts (ops and seeds; no live model).
    """

    def __init__(self, spec: Any, seed: int, run_dir: Path | None, spec_dir: Path | None, genome: Any):
        self.config = spec.executor
        slots = self.config.workers * self.config.in_flight_per_worker
        self.parallelism = self.config.lookahead or slots  # asked ahead; past the slots they wait here
        self.timing = CandidateTiming() if genome.timed else None
        self.cache = ScoreCache(genome.ops, genome.cache_scores, self.timing)
        self._spec = pinned_spec(spec, genome.seeds)
        self._args = (seed, str(run_dir) if run_dir else None, str(spec_dir) if spec_dir else None)
        self._threads = spec.evolve.threads
        self._workers: list[_Worker] = []
        self._started_ray = False
        self._queue: deque[Candidate] = deque()  # submitted, waiting for a free worker
        self._running: dict[Any, tuple[Candidate, _Worker]] = {}  # ObjectRef -> what it scores, where
        self._done: deque[Scored] = deque()
        self._nodes: set[str] = set()
        self._sent = 0
        self._bytes = 0
        self._bytes_max = 0
        self._busy_s = 0.0
        self._lost = 0
        self._resubmitted = 0
        self._started_at: float | None = None

    # --- the loop's interface -------------------------------------------------------------------------------

    def submit(self, candidate: Candidate) -> None:
        hit, scores = self.cache.get(self.cache.key(candidate.genome, "fit"))
        if hit:
            self._done.append(Scored(candidate, scores))
            return
        self._queue.append(candidate)
        self._dispatch()

    def collect(self) -> Scored:
        while not self._done:
            if not self._running and not self._queue:
                raise ContractError("collect without a submitted candidate")
            self._wait_once()
        return self._done.popleft()

    def score(self, genome: Any, split: Split) -> Any:
        key = self.cache.key(genome, split)
        hit, value = self.cache.get(key)
        if not hit:
            value = self._call("score", genome, split)
            self.cache.put(key, value)
        return value

    def report(self, genome: Any) -> Report:
        return self._call("report", genome)

    def images(self, genome: Any, limit: int | None = None) -> list[tuple[Any, list]] | None:
        return self._call("images", genome, limit)

    def describe(self) -> dict[str, Any] | None:
        return self._call("describe")

    def example_groups(self) -> np.ndarray | None:
        return self._call("example_groups")

    def part_means(self, scores: np.ndarray) -> dict[str, float] | None:
        return self._call("part_means", scores)

    def stats(self) -> dict[str, Any]:
        """What the run's summary reports under `executor`: workers, nodes, bytes sent per candidate, the workers'
        busy seconds and utilization (busy / (workers x wall)), workers lost and candidates sent again."""
        wall = time.perf_counter() - self._started_at if self._started_at is not None else 0.0
        capacity = wall * self.config.workers
        return {
            "kind": "ray",
            "workers": self.config.workers,
            "in_flight_per_worker": self.config.in_flight_per_worker,
            "lookahead": self.parallelism,
            "ordering": self.config.ordering,
            "nodes": sorted(self._nodes),
            "candidates_sent": self._sent,
            "bytes_sent_per_candidate": round(self._bytes / self._sent, 1) if self._sent else None,
            "bytes_sent_max": self._bytes_max,
            "worker_busy_s": round(self._busy_s, 3),
            "utilization": round(self._busy_s / capacity, 4) if capacity > 0 else None,
            "workers_lost": self._lost,
            "candidates_resubmitted": self._resubmitted,
        }

    def workers(self) -> list[dict[str, Any]]:
        """Each worker's index, node, process id, candidates queued on it and whether it is alive (for operators,
        and tests that kill one)."""
        return [
            {
                "index": w.index,
                "node": w.node,
                "pid": w.pid,
                "queued": w.load,
                "alive": w.alive and w.restarting is None,
            }
            for w in self._workers
        ]

    def close(self) -> None:
        """Stop the workers (and the local Ray instance this executor started)."""
        if not self._workers:
            return
        import ray

        with contextlib.suppress(Exception):  # a worker already gone leaves nothing to clean
            ray.get([w.handle.close.remote() for w in self._workers if w.alive], timeout=10)
        for worker in self._workers:
            ray.kill(worker.handle, no_restart=True)
        self._workers = []
        if self._started_ray:
            ray.shutdown()

    # --- workers ---------------------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._workers:
            return
        import ray

        config = self.config
        resources = config.resources_per_worker
        try:
            if not ray.is_initialized():
                address = config.address or os.environ.get("RAY_ADDRESS")
                if address:
                    _probe(address)
                    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
                else:  # a local instance, as large as the workers ask (more than the cores is the user's choice)
                    cpus = max(os.cpu_count() or 1, math.ceil(config.workers * resources.num_cpus))
                    ray.init(
                        num_cpus=cpus,
                        include_dashboard=False,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                    )
                self._started_ray = True
        except InfrastructureError:
            raise
        except Exception as exc:
            where = config.address or os.environ.get("RAY_ADDRESS") or "a local instance"
            raise InfrastructureError(f"Ray ({where})", f"cannot start: {first_line(exc)}") from None
        actor = ray.remote(ScoringWorker).options(
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_restarts=config.max_restarts,
            max_task_retries=0,
        )
        env = worker_env(self._threads)
        handles = [actor.remote(self._spec, *self._args, self._threads, env) for _ in range(config.workers)]
        self._workers = [_Worker(i, h) for i, h in enumerate(handles)]
        try:
            infos = ray.get([h.ready.remote() for h in handles], timeout=config.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise InfrastructureError(
                "Ray workers",
                f"the {config.workers} workers did not start within {config.start_timeout_s:g} s (does the "
                f"cluster have {resources.num_gpus:g} GPUs and {resources.num_cpus:g} CPUs free per worker?)",
            ) from None
        except ray.exceptions.RayError as exc:
            self.close()
            raise InfrastructureError("Ray workers", f"a worker could not start: {first_line(exc)}") from None
        failure = next((info["failure"] for info in infos if info["failure"]), None)
        if failure is not None:
            self.close()
            message = f"a Ray worker could not build the run: {failure['message']}"
            if failure["kind"] == "infrastructure":
                raise InfrastructureError("Ray workers", message)
            raise EvaluationError(message)
        for worker, info in zip(self._workers, infos):
            worker.node, worker.pid = info["node"], info["pid"]
        self._nodes.update(info["node"] for info in infos)
        self._started_at = time.perf_counter()
        logger.info("%d Ray workers ready on %d node(s)", len(handles), len(self._nodes))

    def _free_workers(self) -> list[_Worker]:
        return [w for w in self._workers if w.alive and w.restarting is None]

    def _dispatch(self) -> None:
        self._start()
        while self._queue:
            free = [w for w in self._free_workers() if w.load < self.config.in_flight_per_worker]
            if not free:
                return
            worker = min(free, key=lambda w: (w.load, w.index))
            candidate = self._queue.popleft()
            size = len(pickle.dumps(candidate, protocol=5))  # what Ray serializes: the genome and its lineage
            self._sent += 1
            self._bytes += size
            self._bytes_max = max(self._bytes_max, size)
            self._running[worker.handle.fit.remote(candidate)] = (candidate, worker)
            worker.load += 1

    def _wait_once(self) -> None:
        """Wait for the next finished candidate or restarted worker, handle it, and hand out queued work."""
        import ray

        restarting = [w.restarting for w in self._workers if w.restarting is not None]
        refs = list(self._running) + restarting
        if not refs:
            raise self._all_lost()
        ready, _ = ray.wait(refs, num_returns=1)
        ref = ready[0]
        if ref in self._running:
            self._finish(ref)
        else:
            self._back(next(w for w in self._workers if w.restarting == ref))
        self._dispatch()

    def _finish(self, ref: Any) -> None:
        import ray

        candidate, worker = self._running.pop(ref)
        worker.load -= 1
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
            self._resubmitted += 1
            self._queue.appendleft(candidate)
            self._lose(worker, exc)
            return
        except ray.exceptions.RayTaskError as exc:  # the worker's own code failed outside the evaluation
            self._done.append(Scored(candidate, error=first_line(exc), worker=worker.index))
            return
        if "infrastructure" in result:
            raise InfrastructureError(f"Ray worker {worker.index}", result["infrastructure"])
        scores = result["scores"]
        if isinstance(scores, np.ndarray):
            scores = np.array(scores)  # Ray hands back read-only arrays
        self._busy_s += result["seconds"]
        if self.timing is not None and "timing" in result:
            self.timing.records.append(result["timing"])
        if result["error"] is None:
            self.cache.put(self.cache.key(candidate.genome, "fit"), scores)
        self._done.append(Scored(candidate, scores, result["error"], worker.index, result["seconds"]))

    def _lose(self, worker: _Worker, exc: BaseException) -> None:
        """A worker's process died: it gets no work until it answers again (Ray restarts it while its
        `max_restarts` last; a dead one answers `ActorDiedError`)."""
        if not worker.alive or worker.restarting is not None:
            return
        self._lost += 1
        worker.restarting = worker.handle.ready.remote()
        logger.warning(
            "Ray worker %d lost (%s); its candidates go to the other workers", worker.index, first_line(exc)
        )

    def _back(self, worker: _Worker) -> None:
        """A lost worker answered: back at work, still restarting (ask again), or dead for good."""
        import ray

        ref, worker.restarting = worker.restarting, None
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # still restarting
            time.sleep(0.2)
            worker.restarting = worker.handle.ready.remote()
            return
        except ray.exceptions.RayActorError as exc:
            worker.alive = False
            logger.warning("Ray worker %d is gone for good (%s)", worker.index, first_line(exc))
            return
        if info["failure"] is not None:
            worker.alive = False
            logger.warning(
                "Ray worker %d restarted but could not build the run: %s", worker.index, info["failure"]
            )
            return
        self._nodes.add(info["node"])
        worker.node, worker.pid = info["node"], info["pid"]
        logger.warning("Ray worker %d is back (pid %d on %s)", worker.index, info["pid"], info["node"])

    def _all_lost(self) -> InfrastructureError:
        return InfrastructureError("Ray workers", f"all {self.config.workers} were lost (restarts spent)")

    def _call(self, method: str, *args: Any) -> Any:
        """Run a method of the local executor on the least loaded live worker (another one if it dies)."""
        import ray

        self._start()
        while True:
            free = self._free_workers()
            if not free:
                if all(w.restarting is None for w in self._workers):
                    raise self._all_lost()
                self._back(next(w for w in self._workers if w.restarting is not None))
                continue
            worker = min(free, key=lambda w: (w.load, w.index))
            try:
                result = ray.get(worker.handle.call.remote(method, *args))
            except ray.exceptions.RayActorError as exc:
                self._lose(worker, exc)
                continue
            if "infrastructure" in result:
                raise InfrastructureError(f"Ray worker {worker.index}", result["infrastructure"])
            if "error" in result:
                raise EvaluationError(f"{method} on Ray worker {worker.index}: {result['error']}")
            if self.timing is not None and "timing" in result:
                self.timing.records.append(result["timing"])
            return result["value"]
