"""What one text-to-image candidate costs to materialize at SDXL scale: a Blend of K SDXL UNets written into a
live pipeline's UNet, by the code `hf-m2n2 evolve` runs for every candidate.

    python bench/t2i_candidate_bench.py --threads 1                       # CPU, SDXL shapes, 2 seeds read per candidate
    python bench/t2i_candidate_bench.py --threads 1 --resident            # CPU, 2 seeds resident (~16 GB of RAM)
    python bench/t2i_candidate_bench.py --seeds 3 --resident --device cuda --unet-steps 5   # a GPU

On a small shared CPU use one torch thread: two on two shared cores made a candidate ~4x slower here.

What it does, and how:

* Seeds (`bench/sdxl_synthetic.py`, built once under `--work`, default `bench-data/` in the checkout, ignored by
  git; `--delete-data` removes them at the end): a base and two fine-tunes of SDXL base's UNet (2.57B parameters at
  `--scale 1`, 5.1 GB per UNet in float16 on disk), each a diffusers pipeline folder whose other components are
  tiny; the first K are the seeds.
* The evolve path, unchanged: `open_seeds` -> `LivePipeline` of seed 0 (the fixed seed) in `--dtype` on
  `--device` -> `SeedTensors` (`--resident`: the seeds' UNets held on the device in that dtype, as
  `genome.resident: true`; else read from the files per candidate, `resident: false`) -> `BlendTarget.write` of a
  Blend with `--segments` segments (random breakpoints at block boundaries, random convex coefficients per segment,
  one Blend per repeat so nothing is skipped as already written), which `materialize()`s every UNet tensor in
  place. One tensor per segment is then checked against the formula (so the figure is of the real write).
* Figures: seconds per candidate (each repeat, median), the one-off costs (building the live pipeline, loading the
  resident seeds, optionally the Gram prefix pass `--gram`), the peak resident memory while candidates are written
  (VmHWM reset before the first; on CUDA the peak allocated device memory), and the memory-bandwidth bound: K reads
  + 1 write of the live UNet's bytes at the copy bandwidth measured on the same device (`dst.copy_(src)`, bytes
  moved per second). Without `--resident` a candidate also reads K seeds' files (pread into fresh buffers, then a
  cast to `--dtype`): a read-only pass over the seeds is timed too, which is most of the difference.
* `--unet-steps N` times N denoising steps of the live UNet at `--resolution` (batch 2: classifier-free guidance),
  the unit of generation cost: a candidate's generation is about prompts x images x inference steps of them. Use it
  on a GPU; on a CPU one step at 1024x1024 takes minutes.

Memory: the live UNet (5.1 GB in bf16 at scale 1) plus, with `--resident`, K more; without it, the page cache holds
the K seed files if it can. The script reads MemAvailable (CPU) first and stops with a line saying what it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from materialize_bench import copy_bandwidth, sync  # noqa: E402
from sdxl_synthetic import build_sdxl_seeds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's hf_m2n2
    sys.path.insert(0, str(REPO))

from hf_m2n2.blend import Blend, SeedLayout  # noqa: E402

N_MODELS = 3  # the data always holds 3 seeds; --seeds takes the first K
GB = 1e9


def random_blend(layout: SeedLayout, num_seeds: int, segments: int, seed: int) -> Blend:
    """A Blend of `segments` segments: breakpoints at random block boundaries, convex coefficients per segment
    (what M2N2's archive holds after some crossovers: split points from every ancestor, mixed weights)."""
    rng = np.random.default_rng(seed)
    segments = max(1, min(segments, layout.num_blocks))
    inner = np.sort(rng.choice(np.arange(1, layout.num_blocks), size=segments - 1, replace=False))
    breakpoints = np.concatenate([[0], inner, [layout.num_blocks]]).astype(np.int64)
    return Blend(breakpoints, rng.dirichlet(np.ones(num_seeds), size=segments))


def check_segments(blend: Blend, layout: SeedLayout, live, tensors) -> int:
    """For the first tensor lying inside each segment, the live tensor must equal sum_k C[j, k] seed_k evaluated
    left to right in the live dtype (the arithmetic evolve and export share), computed here apart from
    `blend_tensor`. Returns the tensors checked.

    Raises:
        AssertionError: a live tensor differs.
    """
    checked = 0
    for j in range(len(blend.coefs)):
        start, end = blend.breakpoints[j], blend.breakpoints[j + 1]
        t = next(
            (t for t in layout.tensors if start <= t.first_block and t.first_block + t.num_blocks <= end),
            None,
        )
        if t is None:
            continue
        coefs = [float(c) for c in blend.coefs[j]]
        expected = tensors.get(0, t.name) * coefs[0]
        for k in range(1, len(coefs)):
            expected.add_(tensors.get(k, t.name), alpha=coefs[k])
        assert torch.equal(live.tensor(t.name), expected.view(t.shape)), f"{t.name}: not the segment's blend"
        checked += 1
    return checked


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM of this process (`echo 5 > /proc/self/clear_refs`); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def unet_step_seconds(
    unet, steps: int, resolution: int, device: torch.device, dtype: torch.dtype
) -> list[float]:
    """Seconds per denoising step of an SDXL UNet at `resolution` with batch 2 (the two halves of classifier-free
    guidance), on random inputs of SDXL's conditioning shapes."""
    config = unet.config
    g = torch.Generator(device="cpu").manual_seed(0)
    side = resolution // 8  # the VAE's downsampling

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    latents = rand(2, config.in_channels, side, side)
    text = rand(2, 77, config.cross_attention_dim)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {
        "text_embeds": rand(2, pooled),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2).to(
            device, dtype
        ),
    }
    times = []
    with torch.no_grad():
        for i in range(steps + 1):  # the first is a warm-up
            sync(device)
            t0 = time.perf_counter()
            unet(latents, torch.tensor(999 - i, device=device), text, added_cond_kwargs=added)
            sync(device)
            times.append(time.perf_counter() - t0)
    return times[1:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="UNet size as a fraction of SDXL base's")
    parser.add_argument("--seeds", type=int, default=2, choices=(2, 3), help="K, the seeds blended")
    parser.add_argument("--segments", type=int, default=16, help="segments of each candidate Blend")
    parser.add_argument("--block-size", type=int, default=1 << 20, help="genome.block_size")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--resident", action="store_true", help="hold the seeds on the device (resident: true)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="candidates timed")
    parser.add_argument("--gram", action="store_true", help="also time the one-off Gram prefix pass")
    parser.add_argument("--unet-steps", type=int, default=0, help="time this many UNet steps at --resolution")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=REPO / "bench-data", help="where the seeds are built")
    parser.add_argument("--delete-data", action="store_true", help="remove the built seeds at the end")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--bandwidth-mb", type=int, default=512, help="buffer size of the copy-bandwidth probe"
    )
    parser.add_argument("--force", action="store_true", help="run even if MemAvailable looks too small")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--config", type=Path, help=argparse.SUPPRESS
    )  # tests: a small SDXL-family UNet config
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from hf_m2n2.blend_ops import BlendTarget, SeedTensors, evolved_layout, seed_gram
    from hf_m2n2.live_pipeline import LivePipeline
    from hf_m2n2.plan import torch_dtype
    from hf_m2n2.seeds import close_seeds, open_seeds

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    config = json.loads(args.config.read_text()) if args.config else None
    data = args.work / "t2i_sdxl" / (f"scale{args.scale}" if config is None else "custom")
    data.parent.mkdir(parents=True, exist_ok=True)
    built = build_sdxl_seeds(data, args.scale, n_models=N_MODELS, sgm=False, config=config)
    k = args.seeds
    live_bytes = built.params * dtype.itemsize
    need = live_bytes * (1 + (k if args.resident else 0))
    available = mem_available_bytes()
    if device.type == "cpu" and available is not None and need > available - (1 << 30) and not args.force:
        raise SystemExit(
            f"needs ~{need / GB:.1f} GB of RAM ({'live + resident seeds' if args.resident else 'the live UNet'}), "
            f"MemAvailable is {available / GB:.1f} GB: free memory, use fewer seeds or --scale, or --force"
        )
    print(
        f"SDXL UNet x{args.scale}: {built.params / 1e9:.3f}B parameters, {live_bytes / GB:.2f} GB in {args.dtype}; "
        f"K={k} seeds {'resident on ' + str(device) if args.resident else 'read per candidate'}; device {device}, "
        f"{torch.get_num_threads()} torch threads"
    )
    seeds = open_seeds([str(f) for f in built.folders[:k]])
    try:
        names = [n for n in seeds[0].checkpoint.names if n.startswith("unet/")]
        layout = evolved_layout(seeds, names, args.block_size)
        t0 = time.perf_counter()
        live = LivePipeline(seeds[0], dtype=dtype, device=device)
        live_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tensors = SeedTensors(seeds, names, dtype, device, args.resident)
        sync(device)
        resident_s = time.perf_counter() - t0
        gram_s = None
        if args.gram:
            t0 = time.perf_counter()
            seed_gram(layout, tensors, None)
            gram_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for name in names:  # what reading the seeds costs a candidate, without the blend
            for i in range(k):
                tensors.get(i, name)
        sync(device)
        read_s = time.perf_counter() - t0

        target = BlendTarget(layout, tensors, live)
        rss_reset = reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, checked = [], 0
        for r in range(args.repeats):
            blend = random_blend(layout, k, args.segments, seed=r)
            sync(device)
            t0 = time.perf_counter()
            target.write(blend)
            sync(device)
            times.append(time.perf_counter() - t0)
            checked = check_segments(blend, layout, live, tensors)
        peak_rss_kb = proc_status_kb("VmHWM")
        peak_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        bandwidth = copy_bandwidth(device, args.bandwidth_mb << 20)
        bound_s = (k + 1) * live_bytes / bandwidth
        step_s = (
            unet_step_seconds(live.components["unet"], args.unet_steps, args.resolution, device, dtype)
            if args.unet_steps
            else []
        )
    finally:
        close_seeds(seeds)
    median = statistics.median(times)
    result = {
        "scale": args.scale,
        "params": built.params,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "seeds": k,
        "resident": args.resident,
        "segments": args.segments,
        "block_size": args.block_size,
        "live_unet_gb": live_bytes / GB,
        "live_pipeline_s": live_s,
        "resident_load_s": resident_s if args.resident else None,
        "gram_s": gram_s,
        "seed_read_s": read_s,
        "candidate_s": times,
        "candidate_median_s": median,
        "segments_checked": checked,
        "copy_bandwidth_gbps": bandwidth / GB,
        "bound_s": bound_s,
        "fraction_of_bound": bound_s / median,
        "peak_rss_gb": peak_rss_kb * 1024 / GB if peak_rss_kb is not None and rss_reset else None,
        "peak_device_gb": peak_device / GB if peak_device is not None else None,
        "unet_step_s": step_s,
        "resolution": args.resolution if step_s else None,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"one-off: live pipeline {live_s:.1f} s" + (f", resident seeds {resident_s:.1f} s" if args.resident else "")
          + (f", Gram prefix pass {gram_s:.1f} s" if gram_s is not None else ""))  # fmt: skip
    print(
        f"reading the K={k} seeds' UNets ({'resident' if args.resident else 'files -> ' + args.dtype}): {read_s:.2f} s"
    )
    print(
        f"candidate (Blend of {args.segments} segments into the live UNet): median {median:.2f} s of "
        f"{[round(t, 2) for t in times]}; {checked} segment tensors checked against the formula"
    )
    print(
        f"bound: {k} reads + 1 write of {live_bytes / GB:.2f} GB at {bandwidth / GB:.1f} GB/s (copy, bytes moved) = "
        f"{bound_s:.2f} s -> {100 * bound_s / median:.0f}% of bound"
    )
    if result["peak_rss_gb"] is not None:
        print(f"peak RSS while writing candidates: {result['peak_rss_gb']:.2f} GB")
    if peak_device is not None:
        print(f"peak device memory allocated: {peak_device / GB:.2f} GB")
    if step_s:
        print(
            f"UNet step at {args.resolution}x{args.resolution}, batch 2: median {statistics.median(step_s):.3f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.delete_data:
        shutil.rmtree(data)
    return result


if __name__ == "__main__":
    main()
