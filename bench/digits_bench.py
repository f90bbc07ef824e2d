"""Benchmark the M2N2 evolution loop on the digits task against the machine's compute bound.

What it measures, and how (one torch thread, one BLAS thread, as `hf-m2n2 evolve` runs):

* fp32 matmul rate: a 1024 x 1024 x 1024 single-thread sgemm (best of 5 timings), and the rate of the digits
  MLP's first-layer shape (1437 x 64 @ 64 x 256).
* Compute bound of a run of B forward passes: B x 2 x 1437 x (64 x 256 + 256 x 10) FLOP (~54 MFLOP a pass, the
  two matmuls; bias, ReLU and argmax not counted) at the better of the two measured rates (the strictest bound;
  the 1024^3 rate swings with the other jobs on a shared machine, the small first-layer shape much less). The
  ratio against the bound at the 1024^3 sgemm rate alone (the issue's "measured fp32 matmul rate") is printed too.
* Evaluation floor: B x the time of one bare evaluation (`hf_m2n2.demo.tasks.digits.train_scores` on a fixed vector,
  best of 5 timings of 500 calls): what the forward passes alone cost, with the skinny second layer, ReLU and
  argmax included.
* The runs: `examples/digits/scratch/m2n2.yaml` (50,000 passes, mutation) and
  `examples/digits/pretrained/m2n2.yaml` (10,000 passes from the two pretrained seeds), through the same
  `start_runs` as `hf-m2n2 evolve` (no progress bar), in a temporary directory. Reported: the loop's wall time
  (from the run's summary: seeds already built), the process CPU time over the run, passes/s, the final test
  accuracy, and the ratios wall / compute bound and wall / evaluation floor. Target: wall <= 1.5 x the compute
  bound for the from-scratch run.
* The machine is shared: the 1-minute load average before and after each timing is printed; CPU time close to
  wall time means the run was not starved.

Usage:
    python bench/digits_bench.py                       # both runs (~1-2 minutes on 2 idle cores)
    python bench/digits_bench.py --scratch-budget 5000 --pretrained-budget 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SPECS = {
    "scratch": REPO / "examples/digits/scratch/m2n2.yaml",
    "pretrained": REPO / "examples/digits/pretrained/m2n2.yaml",
}


def _best_time(fn, calls: int, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def matmul_rates() -> dict[str, float]:
    """GFLOP/s of a 1024^3 sgemm and of the first layer's shape, one thread."""
    from hf_m2n2.demo.tasks import digits

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=generator), torch.randn(1024, 1024, generator=generator)
    square = 2 * 1024**3 / _best_time(lambda: torch.mm(a, b), 10)
    x = digits.load_data().x_train
    w = torch.randn(digits.INPUT_DIM, digits.HIDDEN_DIM, generator=generator)
    layer = 2 * x.shape[0] * digits.INPUT_DIM * digits.HIDDEN_DIM / _best_time(lambda: torch.mm(x, w), 500)
    return {"sgemm_1024_gflops": square / 1e9, "layer1_gflops": layer / 1e9}


def forward_flops() -> int:
    from hf_m2n2.demo.tasks import digits

    n = digits.load_data().x_train.shape[0]
    return 2 * n * (digits.INPUT_DIM * digits.HIDDEN_DIM + digits.HIDDEN_DIM * digits.OUTPUT_DIM)


def evaluation_time() -> float:
    """Seconds per bare evaluation of one candidate on the training set."""
    from hf_m2n2.demo.tasks import digits

    params = torch.randn(digits.NUM_PARAMS, generator=torch.Generator().manual_seed(1)) * 0.01
    return _best_time(lambda: digits.train_scores(params), 500)


def timed_run(setup: str, budget: int | None, work: Path) -> dict:
    """One run of the setup's M2N2 spec; returns its summary plus CPU time and load averages."""
    from hf_m2n2.evolve.runs import start_runs

    spec = yaml.safe_load(SPECS[setup].read_text())
    if budget is not None:
        spec["evolve"]["budget"] = budget
    spec_path = work / f"{setup}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    load_before = os.getloadavg()[0]
    cpu = time.process_time()
    wall = time.perf_counter()
    (summary,) = start_runs(spec_path, work / setup, progress=False)
    return {
        **summary,
        "total_wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scratch-budget", type=int, default=None, help="forward passes (default: spec, 50000)"
    )
    parser.add_argument(
        "--pretrained-budget", type=int, default=None, help="forward passes (default: spec, 10000)"
    )
    parser.add_argument("--only", choices=["scratch", "pretrained"], help="run one setup")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    rates = matmul_rates()
    flops = forward_flops()
    eval_s = evaluation_time()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(
        f"fp32 sgemm 1024^3: {rates['sgemm_1024_gflops']:.1f} GFLOP/s; first-layer shape: "
        f"{rates['layer1_gflops']:.1f} GFLOP/s; one forward pass: {flops / 1e6:.1f} MFLOP"
    )
    print(
        f"one bare evaluation (train_scores): {eval_s * 1e6:.0f} us "
        f"(bound from FLOPs: {flops / max(rates.values()) / 1e3:.0f} us)"
    )
    results = {"rates": rates, "forward_flops": flops, "evaluation_s": eval_s, "runs": {}}
    budgets = {"scratch": args.scratch_budget, "pretrained": args.pretrained_budget}
    with tempfile.TemporaryDirectory(prefix="hf_m2n2_digits_bench_") as tmp:
        for setup in ("scratch", "pretrained"):
            if args.only and setup != args.only:
                continue
            run = timed_run(setup, budgets[setup], Path(tmp))
            passes = run["forward_passes"]
            wall = run["timing"]["wall_time_s"]
            bound = passes * flops / (max(rates.values()) * 1e9)
            sgemm_bound = passes * flops / (rates["sgemm_1024_gflops"] * 1e9)
            floor = passes * eval_s
            run.update(
                compute_bound_s=bound,
                sgemm_bound_s=sgemm_bound,
                ratio_sgemm_bound=wall / sgemm_bound,
                evaluation_floor_s=floor,
                ratio_bound=wall / bound,
                ratio_floor=wall / floor,
            )
            results["runs"][setup] = run
            print(
                f"{setup:10s} {passes:6d} passes: {wall:6.1f} s wall ({passes / wall:5.0f} passes/s, "
                f"{run['cpu_s']:.1f} s CPU, load {run['load_before']:.1f}->{run['load_after']:.1f}); "
                f"compute bound {bound:5.1f} s -> {wall / bound:.2f}x (at the 1024^3 sgemm rate: "
                f"{sgemm_bound:5.1f} s -> {wall / sgemm_bound:.2f}x); evaluation floor {floor:5.1f} s -> "
                f"{wall / floor:.2f}x; test accuracy {run['test']:.4f} (best train {run['best_train']:.4f})"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
