"""Per-tensor merge methods against their formulas on small hand-made tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from helpers import run_method

from hf_m2n2.methods import REQUIRED, MethodParameterError, UnknownMethodError, all_methods, get_method
from hf_m2n2.methods import sparsify as sp
from hf_m2n2.methods._common import RandomStream

torch.set_num_threads(1)

ALL = [
    "linear",
    "slerp",
    "nuslerp",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "passthrough",
    "sce",
    "ram",
    "ramplus_tl",
    "multislerp",
    "karcher",
    "nearswap",
    "arcee_fusion",
]
S2 = 1 / math.sqrt(2)


def t(*values: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


run = run_method


def close(actual: torch.Tensor, expected: torch.Tensor | Sequence[Any], tol: float = 1e-6) -> None:
    """Elementwise |actual - expected| <= tol * (1 + |expected|) (torch.testing is slow to import)."""
    expected = torch.as_tensor(expected, dtype=torch.float32)
    actual = actual.float()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert bool(((actual - expected).abs() <= tol * (1 + expected.abs())).all()), (actual, expected)


# --- registry and declarations ---------------------------------------------------------------


def test_all_methods_registered() -> None:
    assert sorted(m.name for m in all_methods()) == sorted(ALL)
    with pytest.raises(UnknownMethodError, match="known: .*linear"):
        get_method("nope")


@pytest.mark.parametrize(
    ("name", "normalize", "rescale"),
    [
        ("linear", True, None),
        ("task_arithmetic", False, False),
        ("ties", True, False),
        ("dare_ties", False, True),
        ("dare_linear", False, True),
        ("breadcrumbs", False, False),
        ("breadcrumbs_ties", False, False),
        ("della", True, True),
        ("della_linear", False, True),
    ],
)
def test_normalize_and_rescale_defaults(name: str, normalize: bool, rescale: bool | None) -> None:
    defaults = {p.name: p.default for p in get_method(name).params}
    assert defaults["normalize"] is normalize
    assert defaults.get("rescale") is rescale


def test_declared_parameters() -> None:
    def declared(name: str) -> dict[str, tuple[Any, bool]]:
        return {p.name: (p.default, p.per_model) for p in get_method(name).params}

    assert declared("ties") == {
        "int8_mask": (False, False),
        "normalize": (True, False),
        "rescale": (False, False),
        "lambda": (1.0, False),
        "weight": (REQUIRED, True),
        "density": (1.0, True),
    }
    assert declared("breadcrumbs")["gamma"] == (0.01, True)
    assert declared("della")["epsilon"] == (0.15, True)
    assert declared("slerp") == {"t": (REQUIRED, False)}
    assert declared("nuslerp") == {
        "weight": (REQUIRED, True),
        "nuslerp_flatten": (True, False),
        "nuslerp_row_wise": (False, False),
    }
    assert declared("model_stock") == {"filter_wise": (False, False)}
    assert declared("passthrough") == {"scale": (None, True)}
    assert declared("linear") == {"weight": (REQUIRED, True), "normalize": (True, False)}


def test_base_usage_and_model_counts() -> None:
    uses = {m.name: (m.uses_base, m.min_models, m.max_models, m.randomized) for m in all_methods()}
    assert uses["linear"] == ("never", 1, None, False)
    assert uses["passthrough"] == ("never", 1, 1, False)
    assert uses["slerp"] == ("required", 1, 1, False)
    assert uses["nuslerp"] == ("optional", 2, 2, False)
    assert uses["model_stock"] == ("required", 2, None, False)
    for name in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"):
        assert uses[name] == ("required", 1, None, False)
    for name in ("dare_ties", "dare_linear", "della", "della_linear"):
        assert uses[name] == ("required", 1, None, True)
    assert all(m.paper.count("(https://") == 1 for m in all_methods() if m.paper)


# --- linear ------------------------------------------------------------------------------------


def test_linear_normalized_weights() -> None:
    close(run("linear", [t(1.0, 2.0), t(5.0, 6.0)], weight=[1, 3]), [4.0, 5.0])


def test_linear_unnormalized() -> None:
    close(run("linear", [t(1.0, 2.0), t(5.0, 6.0)], weight=[1, 3], normalize=False), [16.0, 20.0])


def test_linear_zero_weight_sum_is_not_divided() -> None:
    close(run("linear", [t(1.0, 2.0), t(5.0, 7.0)], weight=[1, -1]), [-4.0, -5.0])


# --- task arithmetic family ------------------------------------------------------------------------


BASE3 = t(1.0, 1.0, 1.0)
M1, M2 = t(2.0, 1.0, 0.0), t(1.0, 3.0, 1.0)  # deltas [1, 0, -1] and [0, 2, 0]


def test_task_arithmetic_formula() -> None:
    # base + lambda * (0.5 * d1 + 1 * d2)
    close(run("task_arithmetic", [M1, M2], BASE3, weight=[0.5, 1.0], **{"lambda": 2.0}), [2.0, 5.0, 0.0])


def test_task_arithmetic_normalize_divides_by_weight_sum() -> None:
    out = run("task_arithmetic", [M1, M2], BASE3, weight=[0.5, 1.0], normalize=True)
    close(out, [1 + 0.5 / 1.5, 1 + 2 / 1.5, 1 - 0.5 / 1.5])


def test_task_arithmetic_without_models_returns_base() -> None:
    assert torch.equal(run("task_arithmetic", [], BASE3), BASE3)


ZERO4 = torch.zeros(4)
TIES_MODELS = [t(3.0, -1.0, 2.0, -0.5), t(-2.0, 4.0, 1.0, 0.25), t(1.0, -3.0, -5.0, 0.1)]


def test_ties_trim_elect_disjoint_mean() -> None:
    # density 0.5 keeps 2 of 4: [3, 0, 2, 0], [-2, 4, 0, 0], [0, -3, -5, 0]; weights [1, 2, 1]
    # weighted sums [-1, 5, -3, 0] elect signs [-, +, -, +]; agreeing entries: -4 (w 2), 8 (w 2), -5 (w 1), none
    out = run("ties", TIES_MODELS, ZERO4, weight=[1, 2, 1], density=[0.5] * 3)
    close(out, [-2.0, 4.0, -5.0, 0.0])
    out = run("ties", TIES_MODELS, ZERO4, weight=[1, 2, 1], density=[0.5] * 3, normalize=False)
    close(out, [-4.0, 8.0, -5.0, 0.0])


def test_ties_lambda_and_base() -> None:
    base = t(1.0, 1.0, 1.0, 1.0)
    models = [m + base for m in TIES_MODELS]
    out = run("ties", models, base, weight=[1, 2, 1], density=[0.5] * 3, **{"lambda": 0.5})
    close(out, [0.0, 3.0, -1.5, 1.0])


def test_ties_density_one_keeps_everything() -> None:
    # no trimming: signs of [3-4+1, -1+8-3, 2+2-5, -0.5+0.5+0.1] = [0, 4, -1, 0.1] -> [+, +, -, +]
    out = run("ties", TIES_MODELS, ZERO4, weight=[1, 2, 1], density=[1.0] * 3)
    close(out, [(3 + 1) / 2, 8 / 2, -5 / 1, (0.5 + 0.1) / 3])


def test_breadcrumbs_drops_outliers_and_small() -> None:
    delta = t(*[float(v) * (-1) ** v for v in range(1, 11)])  # magnitudes 1..10
    out = run("breadcrumbs", [delta], torch.zeros(10), weight=[2.0], density=[0.5], gamma=[0.1])
    close(out, [0, 0, 0, 0, -10, 12, -14, 16, -18, 0])  # keeps magnitudes 5..9, times weight 2


def test_breadcrumbs_ties_uses_consensus() -> None:
    a, b = t(4.0, 1.0, -3.0, 2.0), t(-1.0, -2.0, 5.0, 3.0)
    # density 0.5, gamma 0.25 on 4 elements: drop the largest one and the smallest one
    out = run("breadcrumbs_ties", [a, b], ZERO4, weight=[1, 1], density=[0.5, 0.5], gamma=[0.25, 0.25])
    # kept: a -> [0, 0, -3, 2], b -> [0, -2, 0, 3]; signs [+, -, -, +]; no normalize by default
    close(out, [0.0, -2.0, -3.0, 5.0])


def test_int8_mask_has_no_effect() -> None:
    kwargs = {"weight": [1, 2, 1], "density": [0.5] * 3}
    assert torch.equal(
        run("ties", TIES_MODELS, ZERO4, int8_mask=True, **kwargs), run("ties", TIES_MODELS, ZERO4, **kwargs)
    )


# --- sparsification ----------------------------------------------------------------------------------


def test_magnitude_keeps_top_k_and_rescales_l1() -> None:
    x = t(0.1, -4.0, 3.0, 0.2, -0.3, 5.0)
    close(sp.magnitude(x, 0.5), [0, -4.0, 3.0, 0, 0, 5.0])
    close(sp.magnitude(x, 0.5, rescale=True), [v * 12.6 / 12.0 for v in (0, -4.0, 3.0, 0, 0, 5.0)])
    assert sp.magnitude(x, 1.0) is x
    close(sp.magnitude(x, 0.0), [0.0] * 6)
    close(sp.magnitude(x, 0.01), [0, 0, 0, 0, 0, 5.0])  # at least one element survives


def test_magnitude_ties_at_cutoff_keep_exactly_k() -> None:
    out = sp.magnitude(t(1.0, -1.0, 0.5, 1.0, 0.25, -1.0), 0.5)
    assert int(torch.count_nonzero(out)) == 3
    assert set(out.abs().tolist()) == {0.0, 1.0}


def test_magnitude_outliers_gamma_larger_than_room() -> None:
    x = torch.arange(1.0, 11.0)
    close(sp.magnitude_outliers(x, 0.5, 0.8), [1, 2, 3, 4, 5, 0, 0, 0, 0, 0])
    close(sp.magnitude_outliers(x, 0.5, 0.0), [0, 0, 0, 0, 0, 6, 7, 8, 9, 10])
    assert sp.magnitude_outliers(x, 1.0, 0.5) is x


def test_window_mask_with_ties_keeps_exact_count() -> None:
    mags = t(2.0, 1.0, 2.0, 3.0, 2.0, 2.0, 0.0, 3.0)  # ascending ranks 0..7: 0, 1, 2, 2, 2, 2, 3, 3
    mask = sp.rank_window_mask(mags, 3, 7)  # ranks 3..6: three 2s and one 3
    assert int(torch.count_nonzero(mask)) == 4
    assert sorted(mags[mask].tolist()) == [2.0, 2.0, 2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kth_smallest_radix_select(dtype: torch.dtype) -> None:
    values = torch.randn(5000, generator=torch.Generator().manual_seed(1)).abs().to(dtype)
    values[::7] = 0.5  # many ties
    for rank in (1, 2, 100, 2500, 4000, 4999, 5000):
        assert sp.kth_smallest(values, rank) == torch.kthvalue(values, rank).values


def test_top_k_mask_exact_with_ties() -> None:
    values = (torch.randint(0, 20, (3000,), generator=torch.Generator().manual_seed(2)) / 4).float()
    for k in (1, 10, 1500, 2999):
        mask = sp.top_k_mask(values, k)
        kept, dropped = values[mask], values[~mask]
        count = int(torch.count_nonzero(mask))
        assert count == k or (count < k and float(dropped.max()) == 0.0)  # zero ties may be left out
        assert float(kept.min()) >= float(dropped.max())


def test_dare_keep_rate_and_rescale() -> None:
    x = torch.ones(50_000)
    kept = sp.random_drop(x, 0.3, False, RandomStream(0))
    rate = float(kept.mean())
    assert abs(rate - 0.3) < 0.01
    assert set(kept.unique().tolist()) == {0.0, 1.0}
    rescaled = sp.random_drop(x, 0.3, True, RandomStream(0))
    assert torch.equal(rescaled != 0, kept != 0)  # same seed, same mask
    close(rescaled.sum(), 50_000.0, tol=1e-2)  # L1 norm preserved
    close(rescaled.max(), 1 / rate, tol=1e-4)  # i.e. each survivor scaled by ~1/density
    assert abs(1 / rate - 1 / 0.3) < 0.08


def test_dare_seeded_and_reproducible() -> None:
    base = torch.zeros(1000)
    models = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    kwargs = {"weight": [1.0, 1.0], "density": [0.5, 0.5]}
    first = run("dare_ties", models, base, seed=7, **kwargs)
    assert torch.equal(first, run("dare_ties", models, base, seed=7, **kwargs))
    assert not torch.equal(first, run("dare_ties", models, base, seed=8, **kwargs))
    assert 0.2 < float((first == 0).float().mean()) < 0.4  # dropped by both, or by sign election


def test_dare_linear_density_one_is_task_arithmetic() -> None:
    out = run("dare_linear", [M1, M2], BASE3, seed=0, weight=[0.5, 1.0], density=[1.0, 1.0])
    assert torch.equal(out, run("task_arithmetic", [M1, M2], BASE3, weight=[0.5, 1.0]))


def test_dare_linear_rescaled_merge() -> None:
    base = torch.full((20_000,), 2.0)
    out = run("dare_linear", [base + 1.0], base, seed=3, weight=[1.0], density=[0.25])
    survivors = out[out != 2.0]
    assert abs(survivors.numel() / 20_000 - 0.25) < 0.015
    close(survivors - 2.0, torch.full_like(survivors, 20_000 / survivors.numel()), tol=1e-4)


def test_della_probabilities_follow_rank() -> None:
    rows = t(-5.0, 1.0, 4.0, -2.0, 3.0).unsqueeze(0)
    probs = sp._rank_probabilities(rows, 0.5, 0.2, torch.float32)
    close(probs, [[0.7, 0.3, 0.6, 0.4, 0.5]])


def test_della_rejects_bad_epsilon() -> None:
    with pytest.raises(MethodParameterError, match="epsilon"):
        run("della", [M1], BASE3, seed=0, weight=[1.0], density=[0.5], epsilon=[0.5])


def test_della_seeded_keep_rate() -> None:
    base = torch.zeros(200, 100)
    model = torch.randn(200, 100, generator=torch.Generator().manual_seed(4))
    kwargs = {"weight": [1.0], "density": [0.4], "epsilon": [0.1]}
    out = run("della_linear", [model], base, seed=5, **kwargs)
    assert torch.equal(out, run("della_linear", [model], base, seed=5, **kwargs))
    assert not torch.equal(out, run("della_linear", [model], base, seed=6, **kwargs))
    assert abs(float((out != 0).float().mean()) - 0.4) < 0.02
    close(out.abs().sum(), model.abs().sum(), tol=1e-2)  # rescale on by default
    # larger magnitudes survive more often
    kept = out != 0
    big = model.abs() > model.abs().median()
    assert float(kept[big].float().mean()) > float(kept[~big].float().mean()) + 0.05


# --- slerp and nuslerp -----------------------------------------------------------------------------


A, B = t(1.0, 0.0), t(0.0, 1.0)


@pytest.mark.parametrize(("tt", "expected"), [(0.0, [1.0, 0.0]), (1.0, [0.0, 1.0]), (0.5, [S2, S2])])
def test_slerp_orthogonal_unit_vectors(tt: float, expected: list[float]) -> None:
    close(run("slerp", [B], A, t=tt), expected)


def test_slerp_follows_the_arc() -> None:
    sixty = t(0.5, math.sqrt(3) / 2)
    close(run("slerp", [sixty], A, t=0.5), [math.cos(math.pi / 6), 0.5])
    # norms are interpolated too: sin((1-t)θ)/sinθ * a + sin(tθ)/sinθ * b with θ = 90°
    close(run("slerp", [t(0.0, 2.0)], A, t=0.5), [S2, 2 * S2])


def test_slerp_parallel_and_antiparallel_fall_back_to_lerp() -> None:
    a = t(1.0, 2.0)
    close(run("slerp", [2 * a], a, t=0.25), [1.25, 2.5])
    close(run("slerp", [-a], a, t=0.5), [0.0, 0.0])
    close(run("slerp", [-3 * a], a, t=0.25), [0.0, 0.0])


def test_slerp_matrix_is_one_vector() -> None:
    base, other = t(1.0, 0.0, 0.0, 0.0).view(2, 2), t(0.0, 0.0, 0.0, 1.0).view(2, 2)
    close(run("slerp", [other], base, t=0.5), [[S2, 0.0], [0.0, S2]])


def test_nuslerp_weights_give_t() -> None:
    angle = 0.75 * math.pi / 2  # t = 3 / (1 + 3)
    close(run("nuslerp", [A, B], weight=[1.0, 3.0]), [math.cos(angle), math.sin(angle)])
    close(run("nuslerp", [A, B], weight=[2.0, -2.0]), [S2, S2])  # weights sum to 0: t = 0.5


def test_nuslerp_with_base_interpolates_task_vectors() -> None:
    base = t(1.0, 1.0)
    close(run("nuslerp", [base + A, base + B], base, weight=[1.0, 1.0]), [1 + S2, 1 + S2])


def test_nuslerp_rows_or_columns() -> None:
    v0, v1 = t(1.0, 0.0, 0.0, 1.0).view(2, 2), t(1.0, 1.0, 0.0, 1.0).view(2, 2)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)  # 45° apart, t = 0.5
    kwargs: dict[str, Any] = {"weight": [1.0, 1.0], "nuslerp_flatten": False}
    close(run("nuslerp", [v0, v1], **kwargs), [[2 * c, c], [0.0, 1.0]])  # along the last dim
    close(run("nuslerp", [v0, v1], nuslerp_row_wise=True, **kwargs), [[1.0, c], [0.0, 2 * c]])


def test_nuslerp_colinear_is_linear() -> None:
    a = t(1.0, 2.0)
    close(run("nuslerp", [a, 3 * a], weight=[3.0, 1.0]), 1.5 * a)


# --- model stock and passthrough ---------------------------------------------------------------------


def test_model_stock_angle_formula() -> None:
    base = t(1.0, 1.0)
    m1, m2 = base + t(1.0, 0.0), base + t(0.5, math.sqrt(3) / 2)  # 60° apart: cos = 0.5, t = 2cos/(1+cos)
    ratio = 2 / 3
    average = (m1 + m2) / 2
    close(run("model_stock", [m1, m2], base), ratio * average + (1 - ratio) * base)


def test_model_stock_three_models_and_orthogonal() -> None:
    base = torch.zeros(3)
    models = [t(1.0, 0.0, 0.0), t(0.0, 1.0, 0.0), t(0.0, 0.0, 1.0)]
    close(run("model_stock", models, base), [0.0, 0.0, 0.0])  # cos = 0 -> t = 0
    models = [t(1.0, 1.0, 0.0), t(1.0, 0.0, 1.0), t(0.0, 1.0, 1.0)]  # pairwise cos 0.5: t = 1.5/2
    close(run("model_stock", models, base), [0.75 * 2 / 3] * 3)


def test_model_stock_filter_wise_and_singular() -> None:
    base = torch.zeros(2, 2)
    m1, m2 = t(1.0, 0.0, 2.0, 0.0).view(2, 2), t(0.0, 1.0, 4.0, 0.0).view(2, 2)
    # row 0 orthogonal -> base; row 1 parallel (cos 1, t 1) -> average
    close(run("model_stock", [m1, m2], base, filter_wise=True), [[0.0, 0.0], [3.0, 0.0]])
    # opposite task vectors: 1 + (N-1)cos = 0, the base is kept
    close(run("model_stock", [t(3.0, 2.0), t(1.0, 2.0)], t(2.0, 2.0)), [2.0, 2.0])


def test_passthrough() -> None:
    x = t(1.0, -2.0)
    assert torch.equal(run("passthrough", [x]), x)
    close(run("passthrough", [x], scale=[0.5]), [0.5, -1.0])


# --- dtype and purity -----------------------------------------------------------------------------------


def _case(name: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor | None, dict[str, Any]]:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(8, 6, generator=g)
    models = [(base + 0.3 * torch.randn(8, 6, generator=g)).to(dtype) for _ in range(3)]
    method = get_method(name)
    count = min(len(models), method.max_models or 3)
    kwargs: dict[str, Any] = {"weight": [0.5, 0.7, 0.3][:count], "density": [0.6, 0.5, 0.7][:count], "t": 0.3}
    return models[:count], (base.to(dtype) if method.uses_base != "never" else None), kwargs


@pytest.mark.parametrize("name", ALL)
def test_bf16_stays_bf16_and_inputs_untouched(name: str) -> None:
    tensors, base, kwargs = _case(name, torch.bfloat16)
    copies = [x.clone() for x in tensors] + ([base.clone()] if base is not None else [])
    out = run(name, tensors, base, seed=0, **kwargs)
    assert out.dtype == torch.bfloat16 and out.shape == tensors[0].shape
    for before, after in zip(copies, tensors + ([base] if base is not None else [])):
        assert torch.equal(before, after)
    ref = run(name, [x.float() for x in tensors], None if base is None else base.float(), seed=0, **kwargs)
    if not get_method(name).randomized and name not in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        close(out, ref.bfloat16(), tol=0.05)  # bf16 math tracks the float32 result
