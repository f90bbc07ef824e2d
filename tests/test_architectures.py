"""Architecture knowledge as data: layer indices, embedding roles, tied heads, fallback patterns."""

from __future__ import annotations

import pytest

from hf_m2n2.architectures import detect_architecture, num_layers, ties_word_embeddings


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma"])
def test_decoder_families(model_type):
    arch = detect_architecture({"model_type": model_type}, [])
    assert arch.layer_index("model.layers.17.self_attn.q_proj.weight") == 17
    assert arch.layer_index("model.embed_tokens.weight") is None
    assert arch.with_layer("model.layers.3.mlp.up_proj.weight", 11) == "model.layers.11.mlp.up_proj.weight"
    assert arch.is_embed("model.embed_tokens.weight") and arch.is_embed("lm_head.weight")
    assert arch.is_pre("model.embed_tokens.weight") and not arch.is_pre("model.norm.weight")


def test_gpt2_names_and_tied_head():
    arch = detect_architecture({"model_type": "gpt2", "n_layer": 12}, [])
    assert arch.layer_index("transformer.h.5.attn.c_attn.weight") == 5
    assert arch.is_pre("transformer.wpe.weight") and not arch.is_embed("transformer.wpe.weight")
    assert num_layers({"n_layer": 12}, arch, []) == 12
    assert ties_word_embeddings({"model_type": "gpt2"})
    assert ties_word_embeddings({"model_type": "gemma"})
    assert not ties_word_embeddings({"model_type": "llama", "tie_word_embeddings": False})


def test_fallback_patterns_for_unknown_families():
    names = [
        "backbone.layers.0.mixer.weight",
        "backbone.layers.1.mixer.weight",
        "backbone.embed_tokens.weight",
        "blocks.h.2.attn.weight",
        "backbone.norm_f.weight",
    ]
    arch = detect_architecture({"model_type": "exotic"}, names)
    assert arch.layer_index("backbone.layers.1.mixer.weight") == 1
    assert arch.layer_index("blocks.h.2.attn.weight") == 2
    assert arch.is_embed("backbone.embed_tokens.weight") and arch.is_pre("backbone.embed_tokens.weight")
    assert not arch.is_pre("backbone.norm_f.weight")
    assert num_layers({}, arch, names) == 3
