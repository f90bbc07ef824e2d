"""Benchmark `hf-m2n2 merge` against mergekit on synthetic Llama-shaped checkpoints.

What it measures, and how:

* Inputs: `bench/synthetic.py` builds a base model and two sparse-delta fine-tunes (bf16, sharded safetensors,
  Hub layout) under `--work` (default `$TMPDIR or /tmp`/hf_m2n2_bench), once per size; later runs reuse them.
* Configs: one mergekit YAML per method (linear, slerp, ties, dare_ties, task_arithmetic), `dtype: bfloat16`.
* Machine bound: the page-cache read throughput (reading the input shards after a warm-up pass), the write
  throughput of a file of the output's size followed by fsync, and the in-memory tensor copy throughput. The bound
  for a method with K input models of S bytes each is  K*S/read + S/write_fsync  seconds (I/O only, no overlap;
  the copy throughput is reported as a sanity reference for the compute floor).
* Each merge runs as a child of a small spawner process (so the child's ru_maxrss is not inflated by this
  process's own RSS, which Linux carries across fork+exec); wall time is measured around it, peak RSS is the
  kernel's ru_maxrss of the child (os.wait4: the high-water mark of its largest process, counting every resident
  page: private memory, shared libraries and touched mmap'd files), and the process tree's RssAnon (private memory)
  and RssFile (mapped files: shared libraries, mmap'd safetensors) are sampled from /proc every 50 ms.
* Inputs are page-cache warm (one read pass before timing; the page cache cannot be dropped without privileges).
  Before each run the previous output is removed and `sync` is called, so write-back does not leak across runs.
* Write-back: right after each run, `sync` is timed. hf-m2n2 writes its shards with O_DIRECT or fsync, so its
  output is on disk when it exits (the sync finds ~nothing to do); mergekit 0.1.5 leaves its output in the page
  cache. "wall+sync" (the time until the output is durable) is printed beside the wall time for both tools; the
  targets are on the wall time.
* Runs alternate ours, mergekit, ours, mergekit, ... (`--repeats N`); the median wall time and max peak RSS are
  reported, with the ratios ours/mergekit and the per-tensor differences between the two outputs (read lazily with
  safe_open and compared in float32: max abs diff, max symmetric relative error |a-b|/max(|a|,|b|), the number of
  elements that differ, and by more than one bf16 ulp). dare_ties is randomized: the two tools use different
  RNGs, so its element-wise differences are expected.
* Targets (for --size medium): wall <= 0.5x mergekit and peak RSS <= 0.5x mergekit for every method, wall <= 1.5x
  the bound for linear, slerp and task_arithmetic. Wall times include interpreter + torch import (printed), and
  mergekit 0.1.5 does not fsync its output while the bound does.

Usage:
    python bench/merge_bench.py --size tiny                 # ours and mergekit (when found)
    python bench/merge_bench.py --size small --only mergekit --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import LlamaShape, build_synthetic_llama, default_heads, param_count  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("linear", "slerp", "ties", "dare_ties", "task_arithmetic")
BOUND_TARGET_METHODS = ("linear", "slerp", "task_arithmetic")
RANDOMIZED = ("dare_ties",)
MB = 1024 * 1024

SIZES: dict[str, dict[str, int]] = {
    # ~5.3M params, 10.5 MB per model, 3 shards
    "tiny": dict(hidden=256, intermediate=688, layers=4, vocab=4096, shard_bytes=4_000_000),
    # ~120M params, 240 MB per model, 3 shards
    "small": dict(hidden=768, intermediate=2048, layers=10, vocab=32000, shard_bytes=100_000_000),
    # ~953M params, 1.9 GB per model, 4 shards
    "medium": dict(hidden=2048, intermediate=5632, layers=16, vocab=32000, shard_bytes=500_000_000),
}


# ----------------------------------------------------------------------------------------------- configs


def method_config(method: str, models: list[Path]) -> tuple[str, int]:
    """mergekit YAML for `method` over base=models[0] and fine-tunes models[1:], and its number of inputs."""
    base, ft1, ft2 = (str(m) for m in models[:3])
    if method == "linear":
        body = f"models:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n"
        k = 2
    elif method == "slerp":
        body = f"models:\n  - model: {base}\n  - model: {ft1}\nbase_model: {base}\nparameters:\n  t: 0.5\n"
        k = 2
    elif method in ("ties", "dare_ties", "task_arithmetic"):
        p = "{weight: 0.5}" if method == "task_arithmetic" else "{weight: 0.5, density: 0.5}"
        body = (
            f"models:\n  - model: {base}\n  - model: {ft1}\n    parameters: {p}\n"
            f"  - model: {ft2}\n    parameters: {p}\nbase_model: {base}\n"
        )
        k = 3
    else:
        raise ValueError(f"unknown method {method}")
    return f"merge_method: {method}\n{body}dtype: bfloat16\n", k


# ----------------------------------------------------------------------------------------------- machine bound


@dataclass
class MachineBound:
    read_gbps: float  # page-cache read of the input shards
    write_gbps: float  # write of an output-sized file, before fsync
    write_fsync_gbps: float  # same, including fsync
    copy_gbps: float  # torch bf16 tensor copy (bytes copied per second)

    def bound_s(self, k: int, model_bytes: int) -> float:
        return k * model_bytes / (self.read_gbps * 1e9) + model_bytes / (self.write_fsync_gbps * 1e9)


def read_files(paths: list[Path], buf: bytearray) -> int:
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def measure_read_gbps(paths: list[Path], min_s: float = 0.5) -> float:
    """Page-cache read throughput: one untimed warm-up pass, then timed passes for at least `min_s`."""
    buf = bytearray(8 * MB)
    read_files(paths, buf)
    total, t0 = 0, time.perf_counter()
    while True:
        total += read_files(paths, buf)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return total / elapsed / 1e9


def measure_write_gbps(directory: Path, nbytes: int) -> tuple[float, float]:
    """Write `nbytes` to a new file in `directory`; return (GB/s before fsync, GB/s including fsync)."""
    chunk = memoryview(os.urandom(8 * MB))
    path = directory / "write_probe.bin"
    os.sync()
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
        t_write = time.perf_counter() - t0
        os.fsync(f.fileno())
    t_fsync = time.perf_counter() - t0
    path.unlink()
    return nbytes / t_write / 1e9, nbytes / t_fsync / 1e9


def measure_copy_gbps(nbytes: int = 256 * MB, min_s: float = 0.3) -> float:
    """bf16 tensor copy throughput on buffers larger than the CPU caches (bytes copied per second)."""
    n = nbytes // 2
    src = torch.randn(n).to(torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    total, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_s:
        dst.copy_(src)
        total += 2 * n
    return total / elapsed / 1e9


# ----------------------------------------------------------------------------------------------- child runs


@dataclass
class Measure:
    wall_s: float
    peak_rss_mb: float  # ru_maxrss of the child (exact high-water mark, largest process of the tree)
    peak_anon_mb: float  # sampled max of the tree's RssAnon (private memory)
    peak_file_mb: float  # sampled max of the tree's RssFile (shared libraries, mmap'd inputs)
    returncode: int


@dataclass
class Run(Measure):
    writeback_s: float = 0.0  # `sync` right after the run: the tool's output still in the page cache
    tool: str = ""
    method: str = ""
    repeat: int = 0
    log: str = ""


def _tree(pid: int) -> list[int]:
    """pid and its descendants, via /proc/PID/task/TID/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _rss_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of `pid` in kB, from /proc/PID/status; zeros once it is gone."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1])
    except OSError:
        pass
    return anon, file


# Runs the command from a fresh small process: Linux keeps the pre-exec high-water mark in ru_maxrss, so a child
# spawned directly by this (large, torch-importing) process would report at least this process's RSS.
_SPAWNER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}, f)
"""


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str]) -> Measure:
    """Run `cmd` with stdout and stderr to `log_path`; measure wall time and memory.

    `cmd` runs under a small spawner process (python -c, ~10 MB) that reports wall time and the child's rusage;
    ru_maxrss therefore has a floor of the spawner's RSS. RssAnon/RssFile are sampled over the spawner's
    descendants every 50 ms.
    """
    peak_anon = peak_file = 0
    done = threading.Event()
    result_path = log_path.with_suffix(".rusage.json")
    result_path.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SPAWNER, str(result_path), *cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

        def sample() -> None:
            nonlocal peak_anon, peak_file
            while not done.is_set():
                sizes = [_rss_kb(p) for p in _tree(proc.pid)[1:]]
                peak_anon = max(peak_anon, sum(a for a, _ in sizes))
                peak_file = max(peak_file, sum(f for _, f in sizes))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        done.set()
        sampler.join()
    try:
        r = json.loads(result_path.read_text())
    except (OSError, ValueError):
        r = {"wall_s": float("nan"), "maxrss_kb": float("nan"), "rc": proc.returncode or 1}
    return Measure(r["wall_s"], r["maxrss_kb"] / 1024, peak_anon / 1024, peak_file / 1024, r["rc"])


def ours_cmd(exe: str, config: Path, out: Path, shard: int, seed: int) -> list[str]:
    return [exe, "merge", str(config), str(out), "--overwrite", "--out-shard-size", str(shard),
            "--random-seed", str(seed), "--no-copy-tokenizer", "--quiet"]  # fmt: skip


def mergekit_cmd(exe: str, config: Path, out: Path, shard: int, seed: int) -> list[str]:
    return [exe, str(config), str(out), "--out-shard-size", str(shard), "--random-seed", str(seed),
            "--no-copy-tokenizer", "--lazy-unpickle", "--quiet"]  # fmt: skip


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1")
    return env


def torch_import_s(exe: str, env: dict[str, str]) -> float:
    """Wall time of `python -c "import torch"` with the tool's interpreter (a floor included in every merge)."""
    python = Path(exe).parent / "python"
    cmd = [str(python) if python.exists() else sys.executable, "-c", "import torch"]
    subprocess.run(cmd, env=env, check=False)  # warm-up
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=False)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- output diff


@dataclass
class Diff:
    n_tensors: int = 0
    n_elements: int = 0
    missing_in_ours: list[str] = field(default_factory=list)
    missing_in_mergekit: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # shape or dtype
    max_abs: float = 0.0
    max_abs_tensor: str = ""
    max_rel: float = 0.0
    max_rel_tensor: str = ""
    n_diff: int = 0  # elements not bit-identical
    n_diff_gt_1ulp: int = 0  # elements more than one bf16 ulp apart
    max_ulp: int = 0
    n_tensors_diff: int = 0


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


def _bf16_ordered(t: torch.Tensor) -> torch.Tensor:
    """Map bf16 bit patterns to integers ordered like the values (adjacent floats differ by 1)."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -32768 - bits, bits)


def compare_outputs(ours: Path, ref: Path) -> Diff:
    a_files, b_files = weight_files(ours), weight_files(ref)
    d = Diff(
        missing_in_ours=sorted(set(b_files) - set(a_files)),
        missing_in_mergekit=sorted(set(a_files) - set(b_files)),
    )
    for name in sorted(set(a_files) & set(b_files)):
        with safe_open(a_files[name], "pt") as fa, safe_open(b_files[name], "pt") as fb:
            a, b = fa.get_tensor(name), fb.get_tensor(name)
        d.n_tensors += 1
        if a.shape != b.shape or a.dtype != b.dtype:
            d.mismatched.append(f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
            continue
        d.n_elements += a.numel()
        af, bf = a.float(), b.float()
        diff = (af - bf).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        denom = torch.maximum(af.abs(), bf.abs())
        rel = torch.where(denom > 0, diff / denom, torch.zeros_like(diff))
        max_rel = float(rel.max()) if rel.numel() else 0.0
        bits_a, bits_b = (a.view(torch.int16), b.view(torch.int16)) if a.element_size() == 2 else (a, b)
        n_diff = int((bits_a != bits_b).sum())
        d.n_diff += n_diff
        d.n_tensors_diff += n_diff > 0
        if a.dtype == torch.bfloat16:
            ulp = (_bf16_ordered(a) - _bf16_ordered(b)).abs()
            d.n_diff_gt_1ulp += int((ulp > 1).sum())
            d.max_ulp = max(d.max_ulp, int(ulp.max()) if ulp.numel() else 0)
        if max_abs > d.max_abs or not d.max_abs_tensor:
            d.max_abs, d.max_abs_tensor = max_abs, name
        if max_rel > d.max_rel or not d.max_rel_tensor:
            d.max_rel, d.max_rel_tensor = max_rel, name
    return d


# ----------------------------------------------------------------------------------------------- main


@dataclass
class MethodResult:
    method: str
    k_inputs: int
    bound_s: float
    ours_wall_s: float | None = None
    ours_rss_mb: float | None = None
    ours_anon_mb: float | None = None
    ours_file_mb: float | None = None
    mergekit_wall_s: float | None = None
    ours_durable_s: float | None = None  # wall + the sync after it (median)
    mergekit_durable_s: float | None = None
    mergekit_rss_mb: float | None = None
    mergekit_anon_mb: float | None = None
    mergekit_file_mb: float | None = None
    diff: Diff | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def wall_ratio(self) -> float | None:
        return _ratio(self.ours_wall_s, self.mergekit_wall_s)

    @property
    def durable_ratio(self) -> float | None:
        return _ratio(self.ours_durable_s, self.mergekit_durable_s)

    @property
    def rss_ratio(self) -> float | None:
        return _ratio(self.ours_rss_mb, self.mergekit_rss_mb)

    @property
    def ours_over_bound(self) -> float | None:
        return _ratio(self.ours_wall_s, self.bound_s)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def find_ours(arg: str | None) -> str | None:
    for cand in (arg, str(REPO / ".venv/bin/hf-m2n2"), shutil.which("hf-m2n2")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def find_mergekit(arg: str | None) -> str | None:
    for cand in (arg, shutil.which("mergekit-yaml"), str(REPO / ".venv-mergekit/bin/mergekit-yaml")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size", choices=list(SIZES), default="tiny", help="~5M, ~120M or ~1B params (default: %(default)s)"
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("TMPDIR") or "/tmp") / "hf_m2n2_bench",
        help="models, configs and outputs go here, never inside the repo (default: %(default)s)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per tool and method, alternating (default: 1)"
    )
    p.add_argument("--only", choices=("ours", "mergekit"), help="run only one tool")
    p.add_argument("--ours", help="hf-m2n2 executable (default: .venv/bin/hf-m2n2, then PATH)")
    p.add_argument("--mergekit", help="mergekit-yaml executable (default: PATH, then .venv-mergekit/bin)")
    p.add_argument(
        "--out-shard-size",
        type=int,
        help="passed to both tools (mergekit counts bytes; default: input shard bytes)",
    )
    p.add_argument("--seed", type=int, default=0, help="synthetic weights and --random-seed")
    p.add_argument(
        "--keep-outputs", action="store_true", help="keep the merged outputs (WORK/SIZE/runs/METHOD/out_TOOL)"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    if args.work == REPO or REPO in args.work.parents:
        p.error(f"--work {args.work} is inside the repository; use a directory outside it")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)} (known: {', '.join(METHODS)})")
    return args


def model_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def check_disk(work: Path, size: dict[str, int]) -> None:
    """Need 3 inputs + 2 outputs + the write probe, with 10% headroom."""
    shape = LlamaShape(size["hidden"], size["intermediate"], size["layers"], size["vocab"],
                       default_heads(size["hidden"]), default_heads(size["hidden"]))  # fmt: skip
    need = int(param_count(shape) * 2 * 6 * 1.1)
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"not enough disk space in {work}: need ~{need / 1e9:.1f} GB, have {free / 1e9:.1f} GB")


def run_tool(
    tool: str, exe: str, method: str, rep: int, config: Path, out: Path, args: argparse.Namespace, shard: int
) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    make = ours_cmd if tool == "ours" else mergekit_cmd
    log = out.parent / f"{tool}.log"
    m = run_measured(make(exe, config, out, shard, args.seed), log, child_env())
    start = time.perf_counter()
    os.sync()
    writeback = time.perf_counter() - start
    status = "ok" if m.returncode == 0 else f"FAILED rc={m.returncode}, log {log}"
    print(
        f"  {method:16s} {tool:9s} #{rep}  {m.wall_s:7.2f} s  (+ sync {writeback:5.2f} s)  peak RSS"
        f" {m.peak_rss_mb:7.0f} MB  (anon {m.peak_anon_mb:6.0f} MB, file {m.peak_file_mb:6.0f} MB)  {status}",
        flush=True,
    )
    if m.returncode:
        print("    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
    return Run(**asdict(m), writeback_s=writeback, tool=tool, method=method, repeat=rep, log=str(log))


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


PERF_COLUMNS: list[tuple[str, str, str]] = [  # header, MethodResult attribute, format
    ("bound s", "bound_s", ".2f"),
    ("ours s", "ours_wall_s", ".2f"),
    ("mk s", "mergekit_wall_s", ".2f"),
    ("wall o/m", "wall_ratio", ".2f"),
    ("o+sync s", "ours_durable_s", ".2f"),
    ("mk+sync s", "mergekit_durable_s", ".2f"),
    ("sync o/m", "durable_ratio", ".2f"),
    ("o/bound", "ours_over_bound", ".2f"),
    ("ours RSS", "ours_rss_mb", ".0f"),
    ("mk RSS", "mergekit_rss_mb", ".0f"),
    ("RSS o/m", "rss_ratio", ".2f"),
    ("ours anon", "ours_anon_mb", ".0f"),
    ("mk anon", "mergekit_anon_mb", ".0f"),
    ("ours file", "ours_file_mb", ".0f"),
    ("mk file", "mergekit_file_mb", ".0f"),
]


def print_tables(results: list[MethodResult], size: str) -> None:
    print("\nResults (inputs page-cache warm; wall = median of repeats; memory in MB = max of repeats;")
    print("RSS = ru_maxrss, anon/file = sampled peak RssAnon/RssFile; o/m = ours/mergekit;")
    print("+sync = wall + the sync right after the run: until the output is on disk)")
    hdr = f"{'method':16s} {'K':>2s} " + " ".join(f"{h:>9s}" for h, _, _ in PERF_COLUMNS)
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        cells = " ".join(f"{fmt(getattr(r, attr), spec):>9s}" for _, attr, spec in PERF_COLUMNS)
        print(f"{r.method:16s} {r.k_inputs:2d} {cells}")
    diffs = [r for r in results if r.diff]
    if diffs:
        print("\nOutput differences, ours vs mergekit (float32; rel = |a-b|/max(|a|,|b|))")
        hdr = f"{'method':16s} {'max abs':>9s} {'worst tensor (abs)':40s} {'max rel':>8s} {'elems differ':>14s} {'>1 ulp':>12s} {'max ulp':>7s}"
        print(hdr)
        print("-" * len(hdr))
        for r in diffs:
            d = r.diff
            assert d is not None
            pct = 100 * d.n_diff / d.n_elements if d.n_elements else 0.0
            print(
                f"{r.method:16s} {d.max_abs:9.2e} {(d.max_abs_tensor if d.max_abs else '-')[-40:]:40s} {d.max_rel:8.2e} "
                f"{d.n_diff:>8d} {pct:4.1f}% {d.n_diff_gt_1ulp:>12d} {d.max_ulp:>7d}"
            )
            problems = d.missing_in_ours + d.missing_in_mergekit + d.mismatched
            if problems:
                print(f"    missing/mismatched tensors: {len(problems)}: {problems[:5]}")
            if r.method in RANDOMIZED:
                print("    (randomized method: different RNGs, element-wise differences are expected)")
    targets = [r for r in results if r.ours_wall_s is not None]
    if targets:
        print(
            f"\nTargets (defined for --size medium; this is {size}): wall <= 0.5x mergekit, RSS <= 0.5x mergekit, wall <= 1.5x bound for {'/'.join(BOUND_TARGET_METHODS)}"
        )
        for r in targets:
            checks = []
            if r.wall_ratio is not None:
                checks.append(f"wall {'PASS' if r.wall_ratio <= 0.5 else 'FAIL'} ({r.wall_ratio:.2f}x)")
            if r.rss_ratio is not None:
                checks.append(f"RSS {'PASS' if r.rss_ratio <= 0.5 else 'FAIL'} ({r.rss_ratio:.2f}x)")
            if r.method in BOUND_TARGET_METHODS and r.ours_over_bound is not None:
                checks.append(
                    f"bound {'PASS' if r.ours_over_bound <= 1.5 else 'FAIL'} ({r.ours_over_bound:.2f}x)"
                )
            print(f"  {r.method:16s} " + ", ".join(checks))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = SIZES[args.size]
    tools: dict[str, str] = {}
    if args.only != "mergekit":
        exe = find_ours(args.ours)
        if exe is None or subprocess.run([exe, "merge", "--help"], capture_output=True).returncode != 0:
            print(f"hf-m2n2 merge not available ({exe or 'not found'}); skipping ours")
        else:
            tools["ours"] = exe
    if args.only != "ours":
        exe = find_mergekit(args.mergekit)
        if exe is None:
            print("mergekit-yaml not found (PATH, .venv-mergekit/bin, --mergekit); skipping mergekit")
        else:
            tools["mergekit"] = exe
    if not tools:
        print("nothing to run")
        return 1

    data_dir = args.work / args.size
    data_dir.mkdir(parents=True, exist_ok=True)
    check_disk(args.work, size)
    shard_bytes = size["shard_bytes"]
    models = build_synthetic_llama(
        data_dir / "models", **{k: v for k, v in size.items() if k != "shard_bytes"},
        shard_bytes=shard_bytes, n_models=3, seed=args.seed,
    )  # fmt: skip
    s_bytes = model_bytes(models[0])
    out_shard = args.out_shard_size or shard_bytes
    marker = json.loads((data_dir / "models" / "synthetic_llama.json").read_text())
    print(
        f"size {args.size}: {marker['param_count'] / 1e6:.1f}M params, {s_bytes / 1e6:.1f} MB per model, models in {data_dir / 'models'}"
    )

    shards = [f for m in models for f in sorted(m.glob("*.safetensors"))]
    read = measure_read_gbps(shards)
    write, write_fsync = measure_write_gbps(data_dir, s_bytes)
    copy = measure_copy_gbps()
    machine = MachineBound(read, write, write_fsync, copy)
    env = child_env()
    startup = {tool: torch_import_s(exe, env) for tool, exe in tools.items()}
    print(
        f"machine: {os.cpu_count()} CPUs; page-cache read {read:.2f} GB/s, write {write:.2f} GB/s "
        f"({write_fsync:.2f} GB/s with fsync), tensor copy {copy:.2f} GB/s; "
        + "python+torch import "
        + ", ".join(f"{t} {s:.2f} s" for t, s in startup.items())
    )
    for tool, exe in tools.items():
        make = ours_cmd if tool == "ours" else mergekit_cmd
        print(f"{tool}: {' '.join(make(exe, Path('CONFIG'), Path('OUT'), out_shard, args.seed))}")
    print(
        f"bound = K x {s_bytes / 1e6:.0f} MB / read + {s_bytes / 1e6:.0f} MB / write_fsync; inputs are page-cache warm; --out-shard-size {out_shard}"
    )

    results: list[MethodResult] = []
    runs: list[Run] = []
    for method in args.methods:
        text, k = method_config(method, models)
        mdir = data_dir / "runs" / method
        mdir.mkdir(parents=True, exist_ok=True)
        config = mdir / f"{method}.yaml"
        config.write_text(text)
        res = MethodResult(method, k, machine.bound_s(k, s_bytes))
        mruns: dict[str, list[Run]] = {t: [] for t in tools}
        for rep in range(args.repeats):
            for tool, exe in tools.items():
                run = run_tool(tool, exe, method, rep, config, mdir / f"out_{tool}", args, out_shard)
                mruns[tool].append(run)
                runs.append(run)
        for tool, rs in mruns.items():
            ok = [r for r in rs if r.returncode == 0]
            if len(ok) != len(rs):
                res.errors.append(f"{tool}: {len(rs) - len(ok)} failed run(s), see {rs[-1].log}")
            if ok:
                setattr(res, f"{tool}_wall_s", statistics.median(r.wall_s for r in ok))
                setattr(res, f"{tool}_durable_s", statistics.median(r.wall_s + r.writeback_s for r in ok))
                setattr(res, f"{tool}_rss_mb", max(r.peak_rss_mb for r in ok))
                setattr(res, f"{tool}_anon_mb", max(r.peak_anon_mb for r in ok))
                setattr(res, f"{tool}_file_mb", max(r.peak_file_mb for r in ok))
        if (
            res.ours_wall_s is not None
            and res.mergekit_wall_s is not None
            and all(r.returncode == 0 for r in runs[-len(tools) :])
        ):
            res.diff = compare_outputs(mdir / "out_ours", mdir / "out_mergekit")
        if not args.keep_outputs:
            for tool in tools:
                shutil.rmtree(mdir / f"out_{tool}", ignore_errors=True)
        results.append(res)

    print_tables(results, args.size)
    for r in results:
        for e in r.errors:
            print(f"  {r.method}: {e}")
    if args.json:
        payload = {
            "size": args.size,
            "params": marker["param_count"],
            "model_bytes": s_bytes,
            "out_shard_size": out_shard,
            "repeats": args.repeats,
            "machine": {
                **asdict(machine),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "torch_import_s": startup,
            },
            "tools": tools,
            "inputs_page_cache_warm": True,
            "results": [
                {
                    **asdict(r),
                    "wall_ratio": r.wall_ratio,
                    "durable_ratio": r.durable_ratio,
                    "rss_ratio": r.rss_ratio,
                    "ours_over_bound": r.ours_over_bound,
                }
                for r in results
            ],
            "runs": [asdict(r) for r in runs],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(not r.errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
