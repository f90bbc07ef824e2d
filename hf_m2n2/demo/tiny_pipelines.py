"""Tiny text-to-image pipelines built offline from configs (no package ships diffusion weights).

SD 1.x-, SD 2.x- and SDXL-shaped pipelines (UNet2DConditionModel + AutoencoderKL + CLIP text encoder(s) + CLIP
tokenizer(s) + scheduler) with the real families' structure at a few hundred thousand parameters: the same
components, block layout and config keys that the families are detected by, so merging, loading and generating
exercise diffusers' real code. Every pipeline is deterministic in its seed; a "fine-tune" is a base plus noise.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

FAMILIES = ("sd1", "sd2", "sdxl")
_TEXT_HIDDEN = 32
_TEXT_HIDDEN_2 = 48  # SDXL's second text encoder is wider than its first (1280 vs 768), as diffusers expects
_TIME_DIM = 8  # SDXL's addition_time_embed_dim (256 in the real model)


def clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer over bytes only (the first 512 symbols of real CLIP's vocabulary, no merges), padding
    and truncating to `max_length` tokens (77 as CLIP's)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(
        pre_tokenizers.ByteLevel.alphabet()
    )  # the byte-level symbols CLIP's vocabulary starts with
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # transformers 5: vocab_file/merges_file silently build a 2-token vocabulary; pass the objects
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="<|endoftext|>")


def _text_config(vocab_size: int, family: str, projection_dim: int | None = None, hidden: int = _TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if family != "sd1" else "quick_gelu",
        projection_dim=projection_dim or hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
    )
    if family == "sdxl":  # SDXL: down blocks plain then cross-attention, two text encoders, time ids
        return UNet2DConditionModel(
            **common,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=_TEXT_HIDDEN + _TEXT_HIDDEN_2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_TIME_DIM,
            projection_class_embeddings_input_dim=_TEXT_HIDDEN_2 + 6 * _TIME_DIM,
        )
    return UNet2DConditionModel(  # SD 1.x / 2.x: cross-attention down blocks then a plain one
        **common,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=8 if family == "sd1" else (2, 4, 4),
        use_linear_projection=family == "sd2",
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def build_pipeline(family: str = "sd1", *, seed: int = 0):
    """A freshly initialized tiny pipeline of `family` (sd1, sd2 or sdxl), deterministic in `seed`."""
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (use {', '.join(FAMILIES)})")
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_config = _text_config(len(tokenizer), family)
    # built in this order (the random init draws from one generator): UNet, VAE, text encoder(s)
    parts = dict(unet=_unet(family), vae=_vae(), text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer)
    if family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(len(tokenizer), family, _TEXT_HIDDEN_2, hidden=_TEXT_HIDDEN_2)
        )
        scheduler = EulerDiscreteScheduler(
            beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
        )
        return StableDiffusionXLPipeline(
            **parts, text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(), scheduler=scheduler
        )
    if family == "sd2":
        scheduler = EulerDiscreteScheduler(
            beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1
        )
    else:
        scheduler = PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(
        **parts,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def perturb(pipeline, *, seed: int, noise: float = 0.02, components=("unet",)) -> None:
    """Add Gaussian noise of std `noise` to the parameters of `components` (a "fine-tune" of the same base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in components:
            for param in getattr(pipeline, name).parameters():
                param.add_(torch.randn(param.shape, generator=generator) * noise)


def save_pipeline(
    pipeline,
    out_dir: str | os.PathLike[str],
    *,
    variants: tuple[str, ...] = (),
    max_shard_size: str | None = None,
) -> Path:
    """Save as a diffusers folder (safetensors), plus a float16 copy of the weights for each variant (`fp16`)."""
    import shutil
    import tempfile

    out = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    pipeline.save_pretrained(str(out), safe_serialization=True, **kwargs)
    for variant in variants:
        # saved apart and only the variant's weights moved in: a save into `out` would rewrite the configs
        # (transformers 5 loads a text encoder in its config's dtype) and delete the other variant's shards
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
            pipeline.to(torch.float16).save_pretrained(
                scratch, safe_serialization=True, variant=variant, **kwargs
            )
            pipeline.to(torch.float32)
            for file in list(Path(scratch).glob(f"*/*.{variant}*")):
                shutil.move(file, out / file.parent.name / file.name)
    return out


def build_tiny_pipeline(
    out_dir: str | os.PathLike[str],
    family: str = "sd1",
    *,
    seed: int = 0,
    base_seed: int | None = None,
    noise: float = 0.02,
    components: tuple[str, ...] = ("unet",),
    variants: tuple[str, ...] = (),
    max_shard_size: str | None = None,
) -> Path:
    """Build and save a tiny pipeline: initialized from `seed`, or (with `base_seed`) the base of that seed plus
    noise from `seed` on `components`, so that seeds share a base as fine-tunes do."""
    if base_seed is None:
        pipeline = build_pipeline(family, seed=seed)
    else:
        pipeline = build_pipeline(family, seed=base_seed)
        perturb(pipeline, seed=seed, noise=noise, components=components)
    return save_pipeline(pipeline, out_dir, variants=variants, max_shard_size=max_shard_size)


def build_tiny_judge(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Build and save a tiny random CLIP judge (transformers' `CLIPModel` + `CLIPProcessor`, 32x32 images, the
    byte-level `clip_tokenizer`): what `evaluate: {kind: clip, model: DIR}` loads, deterministic in `seed`. Random
    weights score nothing meaningful; they exercise the judge's real code offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            tiny,
            vocab_size=vocab,
            max_position_embeddings=77,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(tiny, image_size=32, patch_size=8),
        projection_dim=16,
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    out = Path(out_dir)
    CLIPModel(config).save_pretrained(str(out))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(out))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="parent folder: writes base/, ft-a/, ft-b/ for the family")
    parser.add_argument("--family", default="sd1", choices=FAMILIES)
    args = parser.parse_args(argv)
    root = Path(args.out)
    build_tiny_pipeline(root / "base", args.family, seed=0)
    build_tiny_pipeline(root / "ft-a", args.family, seed=1, base_seed=0)
    build_tiny_pipeline(root / "ft-b", args.family, seed=2, base_seed=0)
    print(json.dumps({"built": [str(root / n) for n in ("base", "ft-a", "ft-b")]}))


if __name__ == "__main__":
    main()
