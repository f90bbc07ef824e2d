"""Synthetic SDXL-shaped pipeline seeds for the pipeline merge benchmark (nothing downloaded).

`build_sdxl_seeds` writes, per seed (a base and `n_models - 1` fine-tunes = base + dense Gaussian noise):

* a diffusers folder `folders/NAME/` (model_index.json, `unet/` with config.json and
  `diffusion_pytorch_model.safetensors`, float16), whose other components (two CLIP text encoders of SDXL's
  hidden sizes, a VAE, tokenizers, scheduler) are tiny but consistent with the UNet (cross-attention 768 + 1280,
  pooled projection 1280), shared by every seed (hard links);
* unless `sgm=False`, the same UNet tensors as an original-layout (sgm) single file `sgm/NAME.safetensors`
  (`model.diffusion_model.*`), the input sd-mecha reads.

The UNet config is SDXL base's (`SDXL_BASE_UNET`), with the channel widths scaled so that the parameter count is
about `scale` times the real model's (2.57B at scale 1); depth, block layout and key names stay those of SDXL.
Names and shapes come from the model built on the meta device. The sgm names come from the project's
single-file key map (`hf_m2n2.single_file.single_file_key_map`, itself derived from diffusers' converters), and are
checked here again by running diffusers' own `convert_ldm_unet_checkpoint` on stand-ins: it must map every sgm
key back to its diffusers name.

Memory: tensors are generated one at a time (each from its own generator keyed by seed, model and name, so the
weights do not depend on order or sharding) and streamed through the project's sharded writer. A marker records
the parameters; a later call with the same parameters returns at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's hf_m2n2
    sys.path.insert(0, str(REPO))
from hf_m2n2.pipeline_families import RELEASED_UNET_CONFIGS  # noqa: E402

MARKER = "synthetic_sdxl.json"
MARKER_VERSION = 1
SGM_PREFIX = "model.diffusion_model."
WEIGHT_STD = 0.02  # weight matrices and convolutions
BIAS_STD = 0.01
NORM_STD = 0.02  # norm weights: 1 + NORM_STD * N(0, 1)
DELTA_STD = 0.004  # fine-tune noise on weights and biases (cos(base, ft) ~ 0.98 on matrices)
NORM_DELTA_STD = 0.01  # ... on norm weights (fp16's ulp at 1.0 is ~0.001)
DTYPE = torch.float16

SDXL_BASE_UNET: dict = RELEASED_UNET_CONFIGS["sdxl"]  # stable-diffusion-xl-base-1.0
HEAD_DIM = 64  # SDXL's attention_head_dim lists head counts: channels / 64
TEXT_HIDDEN = (768, 1280)  # CLIP ViT-L and OpenCLIP ViT-bigG hidden sizes: 768 + 1280 = cross_attention_dim


def unet_config(width: int) -> dict:
    """SDXL base's UNet config with block widths (width, 2 width, 4 width) (320 is the real model)."""
    if width % 32:
        raise ValueError(f"width {width} is not a multiple of 32 (norm groups, 64-wide heads)")
    channels = [width, 2 * width, 4 * width]
    return {
        **SDXL_BASE_UNET,
        "block_out_channels": channels,
        "attention_head_dim": [c // HEAD_DIM for c in channels],
    }


def unet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """UNet2DConditionModel's state-dict names and shapes for `config` (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def config_for_scale(scale: float) -> tuple[dict, int]:
    """(config, parameter count) whose count is nearest `scale` x SDXL base's, over widths in steps of 32."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    full = sum(math.prod(s) for s in unet_shapes(SDXL_BASE_UNET).values())
    guess = max(32, round(320 * math.sqrt(scale) / 32) * 32)
    best = None
    for width in sorted({max(32, guess - 32), guess, guess + 32}):
        config = unet_config(width)
        params = sum(math.prod(s) for s in unet_shapes(config).values())
        if best is None or abs(params / full - scale) < abs(best[1] / full - scale):
            best = (config, params)
    assert best is not None
    return best


def sgm_key_map(config: dict, names: list[str]) -> dict[str, str]:
    """diffusers UNet name -> original (sgm) key, checked against diffusers' own ldm -> diffusers converter.

    Raises:
        RuntimeError: diffusers does not map some sgm key back to its diffusers name.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from hf_m2n2.single_file import single_file_key_map

    originals = single_file_key_map({"unet": config}, [f"unet/{n}" for n in names], family="sdxl")
    mapping = {
        source.removeprefix("unet/"): key
        for key, original in originals.items()
        for source, _ in original.sources
    }
    # stand-in values: each sgm key carries the diffusers name it should come back as
    back = convert_ldm_unet_checkpoint({sgm: name for name, sgm in mapping.items()}, config)
    if back != {name: name for name in names} or len(set(mapping.values())) != len(names):
        wrong = sorted(set(back.items()) ^ {(n, n) for n in names})[:3]
        raise RuntimeError(f"sgm key map disagrees with diffusers' converter (first: {wrong})")
    return mapping


def _generator(seed: int, model: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{model}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _is_norm(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 1 and name.endswith(".weight")


def base_tensor(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The base seed's float32 value of a tensor."""
    g = _generator(seed, "base", name)
    x = torch.randn(shape, generator=g)
    if _is_norm(name, shape):
        return x.mul_(NORM_STD).add_(1.0)
    return x.mul_(BIAS_STD if len(shape) == 1 else WEIGHT_STD)


def fine_tune(base: torch.Tensor, seed: int, model: str, name: str) -> torch.Tensor:
    """base + dense Gaussian noise of the model (a fine-tune of the base)."""
    std = NORM_DELTA_STD if _is_norm(name, tuple(base.shape)) else DELTA_STD
    return torch.randn(base.shape, generator=_generator(seed, model, name)).mul_(std).add_(base)


def model_names(n_models: int) -> list[str]:
    return ["base", *(f"ft{i}" for i in range(1, n_models))]


def _tiny_components(out: Path) -> None:
    """Non-UNet components of an SDXL pipeline, tiny but consistent with the UNet (saved by diffusers/transformers):
    text encoders of SDXL's hidden sizes (one layer), a small VAE with 4 latent channels, tokenizers, scheduler,
    and model_index.json (diffusers' own, its unet entry filled in)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from hf_m2n2.demo.tiny_pipelines import clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    n = len(tokenizer)

    def text_config(hidden: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=n, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=hidden // HEAD_DIM, max_position_embeddings=77, hidden_act=act,
            projection_dim=hidden, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1,
        )  # fmt: skip

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        scaling_factor=0.13025,
    )  # fmt: skip
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config(TEXT_HIDDEN[0], "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(text_config(TEXT_HIDDEN[1], "gelu")),
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        unet=None,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
        ),
    )
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()  # "unet=None cannot be saved": it is written separately
    transformers_logging.disable_progress_bar()
    pipeline.save_pretrained(str(out), safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


@dataclass(frozen=True)
class SdxlSeeds:
    """What `build_sdxl_seeds` wrote. folders/sgm_files are in model order: base, ft1, ft2, ..."""

    names: list[str]
    folders: list[Path]
    sgm_files: list[Path]
    config: dict
    params: int
    unet_bytes: int  # bytes of one UNet's tensors (float16)
    key_map: dict[str, str]  # diffusers UNet name -> sgm key

    def unet_files(self, i: int) -> list[Path]:
        return sorted((self.folders[i] / "unet").glob("*.safetensors"))


def _marker(scale: float, config: dict, n_models: int, seed: int, shard_bytes: int, sgm: bool) -> dict:
    marker = {
        "version": MARKER_VERSION, "scale": scale, "width": config["block_out_channels"][0], "n_models": n_models,
        "seed": seed, "shard_bytes": shard_bytes, "dtype": str(DTYPE),
        "std": [WEIGHT_STD, BIAS_STD, NORM_STD, DELTA_STD, NORM_DELTA_STD],
    }  # fmt: skip
    return marker if sgm else {**marker, "sgm": False}  # data built before the flag keeps its marker


def build_sdxl_seeds(
    root: Path,
    scale: float,
    n_models: int = 3,
    seed: int = 0,
    shard_bytes: int = 10 * 10**9,
    log=print,
    config: dict | None = None,
    sgm: bool = True,
) -> SdxlSeeds:
    """Write (or reuse) `n_models` synthetic SDXL seeds under `root`: folders/NAME/ and sgm/NAME.safetensors.

    Args:
        root: the data directory (created; built in a hidden sibling, renamed into place).
        scale: parameter count as a fraction of SDXL base's UNet (1.0: the real shapes).
        n_models: the base and n_models - 1 fine-tunes.
        seed: keys every tensor's generator.
        shard_bytes: the diffusers UNet's shard size (the default keeps one file, as diffusers' 10 GB default).
        log: progress lines go here.
        config: a UNet config to use instead of the scaled SDXL one (tests: a smaller SDXL-family UNet).
        sgm: also write the sgm single files (sd-mecha's input); without them `sgm_files` is empty.

    Returns:
        The seeds' paths, config, sizes and key map.
    """
    from hf_m2n2.writer import PlannedTensor, ShardedSafetensorsWriter

    if config is None:
        config, params = config_for_scale(scale)
    shapes = unet_shapes(config)
    params = sum(math.prod(s) for s in shapes.values())
    key_map = sgm_key_map(config, list(shapes))
    names = model_names(n_models)
    marker = _marker(scale, config, n_models, seed, shard_bytes, sgm)
    unet_bytes = params * DTYPE.itemsize
    sgm_files = [root / "sgm" / f"{n}.safetensors" for n in names] if sgm else []
    seeds = SdxlSeeds(
        names, [root / "folders" / n for n in names], sgm_files, config, params, unet_bytes, key_map
    )  # fmt: skip
    marker_file = root / MARKER
    if marker_file.is_file() and json.loads(marker_file.read_text()) == marker:
        return seeds
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    need = int((2 if sgm else 1) * n_models * unet_bytes * 1.05)
    if free < need:
        raise SystemExit(
            f"not enough disk space for the seeds in {root}: need ~{need / 1e9:.1f} GB, have {free / 1e9:.1f}"
        )
    shutil.rmtree(root, ignore_errors=True)
    build = root.parent / f".{root.name}.building"
    shutil.rmtree(build, ignore_errors=True)
    (build / "sgm").mkdir(parents=True) if sgm else build.mkdir(parents=True)
    log(f"building {n_models} SDXL seeds (width {config['block_out_channels'][0]}, {params / 1e9:.3f}B params, "
        f"{unet_bytes / 1e9:.2f} GB per UNet) in {root}")  # fmt: skip
    t0 = time.perf_counter()
    _tiny_components(build / "components")
    planned = [PlannedTensor(n, s, DTYPE) for n, s in shapes.items()]
    planned_sgm = [PlannedTensor(key_map[n], s, DTYPE) for n, s in shapes.items()]
    writers = []
    try:
        for name in names:
            folder = build / "folders" / name
            shutil.copytree(build / "components", folder, copy_function=os.link)
            (folder / "unet").mkdir()
            (folder / "unet" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            writers.append(
                ShardedSafetensorsWriter(
                    folder / "unet", planned, shard_bytes, stem="diffusion_pytorch_model"
                )
            )
            if sgm:
                (build / "sgm" / name).mkdir()
                writers.append(
                    ShardedSafetensorsWriter(build / "sgm" / name, planned_sgm, 1 << 62, stem="model")
                )
        per_seed = 2 if sgm else 1  # writers of seed i: per_seed * i (its folder), then its sgm file
        for tensor_name, shape in shapes.items():
            base = base_tensor(seed, tensor_name, shape)
            for i, name in enumerate(names):
                value = base if i == 0 else fine_tune(base, seed, name, tensor_name)
                half = value.to(DTYPE)
                writers[per_seed * i].write(tensor_name, half)
                if sgm:
                    writers[per_seed * i + 1].write(key_map[tensor_name], half)
        for writer in writers:
            writer.finish()
    finally:
        for writer in writers:
            writer.abort()
    for name in names if sgm else []:
        os.replace(build / "sgm" / name / "model.safetensors", build / "sgm" / f"{name}.safetensors")
        (build / "sgm" / name).rmdir()
    shutil.rmtree(build / "components")
    (build / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(build, root)
    log(f"built in {time.perf_counter() - t0:.1f} s")
    return seeds
