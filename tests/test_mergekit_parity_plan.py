"""Planning parity with mergekit 0.1.5: gradient positions, vocabulary rows, per-token embedding sources, tensors
missing in one seed. Each merged tensor is checked against its formula on tiny synthetic Llamas."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_seed, load_dir

from hf_m2n2.errors import CheckpointError
from hf_m2n2.merge import MergeOptions, merge
from hf_m2n2.spec import parse_spec


def _run(spec: dict, out) -> dict[str, torch.Tensor]:
    merge(parse_spec(spec), out, MergeOptions(progress=False, workers=1))
    return load_dir(out)


def _ties(seeds, density) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(seeds["base"]),
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 0.6, "density": density}},
            {"model": str(seeds["b"]), "parameters": {"weight": 0.4, "density": density}},
        ],
    }


def test_tensors_outside_the_layers_take_the_gradient_at_t0(seeds, tmp_path):
    """mergekit's examples/ties.yml gradient: embeddings, final norm and lm_head all take the value at t = 0 (1.0),
    layer 0 of 2 the value at t = 0 and layer 1 the value at t = 1 (0.1)."""
    gradient = _run(_ties(seeds, [1, 0.7, 0.1]), tmp_path / "gradient")
    at_0 = _run(_ties(seeds, 1.0), tmp_path / "at0")
    at_1 = _run(_ties(seeds, 0.1), tmp_path / "at1")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(gradient[name], at_0[name]), name
        assert not torch.equal(gradient[name], at_1[name]), name
    assert torch.equal(
        gradient["model.layers.0.mlp.up_proj.weight"], at_0["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(
        gradient["model.layers.1.mlp.up_proj.weight"], at_1["model.layers.1.mlp.up_proj.weight"]
    )


def _drop(src, dst, name):
    from safetensors.torch import load_file, save_file

    copy_seed(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "name", ["model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.up_proj.weight"]
)
@pytest.mark.parametrize("broken_first", [True, False])
def test_a_tensor_missing_in_any_seed_is_an_error_whatever_the_order(seeds, tmp_path, name, broken_first):
    broken = _drop(seeds["a"], tmp_path / "broken", name)
    models = [str(broken), str(seeds["b"])]
    if not broken_first:
        models.reverse()
    spec = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1}} for m in models]}
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing in seed broken"):
        merge(parse_spec(spec), tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_a_loader_ignored_buffer_stored_by_one_seed_only_is_dropped(seeds, tmp_path):
    """An old checkpoint's rotary `inv_freq` (a buffer transformers ignores when loading; mergekit never writes it):
    present in one seed only, it is left out of the output instead of failing the merge."""
    from safetensors.torch import load_file, save_file

    old = copy_seed(seeds["a"], tmp_path / "old")
    tensors = load_file(str(old / "model.safetensors"))
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    tensors[buffer] = torch.ones(8)
    save_file(tensors, str(old / "model.safetensors"), metadata={"format": "pt"})
    for order in ([old, seeds["b"]], [seeds["b"], old]):
        spec = {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1}} for m in order],
        }
        out = tmp_path / f"out-{order[0].name}"
        merged = _run(spec, out)
        assert buffer not in merged
        assert merged.keys() == load_dir(seeds["b"]).keys()
