"""Blend genomes over real checkpoints: live materialization equals the exported weights, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import load_dir

from hf_m2n2.blend import select_tensors
from hf_m2n2.blend_ops import (
    BlendOps,
    BlendRecipe,
    BlendTarget,
    SeedTensors,
    evolved_layout,
    export_blend,
    seed_gram,
    seed_record,
)
from hf_m2n2.hub import resolve_model
from hf_m2n2.live import LiveModel
from hf_m2n2.seeds import open_seed


@pytest.fixture(scope="module")
def blend_setup(seeds, tmp_path_factory):
    opened = [open_seed(resolve_model(str(seeds[k]))) for k in ("a", "b")]
    names = select_tensors(opened[0].checkpoint.names, exclude=["model.embed_tokens.weight"])
    layout = evolved_layout(opened, names, block_size=512)
    tensors = SeedTensors(opened, names, torch.bfloat16, "cpu")
    cache = tmp_path_factory.mktemp("gram") / "gram.npz"
    gram = seed_gram(layout, tensors, cache)
    live = LiveModel(seeds["a"], dtype=torch.bfloat16)
    return opened, names, layout, tensors, gram, live, cache


def _child(ops, rng):
    archive = ops.seed_genomes()
    for _ in range(6):
        i, j = rng.choice(len(archive), size=2, replace=False)
        archive.append(
            ops.crossover(archive[i], archive[j], float(rng.uniform()), int(rng.integers(ops.size + 1)))
        )
    return archive[-1]


def test_live_weights_equal_exported_and_rebuilt_weights(blend_setup, tmp_path):
    opened, names, layout, tensors, gram, live, _ = blend_setup
    ops = BlendOps(layout, gram, len(tensors), "segment")
    child = _child(ops, np.random.default_rng(3))
    model = BlendTarget(layout, tensors, live).write(child)
    live_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    recipe = BlendRecipe([seed_record(s) for s in opened], names, layout.block_size, 0, "bfloat16", child)
    export_blend(recipe, opened, tmp_path / "export")
    exported = load_dir(tmp_path / "export")
    for name, tensor in exported.items():
        assert torch.equal(tensor, live_state[name]), name
    assert torch.equal(
        exported["model.embed_tokens.weight"],
        load_dir(opened[0].model.path)["model.embed_tokens.weight"].to(torch.bfloat16),
    )  # not evolved: copied from the fixed seed
    rebuilt = BlendRecipe.load(tmp_path / "export" / "recipe.json")
    export_blend(rebuilt, opened, tmp_path / "rebuilt")
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == (
        tmp_path / "rebuilt" / "model.safetensors"
    ).read_bytes()


def test_materialize_changes_the_live_model_in_place(blend_setup):
    _, _, layout, tensors, gram, live, _ = blend_setup
    ops = BlendOps(layout, gram, len(tensors))
    target = BlendTarget(layout, tensors, live)
    seed_a, seed_b = ops.seed_genomes()
    ptrs = [p.data_ptr() for p in live.model.parameters()]
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        out_b = target.write(seed_b)(ids).logits.clone()
        out_a = target.write(seed_a)(ids).logits.clone()
    assert not torch.equal(out_a, out_b)
    assert [p.data_ptr() for p in live.model.parameters()] == ptrs
    with torch.no_grad():
        assert torch.equal(target.write(seed_b)(ids).logits, out_b)


def test_gram_cache_is_reused_and_keyed(blend_setup):
    _, _, layout, tensors, gram, _, cache = blend_setup
    assert cache.exists()
    np.testing.assert_array_equal(seed_gram(layout, tensors, cache), gram)
    assert gram.shape == (layout.num_blocks + 1, 2, 2)
