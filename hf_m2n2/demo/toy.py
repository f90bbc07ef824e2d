"""Tiny offline models: a byte-level tokenizer and small Llama-architecture checkpoints built from configs.

Used by the demo and the tests: nothing is downloaded, every model is built deterministically from a seed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def byte_tokenizer(extra_tokens: Sequence[str] = ()):
    """A byte-level BPE tokenizer (256 byte symbols + specials, no merges) as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    heads: int = 4,
    tie: bool = False,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_llama(
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    base: str | os.PathLike[str] | None = None,
    noise: float = 0.02,
    extra_tokens: Sequence[str] = (),
    dtype: str = "float32",
    hidden: int = 64,
    layers: int = 2,
    tie: bool = False,
    license: str | None = None,
) -> Path:
    """Save a tiny Llama checkpoint (safetensors, config, tokenizer) to `out_dir`.

    Args:
        seed: torch seed of the random init (or of the noise added to `base`).
        base: if given, start from this checkpoint's weights and add Gaussian noise of std `noise` (a
            "fine-tune" that shares the base, so task-vector methods are meaningful).
        extra_tokens: tokens added to the tokenizer (and embedding rows), e.g. to mimic a 32001-row vocabulary.
        license: written into a README.md front matter, like a Hub repo's card.
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = byte_tokenizer(extra_tokens)
    torch.manual_seed(seed)
    if base is not None:
        model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32, trust_remote_code=False)
        with torch.no_grad():
            if len(tokenizer) != model.config.vocab_size:
                model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            for param in model.parameters():
                param.add_(torch.randn_like(param) * noise)
    else:
        config = tiny_llama_config(len(tokenizer), hidden=hidden, layers=layers, tie=tie)
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if license:
        (out / "README.md").write_text(
            f"---\nlicense: {license}\nlibrary_name: transformers\n---\n# {out.name}\n"
        )
    return out


def build_demo_seeds(root: str | os.PathLike[str]) -> list[Path]:
    """The demo's seeds: a tiny base and two noisy fine-tunes of it (skipped if already built)."""
    root = Path(root)
    base = root / "tiny-base"
    seeds = [base, root / "tiny-math", root / "tiny-code"]
    if all((p / "config.json").exists() for p in seeds):
        return seeds
    build_tiny_llama(base, seed=0, license="apache-2.0")
    build_tiny_llama(seeds[1], seed=1, base=base, license="apache-2.0")
    build_tiny_llama(seeds[2], seed=2, base=base, license="apache-2.0")
    return seeds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny demo seeds offline.")
    parser.add_argument("root", help="directory to hold the seeds")
    args = parser.parse_args(argv)
    for path in build_demo_seeds(args.root):
        print(path)


if __name__ == "__main__":
    main()
