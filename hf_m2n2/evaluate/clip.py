"""CLIP fitness for text-to-image pipelines: `evaluate: {kind: clip, ...}`.

The live pipeline (a candidate's UNet written into it in place) draws images for every prompt; a CLIP judge scores
each image against the prompt, or against a separate scoring text (generate from a Japanese prompt, score against
its English caption: the paper's setting). One example is one prompt: its score is the mean CLIP score of its
images. The CLIP score is the usual one (torchmetrics' `CLIPScore`, Hessel et al. 2021): `max(100 * cos(E_I, E_T),
0)`, so scores are in [0, 100] and continuous: M2N2 shares them with `capacity: max` (the default this evaluator
asks for; see `EvaluatorConfig.capacity`).

Determinism: image i of prompt `id` starts from a generator seeded by `(seed, id, i)` only, so a candidate always
draws the same images whatever the batch it falls in, and the same candidate gets the same scores (the executor
caches them by genome hash; a resumed run ends as an uninterrupted one). The judge's text features are computed
once per run; so are the pipeline's prompt embeddings, unless a text encoder is being evolved.

Example (`examples/text_to_image/spec.yaml`):

```yaml
evaluate:
  kind: clip
  model: build/judge                  # a CLIP directory or Hub repo (transformers' CLIPModel + CLIPProcessor)
  prompts: build/prompts/fit.jsonl    # one prompt per line, or JSONL: id, prompt, scoring_text, group, split
  test_prompts: build/prompts/test.jsonl
  images_per_prompt: 2
  num_inference_steps: 10
  guidance_scale: 4.0
  height: 32
  width: 32
  seed: 0
```
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from hf_m2n2.errors import EvaluationError, SpecError
from hf_m2n2.evaluate.base import EvaluatorConfig, Report
from hf_m2n2.evaluate.previews import PREVIEW_DIR, BestPreviews

METRIC = "clip_score"
_ROW_KEYS = ("id", "prompt", "scoring_text", "group", "split")


class ClipConfig(EvaluatorConfig):
    """The `evaluate: {kind: clip, ...}` section.

    Attributes:
        model: the judge: a CLIP directory (relative to the spec's folder) or Hub repo id, loaded with transformers'
            `CLIPModel` and `CLIPProcessor`.
        revision: the judge's Hub revision (a branch, tag or commit).
        trust_remote_code: load another vision-language judge with `AutoModel`/`AutoProcessor` and its own code
            (it must have `get_image_features` and `get_text_features`); off unless asked for.
        prompts: the fitness prompts: a text file (one prompt per line) or JSONL (`.jsonl`: `id`, `prompt`, optional
            `scoring_text`, `group`, `split`).
        split: keep only the rows of `prompts` whose `split` is this.
        test_prompts: the held-out prompts (same formats); None: `prompts` itself when `test_split` is given.
        test_split: keep only the held-out rows whose `split` is this.
        images_per_prompt: images drawn per prompt (their scores are averaged).
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance; None: the pipeline's default.
        height, width: image size in pixels; None: the pipeline's default (the UNet's sample size times the VAE's
            scale factor).
        negative_prompt: one negative prompt for every image.
        scheduler: a diffusers scheduler class name (e.g. `DDIMScheduler`) built from the pipeline's scheduler
            config; None keeps the pipeline's.
        batch_size: images generated per pipeline call (and scored per judge call).
        seed: the run's image seed (with the prompt id and image index, it seeds every image).
        previews: in a run, keep the images of this many prompts of the best candidate so far in `RUN/preview/`,
            from the images its scoring drew (`hf_m2n2.evaluate.previews`); 0: none.
    """

    kind: Literal["clip"]
    model: str = Field(min_length=1)
    revision: str | None = None
    trust_remote_code: bool = False
    prompts: str = Field(min_length=1)
    split: str | None = None
    test_prompts: str | None = None
    test_split: str | None = None
    images_per_prompt: int = Field(1, ge=1)
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    negative_prompt: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    previews: int = Field(8, ge=0)

    def provides_groups(self) -> bool:
        return True

    def default_capacity(self) -> str:
        return "max"

    @property
    def has_test(self) -> bool:
        return self.test_prompts is not None or self.test_split is not None


@dataclass(frozen=True)
class PromptRow:
    """One example: what the pipeline is prompted with and what its images are scored against.

    Attributes:
        id: a stable name (seeds the prompt's images with the run seed).
        prompt: the text given to the pipeline.
        scoring_text: the text the judge compares the images with (the prompt itself when not given).
        group: the prompt's family (a report column, a MAP-Elites descriptor), or None.
        split: the row's split label, or None.
    """

    id: str
    prompt: str
    scoring_text: str
    group: str | None = None
    split: str | None = None


def load_prompts(path: str | os.PathLike[str], field: str, split: str | None = None) -> list[PromptRow]:
    """Read a prompts file: JSONL when it ends in `.jsonl`, else one prompt per non-empty line.

    Args:
        path: the file.
        field: the YAML path named in errors (e.g. `evaluate.prompts`).
        split: keep only the rows whose `split` is this (JSONL only).

    Returns:
        The rows, in file order (ids: the JSONL `id`, else the line's index in the file).

    Raises:
        SpecError: the file is missing or empty, a line is not a JSON object with a non-empty `prompt`, a key is
            unknown, two rows share an id, or `split` selects nothing.

    Example:
        >>> load_prompts("prompts.txt", "evaluate.prompts")[0]  # doctest: +SKIP
        PromptRow(id='0', prompt='a red circle', scoring_text='a red circle', group=None, split=None)
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(field, f"cannot read prompts file {file} ({exc})") from None
    jsonl = file.suffix == ".jsonl"
    rows: list[PromptRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rows.append(
            _jsonl_row(line, file, number, field) if jsonl else PromptRow(str(number - 1), line, line)
        )
    if not rows:
        raise SpecError(field, f"{file} has no prompts")
    if split is not None:
        rows = [row for row in rows if row.split == split]
        if not rows:
            raise SpecError(field, f"{file} has no prompts of split {split!r}")
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise SpecError(field, f"{file}: id {duplicate!r} is used twice")
    return rows


def _jsonl_row(line: str, file: Path, number: int, field: str) -> PromptRow:
    where = f"{file}:{number}"
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise SpecError(field, f"{where}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SpecError(field, f"{where}: expected a JSON object with a 'prompt'")
    unknown = sorted(set(data) - set(_ROW_KEYS))
    if unknown:
        raise SpecError(field, f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(_ROW_KEYS)})")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError(field, f"{where}: 'prompt' must be a non-empty string")
    values = {key: data.get(key) for key in ("id", "scoring_text", "group", "split")}
    for key, value in values.items():
        if value is not None and not isinstance(value, (str, int)) or isinstance(value, bool):
            raise SpecError(field, f"{where}: {key!r} must be a string")
    scoring = values["scoring_text"]
    if scoring is not None and not str(scoring).strip():
        raise SpecError(field, f"{where}: 'scoring_text' is empty")
    return PromptRow(
        str(values["id"]) if values["id"] is not None else str(number - 1),
        prompt,
        str(scoring) if scoring is not None else prompt,
        None if values["group"] is None else str(values["group"]),
        None if values["split"] is None else str(values["split"]),
    )


def image_seed(seed: int, prompt_id: str, index: int) -> int:
    """The generator seed of image `index` of prompt `prompt_id` (a 63-bit integer from a SHA-256)."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def clip_scores(judge: Any, processor: Any, images: Sequence[Any], text_features: Any) -> np.ndarray:
    """CLIP scores of images against their texts' (precomputed) features: `max(100 * cos, 0)` per pair.

    Args:
        judge: a CLIP model (`get_image_features`).
        processor: its processor (the image processor resizes and normalizes the images).
        images: uint8 images (HxWx3 arrays or PIL images), one per row of `text_features`.
        text_features: the judge's features of each image's text (`text_features_of`), shape (n, d).

    Returns:
        float64 scores in [0, 100], one per image.
    """
    import torch

    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        device = next(judge.parameters()).device
        features = _features(judge.get_image_features(pixel_values=pixels.to(device)))
        features = features / features.norm(p=2, dim=-1, keepdim=True)
        score = 100 * (features * text_features.to(features.device)).sum(dim=-1)
        return torch.clamp(score, min=0).double().cpu().numpy()


def text_features_of(judge: Any, processor: Any, texts: Sequence[str], batch_size: int = 64) -> Any:
    """The judge's unit-norm text features, shape (len(texts), d) (texts longer than the judge takes are cut)."""
    import torch

    limit = getattr(getattr(judge.config, "text_config", None), "max_position_embeddings", None)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            tokens = processor(
                text=batch, return_tensors="pt", padding=True, truncation=True, max_length=limit
            )
            device = next(judge.parameters()).device
            features = _features(
                judge.get_text_features(
                    input_ids=tokens["input_ids"].to(device),
                    attention_mask=tokens["attention_mask"].to(device),
                )
            )
            chunks.append(features / features.norm(p=2, dim=-1, keepdim=True))
    return torch.cat(chunks)


def _features(output: Any) -> Any:
    """A model's features as a tensor (transformers may wrap them in an output with `pooler_output`)."""
    return output if hasattr(output, "norm") else output.pooler_output


def load_judge(config: ClipConfig, base_dir: Path | None, device: str, prefix: str) -> tuple[Any, Any]:
    """The judge model (eval mode, on `device`) and its processor.

    Raises:
        SpecError: the judge cannot be loaded, or is not a CLIP model (without `trust_remote_code`).
    """
    from hf_m2n2.quiet import quiet_loading

    with quiet_loading():
        return _load_judge(config, base_dir, device, prefix)


def _load_judge(config: ClipConfig, base_dir: Path | None, device: str, prefix: str) -> tuple[Any, Any]:
    source = _judge_source(config.model, base_dir)
    from transformers import AutoConfig

    try:
        judge_config = AutoConfig.from_pretrained(
            source, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except Exception as exc:
        from hf_m2n2.custom_code import is_custom_code_error

        if is_custom_code_error(exc):
            raise SpecError(
                f"{prefix}.model",
                f"judge {config.model!r} comes with its own code: set evaluate.trust_remote_code: true to run it",
            ) from None
        raise SpecError(
            f"{prefix}.model", f"cannot load judge {config.model!r}: {_first_line(exc)}"
        ) from None
    try:
        if config.trust_remote_code:
            from transformers import AutoModel, AutoProcessor

            model = AutoModel.from_pretrained(source, revision=config.revision, trust_remote_code=True)
            processor = AutoProcessor.from_pretrained(
                source, revision=config.revision, trust_remote_code=True
            )
            for method in ("get_image_features", "get_text_features"):
                if not hasattr(model, method):
                    raise SpecError(f"{prefix}.model", f"judge {config.model!r} has no {method}()")
        else:
            if judge_config.model_type != "clip":
                raise SpecError(
                    f"{prefix}.model",
                    f"judge {config.model!r} is a {judge_config.model_type!r} model, not CLIP "
                    "(another vision-language judge needs evaluate.trust_remote_code: true)",
                )
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(source, revision=config.revision)
            processor = CLIPProcessor.from_pretrained(source, revision=config.revision)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(
            f"{prefix}.model", f"cannot load judge {config.model!r}: {_first_line(exc)}"
        ) from None
    return model.eval().to(device), processor


def _judge_source(model: str, base_dir: Path | None) -> str:
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path) if path.exists() else model  # not a local path: a Hub repo id, resolved by transformers


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub judge was loaded from: its config.json's snapshot folder in the cache (no request)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an id the cache layout cannot hold
        return None
    return Path(path).parent.name if isinstance(path, str) else None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _prompts_path(value: str, base_dir: Path | None) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def fitness_rows(config: ClipConfig, base_dir: Path | None, prefix: str = "evaluate") -> list[PromptRow]:
    """The fitness prompts of the section."""
    return load_prompts(_prompts_path(config.prompts, base_dir), f"{prefix}.prompts", config.split)


def test_rows(config: ClipConfig, base_dir: Path | None, prefix: str = "evaluate") -> list[PromptRow] | None:
    """The held-out prompts of the section (None without a held-out split)."""
    if not config.has_test:
        return None
    field = "test_prompts" if config.test_prompts is not None else "prompts"
    return load_prompts(
        _prompts_path(config.test_prompts or config.prompts, base_dir), f"{prefix}.{field}", config.test_split
    )


def check_clip_config(config: ClipConfig, spec_dir: Path | None = None, prefix: str = "evaluate") -> None:
    """`hf-m2n2 validate`: the prompts files read, and a local judge is a CLIP model (nothing is loaded)."""
    fitness_rows(config, spec_dir, prefix)
    test_rows(config, spec_dir, prefix)
    source = Path(_judge_source(config.model, spec_dir))
    if source.is_dir() and not config.trust_remote_code:
        try:
            model_type = json.loads((source / "config.json").read_text()).get("model_type")
        except (OSError, ValueError) as exc:
            raise SpecError(f"{prefix}.model", f"{source} has no readable config.json ({exc})") from None
        if model_type != "clip":
            raise SpecError(
                f"{prefix}.model",
                f"judge {config.model!r} is a {model_type!r} model, not CLIP "
                "(another vision-language judge needs evaluate.trust_remote_code: true)",
            )


class ClipEvaluator:
    """Per-prompt CLIP scores of a live text-to-image pipeline.

    Built once per run (judge, prompts and their text features loaded once), then called per candidate after its
    weights were written into the resident pipeline.

    Args:
        config: the validated section.
        pipeline: the live diffusers pipeline (the scheduler is replaced once when `config.scheduler` is set).
        base_dir: the spec's folder (relative paths resolve against it).
        device: where the judge runs.
        prefix: the section's YAML path, for errors.
        text_evolved: a text encoder is being evolved (prompt embeddings are then computed per candidate).
        preview_dir: where to keep previews of the best candidate so far (None: nowhere).

    Raises:
        SpecError: bad prompts, judge, scheduler, or a size the pipeline cannot draw.

    Example:
        >>> evaluator = ClipEvaluator(config, live.model, base_dir=Path("examples/text_to_image"))  # doctest: +SKIP
        >>> evaluator.scores(live.model)  # doctest: +SKIP
        array([31.2, 28.7, ...])
    """

    def __init__(
        self,
        config: ClipConfig,
        pipeline: Any,
        *,
        base_dir: Path | None = None,
        device: str = "cpu",
        prefix: str = "evaluate",
        text_evolved: bool = False,
        preview_dir: Path | None = None,
    ):
        self.config = config
        self._prefix = prefix
        self._base_dir = base_dir
        self._text_evolved = text_evolved
        self.fitness = fitness_rows(config, base_dir, prefix)
        self.test = test_rows(config, base_dir, prefix)
        self.judge, self.processor = load_judge(config, base_dir, device, prefix)
        self._text = {split: self._judge_texts(rows) for split, rows in self._splits().items()}
        self._set_scheduler(pipeline)
        self._size = self._check_size(pipeline)
        self._drawn_with = {
            "guidance_scale": self._guidance(pipeline),
            "scheduler": type(pipeline.scheduler).__name__,
        }
        self._embeds: dict[tuple[int, str, int], Any] = {}
        self.last_timing: dict[str, float] = {}
        self.last_images: list[tuple[PromptRow, list[Any]]] = []
        use_previews = preview_dir is not None and config.previews > 0
        self.previews = BestPreviews(preview_dir, config.previews) if use_previews else None

    # ------------------------------------------------------------------ the evaluator protocol

    def scores(self, model: Any) -> np.ndarray:
        """Per-prompt mean CLIP scores of the fitness prompts (in file order)."""
        return self._score(model, "fit")

    def test_score(self, model: Any) -> float | None:
        """The held-out score: the unweighted mean over groups of their mean prompt scores (None without test)."""
        if self.test is None:
            self.last_timing = {}  # nothing drawn: the executor must not time this call as the last one
            return None
        return float(np.mean(list(self._group_means(self.test, self._score(model, "test")).values())))

    def example_groups(self) -> np.ndarray | None:
        """The fitness prompts' group ids (groups numbered in order of first appearance), None without groups."""
        if any(row.group is None for row in self.fitness):
            return None
        names = list(dict.fromkeys(row.group for row in self.fitness))
        return np.asarray([names.index(row.group) for row in self.fitness], dtype=np.int64)

    def report(self, model: Any) -> Report:
        """Held-out (else fitness) mean CLIP score per group (`{"en": ..., "ja": ...}`), or `{"clip_score": ...}`."""
        rows = self.test if self.test is not None else self.fitness
        scores = self._score(model, "test" if self.test is not None else "fit")
        return Report(self._group_means(rows, scores), METRIC)

    def candidate_scored(self, candidate_id: int, scores: np.ndarray) -> None:
        """The executor's hook right after `scores`: previews of the best candidate so far, from the images that
        call drew (nothing more is generated)."""
        if self.previews is not None:
            self.previews.offer(candidate_id, scores, self.last_images)

    def images(
        self, model: Any, split: str | None = None, limit: int | None = None
    ) -> list[tuple[PromptRow, list]]:
        """The images of `limit` prompts of a split (`test`, `fit`; None: the report's, held-out else fitness), as
        PIL images, with their rows (no scoring). The prompts are taken from the groups in turn (the first of
        each group, then the second, ...), so that a few columns of a grid show every group."""
        from PIL import Image

        split = split or ("test" if self.test is not None else "fit")
        rows = _groups_in_turn(self._rows(split))[:limit]
        pixels = self._generate(model, rows, split)
        n = self.config.images_per_prompt
        return [(row, [Image.fromarray(pixels[i * n + k]) for k in range(n)]) for i, row in enumerate(rows)]

    def describe(self) -> dict[str, Any]:
        """How candidates are scored, for the lineage card: the judge (and its pinned commit when it came from the
        Hub), the prompts files (prompts per group, fitness and held-out) and the generation settings.

        Returns:
            `{"metric", "summary", "judge": {model, revision, commit, hub}, "prompts": [{split, file, select,
            count, groups}], "generation": {setting: value}, "scheduler_replaced"}` (plain JSON data).
        """
        config = self.config
        hub = not Path(_judge_source(config.model, self._base_dir)).exists()
        prompts = [("fitness", config.prompts, config.split, self.fitness)]
        if self.test is not None:
            prompts.append(("held-out", config.test_prompts or config.prompts, config.test_split, self.test))
        generation = {
            "num_inference_steps": config.num_inference_steps,
            "guidance_scale": self._drawn_with["guidance_scale"],
            "height": self._size[0],
            "width": self._size[1],
            "scheduler": self._drawn_with["scheduler"],
            "images_per_prompt": config.images_per_prompt,
            "seed": config.seed,
            "negative_prompt": config.negative_prompt,
        }
        return {
            "metric": METRIC,
            "summary": f"A prompt's score (`{METRIC}`) is the mean CLIP score of its images against its scoring "
            "text (the prompt itself unless the prompts file gives one): max(100 cos(image, text), 0) in the "
            "judge's embeddings, torchmetrics' definition.",
            "judge": {
                "model": config.model,
                "revision": config.revision,
                "commit": _cached_commit(config.model, config.revision) if hub else None,
                "hub": hub,
            },
            "prompts": [
                {
                    "split": split,
                    "file": Path(file).name,
                    "select": select,
                    "count": len(rows),
                    "groups": {
                        g: sum(r.group == g for r in rows) for g in dict.fromkeys(r.group for r in rows)
                    }
                    if all(r.group is not None for r in rows)
                    else {},
                }
                for split, file, select, rows in prompts
            ],
            "generation": {key: value for key, value in generation.items() if value is not None},
            "scheduler_replaced": config.scheduler is not None,
        }

    # ------------------------------------------------------------------ one candidate

    def _score(self, pipeline: Any, split: str) -> np.ndarray:
        rows = self._rows(split)
        start = time.perf_counter()
        pixels = self._generate(pipeline, rows, split)
        generated = time.perf_counter()
        n = self.config.images_per_prompt
        features = self._text[split].repeat_interleave(n, dim=0)
        batch = self.config.batch_size
        per_image = np.concatenate(
            [
                clip_scores(self.judge, self.processor, pixels[i : i + batch], features[i : i + batch])
                for i in range(0, len(pixels), batch)
            ]
        )
        self.last_timing = {"generate_s": generated - start, "score_s": time.perf_counter() - generated}
        return per_image.reshape(len(rows), n).mean(axis=1)

    def _generate(self, pipeline: Any, rows: list[PromptRow], split: str) -> np.ndarray:
        """uint8 images (n_rows * images_per_prompt, H, W, 3), image k of row i at i * images_per_prompt + k.

        Raises:
            EvaluationError: the candidate drew non-finite images (the executor scores it 0).
        """
        import torch

        config = self.config
        n = config.images_per_prompt
        jobs = [(r, k) for r in range(len(rows)) for k in range(n)]
        device = _execution_device(pipeline)
        embeds = None if self._text_evolved else self._prompt_embeds(pipeline, rows, split)
        out = []
        for start in range(0, len(jobs), config.batch_size):
            chunk = jobs[start : start + config.batch_size]
            generators = [
                torch.Generator(device=device).manual_seed(image_seed(config.seed, rows[r].id, k))
                for r, k in chunk
            ]
            which = [r for r, _ in chunk]
            if embeds is not None:
                inputs = {key: None if value is None else value[which] for key, value in embeds.items()}
            else:
                inputs = {"prompt": [rows[r].prompt for r in which]}
                if config.negative_prompt is not None:
                    inputs["negative_prompt"] = [config.negative_prompt] * len(which)
            with torch.no_grad():
                images = pipeline(**inputs, **self._call_kwargs(pipeline), generator=generators).images
            images = np.asarray(images)
            if not np.isfinite(images).all():
                raise EvaluationError(
                    f"the candidate drew non-finite images (prompt {rows[which[0]].id!r} ...)"
                )
            out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))  # as diffusers' numpy_to_pil
        pixels = np.concatenate(out)
        self.last_images = [(row, [pixels[i * n + k] for k in range(n)]) for i, row in enumerate(rows)]
        return pixels

    def _call_kwargs(self, pipeline: Any) -> dict[str, Any]:
        config = self.config
        kwargs: dict[str, Any] = {
            "num_inference_steps": config.num_inference_steps,
            "height": self._size[0],
            "width": self._size[1],
            "output_type": "np",
        }
        if config.guidance_scale is not None:
            kwargs["guidance_scale"] = config.guidance_scale
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        return kwargs

    def _prompt_embeds(self, pipeline: Any, rows: list[PromptRow], split: str) -> dict[str, Any] | None:
        """The pipeline's prompt embeddings of `rows`, computed once per split (None: the pipeline has no
        `encode_prompt` this knows, so prompts go in as text on every call)."""
        key = (id(pipeline), split, tuple(row.id for row in rows))  # `images(limit=...)` encodes a few rows
        if key not in self._embeds:
            self._embeds[key] = _encode_prompts(pipeline, rows, self.config, self._guidance(pipeline))
        return self._embeds[key]

    def _guidance(self, pipeline: Any) -> float:
        if self.config.guidance_scale is not None:
            return self.config.guidance_scale
        default = inspect.signature(type(pipeline).__call__).parameters.get("guidance_scale")
        return float(default.default) if default is not None else 1.0

    # ------------------------------------------------------------------ construction

    def _splits(self) -> dict[str, list[PromptRow]]:
        return {"fit": self.fitness} if self.test is None else {"fit": self.fitness, "test": self.test}

    def _rows(self, split: str) -> list[PromptRow]:
        rows = self._splits().get("test" if split == "test" else "fit")
        if rows is None:
            raise ValueError("no held-out prompts configured (test_prompts or test_split)")
        return rows

    def _judge_texts(self, rows: list[PromptRow]) -> Any:
        return text_features_of(self.judge, self.processor, [row.scoring_text for row in rows])

    def _set_scheduler(self, pipeline: Any) -> None:
        name = self.config.scheduler
        if name is None:
            return
        import diffusers

        cls = getattr(diffusers, name, None)
        if not isinstance(cls, type) or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
            raise SpecError(f"{self._prefix}.scheduler", f"{name!r} is not a diffusers scheduler class")
        pipeline.scheduler = cls.from_config(pipeline.scheduler.config)

    def _check_size(self, pipeline: Any) -> tuple[int, int]:
        """The (height, width) drawn, checked against the VAE's scale factor (as the pipeline's own check)."""
        factor = int(getattr(pipeline, "vae_scale_factor", 1) or 1)
        sample = getattr(getattr(pipeline, "unet", None), "config", None)
        default = int(sample.sample_size) * factor if sample is not None else None
        size = []
        for field in ("height", "width"):
            value = getattr(self.config, field) or default
            if value is None:
                raise SpecError(f"{self._prefix}.{field}", "required: the pipeline has no default image size")
            if value % factor:
                raise SpecError(
                    f"{self._prefix}.{field}",
                    f"{value} is not a multiple of {factor}, the VAE's scale factor: the pipeline cannot draw it",
                )
            size.append(int(value))
        return size[0], size[1]

    @staticmethod
    def _group_means(rows: list[PromptRow], scores: np.ndarray) -> dict[str, float]:
        if any(row.group is None for row in rows):
            return {METRIC: float(scores.mean())}
        groups: dict[str, list[float]] = {}
        for row, score in zip(rows, scores):
            groups.setdefault(row.group, []).append(float(score))
        return {group: float(np.mean(values)) for group, values in groups.items()}


def _groups_in_turn(rows: list[PromptRow]) -> list[PromptRow]:
    """The rows reordered to take the groups in turn (file order within a group and between groups)."""
    groups: dict[str | None, list[PromptRow]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    columns = list(groups.values())
    return [column[i] for i in range(max(map(len, columns))) for column in columns if i < len(column)]


def _execution_device(pipeline: Any) -> Any:
    import torch

    device = getattr(pipeline, "_execution_device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def _encode_prompts(pipeline: Any, rows: list[PromptRow], config: ClipConfig, guidance: float) -> dict | None:
    """`encode_prompt` of an SD-style (2 outputs) or SDXL-style (4 outputs) pipeline, as call keywords."""
    import torch

    encode = getattr(pipeline, "encode_prompt", None)
    if encode is None:
        return None
    do_cfg = guidance > 1 and getattr(getattr(pipeline, "unet", None), "config", None) is not None
    do_cfg = do_cfg and getattr(pipeline.unet.config, "time_cond_proj_dim", None) is None
    negative = None if config.negative_prompt is None else [config.negative_prompt] * len(rows)
    try:
        with torch.no_grad():
            out = encode(
                prompt=[row.prompt for row in rows],
                device=_execution_device(pipeline),
                num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg,
                negative_prompt=negative,
            )
    except TypeError:  # another signature: prompts are encoded by the pipeline call itself
        return None
    names = {
        2: ("prompt_embeds", "negative_prompt_embeds"),
        4: (
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
        ),
    }.get(len(out))
    return None if names is None else dict(zip(names, out))


def build_clip_evaluator(config: ClipConfig, context: Any) -> ClipEvaluator:
    """The registry's factory: the live pipeline from the context; a text encoder among the evolved tensors turns
    the prompt-embedding cache off."""
    if context.model is None:
        raise SpecError(
            context.prefix, "the clip evaluator scores a text-to-image pipeline (a spec with models:)"
        )
    text_evolved = any(name.startswith("text_encoder") for name in context.evolved)
    return ClipEvaluator(
        config,
        context.model,
        base_dir=context.spec_dir,
        device=context.device,
        prefix=context.prefix,
        text_evolved=text_evolved,
        preview_dir=None if context.run_dir is None else Path(context.run_dir) / PREVIEW_DIR,
    )
