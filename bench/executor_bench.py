"""Scheduling benchmark of the Ray executor: evaluations per second and scheduling efficiency against the number
of workers, on an evaluator of controlled, skewed cost (issue 18).

The task: `hf_m2n2.demo.tasks.timed` on a dense genome. Each evaluation sleeps a lognormal duration (default mean
0.5 s, log-std 0.75: most short, a few several times the mean, as GPU evaluations of different lengths) seeded
by the genome's bytes, then returns real per-example scores. Sleeping workers cost little CPU, so 16 of them
fit on a 2-core machine and the figures measure the scheduling, not the hardware.

For each worker count W (default 1 2 4 8 16), on one Ray instance started here (`num_cpus` = max W + 2):

* `m2n2 completion`: steady-state M2N2 through the real pipeline (`start_runs` on a generated spec, `executor:
  {kind: ray, workers: W, ordering: completion}`), budget = W x --evals-per-worker, one held-out test call at the
  end (`log_every` = budget);
* `m2n2 deterministic` (with --methods): the same, told in ask order;
* `cma_es`: CMA-ES (popsize max(W, 2), or --cma-popsize) through the same pipeline: its generation is a barrier;
* `m2n2 barrier`: the mergekit-evolve design as the comparison: generations of W candidates asked from the same
  M2N2 strategy, evaluated in order by `ray.util.ActorPool.map` on W of the executor's own `ScoringWorker` actors,
  all told, then the next generation.

Figures per row:
* wall s: the scheduling wall time, from the workers being ready to the last result (the workers' start-up,
  `start s`, is apart). For the pipeline runs it is the executor's own (`RayExecutor.stats()`: its `utilization`
  is worker busy s / (W x wall since the workers were ready), so wall = busy / (W x utilization)); it includes
  the loop's final checkpoint, archive and test call (milliseconds).
* efficiency: useful worker time / worker time = sum of the workers' evaluation seconds / (W x wall); for the
  pipeline runs this is the executor's `utilization`.
* ideal: the efficiency of a zero-overhead greedy scheduler on the same durations in the same ask order (each
  candidate to the first free worker; from `tells.jsonl`): for M2N2 the children start once the first of the two
  seeds is scored; for CMA-ES and the barrier, generation by generation with a barrier between. What is lost
  between it and 1 is the strategy's start, the finite budget's drain and the barriers' wait for each
  generation's slowest candidate, not overhead; what is lost between efficiency and ideal is the scheduler's
  overhead (and, for `m2n2 deterministic`, its head-of-line wait: a result told in ask order frees no worker
  before the results asked earlier are told, which this greedy bound does not model).

Much of the default run's time is the workers' start-up (each row starts W actors that import torch and build
the run; Ray starts at most as many worker processes at once as there are cores): 40-120 s for 16 workers on 2
cores. The default 60 evaluations per worker show the steady state; with fewer, the budget's drain (the last
candidates finishing one by one) becomes a large part of each row's wall at 16 workers (see `ideal`).
`--lookahead K` asks K x W candidates ahead in the M2N2 rows (`executor.lookahead`): what keeps the workers busy
under `m2n2-deterministic`.

Usage:
    python bench/executor_bench.py --out executor_bench.json          # the default table (14 min here at 20/worker)
    python bench/executor_bench.py --workers 16 --methods m2n2-completion m2n2-deterministic barrier
    python bench/executor_bench.py --workers 16 --lookahead 3 --methods m2n2-deterministic
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

METHODS = ("m2n2-completion", "m2n2-deterministic", "cma_es", "barrier")
DEFAULT_METHODS = ("m2n2-completion", "cma_es", "barrier")  # each row starts W actors (~5 s each on 2 cores)
GENOME_SIZE = 64
EXAMPLES = 16
SEEDS = 2  # random initial vectors: M2N2 asks its first children once one of them is told


def make_spec(args: argparse.Namespace, workers: int, method: str) -> dict[str, Any]:
    """The evolve spec of one row: dense genome, the timed fitness, the Ray executor with `workers` workers."""
    budget = workers * args.evals_per_worker
    evolve: dict[str, Any] = {"algorithm": "m2n2", "budget": budget, "seed": args.seed, "log_every": budget}
    ordering = "deterministic" if method == "m2n2-deterministic" else "completion"
    if method == "cma_es":
        evolve["algorithm"] = "cma_es"
        evolve["cma"] = {"popsize": args.cma_popsize or max(workers, 2), "sigma0": 0.02}
    kwargs = {"mean_s": args.mean_s, "sigma": args.sigma, "examples": EXAMPLES}
    return {
        "name": f"timed-{method}-{workers}",
        "genome": {
            "kind": "dense",
            "size": GENOME_SIZE,
            "seeds": {"kind": "random", "count": SEEDS, "std": 0.01},
        },
        "evolve": evolve,
        "evaluate": {
            "kind": "python",
            "callable": "hf_m2n2.demo.tasks.timed:scores",
            "test_callable": "hf_m2n2.demo.tasks.timed:test_score",
            "kwargs": kwargs,
        },
        "executor": {
            "kind": "ray",
            "workers": workers,
            "ordering": ordering,
            "lookahead": workers * args.lookahead,
        },
    }


def greedy_makespan(durations: list[float], workers: int, seeds: int = 0) -> float:
    """The wall time of a zero-overhead list scheduler: each duration, in order, to the worker free first. With
    `seeds`, the candidates after the first `seeds` start only once one of those finished (M2N2 asks no child
    before an archive member is told)."""
    free = [0.0] * workers
    release = min(durations[:seeds]) if seeds else 0.0
    for index, seconds in enumerate(durations):
        start = heapq.heappop(free)
        heapq.heappush(free, (start if index < seeds else max(start, release)) + seconds)
    return max(free)


def ideal_efficiency(
    durations: list[float], workers: int, generations: list[int] | None = None, seeds: int = 0
) -> float:
    """The efficiency of a zero-overhead scheduler on these durations (in ask order): one list schedule, or one
    per generation (`generations`: their sizes) with a barrier between them."""
    if generations is None:
        wall = greedy_makespan(durations, workers, seeds)
    else:
        ends = list(itertools.accumulate(generations, initial=0))
        wall = sum(greedy_makespan(durations[a:b], workers) for a, b in zip(ends, ends[1:]))
    return sum(durations) / (workers * wall)


def run_pipeline(args: argparse.Namespace, workers: int, method: str, scratch: Path) -> dict[str, Any]:
    """One row through `start_runs` (the real loop and RayExecutor)."""
    from hf_m2n2.evolve.runs import start_runs

    spec_path = scratch / f"{method}-{workers}.yaml"
    spec_path.write_text(yaml.safe_dump(make_spec(args, workers, method), sort_keys=False))
    run_dir = scratch / f"{method}-{workers}"
    start = time.perf_counter()
    summary = start_runs(spec_path, run_dir, overwrite=True, progress=False)[0]
    total = time.perf_counter() - start
    stats = summary["executor"]
    wall = stats["worker_busy_s"] / (workers * stats["utilization"])
    tells = [json.loads(line) for line in (run_dir / "tells.jsonl").read_text().splitlines()]
    durations = [t["seconds"] for t in sorted(tells, key=lambda t: t["id"])]
    if method == "cma_es":  # told in order, a generation of popsize at a time
        popsize = make_spec(args, workers, method)["evolve"]["cma"]["popsize"]
        whole, rest = divmod(len(durations), popsize)
        ideal = ideal_efficiency(durations, workers, [popsize] * whole + [rest] * (rest > 0))
    else:
        ideal = ideal_efficiency(durations, workers, seeds=SEEDS)
    return {
        "workers": workers,
        "method": method,
        "evals": summary["forward_passes"],
        "start_s": round(total - wall, 2),
        "wall_s": round(wall, 3),
        "evals_per_s": round(summary["forward_passes"] / wall, 3),
        "efficiency": stats["utilization"],
        "ideal": round(ideal, 4),
        "busy_s": stats["worker_busy_s"],
        "best_train": summary["best_train"],
        "test": summary["test"],
        "bytes_per_candidate": stats["bytes_sent_per_candidate"],
    }


def run_barrier(args: argparse.Namespace, workers: int, scratch: Path) -> dict[str, Any]:
    """The generation-barrier ordered-map scheduler (mergekit-evolve's design) on the same task and strategy."""
    import ray
    from ray.util import ActorPool

    from hf_m2n2.evaluate.base import check_scores
    from hf_m2n2.evolve.build import build_run
    from hf_m2n2.evolve.ray_executor import ScoringWorker, worker_env
    from hf_m2n2.evolve.spec import load_evolve_spec

    spec_dict = make_spec(args, workers, "barrier")
    spec_dict.pop("executor")  # the driver's strategy is built with the local executor's parts
    spec_path = scratch / f"barrier-{workers}.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    spec, _ = load_evolve_spec(spec_path)
    start = time.perf_counter()
    parts = build_run(spec, args.seed, scratch, scratch)
    actor = ray.remote(ScoringWorker).options(num_cpus=1)
    handles = [actor.remote(spec, args.seed, None, str(scratch), 1, worker_env(1)) for _ in range(workers)]
    try:
        failures = [
            info["failure"] for info in ray.get([h.ready.remote() for h in handles]) if info["failure"]
        ]
        if failures:
            raise RuntimeError(f"a barrier worker could not build the run: {failures[0]}")
        ready = time.perf_counter()
        pool, strategy, budget = ActorPool(handles), parts.strategy, spec.evolve.budget
        passes, busy, durations, generations, n_examples = 0, 0.0, [], [], None
        while passes < budget:
            generation = []
            while (
                len(generation) < min(workers, budget - passes) and (candidate := strategy.ask()) is not None
            ):
                generation.append(candidate)
            results = list(pool.map(lambda a, c: a.fit.remote(c), generation))  # in ask order, a barrier
            for candidate, result in zip(generation, results):
                if result.get("error") or "infrastructure" in result:
                    raise RuntimeError(f"candidate {candidate.lineage.id}: {result}")
                scores = check_scores(result["scores"], n_examples)
                n_examples = scores.shape[0]
                strategy.tell(candidate, scores)
                busy += result["seconds"]
            durations += [r["seconds"] for r in results]
            generations.append(len(generation))
            passes += len(generation)
        wall = time.perf_counter() - ready
    finally:
        for handle in handles:
            ray.kill(handle, no_restart=True)
    test = parts.executor.score(strategy.best().genome, "test")
    return {
        "workers": workers,
        "method": "barrier",
        "evals": passes,
        "start_s": round(ready - start, 2),
        "wall_s": round(wall, 3),
        "evals_per_s": round(passes / wall, 3),
        "efficiency": round(busy / (workers * wall), 4),
        "ideal": round(ideal_efficiency(durations, workers, generations), 4),
        "busy_s": round(busy, 3),
        "best_train": strategy.stats()["best"],
        "test": test,
        "bytes_per_candidate": None,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'workers':>7} | {'method':<18} | {'evals':>5} | {'start s':>7} | {'wall s':>7} | {'evals/s':>7} | "
    )
    header += f"{'efficiency':>10} | {'ideal':>6} | {'best':>6} | {'test':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['workers']:>7} | {r['method']:<18} | {r['evals']:>5} | {r['start_s']:>7.1f} | {r['wall_s']:>7.2f} | "
            f"{r['evals_per_s']:>7.2f} | {r['efficiency']:>10.1%} | {r['ideal']:>6.1%} | "
            f"{r['best_train']:>6.3f} | {r['test'] if r['test'] is None else format(r['test'], '6.3f'):>6}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="worker counts")
    parser.add_argument("--evals-per-worker", type=int, default=60, help="budget = workers x this")
    parser.add_argument("--mean-s", type=float, default=0.5, help="mean seconds per evaluation")
    parser.add_argument("--sigma", type=float, default=0.75, help="log-std of the lognormal cost")
    parser.add_argument("--cma-popsize", type=int, default=None, help="CMA-ES popsize (default max(W, 2))")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument(
        "--lookahead",
        type=int,
        default=1,
        help="M2N2 rows: candidates asked ahead = W x this (executor.lookahead)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, help="write the rows and settings to this JSON file")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(  # the workers import this checkout's hf_m2n2
        p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p
    )
    logging.basicConfig(level=logging.WARNING)
    import ray

    began = time.perf_counter()
    ray.init(
        num_cpus=max(args.workers) + 2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="executor-bench-") as tmp:
            for workers in args.workers:
                for method in args.methods:
                    scratch = Path(tmp) / f"{method}-{workers}"
                    scratch.mkdir()
                    if method == "barrier":
                        row = run_barrier(args, workers, scratch)
                    else:
                        row = run_pipeline(args, workers, method, scratch)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    total = time.perf_counter() - began
    print(
        f"\ntimed fitness: lognormal cost, mean {args.mean_s} s, sigma {args.sigma}; budget = W x {args.evals_per_worker}"
    )
    print(
        "efficiency = worker busy s / (W x wall since the workers were ready): RayExecutor.stats() utilization"
    )
    print(
        "ideal = a zero-overhead scheduler on the same durations: what the strategy's start, the budget's drain"
    )
    print("and the generation barriers cost (efficiency below ideal = the scheduler's own overhead)\n")
    print_table(rows)
    print(f"\nbench wall time {total:.0f} s; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")
    if args.out:
        result = {
            "settings": {
                **vars(args),
                "out": str(args.out),
                "genome_size": GENOME_SIZE,
                "examples": EXAMPLES,
            },
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
            "bench_wall_s": round(total, 1),
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
