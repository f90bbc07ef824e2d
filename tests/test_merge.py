"""End-to-end `hf-m2n2 merge`: merged values equal their formulas, layouts and sidecar files are right."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_m2n2.merge import CHATML


def _merge(cli, spec_path, out, *flags):
    code, stdout, stderr = cli("merge", spec_path, out, "--quiet", *flags)
    assert code == 0, stderr
    return load_dir(out)


def test_linear_equals_normalized_weighted_sum(seeds, write_spec, cli, tmp_path):
    spec = write_spec(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(seeds["a"]), "parameters": {"weight": 1.0}},
                {"model": str(seeds["b"]), "parameters": {"weight": 3.0}},
            ],
        }
    )
    merged = _merge(cli, spec, tmp_path / "out")
    a, b = load_dir(seeds["a"]), load_dir(seeds["b"])
    assert merged.keys() == a.keys()
    for name in a:
        torch.testing.assert_close(merged[name], (a[name] + 3 * b[name]) / 4, rtol=1e-6, atol=1e-7)


def test_parameter_precedence_gradients_and_filters(seeds, write_spec, cli, tmp_path):
    """Model-level beats global; `mlp` tensors follow the gradient [0, 1] over the 2 layers; others take 0.5."""
    spec = write_spec(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(seeds["base"]),
            "models": [
                {
                    "model": str(seeds["a"]),
                    "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]},
                },
                {"model": str(seeds["b"])},
            ],
            "parameters": {"weight": 0.25},
        }
    )
    merged = _merge(cli, spec, tmp_path / "out")
    base, a, b = load_dir(seeds["base"]), load_dir(seeds["a"]), load_dir(seeds["b"])
    for name in base:
        if "mlp" in name:
            w_a = 0.0 if ".layers.0." in name else 1.0
        else:
            w_a = 0.5
        expected = base[name] + w_a * (a[name] - base[name]) + 0.25 * (b[name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_slerp_gradient_endpoints(seeds, write_spec, cli, tmp_path):
    """t: [0, 1] gives the other model at layer 1 (t=1) and the base everywhere else: layer 0 and every tensor
    outside the layers, before or after them, sit at t=0 (as in mergekit since 0.1.2)."""
    spec = write_spec(
        {
            "merge_method": "slerp",
            "base_model": str(seeds["base"]),
            "models": [{"model": str(seeds["base"])}, {"model": str(seeds["a"])}],
            "parameters": {"t": [0.0, 1.0]},
        }
    )
    merged = _merge(cli, spec, tmp_path / "out")
    base, a = load_dir(seeds["base"]), load_dir(seeds["a"])
    for name in base:
        expected = a[name] if ".layers.1." in name else base[name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_passthrough_frankenmerge_renumbers_layers(seeds, write_spec, cli, tmp_path):
    spec = write_spec(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(seeds["a"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(seeds["b"]), "layer_range": [1, 2]}]},
            ],
        }
    )
    out = tmp_path / "out"
    merged = _merge(cli, spec, out)
    a, b = load_dir(seeds["a"]), load_dir(seeds["b"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    suffix = "self_attn.q_proj.weight"
    assert torch.equal(merged[f"model.layers.0.{suffix}"], a[f"model.layers.0.{suffix}"])
    assert torch.equal(merged[f"model.layers.1.{suffix}"], a[f"model.layers.1.{suffix}"])
    assert torch.equal(merged[f"model.layers.2.{suffix}"], b[f"model.layers.1.{suffix}"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 3


def test_sharded_output_loads_and_equals_single_file(seeds, write_spec, cli, tmp_path):
    spec = write_spec(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(seeds["a"]), "parameters": {"weight": 1}},
                {"model": str(seeds["b"]), "parameters": {"weight": 1}},
            ],
        }
    )
    single = _merge(cli, spec, tmp_path / "single")
    sharded = _merge(cli, spec, tmp_path / "sharded", "--out-shard-size", "100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for name in single:
        assert torch.equal(single[name], sharded[name])
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"))
    assert torch.equal(model.state_dict()["model.norm.weight"], single["model.norm.weight"])


def test_out_dtype_bf16_and_config_dtype(seeds, write_spec, cli, tmp_path):
    spec = write_spec(
        {
            "merge_method": "linear",
            "out_dtype": "bfloat16",
            "models": [
                {"model": str(seeds["a"]), "parameters": {"weight": 1}},
                {"model": str(seeds["b"]), "parameters": {"weight": 1}},
            ],
        }
    )
    merged = _merge(cli, spec, tmp_path / "out")
    a, b = load_dir(seeds["a"]), load_dir(seeds["b"])
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(merged[name], ((a[name] + b[name]) / 2).to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_random_methods_are_seeded(seeds, write_spec, cli, tmp_path):
    spec = write_spec(
        {
            "merge_method": "dare_ties",
            "base_model": str(seeds["base"]),
            "models": [
                {"model": str(seeds["a"]), "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": str(seeds["b"]), "parameters": {"weight": 0.5, "density": 0.5}},
            ],
        }
    )
    first = _merge(cli, spec, tmp_path / "one", "--random-seed", "7")
    again = _merge(cli, spec, tmp_path / "two", "--random-seed", "7")
    other = _merge(cli, spec, tmp_path / "three", "--random-seed", "8")
    name = "model.layers.0.mlp.down_proj.weight"
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first[name], other[name])
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors"
    ).read_bytes()


def test_tokenizer_copy_and_chat_template(seeds, write_spec, cli, tmp_path):
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 1}},
            {"model": str(seeds["b"]), "parameters": {"weight": 1}},
        ],
    }
    _merge(cli, write_spec(dict(spec, chat_template="chatml")), tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "chat"))
    assert tok.chat_template == CHATML
    assert "<|im_start|>user\nhi<|im_end|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    _merge(cli, write_spec(spec, "plain.yaml"), tmp_path / "plain", "--no-copy-tokenizer")
    assert not (tmp_path / "plain" / "tokenizer.json").exists()
    assert (tmp_path / "plain" / "merge_config.yaml").read_text() == (tmp_path / "plain.yaml").read_text()


@pytest.mark.parametrize("source, rows", [("base", 259), ("union", 260), (None, 259)])
def test_vocabulary_rows_aligned_by_token(seeds, write_spec, cli, tmp_path, source, rows):
    """base has 259 rows, `wide` 260 (an extra token): rows are matched by token, gaps filled, never a crash."""
    spec = {
        "merge_method": "linear",
        "base_model": str(seeds["base"]),
        "models": [
            {"model": str(seeds["base"]), "parameters": {"weight": 1}},
            {"model": str(seeds["wide"]), "parameters": {"weight": 1}},
        ],
    }
    if source:
        spec["tokenizer_source"] = source
    code, _, stderr = cli("merge", write_spec(spec), tmp_path / "out", "--quiet")
    assert code == 0, stderr
    merged = load_dir(tmp_path / "out")
    base, wide = load_dir(seeds["base"]), load_dir(seeds["wide"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape[0] == rows
        torch.testing.assert_close(merged[name][:259], (base[name] + wide[name][:259]) / 2)
        if (
            rows == 260
        ):  # the base lacks the extra token: it takes wide's row first (as mergekit), so it is kept
            torch.testing.assert_close(merged[name][259], wide[name][259])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == rows
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "out"))) == rows
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_gpt2_architecture_merges(seeds, write_spec, cli, tmp_path):
    spec = write_spec(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(seeds["gpt2"]), "parameters": {"weight": 1}},
                {"model": str(seeds["gpt2"]), "parameters": {"weight": 1}},
            ],
        }
    )
    merged = _merge(cli, spec, tmp_path / "out")
    original = load_dir(seeds["gpt2"])
    assert merged.keys() == original.keys()
    for name in original:
        torch.testing.assert_close(merged[name], original[name])
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_row_chunked_elementwise_merge_is_byte_identical(seeds, tmp_path, method):
    """Elementwise methods are merged in row blocks (bounded memory); the bytes must not change."""
    from hf_m2n2.merge import MergeOptions, merge
    from hf_m2n2.spec import parse_spec

    spec = parse_spec(
        {
            "merge_method": method,
            "models": [
                {"model": str(seeds["a"]), "parameters": {"weight": 0.7}},
                {"model": str(seeds["b"]), "parameters": {"weight": 0.4}},
            ],
            "out_dtype": "bfloat16",
            # linear would merge a base as a third model, which needs its own weight (as in mergekit)
            **({"base_model": str(seeds["base"])} if method != "linear" else {}),
        }
    )
    merge(spec, tmp_path / "whole", MergeOptions(progress=False))
    merge(
        spec, tmp_path / "chunked", MergeOptions(progress=False, chunk_elements=1000, memory_budget=1 << 16)
    )
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (
        tmp_path / "chunked" / "model.safetensors"
    ).read_bytes()
