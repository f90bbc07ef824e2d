"""Load the demo's merged model with transformers, generate a few tokens, and show its card's front matter."""

import sys
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer("12+7=", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {out_dir}: {type(model).__name__}, {n_params:,} parameters, dtype {model.dtype}")
    print(f"generated token ids: {generated[0, ids.shape[1] :].tolist()}")
    card = ModelCard.load(Path(out_dir) / "README.md")
    print("card front matter:")
    print(card.data.to_yaml())


if __name__ == "__main__":
    main(sys.argv[1])
