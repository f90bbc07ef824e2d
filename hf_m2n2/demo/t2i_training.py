"""The models of the text-to-image world and how they are trained (one torch thread, every draw seeded).

- the judge: a tiny `CLIPModel` (ViT + text transformer) trained contrastively on (image, English caption) pairs,
  with its `CLIPProcessor` (a `CLIPImageProcessor` sized to the images, the byte-level CLIP tokenizer);
- the autoencoder: a tiny `AutoencoderKL` trained for reconstruction (latents at half the image size);
- the text encoder: a `CLIPTextModel` left at its seeded random initialization (frozen: it only has to keep the
  tokens apart, the UNet learns what they mean);
- the denoiser: a tiny `UNet2DConditionModel` trained for epsilon prediction with min-SNR weighting.

`hf_m2n2.demo.t2i_world` assembles these into the judge folder and three `StableDiffusionPipeline` folders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Scheduler settings shared by training (DDPM) and generation (DDIM): Stable Diffusion's noise schedule.
NOISE_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
IMAGE_MEAN = (0.5, 0.5, 0.5)  # the judge's pixel normalization: [0, 255] -> [-1, 1]
IMAGE_STD = (0.5, 0.5, 0.5)


def to_pixels(images: np.ndarray) -> Any:
    """uint8 `(n, h, w, 3)` images -> float `(n, 3, h, w)` tensor in [-1, 1] (the VAE's and the judge's range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------- the judge


def build_judge(*, vocab_size: int, image_size: int, hidden: int, layers: int, patch: int, max_length: int):
    """A freshly initialized tiny CLIP (draws from torch's global generator: seed it first)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    heads = max(1, hidden // 16)
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=hidden)
    return CLIPModel(config)


def judge_processor(tokenizer: Any, image_size: int):
    """The judge's `CLIPProcessor`: images resized/cropped to `image_size`, scaled to [-1, 1]; `tokenizer`'s text.

    The image processor is the PIL one, named explicitly: the same pixels whether or not torchvision is installed.
    """
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train_judge(
    model: Any,
    draw_batch: Callable[[], np.ndarray],
    caption_ids: Any,
    steps: int,
    lr: float,
) -> list[float]:
    """CLIP's symmetric contrastive loss, every batch one image of each caption (so no two share a caption).

    Args:
        model: the judge (`build_judge`).
        draw_batch: returns one uint8 image per caption, in the order of `caption_ids`.
        caption_ids: the captions' token ids `(captions, length)`.
        steps: AdamW steps (warmup then linear decay).
        lr: peak learning rate.

    Returns:
        The losses. The model is left in eval mode.
    """
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = _warmup_decay(optimizer, steps)
    losses = []
    model.train()
    for _ in range(steps):
        out = model(input_ids=caption_ids, pixel_values=to_pixels(draw_batch()), return_loss=True)
        losses.append(_step(out.loss, optimizer, schedule))
    model.eval()
    return losses


def clip_similarities(model: Any, pixel_values: Any, caption_ids: Any) -> Any:
    """Cosine similarities `(images, captions)` between the judge's image and text embeddings."""
    import torch

    with torch.no_grad():
        images = model.get_image_features(pixel_values=pixel_values).pooler_output
        texts = model.get_text_features(input_ids=caption_ids).pooler_output
    images = images / images.norm(dim=-1, keepdim=True)
    texts = texts / texts.norm(dim=-1, keepdim=True)
    return images @ texts.T


# ---------------------------------------------------------------------- the autoencoder


def build_vae(*, image_size: int, channels: Sequence[int], groups: int):
    """A freshly initialized tiny `AutoencoderKL` (4 latent channels, downsampling 2^(len(channels) - 1))."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=image_size,
        mid_block_add_attention=False,
    )


def train_vae(vae: Any, pixels: Any, steps: int, lr: float, batch_size: int, generator: Any) -> list[float]:
    """Reconstruction (MSE) through the posterior's mean: a plain autoencoder, which learns far faster than with
    sampled latents and a KL term; the diffusion model only ever sees encoded means. Returns the losses."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = _warmup_decay(optimizer, steps)
    losses = []
    vae.train()
    for _ in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        loss = F.mse_loss(vae.decode(vae.encode(batch).latent_dist.mode()).sample, batch)
        losses.append(_step(loss, optimizer, schedule, clip=list(vae.parameters())))
    vae.eval()
    return losses


def encode_latents(vae: Any, pixels: Any) -> Any:
    """The posterior means of `pixels` (not yet scaled by the VAE's scaling factor)."""
    import torch

    with torch.no_grad():
        return torch.cat(
            [vae.encode(pixels[i : i + 512]).latent_dist.mode() for i in range(0, len(pixels), 512)]
        )


# ---------------------------------------------------------------------- text encoder and denoiser


def build_text_encoder(*, vocab_size: int, hidden: int, layers: int, max_length: int):
    """A freshly initialized `CLIPTextModel` (draws from torch's global generator: seed it first)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 8),
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def encode_texts(text_encoder: Any, tokenizer: Any, texts: Sequence[str]) -> Any:
    """`(len(texts), max_length, hidden)` hidden states, as `StableDiffusionPipeline` conditions the UNet."""
    import torch

    ids = tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def build_unet(*, latent_size: int, channels: Sequence[int], cross_attention_dim: int, heads: int):
    """A freshly initialized tiny SD 1.x-shaped UNet: a plain block at full latent resolution, cross-attention
    blocks below it, no middle block (the cheapest layout that still learns this world)."""
    from diffusers import UNet2DConditionModel

    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(channels),
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        mid_block_type=None,
    )


def train_unet(
    unet: Any,
    latents: Any,
    conditions: Any,
    unconditional: Any,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    snr_gamma: float,
    uncond_prob: float,
    generator: Any,
    trainable: Callable[[str], bool] | None = None,
) -> list[float]:
    """Denoising training: epsilon prediction under Stable Diffusion's schedule, min-SNR-gamma loss weights.

    Args:
        unet: the denoiser, trained in place.
        latents: scaled latents `(n, 4, h, w)`.
        conditions: the text encoder's hidden states of each latent's caption `(n, tokens, hidden)`.
        unconditional: the hidden states of the empty prompt `(tokens, hidden)`, swapped in for a caption with
            probability `uncond_prob` (classifier-free guidance needs the unconditional prediction).
        steps, lr, batch_size: AdamW steps (warmup then linear decay), peak learning rate, batch size.
        snr_gamma: min-SNR-gamma weighting (Hang et al., 2023): faster convergence at the same cost.
        generator: the source of batches, noise, timesteps and caption dropout.
        trainable: which parameters (by name) are trained; None: all.

    Returns:
        The losses. The UNet is left in eval mode with every parameter trainable again.
    """
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000, **NOISE_SCHEDULE)
    params = []
    for name, param in unet.named_parameters():
        param.requires_grad_(trainable is None or trainable(name))
        if param.requires_grad:
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = _warmup_decay(optimizer, steps)
    losses = []
    unet.train()
    for _ in range(steps):
        rows = torch.randint(0, len(latents), (batch_size,), generator=generator)
        clean = latents[rows]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        text = conditions[rows].clone()
        text[torch.rand(batch_size, generator=generator) < uncond_prob] = unconditional
        prediction = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, text).sample
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=snr_gamma) / snr
        loss = (weights * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        losses.append(_step(loss, optimizer, schedule, clip=params))
    for param in unet.parameters():
        param.requires_grad_(True)
    unet.eval()
    return losses


def generation_scheduler():
    """The pipelines' scheduler: DDIM over the training schedule (few steps, deterministic given the noise)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **NOISE_SCHEDULE,
    )


def _step(loss: Any, optimizer: Any, schedule: Any, clip: list[Any] | None = None) -> float:
    """One optimizer step on `loss` (gradients of `clip` clipped to norm 1 first); returns the loss."""
    import torch

    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    return loss.item()


def _warmup_decay(optimizer: Any, steps: int):
    """Linear warmup over min(20, steps / 10) steps, then linear decay to 0."""
    import torch

    warmup = max(1, min(20, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1.0 - step / steps)
    )
