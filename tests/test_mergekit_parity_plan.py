"""Planning parity with mergekit 0.1.5: gradient positions, vocabulary rows, per-token embedding sources, tensors
missing in one seed. Each merged tensor is checked against its formula on tiny synthetic Llamas."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import copy_seed, load_dir

from hf_m2n2.errors import CheckpointError, SpecError
from hf_m2n2.merge import MergeOptions, merge, validate
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


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
N = 259  # the byte tokenizer's tokens: rows of the base


@pytest.fixture(scope="module")
def chat(seeds, tmp_path_factory) -> dict:
    """Two ChatML fine-tunes of the base (261 rows: the base's 259 + <|im_start|>, <|im_end|>)."""
    from hf_m2n2.demo.toy import build_tiny_llama

    root = tmp_path_factory.mktemp("chat")
    extra = [IM_START, IM_END]
    return {
        "chat": build_tiny_llama(root / "chat", seed=6, base=seeds["base"], extra_tokens=extra),
        "chat2": build_tiny_llama(root / "chat2", seed=7, base=seeds["base"], extra_tokens=extra),
    }


def _linear(*models, **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1}} for m in models],
        **extra,
    }


def _vocab(out) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out)).get_vocab()


EMBEDS = ("model.embed_tokens.weight", "lm_head.weight")


def test_a_token_only_one_seed_has_keeps_that_seeds_row(seeds, chat, tmp_path):
    """union of base, a and a ChatML fine-tune: <|im_start|>'s merged row equals the fine-tune's row (it was 1/3
    of it: the two seeds that lack it gave zero rows); shared tokens are the plain mean."""
    merged = _run(
        _linear(seeds["base"], seeds["a"], chat["chat"], tokenizer_source="union"), tmp_path / "out"
    )
    vocab = _vocab(tmp_path / "out")
    base, a, c = load_dir(seeds["base"]), load_dir(seeds["a"]), load_dir(chat["chat"])
    for name in EMBEDS:
        assert merged[name].shape[0] == N + 2
        for token in (IM_START, IM_END):
            torch.testing.assert_close(merged[name][vocab[token]], c[name][vocab[token]], rtol=1e-6, atol=0)
        torch.testing.assert_close(merged[name][:N], (base[name] + a[name] + c[name][:N]) / 3)


def test_a_token_several_seeds_have_but_not_the_base_takes_their_mean(seeds, chat, tmp_path):
    spec = _linear(
        seeds["base"], chat["chat"], chat["chat2"], tokenizer_source="union", base_model=str(seeds["base"])
    )
    merged = _run(spec, tmp_path / "out")
    c1, c2 = load_dir(chat["chat"]), load_dir(chat["chat2"])
    for name in EMBEDS:
        torch.testing.assert_close(merged[name][N:], (c1[name][N:] + c2[name][N:]) / 2)


def _slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (the textbook formula)."""
    a, b = v0.flatten().double(), v1.flatten().double()
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1, 1))
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return out.reshape(v0.shape).float()


def test_slerp_with_a_union_tokenizer_sees_the_filled_rows(seeds, chat, tmp_path):
    """The base lacks the ChatML rows: it takes the fine-tune's before the slerp, so the angle (and every row) is
    that of the two full embeddings, not of a base with zero rows."""
    spec = {
        "merge_method": "slerp",
        "base_model": str(seeds["base"]),
        "models": [{"model": str(seeds["base"])}, {"model": str(chat["chat"])}],
        "parameters": {"t": 0.3},
        "tokenizer_source": "union",
    }
    merged = _run(spec, tmp_path / "out")
    base, c = load_dir(seeds["base"]), load_dir(chat["chat"])
    for name in EMBEDS:
        filled = torch.cat([base[name], c[name][N:]])
        torch.testing.assert_close(merged[name], _slerp(filled, c[name], 0.3), rtol=1e-4, atol=1e-6)


def test_padding_rows_hold_the_mean_embedding(seeds, chat, tmp_path):
    spec = _linear(seeds["base"], chat["chat"], tokenizer={"source": "union", "pad_to_multiple_of": 64})
    merged = _run(spec, tmp_path / "out")
    for name in EMBEDS:
        assert merged[name].shape[0] == 320
        mean = merged[name][: N + 2].mean(0)
        torch.testing.assert_close(merged[name][N + 2 :], mean.expand(320 - N - 2, -1), rtol=1e-5, atol=1e-6)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(tmp_path / "out")).vocab_size == 320


def test_token_sources_zero_model_token_and_force(seeds, chat, tmp_path):
    """tokenizer.tokens as in mergekit: <|im_start|> from the base's <s> row for the seed lacking it (the
    fine-tune keeps its own), <|im_end|> forced to zeros, a new token <|tool|> added from row 5 of the
    fine-tune, and the base's </s> forced to the fine-tune's </s> row."""
    tokens = {
        IM_START: {"source": {"kind": "model_token", "model": str(seeds["base"]), "token": "<s>"}},
        IM_END: {"source": {"kind": "zero"}, "force": True},
        "<|tool|>": {"source": {"kind": "model_token", "model": str(chat["chat"]), "token_id": 5}},
        "</s>": {"source": str(chat["chat"]), "force": True},
    }
    merged = _run(_linear(seeds["base"], chat["chat"], tokenizer={"tokens": tokens}), tmp_path / "out")
    vocab = _vocab(tmp_path / "out")
    base, c = load_dir(seeds["base"]), load_dir(chat["chat"])
    assert len(vocab) == N + 3 and vocab["<|tool|>"] == N + 2
    for name in EMBEDS:
        rows = merged[name]
        assert rows.shape[0] == N + 3
        torch.testing.assert_close(rows[vocab[IM_START]], (base[name][1] + c[name][vocab[IM_START]]) / 2)
        assert torch.equal(rows[vocab[IM_END]], torch.zeros_like(rows[0]))
        torch.testing.assert_close(rows[vocab["<|tool|>"]], c[name][5], rtol=1e-6, atol=0)
        torch.testing.assert_close(rows[vocab["</s>"]], c[name][2], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "entry, path",
    [
        ({"source": {"kind": "bogus"}}, "tokenizer.tokens.<x>.source: unknown kind 'bogus'"),
        (
            {"source": {"kind": "model_token", "model": "m"}},
            "tokenizer.tokens.<x>.source: model_token: give exactly",
        ),
        (
            {"source": {"kind": "zero"}, "forse": True},
            "tokenizer.tokens.<x>.forse: unknown key (did you mean force?)",
        ),
    ],
)
def test_token_entries_are_typed_with_yaml_path_errors(entry, path):
    spec = _linear("m", tokenizer={"source": "union", "tokens": {"<x>": entry}})
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert str(info.value).startswith(path), str(info.value)


def test_a_token_source_that_is_not_merged_is_a_spec_error(seeds, chat, tmp_path):
    tokens = {"<x>": {"source": {"kind": "model_token", "model": str(chat["chat2"]), "token_id": 3}}}
    spec = _linear(seeds["base"], chat["chat"], tokenizer={"tokens": tokens})
    with pytest.raises(
        SpecError, match=r"^tokenizer\.tokens\.<x>\.source\.model: .* is not one of the merged models"
    ):
        merge(parse_spec(spec), tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_a_token_entry_without_a_source_takes_the_automatic_default(seeds, chat, tmp_path):
    """`{force: true}` alone gives every seed the default row (the base's, all having the token); `{}` alone only
    adds a token, zero where no seed has it."""
    tokens = {"</s>": {"force": True}, "<|new|>": {}}
    spec = _linear(seeds["base"], chat["chat"], base_model=str(seeds["base"]), tokenizer={"tokens": tokens})
    merged = _run(spec, tmp_path / "out")
    vocab = _vocab(tmp_path / "out")
    base = load_dir(seeds["base"])
    for name in EMBEDS:
        torch.testing.assert_close(merged[name][vocab["</s>"]], base[name][2], rtol=1e-6, atol=0)
        assert torch.equal(merged[name][vocab["<|new|>"]], torch.zeros_like(merged[name][0]))


def test_a_token_source_missing_from_one_tensors_models_names_the_tensor(seeds, chat, tmp_path):
    """Slices: lm_head comes from the last slice, which does not merge the fine-tune the token's row is taken from."""
    tokens = {IM_START: {"source": str(chat["chat"]), "force": True}}
    spec = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": str(m), "layer_range": [0, 1], "parameters": {"weight": 1}}
                    for m in (seeds["base"], chat["chat"])
                ]
            },
            {
                "sources": [
                    {"model": str(m), "layer_range": [1, 2], "parameters": {"weight": 1}}
                    for m in (seeds["base"], seeds["a"])
                ]
            },
        ],
        "tokenizer": {"tokens": tokens},
    }
    message = r"tokenizer\.tokens\.<\|im_start\|>\.source: .* not merged into 'lm_head.weight'"
    with pytest.raises(SpecError, match=message):  # refused when planned, before anything is written
        merge(parse_spec(spec), tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists()
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=message):  # validate refuses what merge refuses
        validate(path)
