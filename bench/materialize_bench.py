"""Materialize a 2-seed Blend into a live Llama model, against the memory-bandwidth bound.

    python bench/materialize_bench.py [--size tiny|small|medium] [--device cpu|cuda] [--repeats 3]

Builds (or reuses) synthetic Llama-shaped bf16 checkpoints (`bench/synthetic.py`; medium is ~1B parameters),
keeps two seeds resident on the device, loads a LiveModel, and evolves a realistic Blend (a chain of SLERP
crossovers with split points, so tensors are cut into several segments). It then times writing every
parameter of the live model from the Blend (the per-candidate cost of evolution) and compares it with the
bound: K seed reads + 1 write of the model's bytes at the copy bandwidth this script measures on the same
device (a copy of B bytes moves 2B). Also prints the one-off Gram prefix-sum pass and bytes per Blend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import SIZES  # noqa: E402
from synthetic import build_synthetic_llama  # noqa: E402

from hf_m2n2.blend import Blend, SeedLayout, blend_tensor, crossover, gram_prefix  # noqa: E402
from hf_m2n2.checkpoint import Checkpoint  # noqa: E402
from hf_m2n2.live import LiveModel  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int = 512 << 20) -> float:
    """Bytes moved per second by `dst.copy_(src)` (reads + writes)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def evolved_blend(layout: SeedLayout, gram: np.ndarray, steps: int, seed: int) -> Blend:
    rng = np.random.default_rng(seed)
    archive = [Blend.seed(0, 2, layout.num_blocks), Blend.seed(1, 2, layout.num_blocks)]
    for _ in range(steps):
        i, j = rng.choice(len(archive), size=2, replace=False)
        split = layout.snap(rng.uniform(0, layout.num_params))
        archive = (archive + [crossover(archive[i], archive[j], rng.uniform(), split, gram, layout)])[-20:]
    return archive[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=1 << 16)
    parser.add_argument("--steps", type=int, default=50, help="crossovers behind the timed Blend")
    parser.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "hf_m2n2_bench"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = dict(SIZES[args.size])
    shard_bytes = size.pop("shard_bytes")
    # the same 3-model build as merge_bench.py (shared on disk); the first two are the seeds
    dirs = build_synthetic_llama(Path(args.work) / args.size, n_models=3, shard_bytes=shard_bytes, **size)[:2]

    t0 = time.perf_counter()
    ckpts = [Checkpoint(d) for d in dirs]
    seeds = [{n: c.get(n).to(device) for n in c.names} for c in ckpts]
    load_s = time.perf_counter() - t0
    names = list(seeds[0])
    layout = SeedLayout([(n, tuple(seeds[0][n].shape)) for n in names], args.block_size)
    t0 = time.perf_counter()
    gram = gram_prefix(layout, lambda k, name: seeds[k][name].cpu(), 2)
    gram_s = time.perf_counter() - t0
    blend = evolved_blend(layout, gram, args.steps, seed=0)

    live = LiveModel(dirs[0], dtype=torch.bfloat16, device=args.device)
    params = live.model.state_dict(keep_vars=True)
    model_bytes = sum(seeds[0][n].nbytes for n in names)
    times = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for t in layout.tensors:
                blend_tensor(blend, t, layout, [seeds[0][t.name], seeds[1][t.name]], out=params[t.name])
        sync(device)
        times.append(time.perf_counter() - start)
    bandwidth = copy_bandwidth(device)
    bound_s = 3 * model_bytes / bandwidth
    best = min(times)
    segments = len(blend.coefs)
    result = {
        "size": args.size,
        "device": str(device),
        "params": layout.num_params,
        "model_gb": model_bytes / 1e9,
        "segments": segments,
        "blend_bytes": blend.nbytes,
        "seed_load_s": load_s,
        "gram_pass_s": gram_s,
        "materialize_s": times,
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "bound_s": bound_s,
        "fraction_of_bound": bound_s / best,
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"{args.size}: {layout.num_params / 1e9:.2f}B params, {model_bytes / 1e9:.2f} GB bf16 per model, device {device}"
    )
    print(f"Blend after {args.steps} crossovers: {segments} segments, {blend.nbytes} bytes")
    print(f"one-off: seeds loaded in {load_s:.1f} s, Gram prefix pass {gram_s:.1f} s")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> bound (2 reads + 1 write) {bound_s:.3f} s")
    print(
        f"materialize: best {best:.3f} s of {[round(t, 3) for t in times]} -> {100 * bound_s / best:.0f}% of bound"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
