"""The tiny text-to-image world: a CLIP judge, a base pipeline and two language specialists, built offline.

The analogue of the paper's diffusion experiment (an English SDXL and a Japanese one merged, the merge prompted in
Japanese and scored by an English CLIP against the English caption), at a size one CPU thread trains in minutes:

- images: one coloured shape on a dark background (`hf_m2n2.demo.shapes_world`), 16x16 pixels;
- `judge/`: a tiny `CLIPModel` + `CLIPProcessor` trained contrastively on (image, English caption) pairs;
- `vae/`: the `AutoencoderKL` trained for reconstruction, shared by all three pipelines;
- `base/`: a tiny `StableDiffusionPipeline` (UNet, `AutoencoderKL`, frozen random `CLIPTextModel`, byte-level CLIP
  tokenizer, DDIM) whose UNet learned to draw scenes from attribute codes (`A E H`: words of neither language);
- `en/`, `ja/`: the base with the UNet's cross-attention keys and values fine-tuned on English, resp. Japanese,
  captions; the text encoder and the autoencoder are the base's, byte for byte. Each specialist draws its own
  language's prompts well and the other's no better than the base, and a plain 50/50 average of their UNets
  scores higher than either specialist on the two languages' mean: an evolved merge has room to win;
- `prompts/fit.jsonl`, `prompts/test.jsonl`: `{"id", "prompt", "scoring_text", "group"}` per line, the prompt in
  English (`en`) or Japanese (`ja`), the scoring text always the English caption; the fitness and test prompts are
  disjoint sets of captions (the models were trained on every caption: the split separates search from report);
- `report.json`: the judge's held-out accuracy and the CLIP scores of base, specialists and the 50/50 merge
  (deterministic), and how long one candidate's fitness evaluation took (a measurement).

Every part is cached (`hf_m2n2.demo.build_cache`): a second build with the same configuration reuses everything,
a changed parameter rebuilds exactly the parts that depend on it. One torch thread and fixed seeds give the same
bytes on one machine. Unlike the specialists' command line, this one does not pin the portable CPU kernels (they
make this build about 40% slower): the cache keys record the kernels in effect, so other kernels rebuild.

Command line: `python -m hf_m2n2.demo.t2i_world OUT_DIR [--param NAME=VALUE ...]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_m2n2.demo import build_cache
from hf_m2n2.demo.shapes_world import LANGUAGES, SCENES, render_many, sample_images

BUILD_VERSION = 1
PARTS = ("prompts", "judge", "vae", "base", *LANGUAGES)
REPORT = "report.json"
REPORT_SCORER = "hf_m2n2.evaluate.clip"  # in the report's key: another scorer rescores
JUDGE_EVAL = "judge_eval.json"
KV_PARAMETERS = (
    ".attn2.to_k.",
    ".attn2.to_v.",
)  # what the specialists fine-tune: cross-attention keys/values


@dataclass(frozen=True)
class WorldConfig:
    """Build parameters (each enters the cache key of the parts that depend on it).

    Attributes:
        seed: seed of every draw (images, initializations, batches, prompt splits).
        image_size: width and height of the images in pixels.
        max_length: token length of prompts (tokenizer padding, text encoders' positions).
        judge_hidden, judge_layers, judge_patch: the judge's width, depth (both towers) and ViT patch size.
        judge_steps, judge_lr: contrastive training (every batch one image of each caption).
        judge_eval_images: held-out images per caption for the judge's accuracy.
        vae_channels, vae_groups: the autoencoder's block widths (latents at image_size / 2^(len - 1)) and norm
            groups.
        vae_images, vae_steps, vae_lr, vae_batch: reconstruction training.
        text_hidden, text_layers: the frozen random text encoder.
        unet_channels, unet_heads: the denoiser's block widths and attention heads.
        train_images: rendered images (with their codes / captions) the denoisers are trained on.
        base_steps, base_lr, base_batch: the base's training on attribute codes.
        finetune_steps, finetune_lr, finetune_batch: each specialist's fine-tuning (cross-attention keys and
            values only) on its language's captions.
        snr_gamma: min-SNR loss weighting of the denoisers.
        uncond_prob: probability of training a denoiser on the empty prompt (for classifier-free guidance).
        prompts_per_group: prompts per language in each of the fit and test splits.
        inference_steps, guidance_scale: generation settings of the report (and of the demo's spec).
        report_images: images per prompt in the report's test table.
        fit_images: images per prompt in the report's fit table and its timing (the demo spec's
            `images_per_prompt`).
    """

    seed: int = 0
    image_size: int = 16
    max_length: int = 32
    judge_hidden: int = 64
    judge_layers: int = 2
    judge_patch: int = 2
    judge_steps: int = 300
    judge_lr: float = 2e-3
    judge_eval_images: int = 10
    vae_channels: tuple[int, ...] = (16, 32)
    vae_groups: int = 4
    vae_images: int = 2048
    vae_steps: int = 200
    vae_lr: float = 3e-3
    vae_batch: int = 32
    text_hidden: int = 256
    text_layers: int = 1
    unet_channels: tuple[int, ...] = (32, 64)
    unet_heads: int = 4
    train_images: int = 4096
    base_steps: int = 300
    base_lr: float = 3e-3
    base_batch: int = 64
    finetune_steps: int = 200
    finetune_lr: float = 3e-2
    finetune_batch: int = 32
    snr_gamma: float = 5.0
    uncond_prob: float = 0.1
    prompts_per_group: int = 12
    inference_steps: int = 10
    guidance_scale: float = 6.0
    report_images: int = 4
    fit_images: int = 2


@dataclass(frozen=True)
class World:
    """Where a build lives.

    Attributes:
        root: the build folder.
        judge: the judge (`CLIPModel` and `CLIPProcessor` folder).
        base: the base pipeline folder.
        models: language -> specialist pipeline folder (`en`, `ja`).
        fit_prompts, test_prompts: the prompt files (JSON lines).
        report: the report file (written by `build_world` unless told not to).
    """

    root: Path
    judge: Path
    base: Path
    models: dict[str, Path]
    fit_prompts: Path
    test_prompts: Path
    report: Path


# ---------------------------------------------------------------------- prompts


def prompt_rows(config: WorldConfig) -> dict[str, list[dict[str, str]]]:
    """The fit and test prompts: per language `prompts_per_group` distinct scenes in each split, no scene in two
    (language, split) cells, so no fitness caption is ever a test caption in either language.

    Args:
        config: the build parameters (seed, prompts_per_group).

    Returns:
        `{"fit": rows, "test": rows}`, each row `{"id", "prompt", "scoring_text", "group"}`.

    Raises:
        ValueError: if the four cells need more scenes than the world has.
    """
    cells = [(split, language) for split in ("fit", "test") for language in LANGUAGES]
    per_cell = config.prompts_per_group
    if per_cell * len(cells) > len(SCENES):
        raise ValueError(
            f"prompts_per_group={per_cell}: at most {len(SCENES) // len(cells)} (the world has {len(SCENES)} scenes)"
        )
    order = np.random.default_rng([config.seed, 1]).permutation(len(SCENES))
    rows: dict[str, list[dict[str, str]]] = {"fit": [], "test": []}
    for cell, (split, language) in enumerate(cells):
        for index in sorted(order[cell * per_cell : (cell + 1) * per_cell].tolist()):
            scene = SCENES[index]
            rows[split].append(
                {
                    "id": f"{language}-{index:04d}",
                    "prompt": scene.caption(language),
                    "scoring_text": scene.english,
                    "group": language,
                }
            )
    return rows


def read_prompts(path: Path) -> list[dict[str, str]]:
    """The rows of a prompts file (JSON lines)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _build_prompts(config: WorldConfig, out: Path) -> None:
    for split, rows in prompt_rows(config).items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------- parts


def _tokenizer(config: WorldConfig):
    from hf_m2n2.demo.tiny_pipelines import clip_tokenizer

    return clip_tokenizer(max_length=config.max_length)


def _caption_ids(tokenizer: Any, texts: Sequence[str]) -> Any:
    return tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt").input_ids


def _build_judge(config: WorldConfig, out: Path) -> None:
    """Train the judge, save it with its processor, and record its held-out top-1 accuracy."""
    import torch

    from hf_m2n2.demo import t2i_training as training

    tokenizer = _tokenizer(config)
    torch.manual_seed(config.seed)
    model = training.build_judge(
        vocab_size=len(tokenizer),
        image_size=config.image_size,
        hidden=config.judge_hidden,
        layers=config.judge_layers,
        patch=config.judge_patch,
        max_length=config.max_length,
    )
    captions = [scene.english for scene in SCENES]
    ids = _caption_ids(tokenizer, captions)
    rng = np.random.default_rng([config.seed, 2])
    losses = training.train_judge(
        model,
        lambda: render_many(list(SCENES), rng, config.image_size),
        ids,
        config.judge_steps,
        config.judge_lr,
    )
    processor = training.judge_processor(tokenizer, config.image_size)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    # held out: images never drawn in training (another stream), scored through the saved processor
    images, indices = sample_images(
        config.judge_eval_images * len(SCENES), np.random.default_rng([config.seed, 3]), config.image_size
    )
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    similarities = training.clip_similarities(model, pixels, ids)
    top1 = float((similarities.argmax(dim=1).numpy() == indices).mean())
    record = {
        "top1_accuracy": round(top1, 4),
        "chance": round(1 / len(SCENES), 4),
        "captions": len(SCENES),
        "images": int(len(indices)),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }
    (out / JUDGE_EVAL).write_text(json.dumps(record, indent=1) + "\n")


def _training_pixels(config: WorldConfig, count: int, stream: int) -> tuple[Any, np.ndarray]:
    from hf_m2n2.demo.t2i_training import to_pixels

    images, indices = sample_images(count, np.random.default_rng([config.seed, stream]), config.image_size)
    return to_pixels(images), indices


def _build_vae(config: WorldConfig, out: Path) -> None:
    """Train the autoencoder; its scaling factor makes the training latents unit-variance (as SD's 0.18215)."""
    import torch

    from hf_m2n2.demo import t2i_training as training

    pixels, _ = _training_pixels(config, config.vae_images, stream=4)
    torch.manual_seed(config.seed)
    vae = training.build_vae(
        image_size=config.image_size, channels=config.vae_channels, groups=config.vae_groups
    )
    generator = torch.Generator().manual_seed(config.seed)
    training.train_vae(vae, pixels, config.vae_steps, config.vae_lr, config.vae_batch, generator)
    latents = training.encode_latents(vae, pixels)
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 6))
    vae.save_pretrained(str(out))


def _denoiser_data(config: WorldConfig, vae: Any, text_encoder: Any, tokenizer: Any, language: str):
    """Scaled training latents, each one's caption hidden states in `language`, and the empty prompt's."""
    from hf_m2n2.demo import t2i_training as training

    pixels, indices = _training_pixels(config, config.train_images, stream=5)
    latents = training.encode_latents(vae, pixels) * vae.config.scaling_factor
    captions = training.encode_texts(text_encoder, tokenizer, [scene.caption(language) for scene in SCENES])
    empty = training.encode_texts(text_encoder, tokenizer, [""])[0]
    return latents, captions[indices], empty


def _build_base(config: WorldConfig, vae_dir: Path, out: Path) -> None:
    """The base pipeline: a fresh UNet trained on attribute codes, the trained VAE, a frozen random text encoder."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from hf_m2n2.demo import t2i_training as training

    tokenizer = _tokenizer(config)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    vae.register_to_config(
        _name_or_path=vae_dir.name
    )  # where it came from, relative: the same bytes in any root
    torch.manual_seed(config.seed)
    text_encoder = training.build_text_encoder(
        vocab_size=len(tokenizer),
        hidden=config.text_hidden,
        layers=config.text_layers,
        max_length=config.max_length,
    )
    unet = training.build_unet(
        latent_size=config.image_size // 2 ** (len(config.vae_channels) - 1),
        channels=config.unet_channels,
        cross_attention_dim=config.text_hidden,
        heads=config.unet_heads,
    )
    latents, conditions, empty = _denoiser_data(config, vae, text_encoder, tokenizer, "code")
    training.train_unet(
        unet,
        latents,
        conditions,
        empty,
        steps=config.base_steps,
        lr=config.base_lr,
        batch_size=config.base_batch,
        snr_gamma=config.snr_gamma,
        uncond_prob=config.uncond_prob,
        generator=torch.Generator().manual_seed(config.seed + 1),
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=training.generation_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(out), safe_serialization=True)


def _build_specialist(config: WorldConfig, language: str, base: Path, out: Path) -> None:
    """The base with its UNet's cross-attention keys and values fine-tuned on `language`'s captions."""
    import torch
    from diffusers import StableDiffusionPipeline

    from hf_m2n2.demo import t2i_training as training

    pipeline = StableDiffusionPipeline.from_pretrained(
        str(base), safety_checker=None, requires_safety_checker=False
    )
    # where each part came from, relative to the build folder: the same bytes in any root
    pipeline.register_to_config(_name_or_path=base.name)
    for name in ("unet", "vae"):
        getattr(pipeline, name).register_to_config(_name_or_path=f"{base.name}/{name}")
    latents, conditions, empty = _denoiser_data(
        config, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, language
    )
    training.train_unet(
        pipeline.unet,
        latents,
        conditions,
        empty,
        steps=config.finetune_steps,
        lr=config.finetune_lr,
        batch_size=config.finetune_batch,
        snr_gamma=config.snr_gamma,
        uncond_prob=config.uncond_prob,
        generator=torch.Generator().manual_seed(config.seed + 2 + LANGUAGES.index(language)),
        trainable=lambda name: any(part in name for part in KV_PARAMETERS),
    )
    pipeline.save_pretrained(str(out), safe_serialization=True)


# ---------------------------------------------------------------------- cache keys and the build


def _part_keys(config: WorldConfig) -> dict[str, str]:
    """Cache keys: each covers exactly what its part's bytes depend on (a part built from another includes that
    part's key)."""
    from importlib.metadata import version

    params = dataclasses.asdict(config)

    def pick(*names: str) -> dict[str, Any]:
        return {name: params[name] for name in names}

    libraries = {lib: version(lib) for lib in ("numpy", "torch", "transformers", "diffusers", "tokenizers")}
    env = {"version": BUILD_VERSION, **libraries, "kernels": build_cache.kernels_in_effect()}
    world = pick("seed", "image_size")
    keys = {
        "prompts": build_cache.digest(
            {"version": BUILD_VERSION, "part": "prompts", **pick("seed", "prompts_per_group")}
        )
    }
    judge = pick(
        "max_length",
        "judge_hidden",
        "judge_layers",
        "judge_patch",
        "judge_steps",
        "judge_lr",
        "judge_eval_images",
    )
    keys["judge"] = build_cache.digest({**env, **world, "part": "judge", **judge})
    vae = pick("vae_channels", "vae_groups", "vae_images", "vae_steps", "vae_lr", "vae_batch")
    keys["vae"] = build_cache.digest({**env, **world, "part": "vae", **vae})
    denoiser = pick("max_length", "text_hidden", "text_layers", "unet_channels", "unet_heads", "train_images")
    denoiser.update(pick("snr_gamma", "uncond_prob"))
    base = pick("base_steps", "base_lr", "base_batch")
    keys["base"] = build_cache.digest(
        {"part": "base", "vae": keys["vae"], **env, **world, **denoiser, **base}
    )
    finetune = pick("finetune_steps", "finetune_lr", "finetune_batch")
    for language in LANGUAGES:
        keys[language] = build_cache.digest({"part": language, "base": keys["base"], **finetune})
    return keys


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """`hf_m2n2.quiet.quiet_loading` (no progress bars) and, during a build, no library warnings either."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from hf_m2n2.quiet import quiet_loading

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    try:
        with quiet_loading():
            yield
    finally:
        transformers_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])


def _report_key(config: WorldConfig, keys: dict[str, str]) -> str:
    generation = {
        name: getattr(config, name)
        for name in ("seed", "inference_steps", "guidance_scale", "report_images", "fit_images")
    }
    return build_cache.digest({"part": "report", "scorer": REPORT_SCORER, **keys, **generation})


def build_world(
    root: str | os.PathLike[str],
    config: WorldConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
    report: bool = True,
) -> World:
    """Build (or reuse) the judge, the base, the two specialists, the prompts and the report under `root`.

    Args:
        root: the build folder (created if needed).
        config: build parameters; default `WorldConfig()` (a few minutes on one core).
        log: called with one line per part built or reused, and the report's table (e.g. `print`).
        report: whether to write (or reuse) `report.json`.

    Returns:
        The paths of the parts.

    Example:
        >>> world = build_world("t2i-build", log=print)  # doctest: +SKIP
        prompts: built in 0.0 s
        judge: built in 31.2 s
        ...
        >>> StableDiffusionPipeline.from_pretrained(world.models["ja"])  # doctest: +SKIP
    """
    config = config or WorldConfig()
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)
    keys = _part_keys(config)
    params = dataclasses.asdict(config)
    builders: dict[str, Callable[[Path], None]] = {
        "prompts": lambda out: _build_prompts(config, out),
        "judge": lambda out: _build_judge(config, out),
        "vae": lambda out: _build_vae(config, out),
        "base": lambda out: _build_base(config, root / "vae", out),
    }
    for language in LANGUAGES:
        builders[language] = lambda out, lang=language: _build_specialist(config, lang, root / "base", out)
    with build_cache.one_thread(), _quiet_libraries():
        kernels = build_cache.kernels_in_effect()
        for part in PARTS:
            path = root / part
            if build_cache.is_built(path, keys[part]):
                say(f"{part}: cached ({path})")
                continue
            say(f"{part}: building...")
            start = time.perf_counter()
            with build_cache.atomic_dir(path, keys[part], params, kernels) as scratch:
                builders[part](scratch)
            say(f"{part}: built in {time.perf_counter() - start:.1f} s ({path})")
        world = World(
            root=root,
            judge=root / "judge",
            base=root / "base",
            models={language: root / language for language in LANGUAGES},
            fit_prompts=root / "prompts" / "fit.jsonl",
            test_prompts=root / "prompts" / "test.jsonl",
            report=root / REPORT,
        )
        if report:
            _ensure_report(world, config, _report_key(config, keys), say)
    return world


# ---------------------------------------------------------------------- the report


def world_report(world: World, config: WorldConfig) -> dict[str, Any]:
    """Score the base, the specialists and the 50/50 average of their UNets on both prompt splits, with the
    project's CLIP evaluator (`hf_m2n2.evaluate.clip`, as `make demo-t2i` scores its candidates).

    All candidates are written in place into one resident pipeline (the base's), as an evolution run does.

    Args:
        world: a build (`build_world`).
        config: its parameters (generation settings: inference_steps, guidance_scale, report_images,
            fit_images, seed).

    Returns:
        The report: the judge's held-out accuracy, the generation settings, `test` and `fit` tables
        (`{candidate: {"en", "ja", "mean"}}`, mean CLIP score per group and the mean of the groups), and the seconds
        one candidate's fitness evaluation takes (all fit prompts, `fit_images` images each, one thread).
    """
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from hf_m2n2.evaluate.clip import ClipConfig, ClipEvaluator

    pipeline = StableDiffusionPipeline.from_pretrained(
        str(world.base), safety_checker=None, requires_safety_checker=False
    )
    settings = {
        "num_inference_steps": config.inference_steps,
        "guidance_scale": config.guidance_scale,
        "height": config.image_size,
        "width": config.image_size,
        "seed": config.seed,
    }
    evaluators = {
        split: ClipEvaluator(
            ClipConfig(
                kind="clip",
                model=str(world.judge),
                prompts=str(path),
                images_per_prompt=images,
                batch_size=48,
                **settings,
            ),
            pipeline,
        )
        for split, path, images in (
            ("test", world.test_prompts, config.report_images),
            ("fit", world.fit_prompts, config.fit_images),
        )
    }
    weights = {"base": {k: v.clone() for k, v in pipeline.unet.state_dict().items()}}
    for language, path in world.models.items():
        weights[language] = load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    weights["merge 50/50"] = {k: 0.5 * weights["en"][k] + 0.5 * weights["ja"][k] for k in weights["base"]}
    tables: dict[str, dict[str, dict[str, float]]] = {"test": {}, "fit": {}}
    timing = []
    for label, tensors in weights.items():
        pipeline.unet.load_state_dict(tensors)
        tables["test"][label] = _with_mean(evaluators["test"].report(pipeline).scores)
        wall, cpu = time.perf_counter(), time.process_time()
        tables["fit"][label] = _with_mean(evaluators["fit"].report(pipeline).scores)
        timing.append((time.perf_counter() - wall, time.process_time() - cpu))
    prompts = len(evaluators["fit"].fitness)
    return {
        "judge": json.loads((world.judge / JUDGE_EVAL).read_text()),
        "generation": {
            "scheduler": type(pipeline.scheduler).__name__,
            **settings,
            "images_per_prompt": {"test": config.report_images, "fit": config.fit_images},
        },
        "test": tables["test"],
        "fit": tables["fit"],
        "candidate_seconds": {
            "prompts": prompts,
            "images": prompts * config.fit_images,
            "wall": round(min(t[0] for t in timing), 3),
            "cpu": round(min(t[1] for t in timing), 3),
        },
    }


def _with_mean(groups: dict[str, float]) -> dict[str, float]:
    row = {g: round(groups[g], 2) for g in LANGUAGES}
    return {**row, "mean": round(float(np.mean(list(row.values()))), 2)}


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A report table as text: one line per candidate, columns en, ja, mean."""
    columns = [*LANGUAGES, "mean"]
    lines = [f"{'model':<12}" + "".join(f"{c:>8}" for c in columns)]
    lines += [f"{label:<12}" + "".join(f"{row[c]:>8.2f}" for c in columns) for label, row in table.items()]
    return "\n".join(lines)


def _ensure_report(world: World, config: WorldConfig, key: str, say: Callable[[str], None]) -> None:
    from hf_m2n2.outdir import atomic_write_text

    try:
        report = json.loads(world.report.read_text())
        cached = report.get("key") == key
    except (OSError, ValueError):
        cached = False
    if cached:
        say(f"report: cached ({world.report})")
    else:
        say("report: scoring base, specialists and the 50/50 merge with the judge...")
        start = time.perf_counter()
        report = {"key": key, **world_report(world, config)}
        atomic_write_text(world.report, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        say(f"report: built in {time.perf_counter() - start:.1f} s ({world.report})")
    judge = report["judge"]
    accuracy, chance = judge["top1_accuracy"], judge["chance"]
    say(f"judge held-out top-1: {accuracy:.3f} over {judge['captions']} captions (chance {chance:.3f})")
    say("CLIP score on the test prompts (English caption; en/ja: prompt language):")
    say(format_table(report["test"]))
    seconds = report["candidate_seconds"]
    wall, cpu, images = seconds["wall"], seconds["cpu"], seconds["images"]
    say(
        f"one candidate's fitness ({seconds['prompts']} fit prompts, {images} images): {wall:.2f} s wall, {cpu:.2f} s CPU"
    )


# ---------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hf_m2n2.demo.t2i_world OUT_DIR [--param NAME=VALUE ...]`: build (or reuse) into OUT_DIR."""
    parser = build_cache.builder_parser(
        "python -m hf_m2n2.demo.t2i_world",
        "Build the tiny text-to-image world offline (cached): judge, base, en, ja, prompts.",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="skip the report (scores of the four candidates)"
    )
    args = parser.parse_args(argv)
    config = build_cache.config_from_overrides(WorldConfig, args.param, parser)
    start = time.perf_counter()
    world = build_world(
        args.root, config, log=lambda line: print(line, flush=True), report=not args.no_report
    )
    print(f"done in {time.perf_counter() - start:.1f} s: {world.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
