"""`hf-m2n2 merge` with `merge_method: permute | weight_matching | zipit`: two causal LMs of different
initializations merged unit by unit after matching their FFN units. A model merged with a permuted copy of itself
comes back (every method); bad specs and seeds are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import write_yaml

from hf_m2n2.align.apply import permute_state
from hf_m2n2.align.graphs import decoder_ffn_graph

torch.set_num_threads(1)
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 2]])
TEXTS = [
    "37+48=85",
    "merge=EGREM",
    "the quick brown fox",
    "12+30=42",
    "hello=OLLEH",
    "jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def permuted_copy(seeds, tmp_path_factory):
    """Seed a with the FFN units of every layer permuted at random: the same function, other weights."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("align_merge")
    out = root / "a-permuted"
    shutil.copytree(seeds["a"], out)
    state = load_file(str(seeds["a"] / "model.safetensors"))
    config = json.loads((seeds["a"] / "config.json").read_text())
    graph = decoder_ffn_graph(config, state)
    rng = np.random.default_rng(0)
    permuted = permute_state(graph, state, {s.name: rng.permutation(s.size) for s in graph.spaces})
    save_file(
        {k: v.contiguous() for k, v in permuted.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return out


def _logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()(input_ids=IDS).logits


def _spec(method, a, b, **extra) -> dict:
    return {
        "merge_method": method,
        "models": [{"model": str(a)}, {"model": str(b)}],
        "dtype": "float32",
        **extra,
    }


@pytest.mark.parametrize(
    "method, extra",
    [
        ("weight_matching", {}),
        ("permute", {"calibration": {"data": "texts.jsonl", "samples": 6}}),
        ("zipit", {"parameters": {"alpha": 0.3, "beta": 0.125}, "calibration": {"data": "texts.jsonl"}}),
    ],
)
def test_a_model_merged_with_a_permuted_copy_of_itself_comes_back(
    seeds, permuted_copy, tmp_path, cli, method, extra
):
    assert not torch.equal(_logits(permuted_copy), _logits(seeds["b"]))
    spec = write_yaml(
        permuted_copy.parent / f"{method}.yaml", _spec(method, seeds["a"], permuted_copy, **extra)
    )
    averaged = write_yaml(
        tmp_path / "linear.yaml", _spec("linear", seeds["a"], permuted_copy, parameters={"weight": 1})
    )
    code, _, err = cli("merge", spec, tmp_path / "out")
    assert code == 0, err
    assert torch.allclose(_logits(tmp_path / "out"), _logits(seeds["a"]), atol=1e-5)
    assert cli("merge", averaged, tmp_path / "averaged")[0] == 0
    assert not torch.allclose(
        _logits(tmp_path / "averaged"), _logits(seeds["a"]), atol=1e-3
    )  # unaligned: not so
    card = (tmp_path / "out" / "README.md").read_text()
    assert "layers.0.mlp" in card and method in card
    assert (tmp_path / "out" / "merge_config.yaml").read_text() == spec.read_text()


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"merge_method": "zipit"}, "calibration: zipit matches features: give calibration: {data: FILE}"),
        ({"calibration": {"data": "x.jsonl"}}, "calibration: weight_matching is data-free"),
        (
            {"merge_method": "linear", "calibration": {"data": "x.jsonl"}},
            "calibration: only used by the feature-matching",
        ),
        (
            {"merge_method": "zipit", "parameters": {"alpha": 0}, "calibration": {"data": "x"}},
            "parameters.alpha: must lie in (0, 1]",
        ),
        (
            {"merge_method": "permute", "calibration": {"data": "missing.jsonl"}},
            "calibration.data: not found",
        ),
    ],
)
def test_bad_align_specs_fail_with_one_line(seeds, tmp_path, cli, change, expected):
    spec = write_yaml(tmp_path / "spec.yaml", {**_spec("weight_matching", seeds["a"], seeds["b"]), **change})
    code, _, err = cli("merge", spec, tmp_path / "out")
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    code, _, err = cli("validate", spec, "--no-resolve")
    assert code == 2 and expected in err, err


def test_bad_seeds_fail_with_one_line(seeds, permuted_copy, tmp_path, cli, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    neox = tmp_path / "neox"
    GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(str(neox))
    capsys.readouterr()  # the save's progress bar
    texts = permuted_copy.parent / "texts.jsonl"
    cases = [
        (_spec("weight_matching", seeds["a"], seeds["narrow"]), "the models' spaces differ in size"),
        (_spec("weight_matching", neox, neox), "model type 'gpt_neox': no FFN space data"),
        (
            _spec("permute", seeds["a"], permuted_copy, calibration={"data": str(texts), "max_length": 1000}),
            "calibration.max_length: 1000 tokens do not fit",
        ),
    ]
    for spec, expected in cases:
        code, _, err = cli("merge", write_yaml(tmp_path / "spec.yaml", spec), tmp_path / "out")
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
