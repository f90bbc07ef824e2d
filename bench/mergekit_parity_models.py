"""Tiny local Llama checkpoints standing in for the models that mergekit's example and test configs name.

Each model is a `LlamaForCausalLM` of the shape of mergekit's tests/common.py `make_picollama` (hidden 32,
intermediate 48, 16 heads) saved with safetensors, and, where asked, a tokenizer of the shape of mergekit's
tests/test_tokenizer.py `make_tokenizer` (V BPE tokens `<unk> <s> </s> _tok_3 ...`, no merges, plus added
tokens). A model is either initialised from its own seed or a "fine-tune" of another: its weights plus Gaussian
noise drawn from its seed. Everything is deterministic; a marker file lets a later run reuse a complete build.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MARKER = "parity_model.json"
FINETUNE_NOISE = 0.01  # std of the noise a fine-tune adds (random init std is 0.02)


def model_dir(root: Path, name: str) -> Path:
    """Where model `name` (a Hub id or a fixture name) is built under `root`."""
    return root / name.replace("/", "--")


def build_tokenizer(vocab_size: int, added: list[str]):
    """mergekit's test tokenizer: `vocab_size` BPE tokens (no merges) + `added` tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens[:vocab_size])}, merges=[]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        tokenizer.add_tokens(added)
    if len(tokenizer) != vocab_size + len(added):  # guard against a silently different vocabulary
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {vocab_size + len(added)}")
    return tokenizer


def _fresh_model(spec: dict[str, Any]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=spec.get("layers", 2),
    )
    torch.manual_seed(spec["seed"])
    return LlamaForCausalLM(config)


def _finetune(base_dir: Path, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * FINETUNE_NOISE)
    return model


def resolved_spec(name: str, specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The spec of `name` with what a fine-tune inherits from its base (vocab, layers, dtype, tokenizer)."""
    spec = dict(specs[name])
    if "finetune_of" in spec:
        inherited = resolved_spec(spec["finetune_of"], specs)
        spec = {**{k: v for k, v in inherited.items() if k != "seed"}, **spec}
    return spec


def build_model(root: Path, name: str, specs: dict[str, dict[str, Any]]) -> Path:
    """Build model `name` (and its base first, for a fine-tune) under `root`, unless already built."""
    import torch

    spec = resolved_spec(name, specs)
    out = model_dir(root, name)
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    if "finetune_of" in spec:
        model = _finetune(build_model(root, spec["finetune_of"], specs), spec["seed"])
    else:
        model = _fresh_model(spec)
    model = model.to(getattr(torch, spec.get("dtype", "float32")))
    model.save_pretrained(str(out))
    if "tokenizer" in spec:
        vocab_size, added = spec["tokenizer"]
        build_tokenizer(vocab_size, list(added)).save_pretrained(str(out))
    marker.write_text(json.dumps(spec))
    return out


def build_models(root: Path, names: list[str], specs: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """Build every model in `names`; return name -> directory."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    root.mkdir(parents=True, exist_ok=True)
    return {name: build_model(root, name, specs) for name in names}
