"""The methods mergekit 0.1.5 added (sce, ram, ramplus_tl, multislerp, karcher, nearswap, arcee_fusion) against their
documented formulas on small hand-made tensors, with expected values worked out here independently."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import run_method

from hf_m2n2.errors import MethodParameterError
from hf_m2n2.methods import REQUIRED, get_method
from hf_m2n2.methods.streaming import Block, Lazy, TensorContext

torch.set_num_threads(1)


def t(*values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


run = run_method


def close(actual: torch.Tensor, expected: Any, tol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert bool(((actual.float() - expected).abs() <= tol * (1 + expected.abs())).all()), (actual, expected)


def test_declarations_follow_mergekit() -> None:
    def shape(name: str) -> tuple:
        m = get_method(name)
        params = {p.name: (p.default, p.per_model) for p in m.params}
        return m.uses_base, m.min_models, m.max_models, m.randomized, params

    assert shape("sce") == (
        "required",
        1,
        None,
        False,
        {"int8_mask": (False, False), "select_topk": (1.0, False)},
    )
    assert shape("ram") == ("required", 1, None, False, {"epsilon": (1e-5, False)})
    assert shape("ramplus_tl")[:4] == ("required", 1, None, False)
    assert shape("ramplus_tl")[4] == {"r": (0.1, False), "alpha": (0.2, False), "epsilon": (1e-5, False)}
    assert shape("multislerp") == (
        "optional",
        1,
        None,
        False,
        {"weight": (REQUIRED, True), "normalize_weights": (True, False), "eps": (1e-8, False)},
    )
    assert shape("karcher") == ("never", 1, None, False, {"max_iter": (10, False), "tol": (1e-5, False)})
    assert shape("nearswap") == ("required", 1, 1, False, {"t": (REQUIRED, False)})
    assert shape("arcee_fusion") == ("required", 1, 1, False, {})
    # elementwise methods may be merged in row chunks; the others see whole tensors (or stream statistics)
    assert get_method("nearswap").elementwise and get_method("ram").elementwise
    assert get_method("ramplus_tl").streamed is not None
    for name in ("sce", "multislerp", "karcher", "arcee_fusion"):
        assert not get_method(name).elementwise and get_method(name).streamed is None


# --- nearswap ----------------------------------------------------------------------------------------------


def test_nearswap_weight_is_t_over_distance_capped_at_one() -> None:
    base = t(0.0, 0.0, 0.0, 1.0)
    other = t(0.05, 0.2, -1.0, 1.0)  # distances 0.05, 0.2, 1.0, 0
    # w = min(0.1 / d, 1): 1, 0.5, 0.1, 1 -> w * other + (1 - w) * base
    close(run("nearswap", [other], base, t=0.1), [0.05, 0.1, -0.1, 1.0])


# --- ram / ramplus_tl ----------------------------------------------------------------------------------------


def test_ram_sums_unique_changes_and_averages_shared_ones() -> None:
    base = t(1.0, 1.0, 1.0, 1.0)
    a = t(1.5, 1.0, 3.0, 1.0 + 1e-6)  # changes: 0.5 (alone), -, 2.0 (shared), below epsilon
    b = t(1.0, 0.0, 2.0, 1.0)  # changes: -, -1.0 (alone), 1.0 (shared), -
    close(run("ram", [a, b], base), [1.5, 0.0, 1.0 + (2.0 + 1.0) / 2, 1.0])


def test_ramplus_scales_unique_changes_by_the_shared_to_unique_ratio() -> None:
    base = torch.zeros(6)
    a = t(1.0, 2.0, 0.0, 4.0, 0.0, 0.0)  # unique at 0, 1; shared at 3
    b = t(0.0, 0.0, 3.0, 2.0, 0.0, 0.0)  # unique at 2; shared at 3
    # rho_a = 1 shared / 2 unique = 0.5 -> clamp to alpha 0.2 -> lambda_a = 1 + 0.5 * 0.2 = 1.1
    # rho_b = 1 / 1 = 1 -> 0.2 -> lambda_b = 1.1; shared element: (4 + 2) / 2
    close(run("ramplus_tl", [a, b], base, r=0.5), [1.1, 2.2, 3.3, 3.0, 0.0, 0.0])
    # alpha large: lambda_a = 1 + 0.5 * 0.5, lambda_b = 1 + 0.5 * 1
    close(run("ramplus_tl", [a, b], base, r=0.5, alpha=5.0), [1.25, 2.5, 4.5, 3.0, 0.0, 0.0])


def test_ramplus_streamed_blocks_give_the_whole_tensor_result() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 5, generator=g)
    models = [
        base + (torch.rand(12, 5, generator=g) < 0.4) * torch.randn(12, 5, generator=g) for _ in range(3)
    ]
    method = get_method("ramplus_tl")
    params = {"r": 0.7, "alpha": 0.9, "epsilon": 1e-5}
    whole = method.fn(models, base, params, [{}] * 3, None)
    context = TensorContext((12, 5), params, [{}] * 3)
    blocks = [
        Block(context, [m[r : r + 4] for m in models], base[r : r + 4], i, (r, r + 4))
        for i, r in enumerate((0, 4, 8))
    ]
    stats = method.streamed.statistics(context, [Lazy(b.index, (4, 5), lambda b=b: b) for b in blocks])
    assert torch.equal(torch.cat([method.streamed.apply(b, stats) for b in blocks]), whole)


# --- sce ------------------------------------------------------------------------------------------------------


def test_sce_energy_weights_and_sign_consensus() -> None:
    base = torch.zeros(3)
    a = t(2.0, 2.0, -2.0)  # energy (4 + 4 + 4) / 3 = 4
    b = t(1.0, -1.0, 1.0)  # energy 1  -> weights 0.8, 0.2
    # elected signs: +, +, -; element 1: b disagrees, element 2: b disagrees
    expected = [(0.8 * 2 + 0.2 * 1) / 1.0, 2.0, -2.0]
    close(run("sce", [a, b], base), expected)


def test_sce_select_topk_keeps_the_highest_variance_positions() -> None:
    base = torch.zeros(4)
    a = t(1.0, 4.0, 0.0, 3.0)
    b = t(
        1.0, 0.0, 2.0, 3.0
    )  # variances over models: 0, 4, 1, 0 -> nonzero 2, k = int(2 * 0.5) = 1: position 1
    # after selection a = (0, 4, 0, 0), b = 0: weights 1, 0; elected + at 1; b's sign 0 never agrees
    close(run("sce", [a, b], base, select_topk=0.5), [0.0, 4.0, 0.0, 0.0])


# --- multislerp ------------------------------------------------------------------------------------------------


def test_multislerp_two_orthogonal_unit_vectors_is_the_arc_midpoint() -> None:
    out = run("multislerp", [t(1.0, 0.0), t(0.0, 1.0)], weight=[1.0, 1.0])
    # mean direction (1, 1)/sqrt2; tangents cancel; exp map of a zero tangent; mean norm 1
    close(out, [1 / math.sqrt(2), 1 / math.sqrt(2)], tol=1e-4)


def test_multislerp_three_models_closed_form() -> None:
    x, y, z = t(2.0, 0.0, 0.0), t(0.0, 1.0, 0.0), t(0.0, 0.0, 3.0)
    w = torch.tensor([0.5, 0.25, 0.25])
    units = torch.eye(3)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    angle = tangent.norm()
    direction = mean * torch.cos(angle) + tangent * torch.sin(angle) / angle
    expected = direction * float((torch.tensor([2.0, 1.0, 3.0]) * w).sum())
    close(run("multislerp", [x, y, z], weight=[2.0, 1.0, 1.0]), expected, tol=1e-4)


def test_multislerp_base_works_on_task_vectors_and_one_model_passes_through() -> None:
    base = t(1.0, 1.0)
    out = run("multislerp", [t(2.0, 1.0), t(1.0, 2.0)], base, weight=[1.0, 1.0])
    close(out, [1 + 1 / math.sqrt(2), 1 + 1 / math.sqrt(2)], tol=1e-4)
    x = t(3.0, -1.0)
    assert torch.equal(run("multislerp", [x], base, weight=[1.0]), x)


def test_multislerp_opposite_models() -> None:
    close(run("multislerp", [t(1.0, 2.0), t(-1.0, -2.0)], weight=[1.0, 1.0]), [0.0, 0.0])  # linear fallback
    with pytest.raises(MethodParameterError, match="weighted mean of the models' directions is zero"):
        run("multislerp", [t(1.0, 0.0), t(-1.0, 0.0), t(0.0, 0.0)], weight=[1.0, 1.0, 1.0])


# --- karcher ---------------------------------------------------------------------------------------------------


def test_karcher_of_orthogonal_vectors_is_their_bisector_at_the_mean_norm() -> None:
    out = run("karcher", [t(2.0, 0.0), t(0.0, 4.0)])
    close(out, [3 / math.sqrt(2), 3 / math.sqrt(2)], tol=1e-4)


def test_karcher_converges_to_the_spherical_mean_of_three_directions() -> None:
    angles = [0.0, 0.5, 1.3]  # on a circle the Karcher mean direction is the mean angle
    vectors = [t(math.cos(a), math.sin(a)) * (i + 1) for i, a in enumerate(angles)]
    out = run("karcher", vectors, max_iter=50, tol=1e-7)
    mean = sum(angles) / 3
    close(out, [2.0 * math.cos(mean), 2.0 * math.sin(mean)], tol=1e-4)
    one_step = run("karcher", vectors, max_iter=0)  # no iteration: the normalized average direction
    avg = sum(torch.stack([t(math.cos(a), math.sin(a)) for a in angles]))
    close(one_step, 2.0 * avg / avg.norm(), tol=1e-4)


# --- arcee_fusion -------------------------------------------------------------------------------------------


def test_arcee_fusion_keeps_only_outlier_importance_changes() -> None:
    base = torch.zeros(4, 3)
    model = base.clone()
    model[0, 0] = 2.0  # the only row whose softmax moves: importance |d| * KL there, 0 elsewhere
    model[0, 1] = 0.1
    p = torch.softmax(model[0], 0) + 1e-8
    q = torch.softmax(base[0], 0) + 1e-8
    kl = float((p * torch.log(p / q)).sum())
    scores = (model - base).abs() * torch.tensor([kl, 0, 0, 0])[:, None]
    assert scores[0, 0] > scores[0, 1] > 0
    # 12 scores, 10 zero: quartiles at sorted positions 2, 5, 8 are 0 -> threshold 0: every change is kept
    close(run("arcee_fusion", [model], base), model)
    g = torch.Generator().manual_seed(0)
    base2 = torch.randn(8, 6, generator=g)
    model2 = base2 + 0.05 * torch.randn(8, 6, generator=g)
    model2[3, 2] += 3.0  # a large change: an outlier score
    p2, q2 = torch.softmax(model2, -1) + 1e-8, torch.softmax(base2, -1) + 1e-8
    scores2 = (model2 - base2).abs() * (p2 * torch.log(p2 / q2)).sum(-1, keepdim=True)
    ordered = scores2.reshape(-1).sort().values  # 48 scores: quartiles at positions int(q * 47) = 11, 23, 35
    threshold = ordered[23] + 1.5 * (ordered[35] - ordered[11])
    keep = scores2 >= threshold
    assert keep[3, 2] and 0 < int(keep.sum()) < 48
    close(run("arcee_fusion", [model2], base2), torch.where(keep, model2, base2))


# --- through the engine ---------------------------------------------------------------------------------------

ENGINE_CASES = {
    "nearswap": ({"t": 0.01}, {}),
    "ram": ({"epsilon": 1e-3}, {}),
    "ramplus_tl": ({"r": 0.5, "alpha": 0.5, "epsilon": 1e-3}, {}),
    "sce": ({"select_topk": 0.5}, {}),
    "multislerp": ({}, {"weight": 0.7}),
    "karcher": ({"max_iter": 5}, {}),
    "arcee_fusion": ({}, {}),
}


@pytest.mark.parametrize("name", sorted(ENGINE_CASES))
def test_merged_in_row_blocks_by_the_engine_equals_the_method_on_whole_tensors(seeds, tmp_path, name):
    """`hf-m2n2 merge` with tiny row blocks writes what the method computes on the whole seed tensors."""
    from helpers import load_dir

    from hf_m2n2.merge import MergeOptions, merge
    from hf_m2n2.spec import parse_spec

    method = get_method(name)
    params, per_model = ENGINE_CASES[name]
    others = ["a"] if method.max_models == 1 else ["a", "b"]
    spec = {
        "merge_method": name,
        "models": [{"model": str(seeds[k]), "parameters": dict(per_model)} for k in others],
        "parameters": params,
    }
    if method.uses_base != "never":
        spec["base_model"] = str(seeds["base"])
    merge(
        parse_spec(spec),
        tmp_path / "out",
        MergeOptions(progress=False, chunk_elements=300, memory_budget=1 << 14),
    )
    merged = load_dir(tmp_path / "out")
    inputs = [load_dir(seeds[k]) for k in others]
    base = load_dir(seeds["base"]) if method.uses_base != "never" else None
    resolved = {p.name: params.get(p.name, p.default) for p in method.global_params}
    model_params = [{p.name: per_model.get(p.name, p.default) for p in method.model_params} for _ in others]
    for tensor, out in merged.items():
        expected = method.fn(
            [x[tensor] for x in inputs], None if base is None else base[tensor], resolved, model_params, None
        )
        assert torch.equal(out, expected.to(out.dtype)), tensor


# --- a base_model given to a method that takes none (mergekit 0.1.5 merges it as one more model) --------------


def _merge_spec(spec: dict[str, Any], out) -> dict[str, torch.Tensor]:
    from helpers import load_dir

    from hf_m2n2.merge import MergeOptions, merge
    from hf_m2n2.spec import parse_spec

    merge(parse_spec(spec), out, MergeOptions(progress=False))
    return load_dir(out)


def test_karcher_merges_an_unlisted_base_model_as_one_more_model(seeds, tmp_path) -> None:
    from helpers import load_dir

    spec = {
        "merge_method": "karcher",
        "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}],
        "base_model": str(seeds["base"]),
        "parameters": {"max_iter": 5},
    }
    merged = _merge_spec(spec, tmp_path / "out")
    a, b, base = (load_dir(seeds[k]) for k in ("a", "b", "base"))
    fn = get_method("karcher").fn
    params = {"max_iter": 5, "tol": 1e-5}
    name = "model.layers.0.self_attn.o_proj.weight"
    three = fn([a[name], b[name], base[name]], None, params, [{}] * 3, None)
    two = fn([a[name], b[name]], None, params, [{}] * 2, None)
    assert not torch.equal(three, two)
    for tensor, out in merged.items():
        expected = fn([a[tensor], b[tensor], base[tensor]], None, params, [{}] * 3, None)
        assert torch.equal(out, expected.to(out.dtype)), tensor


def test_linear_with_an_unlisted_base_model_needs_its_weight(seeds, tmp_path) -> None:
    from helpers import load_dir

    from hf_m2n2.errors import SpecError

    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 0.6}},
            {"model": str(seeds["b"]), "parameters": {"weight": 0.4}},
        ],
        "base_model": str(seeds["base"]),
    }
    with pytest.raises(SpecError, match=r"^base_model: linear merges base_model as one more model .* weight"):
        _merge_spec(spec, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # a global weight applies to the base too: the plain mean of the three
    spec = {
        **spec,
        "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}],
        "parameters": {"weight": 1.0},
    }
    merged = _merge_spec(spec, tmp_path / "out")
    a, b, base = (load_dir(seeds[k]) for k in ("a", "b", "base"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(merged[name], (a[name] + b[name] + base[name]) / 3, atol=1e-6)


def test_passthrough_refuses_a_base_model_it_would_count_as_a_second_model(seeds, tmp_path) -> None:
    from hf_m2n2.errors import SpecError

    spec = {
        "merge_method": "passthrough",
        "models": [{"model": str(seeds["a"])}],
        "base_model": str(seeds["base"]),
    }
    with pytest.raises(SpecError, match=r"^base_model: passthrough takes at most 1 model"):
        _merge_spec(spec, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


# --- slerp's coefficients in float32, as mergekit computes them --------------------------------------------------


def test_slerp_of_float32_tensors_uses_float32_coefficients_as_mergekit() -> None:
    """cos = 24/25 exactly (norms 5 and 5, dot 24); at t = 0.35 the coefficients rounded from float64 arithmetic
    differ from mergekit's float32 ones in the last bit, and so does the float32 output."""
    v0, v1 = t(3.0, 4.0), t(4.0, 3.0)
    cos, t32 = torch.tensor(24 / 25, dtype=torch.float32), torch.tensor(0.35, dtype=torch.float32)
    theta = torch.acos(cos)
    expected = (
        torch.sin((1 - t32) * theta) / torch.sin(theta) * v0 + torch.sin(t32 * theta) / torch.sin(theta) * v1
    )
    theta64 = math.acos(24 / 25)
    rounded_from_float64 = (math.sin(0.65 * theta64) * v0 + math.sin(0.35 * theta64) * v1) / math.sin(theta64)
    assert not torch.equal(rounded_from_float64, expected)  # the case tells the two apart
    assert torch.equal(run("slerp", [v1], v0, t=0.35), expected)


# --- the mergekit parity bench's classification of known differences ---------------------------------------------


def _bench_module(name: str):
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parent.parent / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def test_bench_compares_mergekit_float32_output_cast_to_the_requested_dtype() -> None:
    compare = _bench_module("compare_configs_mergekit")
    ref = {"w": torch.linspace(-1, 1, 12).reshape(3, 4)}
    ours = {"w": ref["w"].to(torch.bfloat16)}
    same = compare.Comparison()
    compare.compare_tensors(ref, ours, same, torch.bfloat16)
    assert (same.cast_tensors, same.structure, same.values) == (["w"], [], [])
    wrong = {"w": ours["w"].clone()}
    wrong["w"][1, 2] += 0.25
    differ = compare.Comparison()
    compare.compare_tensors(ref, wrong, differ, torch.bfloat16)
    assert differ.values and bool(differ.masks["w"][1, 2]) and int(differ.masks["w"].sum()) == 1
    unrequested = compare.Comparison()  # a dtype the config did not ask for stays a structural difference
    compare.compare_tensors(ref, ours, unrequested, torch.float16)
    assert unrequested.structure and not unrequested.cast_tensors


def test_bench_explains_sce_differences_by_tied_variances_only(tmp_path) -> None:
    import json

    from safetensors.torch import save_file

    from hf_m2n2.methods.sce import merge_selected, select_by_variance

    ties = _bench_module("mergekit_parity_ties")
    name = "model.layers.0.mlp.w"
    scale = t(1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 0.5, 1, 1, 1, 1, 1).reshape(4, 4)
    tensors = {"base": torch.zeros(4, 4), "a": scale, "b": -0.5 * scale}  # variances tie: 12 of 16 equal
    for key, value in tensors.items():
        (tmp_path / key).mkdir()
        save_file({name: value}, str(tmp_path / key / "model.safetensors"))
        (tmp_path / key / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    config = {
        "merge_method": "sce",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}],
        "dtype": "float32",
        "parameters": {"select_topk": 0.4},  # k = 6: positions 1 and 4, then 4 of the 12 tied ones
    }
    deltas = torch.stack([tensors["a"], tensors["b"]])
    variance = torch.var(deltas, dim=0, unbiased=False)
    theirs = torch.zeros(16)
    theirs[torch.topk(variance.reshape(-1), 6).indices] = 1  # mergekit's selection
    reference = merge_selected(tensors["base"], deltas * theirs.reshape(4, 4))
    ours = merge_selected(tensors["base"], deltas * select_by_variance(deltas, 0.4))
    assert not torch.equal(reference, ours)
    (tmp_path / "mk").mkdir()
    save_file({name: reference}, str(tmp_path / "mk" / "model.safetensors"))
    assert ties.sce_differs_only_at_variance_ties(config, tmp_path / "mk", {name: reference != ours})
    save_file({name: reference + 1e-3}, str(tmp_path / "mk" / "model.safetensors"))  # not explained by ties
    assert not ties.sce_differs_only_at_variance_ties(config, tmp_path / "mk", {name: reference != ours})
