"""Benchmark `hf-m2n2 merge` of diffusers pipelines against sd-mecha on synthetic SDXL-shaped UNets.

What it measures, and how:

* Inputs (`bench/sdxl_synthetic.py`, built once per scale under `--work`, default `bench-data/` in the checkout,
  ignored by git): a base and two fine-tunes (base + dense Gaussian noise) of SDXL base's UNet, channel widths
  scaled to about `--scale` x its 2.57B parameters (1.0: the real shapes, 5.1 GB in float16), each written twice with the same float16 values: a
  diffusers pipeline folder (what hf-m2n2 reads; tiny consistent text encoders/VAE, only the UNet is merged) and
  an sgm single file `model.diffusion_model.*` (what sd-mecha reads: it reads only original-layout single files).
* Recipes, the same arithmetic on both sides (A = ft1, B = ft2, C = base; float32 math, float16 output):
    weighted_sum    0.7 A + 0.3 B         hf-m2n2 linear (weights 0.7, 0.3)   sd-mecha weighted_sum(A, B, 0.3)
    add_difference  A + 0.5 (B - C)       hf-m2n2 task_arithmetic, base C,    sd-mecha add_difference(A, B, C,
                                          weights A 1.0, B 0.5                 alpha=0.5)
    ties            C + TIES(A-C, B-C)    hf-m2n2 ties, density 0.3, lambda 1 sd-mecha subtract -> ties_sum(k=0.3,
                                          (normalize: disjoint mean)           vote_sgn=True) -> add_difference(1)
    slerp           slerp(A, B, 0.3)      hf-m2n2 slerp (base A, t 0.3)       sd-mecha slerp(A, B, alpha=0.3)
  TIES: both keep the largest |delta| per tensor, elect the sign of the summed deltas and average the agreeing
  ones; sd-mecha keeps |delta| >= the (1-k)n-th smallest (one element more than the top k n, and every tie at the
  cut-off), and where the kept deltas cancel exactly (sum 0: frequent with float16 inputs) it elects no sign and
  keeps the base, where hf-m2n2 (mergekit's rule) elects +. Elements there differ; the bench counts the differing
  elements outside those positions (`ties_tie_positions`), which should be none. slerp: sd-mecha interpolates the unit tensors and
  rescales by lerp(|A|, |B|, t); hf-m2n2 (as mergekit) combines the tensors themselves with the same sin weights
  (and lerps when cos > 0.9995): the formulas agree only when |A| = |B|, so slerp differences are expected.
* Page cache: the inputs of both tools (2 x K x UNet size) do not fit in memory at full scale, so by default
  (`--cache cold`) every run starts cold: `sync`, then POSIX_FADV_DONTNEED on every input file of both tools
  (evicts their clean pages; no privileges needed). `--cache warm` instead evicts everything and then reads the
  running tool's own inputs once before its run (the warm-up read). The I/O bound of a recipe with K inputs of S
  bytes is K S / read + S / write_fsync, with read measured in the same state (cold: read after eviction; warm:
  re-read from the page cache) and write_fsync measured by writing S bytes and fsync.
* Each merge runs under a small spawner process (bench/merge_bench.py's `run_measured`): wall time around it, peak
  RSS = the kernel's ru_maxrss of the child (largest process of the tree; every resident page, including touched
  mmap'd input pages), and the tree's RssAnon / RssFile sampled every 50 ms. After each run `sync` is timed
  (write-back left in the page cache; hf-m2n2 fsyncs its output, sd-mecha does not): "+sync" columns.
* Runs alternate hf-m2n2, sd-mecha, hf-m2n2, sd-mecha, ... (`--repeats N`); medians of wall time, max of memory.
  Then the two last outputs are compared tensor by tensor (sd-mecha's sgm keys mapped to diffusers names with the
  seeds' key map), in float32: max abs difference, elements not bit-identical, elements more than one float16 ulp
  apart; and both against the recipe's closed form (`FORMULAS`, in float32 from the seeds, on every
  `--formula-every`-th tensor), which tells which tool a difference comes from; then deleted (unless
  `--keep-outputs`).
* Targets (issue 15): hf-m2n2 peak RSS <= 1.5 GB (flat in model size), wall <= 0.5x sd-mecha's, values equal to
  sd-mecha's within float16 rounding (one ulp) for the deterministic linear recipes.

Usage:
    .venv/bin/python bench/pipeline_merge_bench.py --scale 0.05
    .venv/bin/python bench/pipeline_merge_bench.py --scale 1.0 --repeats 2 --formula-every 4 \
        --json bench-data/sdxl_full.json
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
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import Measure, child_env, measure_write_gbps, read_files, run_measured  # noqa: E402
from sdxl_synthetic import SdxlSeeds, build_sdxl_seeds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20
TOOLS = ("hf-m2n2", "sd-mecha")
ALPHA, DENSITY = 0.3, 0.3


@dataclass(frozen=True)
class Recipe:
    """One benchmark recipe: its inputs (indices into base, ft1, ft2), hf-m2n2 spec and sd-mecha arguments."""

    name: str
    inputs: tuple[int, ...]  # seed indices, in sd-mecha's argument order
    note: str = ""

    @property
    def k(self) -> int:
        return len(self.inputs)


BASE, FT1, FT2 = 0, 1, 2
RECIPES = {
    "weighted_sum": Recipe("weighted_sum", (FT1, FT2), "0.7 ft1 + 0.3 ft2"),
    "add_difference": Recipe("add_difference", (FT1, FT2, BASE), "ft1 + 0.5 (ft2 - base)"),
    "ties": Recipe("ties", (BASE, FT1, FT2), "base + TIES(ft1 - base, ft2 - base), k/density 0.3, lambda 1"),
    "slerp": Recipe("slerp", (FT1, FT2), "slerp(ft1, ft2, 0.3); formulas differ unless |ft1| = |ft2|"),
}
DETERMINISTIC_EQUAL = ("weighted_sum", "add_difference")  # same arithmetic: equal within float16 rounding


def hf_spec(recipe: str, folders: list[Path]) -> dict:
    """hf-m2n2's merge spec (mergekit YAML as a dict) for `recipe` over the seeds' folders."""
    base, ft1, ft2 = (str(f) for f in folders[:3])
    if recipe == "weighted_sum":
        body = {"merge_method": "linear", "models": [
            {"model": ft1, "parameters": {"weight": 1 - ALPHA}}, {"model": ft2, "parameters": {"weight": ALPHA}}]}  # fmt: skip
    elif recipe == "add_difference":
        body = {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": ft1, "parameters": {"weight": 1.0}}, {"model": ft2, "parameters": {"weight": 0.5}}]}  # fmt: skip
    elif recipe == "ties":
        p = {"weight": 1.0, "density": DENSITY}
        body = {"merge_method": "ties", "base_model": base, "parameters": {"lambda": 1.0},
                "models": [{"model": ft1, "parameters": p}, {"model": ft2, "parameters": p}]}  # fmt: skip
    elif recipe == "slerp":
        body = {"merge_method": "slerp", "base_model": ft1, "models": [{"model": ft1}, {"model": ft2}],
                "parameters": {"t": ALPHA}}  # fmt: skip
    else:
        raise ValueError(f"unknown recipe {recipe}")
    # sd-mecha's merge: float32 math, float16 output (`dtype` is hf-m2n2's compute dtype, as in mergekit)
    return {**body, "dtype": "float32", "out_dtype": "float16"}


def sdmecha_args(recipe: str, sgm: list[Path]) -> list[str]:
    """Arguments of bench/sdmecha_merge.py for `recipe` (after the output path)."""
    inputs = [str(sgm[i]) for i in RECIPES[recipe].inputs]
    alpha = {"weighted_sum": ALPHA, "add_difference": 0.5, "ties": 1.0, "slerp": ALPHA}[recipe]
    extra = ["--k", str(DENSITY)] if recipe == "ties" else []
    return [*inputs, "--alpha", str(alpha), *extra]


# ----------------------------------------------------------------------------------------------- page cache


def evict(paths: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (after a sync, so that dirty pages are clean)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_gbps(paths: list[Path], cold: bool) -> float:
    """Read throughput of `paths`: right after eviction (cold) or re-read from the page cache (warm)."""
    buf = bytearray(8 * MB)
    evict(paths)
    if not cold:
        read_files(paths, buf)
    start = time.perf_counter()
    total = read_files(paths, buf)
    return total / (time.perf_counter() - start) / 1e9


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class Run(Measure):
    tool: str = ""
    recipe: str = ""
    repeat: int = 0
    writeback_s: float = 0.0
    output_bytes: int = 0
    log: str = ""


_OURS = "import sys; from hf_m2n2.cli import main; sys.argv[0] = 'hf-m2n2'; sys.exit(main())"


def tool_command(tool: str, recipe: str, seeds: SdxlSeeds, out: Path, args: argparse.Namespace) -> list[str]:
    if tool == "hf-m2n2":
        spec = out.parent / f"{recipe}.json"  # JSON is YAML
        spec.write_text(json.dumps(hf_spec(recipe, seeds.folders), indent=1) + "\n")
        extra = ["--workers", str(args.workers)] if args.workers else []
        return [sys.executable, "-c", _OURS, "merge", str(spec), str(out), "--overwrite", "--quiet", *extra]
    script = str(Path(__file__).resolve().parent / "sdmecha_merge.py")
    extra = ["--threads", str(args.sdmecha_threads)] if args.sdmecha_threads else []
    return [args.sdmecha_python, script, recipe, str(out), *sdmecha_args(recipe, seeds.sgm_files), *extra]


def tool_inputs(tool: str, recipe: str, seeds: SdxlSeeds) -> list[Path]:
    if tool == "hf-m2n2":
        return [f for i in RECIPES[recipe].inputs for f in seeds.unet_files(i)]
    return [seeds.sgm_files[i] for i in RECIPES[recipe].inputs]


def output_path(tool: str, rdir: Path) -> Path:
    return rdir / ("out_hf-m2n2" if tool == "hf-m2n2" else "out_sd-mecha.safetensors")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_tool(tool: str, recipe: str, rep: int, seeds: SdxlSeeds, rdir: Path, args: argparse.Namespace) -> Run:
    out = output_path(tool, rdir)
    _remove(out)
    every_input = [p for t in TOOLS for p in tool_inputs(t, recipe, seeds)]
    evict(every_input)
    if args.cache == "warm":
        read_files(tool_inputs(tool, recipe, seeds), bytearray(8 * MB))
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log = rdir / f"{tool}.log"
    m = run_measured(tool_command(tool, recipe, seeds, out, args), log, env)
    start = time.perf_counter()
    os.sync()
    writeback = time.perf_counter() - start
    merged = (
        out / "unet" if tool == "hf-m2n2" else out
    )  # the merged UNet's bytes (hf-m2n2 writes a whole pipeline)
    size = _size(merged) if merged.exists() else 0
    status = "ok" if m.returncode == 0 else f"FAILED rc={m.returncode}, log {log}"
    print(
        f"  {recipe:15s} {tool:8s} #{rep}  {m.wall_s:8.2f} s (+ sync {writeback:5.2f} s)  peak RSS"
        f" {m.peak_rss_mb:7.0f} MB (anon {m.peak_anon_mb:6.0f}, file {m.peak_file_mb:6.0f})"
        f"  out {size / 1e9:.2f} GB  {status}",
        flush=True,
    )
    if m.returncode:
        print("    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
    return Run(
        **asdict(m),
        tool=tool,
        recipe=recipe,
        repeat=rep,
        writeback_s=writeback,
        output_bytes=size,
        log=str(log),
    )


# ----------------------------------------------------------------------------------------------- comparison


@dataclass
class Diff:
    n_tensors: int = 0
    n_elements: int = 0
    missing_in_ours: list[str] = field(default_factory=list)
    missing_in_sdmecha: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # shape or dtype
    max_abs: float = 0.0
    max_abs_tensor: str = ""
    n_diff: int = 0  # elements not bit-identical
    n_diff_gt_1ulp: int = 0  # elements more than one float16 ulp apart
    max_ulp: int = 0
    n_tensors_diff: int = 0
    # "TOOL vs FORMULA" -> [elements more than one ulp from the formula (float32, rounded to float16), max ulp]
    reference: dict[str, list[int]] = field(default_factory=dict)
    formula_tensors: int = 0  # tensors checked against the formulas (every `formula_every`-th)
    n_diff_off_cut: int | None = None  # TIES: differing elements outside `ties_tie_positions`


def _half_ordered(t: torch.Tensor) -> torch.Tensor:
    """float16 bit patterns as integers ordered like the values (adjacent floats differ by 1)."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -32768 - bits, bits)


def ulp_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    """(elements not bit-identical, elements more than one ulp apart, max ulps) of two float16 tensors."""
    differ = a.view(torch.int16) != b.view(torch.int16)
    n_diff = int(differ.sum())
    if not n_diff:
        return 0, 0, 0
    ulps = (_half_ordered(a[differ]) - _half_ordered(b[differ])).abs()
    return n_diff, int((ulps > 1).sum()), int(ulps.max())


def _slerp_mergekit(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """hf-m2n2's (and mergekit's) slerp: sin-weighted sum of the tensors themselves, lerp when near-parallel."""
    cos = float(torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = torch.tensor(cos, dtype=a.dtype).clamp(-1, 1).acos()
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def _slerp_sdmecha(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """sd-mecha's slerp: slerp of the unit tensors, rescaled by lerp(|a|, |b|, t); lerp where that gives NaN."""
    an, bn = a / a.norm(), b / b.norm()
    omega = (an * bn).sum().clamp(-1, 1).acos()
    out = (torch.sin((1 - t) * omega) * an + torch.sin(t * omega) * bn) / torch.sin(omega)
    out = out * torch.lerp(a.norm(), b.norm(), t)
    return torch.lerp(a, b, t) if out.isnan().any() else out


def _ties_cut(delta: torch.Tensor) -> torch.Tensor:
    """sd-mecha's TIES cut-off magnitude of one delta (it keeps |delta| >= this: ties at the cut all kept)."""
    index = max(int((1 - DENSITY) * delta.numel()), 1)
    return delta.abs().flatten().kthvalue(index).values


def _ties_sdmecha(x: list[torch.Tensor]) -> torch.Tensor:
    """sd-mecha's TIES (ties_sum with vote_sgn, then base + lambda 1 x the result) over base x[0], models x[1:]."""
    deltas = torch.stack([d * (d.abs() >= _ties_cut(d)) for d in (m - x[0] for m in x[1:])])
    agree = deltas.sign() == deltas.sum(0).sign()
    merged = (deltas * agree).sum(0) / agree.sum(0)
    return x[0] + torch.nan_to_num(merged, nan=0, posinf=0, neginf=0)


def ties_tie_positions(x: list[torch.Tensor]) -> torch.Tensor:
    """Elements where the two tools' TIES may legitimately differ: some model's |delta| lies between sd-mecha's
    cut-off (it keeps |delta| >= the int((1-k) n)-th smallest) and the top-k-n cut-off hf-m2n2 and mergekit use
    (inclusive: ties at either are kept or not), or the selected deltas cancel exactly (their sum is 0: sd-mecha
    elects no sign and writes the base, mergekit's rule elects +)."""
    mask = torch.zeros(x[0].shape, dtype=torch.bool)
    total = torch.zeros(x[0].shape, dtype=x[0].dtype)
    for m in x[1:]:
        delta = m - x[0]
        flat, n = delta.abs().flatten(), delta.numel()
        ranks = (max(int((1 - DENSITY) * n), 1), min(max(n - max(int(DENSITY * n), 1) + 1, 1), n))
        low, high = (flat.kthvalue(r).values for r in sorted(ranks))
        mask |= (delta.abs() >= low) & (delta.abs() <= high)
        total += delta * (delta.abs() >= _ties_cut(delta))
    return mask | (total == 0)


# Closed forms of the recipes over the inputs in sd-mecha's argument order, in float32 (the deltas of float16
# inputs are exact in it; its rounding is far below float16's, so a tool computing the formula in float32 is
# within one float16 ulp of it): the value each tool should give (TIES: sd-mecha's selection rule; hf-m2n2 keeps exactly the top density x n instead).
FORMULAS = {
    "weighted_sum": {"exact": lambda x: torch.lerp(x[0], x[1], ALPHA)},
    "add_difference": {"exact": lambda x: x[0] + 0.5 * (x[1] - x[2])},
    "slerp": {
        "hf-m2n2 formula": lambda x: _slerp_mergekit(x[0], x[1], ALPHA),
        "sd-mecha formula": lambda x: _slerp_sdmecha(x[0], x[1], ALPHA),
    },
    "ties": {"sd-mecha rule": _ties_sdmecha},
}


def compare_outputs(
    ours_dir: Path,
    sdmecha_file: Path,
    key_map: dict[str, str],
    inputs: list[Path] | None = None,
    recipe: str = "",
    formula_every: int = 1,
) -> Diff:
    """hf-m2n2's merged UNet (diffusers names) against sd-mecha's (sgm keys), tensor by tensor, in float32; with
    `inputs` (the recipe's seed UNet files, single-file diffusers layout), both against the recipe's FORMULAS on
    every `formula_every`-th tensor (by sorted name)."""
    formulas = FORMULAS.get(recipe, {}) if inputs else {}
    to_ours = {sgm: name for name, sgm in key_map.items()}
    with ExitStack() as stack:
        ours_files = [
            stack.enter_context(safe_open(f, "pt")) for f in sorted((ours_dir / "unet").glob("*.safetensors"))
        ]
        ours = {k: f for f in ours_files for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        theirs = stack.enter_context(safe_open(sdmecha_file, "pt"))
        theirs_named = {to_ours.get(k, f"(unmapped) {k}"): k for k in theirs.keys()}  # noqa: SIM118
        seeds = [stack.enter_context(safe_open(f, "pt")) for f in inputs or []] if formulas else []
        d = Diff(
            missing_in_ours=sorted(set(theirs_named) - set(ours)),
            missing_in_sdmecha=sorted(set(ours) - set(theirs_named)),
        )
        d.reference = {f"{tool} vs {label}": [0, 0] for label in formulas for tool in TOOLS}
        for index, name in enumerate(sorted(set(ours) & set(theirs_named))):
            a, b = ours[name].get_tensor(name), theirs.get_tensor(theirs_named[name])
            d.n_tensors += 1
            if a.shape != b.shape or a.dtype != b.dtype:
                d.mismatched.append(f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
                continue
            d.n_elements += a.numel()
            n_diff, n_far, worst = ulp_stats(a, b)
            d.n_diff += n_diff
            d.n_tensors_diff += n_diff > 0
            d.n_diff_gt_1ulp += n_far
            d.max_ulp = max(d.max_ulp, worst)
            if n_diff:
                max_abs = float((a.float() - b.float()).abs().max())
                if max_abs > d.max_abs:
                    d.max_abs, d.max_abs_tensor = max_abs, name
            if formulas and index % formula_every == 0:
                d.formula_tensors += 1
                x = [s.get_tensor(name).float() for s in seeds]
                for label, formula in formulas.items():
                    ref = formula(x).to(torch.float16)
                    for tool, out in zip(TOOLS, (a, b)):
                        _, n_far, worst = ulp_stats(out, ref)
                        counts = d.reference[f"{tool} vs {label}"]
                        counts[0] += n_far
                        counts[1] = max(counts[1], worst)
                if recipe == "ties" and n_diff:
                    differ = a.view(torch.int16) != b.view(torch.int16)
                    off_cut = int((differ & ~ties_tie_positions(x)).sum())
                    d.n_diff_off_cut = (d.n_diff_off_cut or 0) + off_cut
    return d


# ----------------------------------------------------------------------------------------------- results


@dataclass
class RecipeResult:
    recipe: str
    k_inputs: int
    bound_s: float
    wall_s: dict[str, float] = field(default_factory=dict)  # median
    durable_s: dict[str, float] = field(default_factory=dict)  # median of wall + sync
    rss_mb: dict[str, float] = field(default_factory=dict)  # max ru_maxrss
    anon_mb: dict[str, float] = field(default_factory=dict)
    file_mb: dict[str, float] = field(default_factory=dict)
    output_bytes: dict[str, int] = field(default_factory=dict)
    diff: Diff | None = None
    errors: list[str] = field(default_factory=list)

    def ratio(self, table: str) -> float | None:
        values = getattr(self, table)
        a, b = values.get("hf-m2n2"), values.get("sd-mecha")
        return a / b if a is not None and b else None

    @property
    def ours_over_bound(self) -> float | None:
        ours = self.wall_s.get("hf-m2n2")
        return ours / self.bound_s if ours is not None else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(results: list[RecipeResult], scale: float) -> None:
    print(
        "\nResults (wall = median of repeats, memory = max; RSS = ru_maxrss, anon/file = sampled RssAnon/RssFile;"
    )
    print(
        "o/m = hf-m2n2 / sd-mecha; +sync = wall + the sync right after the run: until the output is on disk)"
    )
    cols = [
        ("K", lambda r: str(r.k_inputs)),
        ("bound s", lambda r: fmt(r.bound_s)),
        ("ours s", lambda r: fmt(r.wall_s.get("hf-m2n2"))),
        ("mecha s", lambda r: fmt(r.wall_s.get("sd-mecha"))),
        ("wall o/m", lambda r: fmt(r.ratio("wall_s"))),
        ("o+sync s", lambda r: fmt(r.durable_s.get("hf-m2n2"))),
        ("m+sync s", lambda r: fmt(r.durable_s.get("sd-mecha"))),
        ("sync o/m", lambda r: fmt(r.ratio("durable_s"))),
        ("o/bound", lambda r: fmt(r.ours_over_bound)),
        ("ours RSS", lambda r: fmt(r.rss_mb.get("hf-m2n2"), ".0f")),
        ("mecha RSS", lambda r: fmt(r.rss_mb.get("sd-mecha"), ".0f")),
        ("RSS o/m", lambda r: fmt(r.ratio("rss_mb"))),
        ("ours anon", lambda r: fmt(r.anon_mb.get("hf-m2n2"), ".0f")),
        ("mecha anon", lambda r: fmt(r.anon_mb.get("sd-mecha"), ".0f")),
        ("ours file", lambda r: fmt(r.file_mb.get("hf-m2n2"), ".0f")),
        ("mecha file", lambda r: fmt(r.file_mb.get("sd-mecha"), ".0f")),
        ("UNet GB o", lambda r: fmt(r.output_bytes.get("hf-m2n2", 0) / 1e9 or None)),
        ("UNet GB m", lambda r: fmt(r.output_bytes.get("sd-mecha", 0) / 1e9 or None)),
    ]
    header = f"{'recipe':15s} " + " ".join(f"{h:>10s}" for h, _ in cols)
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.recipe:15s} " + " ".join(f"{get(r):>10s}" for _, get in cols))
    diffs = [r for r in results if r.diff]
    if diffs:
        print(
            "\nOutput differences, hf-m2n2 vs sd-mecha (UNet tensors, sgm keys mapped to diffusers names; float32)"
        )
        header = f"{'recipe':15s} {'tensors':>8s} {'max abs':>9s} {'worst tensor':45s} {'elems differ':>17s} {'>1 ulp':>10s} {'max ulp':>8s}"
        print(header)
        print("-" * len(header))
        for r in diffs:
            d = r.diff
            assert d is not None
            pct = 100 * d.n_diff / d.n_elements if d.n_elements else 0.0
            print(
                f"{r.recipe:15s} {d.n_tensors:8d} {d.max_abs:9.2e} {(d.max_abs_tensor if d.max_abs else '-')[-45:]:45s}"
                f" {d.n_diff:>10d} {pct:5.2f}% {d.n_diff_gt_1ulp:>10d} {d.max_ulp:>8d}"
            )
            for label, (n_bad, worst) in d.reference.items():
                print(
                    f"    {label:30s} {n_bad:>10d} elements > 1 ulp, max {worst} ulp ({d.formula_tensors} tensors)"
                )
            if d.n_diff_off_cut is not None:
                print(
                    f"    differing elements not at a selection cut-off or a sign tie (checked tensors): {d.n_diff_off_cut}"
                )
            problems = d.missing_in_ours + d.missing_in_sdmecha + d.mismatched
            if problems:
                print(f"    missing/mismatched tensors: {len(problems)}: {problems[:5]}")
            if r.recipe not in DETERMINISTIC_EQUAL:
                print(
                    f"    ({RECIPES[r.recipe].note}: see the module docstring for the expected differences)"
                )
    print(f"\nTargets (issue 15, for --scale 1.0; this is --scale {scale}): hf-m2n2 RSS <= 1.5 GB, wall <= 0.5x "
          f"sd-mecha, values within one float16 ulp for {'/'.join(DETERMINISTIC_EQUAL)}")  # fmt: skip
    for r in results:
        checks = []
        if "hf-m2n2" in r.rss_mb:
            checks.append(
                f"RSS {'PASS' if r.rss_mb['hf-m2n2'] <= 1536 else 'FAIL'} ({r.rss_mb['hf-m2n2']:.0f} MB)"
            )
        if (ratio := r.ratio("wall_s")) is not None:
            checks.append(f"wall {'PASS' if ratio <= 0.5 else 'FAIL'} ({ratio:.2f}x)")
        if r.diff is not None and r.recipe in DETERMINISTIC_EQUAL:
            ok = r.diff.n_diff_gt_1ulp == 0 and not (r.diff.missing_in_ours or r.diff.missing_in_sdmecha)
            checks.append(f"values {'PASS' if ok else 'FAIL'} (max {r.diff.max_ulp} ulp)")
        print(f"  {r.recipe:15s} " + ", ".join(checks))


# ----------------------------------------------------------------------------------------------- main


def find_sdmecha_python(arg: str | None) -> str | None:
    for cand in (arg, str(REPO / ".venv-sdmecha/bin/python")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--scale",
        type=float,
        default=0.05,
        help="UNet parameters as a fraction of SDXL base's 2.57B (default: %(default)s)",
    )
    p.add_argument(
        "--methods", default=",".join(RECIPES), help="comma-separated recipes (default: %(default)s)"
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per tool and recipe, alternating (default: 1)"
    )
    p.add_argument(
        "--work", type=Path, default=REPO / "bench-data", help="seeds and outputs (default: %(default)s)"
    )
    p.add_argument(
        "--cache",
        choices=("cold", "warm"),
        default="cold",
        help="inputs' page-cache state per run (default: %(default)s)",
    )
    p.add_argument("--only", choices=TOOLS, help="run one tool only")
    p.add_argument(
        "--sdmecha-python",
        help="python of sd-mecha's venv (default: .venv-sdmecha in the checkout)",
    )
    p.add_argument("--workers", type=int, help="hf-m2n2 merge --workers (default: its own, 2)")
    p.add_argument("--sdmecha-threads", type=int, help="sd-mecha merge threads (default: its own choice)")
    p.add_argument("--seed", type=int, default=0, help="synthetic weights")
    p.add_argument(
        "--formula-every",
        type=int,
        default=1,
        metavar="N",
        help="check both outputs against the recipe's formula on every N-th tensor (reads the inputs again; "
        "0: never; default: %(default)s)",
    )
    p.add_argument(
        "--keep-outputs", action="store_true", help="keep the merged outputs (WORK/.../runs/RECIPE)"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    if args.work == REPO or REPO in args.work.parents:
        p.error(f"--work {args.work} is inside the repository; use a directory outside it")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(RECIPES)
    if unknown:
        p.error(f"unknown recipes {sorted(unknown)} (known: {', '.join(RECIPES)})")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def _import_s(python: str, module: str) -> float:
    cmd = [python, "-c", f"import {module}"]
    subprocess.run(cmd, check=False, capture_output=True)  # warm-up
    start = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = [t for t in TOOLS if args.only in (None, t)]
    if "sd-mecha" in tools:
        args.sdmecha_python = find_sdmecha_python(args.sdmecha_python)
        if args.sdmecha_python is None:
            print("sd-mecha's python not found (--sdmecha-python, .venv-sdmecha); skipping sd-mecha")
            tools.remove("sd-mecha")
    data = args.work / f"sdxl_scale{args.scale:g}_seed{args.seed}"
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = build_sdxl_seeds(data, args.scale, n_models=3, seed=args.seed)
    size = seeds.unet_bytes
    free = shutil.disk_usage(args.work).free
    if free < 2.2 * size:
        sys.exit(
            f"not enough disk space in {args.work} for two outputs: need ~{2.2 * size / 1e9:.1f} GB, have {free / 1e9:.1f} GB"
        )
    print(f"scale {args.scale:g}: SDXL UNet widths {seeds.config['block_out_channels']}, {seeds.params / 1e9:.3f}B params, "
          f"{size / 1e9:.2f} GB per UNet (float16); seeds in {data}")  # fmt: skip

    unets = [f for i in range(3) for f in seeds.unet_files(i)]
    read_cold = read_gbps(unets, cold=True)
    read_warm = read_gbps(seeds.unet_files(0), cold=False)
    write, write_fsync = measure_write_gbps(data, size)
    read = read_cold if args.cache == "cold" else read_warm
    imports = {"hf-m2n2": _import_s(sys.executable, "hf_m2n2.cli, torch")}
    if "sd-mecha" in tools:
        imports["sd-mecha"] = _import_s(args.sdmecha_python, "sd_mecha")
    print(f"machine: {os.cpu_count()} CPUs; read {read_cold:.2f} GB/s cold, {read_warm:.2f} GB/s page cache; write "
          f"{write:.2f} GB/s ({write_fsync:.2f} GB/s with fsync); imports "
          + ", ".join(f"{t} {s:.2f} s" for t, s in imports.items()))  # fmt: skip
    print(f"inputs {args.cache} at each run; bound = K x {size / 1e9:.2f} GB / {read:.2f} GB/s + {size / 1e9:.2f} GB / "
          f"{write_fsync:.2f} GB/s")  # fmt: skip

    results: list[RecipeResult] = []
    runs: list[Run] = []
    for recipe in args.methods:
        rdir = data / "runs" / recipe
        rdir.mkdir(parents=True, exist_ok=True)
        k = RECIPES[recipe].k
        res = RecipeResult(recipe, k, k * size / (read * 1e9) + size / (write_fsync * 1e9))
        mine: dict[str, list[Run]] = {t: [] for t in tools}
        for rep in range(args.repeats):
            for tool in tools:
                run = run_tool(tool, recipe, rep, seeds, rdir, args)
                mine[tool].append(run)
                runs.append(run)
        for tool, rs in mine.items():
            ok = [r for r in rs if r.returncode == 0]
            if len(ok) != len(rs):
                res.errors.append(f"{tool}: {len(rs) - len(ok)} failed run(s), see {rs[-1].log}")
            if ok:
                res.wall_s[tool] = statistics.median(r.wall_s for r in ok)
                res.durable_s[tool] = statistics.median(r.wall_s + r.writeback_s for r in ok)
                res.rss_mb[tool] = max(r.peak_rss_mb for r in ok)
                res.anon_mb[tool] = max(r.peak_anon_mb for r in ok)
                res.file_mb[tool] = max(r.peak_file_mb for r in ok)
                res.output_bytes[tool] = ok[-1].output_bytes
        if len(tools) == 2 and all(mine[t][-1].returncode == 0 for t in tools):
            start = time.perf_counter()
            inputs = [seeds.unet_files(i)[0] for i in RECIPES[recipe].inputs] if args.formula_every else None
            res.diff = compare_outputs(
                output_path("hf-m2n2", rdir),
                output_path("sd-mecha", rdir),
                seeds.key_map,
                inputs,
                recipe,
                max(args.formula_every, 1),
            )
            print(f"  {recipe:15s} compared in {time.perf_counter() - start:.1f} s", flush=True)
        if not args.keep_outputs:
            for tool in tools:
                _remove(output_path(tool, rdir))
        results.append(res)

    print_tables(results, args.scale)
    for r in results:
        for e in r.errors:
            print(f"  {r.recipe}: {e}")
    if args.json:
        payload = {
            "scale": args.scale, "params": seeds.params, "unet_bytes": size, "width": seeds.config["block_out_channels"],
            "repeats": args.repeats, "cache": args.cache, "tools": tools, "sdmecha_python": args.sdmecha_python,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "read_cold_gbps": read_cold,
                        "read_warm_gbps": read_warm, "write_gbps": write, "write_fsync_gbps": write_fsync,
                        "import_s": imports},
            "results": [{**asdict(r), "wall_ratio": r.ratio("wall_s"), "durable_ratio": r.ratio("durable_s"),
                         "rss_ratio": r.ratio("rss_mb"), "ours_over_bound": r.ours_over_bound} for r in results],
            "runs": [asdict(r) for r in runs],
        }  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(not r.errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
