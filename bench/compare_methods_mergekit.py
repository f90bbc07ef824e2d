"""Compare hf_m2n2's per-tensor merge methods with mergekit 0.1.5 on the same random tensors.

Run with the separate mergekit venv (never installed into the project's):
    PYTHONPATH=. .venv-mergekit/bin/python bench/compare_methods_mergekit.py   (from the repo root)

mergekit is driven through `mergekit.merge_methods.api.merge_tensors`, its public per-tensor entry point,
which binds parameters exactly as a YAML recipe would and runs the method on one tensor group.

Per case it prints:
  rel     max|ours - mergekit| / max|mergekit| over the tensor (the issue's bound: 1e-5 in fp32)
  ndiff   elements that differ at all
  bad     elements beyond tolerance: fp32 |diff| > 1e-5 * max|mergekit|; bf16 |diff| > one bf16 step (ulp)
  ties    for magnitude selection: "all" when every differing element sits where some model's delta
          magnitude ties at the selection cut-off (the only difference the issue allows); "selection" when
          differences reach other elements but both sides keep the same multiset of magnitudes per model (only
          tied elements swapped), so the L1 rescale sum rounds differently in bf16 (a global 1-step change)
Randomized methods (DARE, DELLA) draw their masks from a counter-based Philox stream (see the README), mergekit
from torch's generator: the masks differ, so such a case is "ok (random)" when ours is reproducible, changes with
the seed, and each model's keep rate agrees with mergekit's within 5 standard errors.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mergekit import sparsify as mk_sparsify
from mergekit.merge_methods.api import merge_tensors

from hf_m2n2.methods import get_method
from hf_m2n2.methods import sparsify as ours_sparsify
from hf_m2n2.methods._common import RandomStream

torch.set_num_threads(2)

SHAPES: tuple[tuple[int, ...], ...] = ((384, 256), (4096,), (24, 16, 9), (1280, 1024))
SEED = 1234


@dataclass
class Case:
    method: str
    n_models: int
    params: dict[str, Any] = field(default_factory=dict)
    model_params: dict[str, list[Any]] = field(default_factory=dict)
    with_base: bool = True
    data: str = "finetune"  # finetune | far | parallel | antiparallel | quantized
    note: str = ""


CASES: tuple[Case, ...] = (
    Case("linear", 3, {}, {"weight": [1.0, 3.0, 0.5]}, with_base=False),
    Case("linear", 2, {"normalize": False}, {"weight": [0.7, -0.2]}, with_base=False),
    Case("slerp", 1, {"t": 0.3}, data="far"),
    Case("slerp", 1, {"t": 0.7}, data="finetune", note="cos > 0.9995: lerp"),
    Case("slerp", 1, {"t": 0.4}, data="parallel"),
    Case("slerp", 1, {"t": 0.4}, data="antiparallel"),
    Case("nuslerp", 2, {}, {"weight": [1.0, 2.0]}, with_base=False, data="far"),
    Case("nuslerp", 2, {}, {"weight": [1.0, 2.0]}, data="finetune", note="task vectors"),
    Case("nuslerp", 2, {"nuslerp_flatten": False}, {"weight": [0.3, 0.5]}, with_base=False, data="far"),
    Case("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, {"weight": [2.0, 1.0]}),
    Case("nuslerp", 2, {}, {"weight": [1.0, -1.0]}, with_base=False, data="far", note="weights sum 0"),
    Case("nuslerp", 2, {}, {"weight": [1.0, 1.0]}, with_base=False, data="parallel"),
    Case("task_arithmetic", 3, {}, {"weight": [0.5, 0.3, -0.2]}),
    Case("task_arithmetic", 2, {"normalize": True, "lambda": 0.8}, {"weight": [1.0, 2.0]}),
    Case("ties", 3, {}, {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 0.7]}),
    Case(
        "ties", 3, {"lambda": 1.3, "rescale": True}, {"weight": [1.0, -0.5, 0.8], "density": [0.2, 0.9, 1.0]}
    ),
    Case("ties", 3, {}, {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 0.7]}, data="quantized"),
    Case("ties", 2, {"normalize": False, "int8_mask": True}, {"weight": [0.6, 0.6], "density": [0.01, 0.99]}),
    Case(
        "breadcrumbs",
        3,
        {},
        {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 0.9], "gamma": [0.01, 0.05, 0.2]},
    ),
    Case(
        "breadcrumbs", 2, {"rescale": True}, {"weight": [1.0, 0.5], "density": [0.5, 0.3]}, data="quantized"
    ),
    Case("breadcrumbs_ties", 3, {"normalize": True}, {"weight": [1.0, 0.5, 0.8], "density": [0.4, 0.6, 0.8]}),
    Case("model_stock", 2, {}, data="finetune"),
    Case("model_stock", 3, {}, data="finetune"),
    Case("model_stock", 3, {"filter_wise": True}, data="finetune"),
    Case("passthrough", 1, {}, {"scale": [0.5]}, with_base=False),
    Case("passthrough", 1, {}, {}, with_base=False),
    Case("dare_linear", 3, {}, {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 0.7]}),
    Case("dare_ties", 3, {"normalize": True}, {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 0.7]}),
    Case("dare_ties", 2, {"rescale": False}, {"weight": [1.0, 0.5], "density": [1.0, 0.3]}),
    Case(
        "della", 3, {}, {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 0.7], "epsilon": [0.1, 0.2, 0.15]}
    ),
    Case("della_linear", 2, {"lambda": 0.9}, {"weight": [1.0, 0.5], "density": [0.4, 0.6]}),
    Case(
        "nuslerp",
        2,
        {},
        {"weight": [1.0, 2.0]},
        with_base=False,
        note="bf16 math as mergekit's (dtype: bfloat16)",
    ),
    Case("sce", 3, {}),
    Case("sce", 3, {"select_topk": 0.5}),
    Case("sce", 2, {"select_topk": 0.3, "int8_mask": True}, data="quantized", note="variance ties"),
    Case("ram", 3, {}, data="sparse"),
    Case("ram", 2, {"epsilon": 0.01}, data="finetune"),
    Case("ramplus_tl", 3, {}, data="sparse"),
    Case("ramplus_tl", 3, {"r": 0.5, "alpha": 0.3, "epsilon": 1e-3}, data="sparse"),
    Case("multislerp", 3, {}, {"weight": [1.0, 2.0, 0.5]}, with_base=False, data="far"),
    Case("multislerp", 3, {}, {"weight": [1.0, 2.0, 0.5]}, data="finetune", note="task vectors"),
    Case("multislerp", 2, {"normalize_weights": False}, {"weight": [0.3, 0.4]}, with_base=False, data="far"),
    Case(
        "multislerp", 2, {}, {"weight": [1.0, 1.0]}, with_base=False, data="opposite", note="linear fallback"
    ),
    Case("karcher", 3, {}, with_base=False, data="far"),
    Case("karcher", 2, {"max_iter": 3, "tol": 1e-4}, with_base=False, data="finetune"),
    Case("nearswap", 1, {"t": 0.01}),
    Case("nearswap", 1, {"t": 0.3}, data="far"),
    Case("arcee_fusion", 1, {}),
    Case("arcee_fusion", 1, {}, data="far"),
)
MAGNITUDE = {
    "ties": "magnitude",
    "breadcrumbs": "magnitude_outliers",
    "breadcrumbs_ties": "magnitude_outliers",
}


def make_inputs(
    case: Case, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base tensor and the models' tensors (float32 data rounded to `dtype`)."""
    g = torch.Generator().manual_seed(SEED + len(shape) * 7 + shape[0])
    base = torch.randn(shape, generator=g)
    if case.data == "quantized":  # few distinct magnitudes: many ties at any cut-off
        base = torch.randint(-64, 64, shape, generator=g) / 64.0
        models = [base + torch.randint(-8, 9, shape, generator=g) / 256.0 for _ in range(case.n_models)]
    elif case.data == "far":
        models = [base + 0.6 * torch.randn(shape, generator=g) for _ in range(case.n_models)]
    elif case.data == "parallel":
        models = [base * (1.5 + i) for i in range(case.n_models)]
    elif (
        case.data == "sparse"
    ):  # RL-style task vectors: most entries unchanged, some changed by several models
        models = [
            base + (torch.rand(shape, generator=g) < 0.3) * 0.02 * torch.randn(shape, generator=g)
            for _ in range(case.n_models)
        ]
    elif case.data == "opposite":
        models = [base, -base]
    elif case.data == "antiparallel":
        models = [-2.0 * base for _ in range(case.n_models)]
    else:
        models = [base + 0.02 * torch.randn(shape, generator=g) for _ in range(case.n_models)]
    return base.to(dtype), [m.to(dtype) for m in models]


def run_mergekit(case: Case, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    parameters = {**case.params, **case.model_params}
    if case.method == "passthrough" and "scale" not in parameters:
        parameters = {}
    torch.manual_seed(SEED)
    if case.with_base:
        return merge_tensors([base, *models], case.method, parameters=parameters, base_index=0)
    return merge_tensors(models, case.method, parameters=parameters)


def run_ours(case: Case, base: torch.Tensor, models: list[torch.Tensor], seed: int = SEED) -> torch.Tensor:
    """Our method on the same inputs (randomized methods: a RandomStream keyed by `seed`)."""
    method = get_method(case.method)
    params = {p.name: case.params.get(p.name, p.default) for p in method.global_params}
    model_params = [
        {p.name: case.model_params.get(p.name, [p.default] * len(models))[i] for p in method.model_params}
        for i in range(len(models))
    ]
    stream = RandomStream(seed) if method.randomized else None
    return method.fn(models, base if case.with_base else None, params, model_params, stream)


def one_step(ref: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """bf16 spacing at the larger of the two magnitudes, per element."""
    _, exponent = torch.frexp(torch.maximum(ref.abs(), ours.abs()))
    return torch.ldexp(torch.ones_like(ref), exponent - 8)


def cut_values(delta: torch.Tensor, kind: str, density: float, gamma: float) -> torch.Tensor:
    """Magnitudes at which mergekit's selection of `delta` is cut (ascending sort, bench only)."""
    n = delta.numel()
    if density >= 1:
        return delta.new_empty(0)
    ordered = delta.abs().reshape(-1).float().sort().values
    if kind == "magnitude":
        k = max(1, int(density * n))
        return ordered[n - k : n - k + 1]
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    return ordered[[i for i in (bottom, bottom + keep - 1) if 0 <= i < n]]


def tie_positions(case: Case, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """Elements where some model's delta magnitude equals its selection cut-off."""
    kind = MAGNITUDE[case.method]
    mask = torch.zeros(base.shape, dtype=torch.bool)
    for i, x in enumerate(models):
        delta = x - base
        density = case.model_params.get("density", [1.0] * len(models))[i]
        gamma = case.model_params.get("gamma", [0.01] * len(models))[i]
        magnitudes = delta.abs().float()
        for cut in cut_values(delta, kind, density, gamma):
            mask |= (magnitudes == cut) & (cut > 0)
    return mask


def same_selection(case: Case, base: torch.Tensor, models: list[torch.Tensor]) -> bool:
    """Whether ours and mergekit keep the same multiset of magnitudes per model (only tied elements swap)."""
    kind = MAGNITUDE[case.method]
    for i, x in enumerate(models):
        delta = x - base
        density = case.model_params.get("density", [1.0] * len(models))[i]
        gamma = case.model_params.get("gamma", [0.01] * len(models))[i]
        theirs = mk_sparsify.sparsify(delta, density, mk_sparsify.SparsificationMethod(kind), gamma=gamma)
        if kind == "magnitude":
            ours = ours_sparsify.magnitude(delta, density)
        else:
            ours = ours_sparsify.magnitude_outliers(delta, density, gamma)
        if not torch.equal(theirs.abs().reshape(-1).sort().values, ours.abs().reshape(-1).sort().values):
            return False
    return True


def rank_ties(delta: torch.Tensor) -> torch.Tensor:
    """Elements whose magnitude equals another's in the same row (dim 1; DELLA's rank ties)."""
    rows = delta.abs().float().reshape(1, -1) if delta.dim() < 2 else delta.abs().float()
    ordered, order = rows.sort(dim=1, stable=True)
    equal = ordered[:, 1:] == ordered[:, :-1]
    tied = torch.zeros_like(ordered, dtype=torch.bool)
    tied[:, 1:] |= equal
    tied[:, :-1] |= equal
    return torch.zeros_like(tied).scatter_(1, order, tied).reshape(delta.shape)


def random_mask_check(case: Case, base: torch.Tensor, models: list[torch.Tensor]) -> tuple[float, float]:
    """Our masks come from a Philox stream, mergekit's from torch's generator: the draws differ, so compare their
    keep rates per model; returns (the largest |ours - theirs| keep-rate gap in standard errors of a difference of
    two independent rates, that gap)."""
    densities = case.model_params.get("density", [1.0] * len(models))
    epsilons = case.model_params.get("epsilon", [0.15] * len(models))
    della = case.method.startswith("della")
    torch.manual_seed(SEED)
    stream = RandomStream(SEED)
    worst_z = worst_gap = 0.0
    for x, density, epsilon in zip(models, densities, epsilons):
        delta = x - base
        if della:
            theirs = mk_sparsify.della_magprune(delta, density, epsilon)
            ours = ours_sparsify.della_magprune(delta, density, epsilon, False, stream)
        else:
            theirs = mk_sparsify.bernoulli(delta, density)
            ours = ours_sparsify.random_drop(delta, density, False, stream)
        n = delta.numel()
        nonzero = int((delta != 0).sum())
        p = min(1.0, density) * nonzero / n
        stderr = max(math.sqrt(2 * p * (1 - p) / n), 1e-12)
        rates = [int((side != 0).sum()) / n for side in (theirs, ours)]
        worst_z = max(worst_z, abs(rates[0] - rates[1]) / stderr)
        worst_gap = max(worst_gap, abs(rates[0] - rates[1]))
    return worst_z, worst_gap


def sce_variance_ties(case: Case, base: torch.Tensor, models: list[torch.Tensor]) -> str:
    """Whether ours and mergekit's SCE select the same number of positions, differing only among positions whose
    variance equals the cut-off (torch.topk breaks such ties arbitrarily, ours in index order)."""
    from mergekit.merge_methods.sce import sce_mask

    from hf_m2n2.methods.sce import select_by_variance

    deltas = torch.stack([x - base for x in models])
    fraction = float(case.params["select_topk"])
    theirs, ours = sce_mask(deltas, fraction).bool(), select_by_variance(deltas, fraction).bool()
    variance = torch.var(deltas, dim=0, unbiased=False)
    kept = variance[ours]
    cut = kept.min() if kept.numel() else variance.new_tensor(float("inf"))
    differing = theirs != ours
    if int(theirs.sum()) == int(ours.sum()) and bool((variance[differing] == cut).all()):
        return f" ties=all({int(differing.sum())} selected positions swapped among equal variances)"
    return f" ties=NO({int(differing.sum())} selected positions differ)"


def compare(case: Case, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    base, models = make_inputs(case, shape, dtype)
    ref = run_mergekit(case, base, models)
    if (
        ref.dtype != dtype
    ):  # mergekit returns float32 for some half inputs (arcee_fusion, ramplus_tl); its writer casts
        ref = ref.to(dtype)
    ours = run_ours(case, base, models)
    if ours.dtype != ref.dtype or ours.shape != ref.shape:
        return f"FAIL dtype/shape {ours.dtype}{tuple(ours.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    ref32, ours32 = ref.float(), ours.float()
    diff = (ours32 - ref32).abs()
    scale = ref32.abs().max().clamp(min=1e-30)
    tol = 1e-5 * scale if dtype == torch.float32 else one_step(ref32, ours32)
    bad = diff > tol
    status = "ok" if not bool(bad.any()) else "FAIL"
    ties = ""
    if case.method in MAGNITUDE:
        differing = diff > 0
        outside = int((differing & ~tie_positions(case, base, models)).sum())
        if outside == 0:
            ties = f" ties=all({int(differing.sum())} differing elements at cut-off ties)"
        elif same_selection(case, base, models):
            ties = f" ties=selection({outside} elsewhere: rescale sum rounds differently)"
        else:
            ties = f" ties=NO({outside} differing elements not at ties)"
        if bad.any() and not ties.startswith(" ties=NO"):
            status = "ok (tie-only)"
    if case.method == "sce" and float(case.params.get("select_topk", 1.0)) < 1 and bad.any():
        ties = sce_variance_ties(case, base, models)
        status = "ok (tie-only)" if ties.startswith(" ties=all") else "FAIL"
    extra = ""
    if case.method == "arcee_fusion" and base.numel() > 1_000_000 and bad.any():
        status = "ok (sampled)"  # mergekit estimates the quartiles from 1M random scores; ours are exact
        extra = " mergekit samples quartiles above 1M elements"
    if get_method(case.method).randomized:
        again = run_ours(case, base, models)
        other = run_ours(case, base, models, seed=SEED + 1)
        same = torch.equal(again, ours)
        differs = not torch.equal(other, ours) or all(d >= 1 for d in case.model_params.get("density", [1.0]))
        extra = f" reproducible={same} seed-sensitive={differs}"
        if bad.any():  # other draws than mergekit's: compare the keep rates instead
            z, gap = random_mask_check(case, base, models)
            extra += (
                f" keep rates: ours vs mergekit {gap:.4f} apart, both within {z:.1f} std errors of density"
            )
            status = "ok (random)" if same and differs and z < 5 else "FAIL"
    rel = float(diff.max() / scale)
    return f"{status:14s} rel={rel:.2e} ndiff={int((diff > 0).sum()):7d} bad={int(bad.sum()):5d}{ties}{extra}"


def describe(case: Case) -> str:
    bits = [f"{k}={v}" for k, v in {**case.params, **case.model_params}.items()]
    base = "base" if case.with_base else "no-base"
    return f"{case.method} n={case.n_models} {base} {case.data} {' '.join(bits)} {case.note}".strip()


def timing() -> None:
    """Magnitude selection on one 7B-sized projection delta (4096 x 4096): ours vs mergekit."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(4096, 4096, generator=g)
    for label, fn in (
        ("mergekit magnitude (argsort)", lambda: mk_sparsify.magnitude(delta, 0.3)),
        ("ours magnitude (kthvalue)", lambda: ours_sparsify.magnitude(delta, 0.3)),
        ("mergekit breadcrumbs (sort)", lambda: mk_sparsify.magnitude_outliers(delta, 0.3, gamma=0.01)),
        ("ours breadcrumbs (kthvalue)", lambda: ours_sparsify.magnitude_outliers(delta, 0.3, 0.01)),
    ):
        start = time.perf_counter()
        fn()
        print(f"  {label:30s} {time.perf_counter() - start:6.2f} s")


def main(argv: Sequence[str]) -> int:
    print(f"torch {torch.__version__}; shapes {SHAPES}")
    failures = 0
    only = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("--only=")]
    for case in CASES:
        if only and case.method not in only[0]:
            continue
        print(describe(case))
        for dtype in (torch.float32, torch.bfloat16):
            for shape in SHAPES:
                line = compare(case, shape, dtype)
                failures += line.startswith("FAIL")
                print(f"  {str(dtype)[6:]:8s} {str(shape):13s} {line}")
    if "--no-timing" not in argv:
        print("timing, single 4096x4096 float32 delta, density 0.3:")
        timing()
    print(f"{failures} failing comparisons")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
