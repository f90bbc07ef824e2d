"""Load the demo's merged pipeline with diffusers, generate one 32x32 image in 2 steps, show the card's front matter."""

import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(out_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, generator=generator).images[0]
    image.save(Path(out_dir) / "sample.png")
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    print(
        f"loaded {out_dir}: {type(pipe).__name__}, UNet {n_params:,} parameters; wrote {out_dir}/sample.png"
    )
    card = ModelCard.load(Path(out_dir) / "README.md")
    print("card front matter:")
    print(card.data.to_yaml())


if __name__ == "__main__":
    main(sys.argv[1])
