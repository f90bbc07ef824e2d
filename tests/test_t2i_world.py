"""The tiny text-to-image world: deterministic, cached per part, loadable by diffusers and transformers offline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_m2n2.demo.build_cache import MARKER
from hf_m2n2.demo.shapes_world import LANGUAGES, SCENES, render_many, sample_images
from hf_m2n2.demo.t2i_world import (
    PARTS,
    WorldConfig,
    build_world,
    main,
    prompt_rows,
    read_prompts,
)

# A reduced build for CI: every part is trained, briefly (the full build's figures are in its report.json).
REDUCED = WorldConfig(
    judge_hidden=32,
    judge_steps=60,
    judge_eval_images=4,
    vae_images=256,
    vae_steps=20,
    vae_batch=16,
    train_images=256,
    base_steps=20,
    base_batch=16,
    finetune_steps=10,
    finetune_batch=16,
    inference_steps=4,
    report_images=1,
    fit_images=1,
)


REDUCED_ROOT = (
    "t2i-reduced"  # under the session's base temp: the Space's tests reuse this build (cached by part)
)


@pytest.fixture(scope="session")
def world(tmp_path_factory, session_builds):
    session_builds.take("world")
    return build_world(tmp_path_factory.getbasetemp() / REDUCED_ROOT, REDUCED)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for part in PARTS
        for path in sorted((root / part).rglob("*"))
        if path.is_file()
    }


def test_scenes_have_english_and_japanese_captions():
    assert (
        len({scene.english for scene in SCENES}) == len({scene.japanese for scene in SCENES}) == len(SCENES)
    )
    assert SCENES[0].english == "a red circle on the left" and SCENES[0].japanese == "左の赤い丸"
    for scene in SCENES:
        assert re.fullmatch(r"[a-z ]+", scene.english)
        assert re.fullmatch(r"[\u3040-\u30ff\u4e00-\u9fff]+", scene.japanese)
        assert not set(scene.code.replace(" ", "")) & set(scene.english + scene.japanese)


def test_rendering_is_seeded_and_draws_the_scene():
    images, indices = sample_images(96, np.random.default_rng(0))
    again, same = sample_images(96, np.random.default_rng(0))
    assert np.array_equal(images, again) and np.array_equal(indices, same)
    assert np.bincount(indices, minlength=len(SCENES)).tolist() == [2] * len(SCENES)  # balanced rounds
    # the shape's pixels sit on the named side and have the named colour's dominant channel
    for scene in SCENES:
        image = render_many([scene], np.random.default_rng(1))[0].astype(float)
        foreground = image.max(axis=2) > 120
        ys, xs = np.nonzero(foreground)
        centre = {
            "left": xs.mean() < 7,
            "right": xs.mean() > 8,
            "top": ys.mean() < 7,
            "bottom": ys.mean() > 8,
        }
        assert centre[scene.position], scene
        channel = {"red": 0, "green": 1, "blue": 2, "yellow": 0}[scene.colour]
        assert image[foreground].mean(axis=0).argmax() == channel, scene


def test_prompts_cover_both_groups_in_disjoint_splits(world):
    fit, test = read_prompts(world.fit_prompts), read_prompts(world.test_prompts)
    for rows in (fit, test):
        assert {row["group"] for row in rows} == set(LANGUAGES)
        assert all(len([r for r in rows if r["group"] == g]) == REDUCED.prompts_per_group for g in LANGUAGES)
    assert not {r["id"] for r in fit} & {r["id"] for r in test}
    assert not {r["scoring_text"] for r in fit} & {r["scoring_text"] for r in test}
    english = {scene.english: scene for scene in SCENES}
    for row in fit + test:
        scene = english[row["scoring_text"]]
        assert row["prompt"] == scene.caption(row["group"])
        assert set(row) == {"id", "prompt", "scoring_text", "group"}
    assert "左" in world.fit_prompts.read_text(encoding="utf-8") + world.test_prompts.read_text(
        encoding="utf-8"
    )
    assert prompt_rows(REDUCED) == {"fit": fit, "test": test}


def test_too_many_prompts_per_group_is_refused():
    with pytest.raises(ValueError, match="prompts_per_group=13"):
        prompt_rows(dataclasses.replace(REDUCED, prompts_per_group=13))


def test_judge_loads_offline_and_matches_held_out_images_above_chance(world):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(world.judge))
    processor = CLIPProcessor.from_pretrained(str(world.judge))
    images, _ = sample_images(3, np.random.default_rng(5), REDUCED.image_size)
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    # the processor feeds the judge what it was trained on: pixels scaled to [-1, 1], nothing resized
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)
    assert model.get_image_features(pixel_values=pixels).pooler_output.shape == (3, REDUCED.judge_hidden)
    record = json.loads((world.judge / "judge_eval.json").read_text())
    assert record["chance"] == pytest.approx(1 / len(SCENES), abs=1e-4)
    assert record["top1_accuracy"] >= 4 * record["chance"]


def test_pipelines_load_offline_share_all_but_the_unets_keys_and_values(world):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    for path in (world.base, *world.models.values()):
        pipeline = StableDiffusionPipeline.from_pretrained(str(path))
        pipeline.set_progress_bar_config(disable=True)
        images = pipeline(
            ["a red circle on the left", "左の赤い丸"],
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        assert images.shape == (2, REDUCED.image_size, REDUCED.image_size, 3) and np.isfinite(images).all()
    for component in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        digests = {hashlib.sha256((p / component).read_bytes()).hexdigest() for p in world.models.values()}
        assert digests == {hashlib.sha256((world.base / component).read_bytes()).hexdigest()}
    unet = "unet/diffusion_pytorch_model.safetensors"
    base = load_file(str(world.base / unet))
    for path in world.models.values():
        changed = {k for k, v in load_file(str(path / unet)).items() if not torch.equal(v, base[k])}
        assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)


def test_report_has_the_four_candidates_and_their_means(world):
    report = json.loads(world.report.read_text())
    for split in ("test", "fit"):
        assert list(report[split]) == ["base", "en", "ja", "merge 50/50"]
        for row in report[split].values():
            assert row["mean"] == pytest.approx((row["en"] + row["ja"]) / 2, abs=0.01)
            assert all(0 <= row[g] <= 100 for g in LANGUAGES)
    assert report["generation"]["num_inference_steps"] == REDUCED.inference_steps
    assert report["candidate_seconds"]["prompts"] == 2 * REDUCED.prompts_per_group


def test_build_is_deterministic_and_cached(world, tmp_path):
    other = build_world(tmp_path / "again", REDUCED, report=False)
    assert _digests(world.root) == _digests(other.root)

    lines: list[str] = []
    mtime = (world.base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    build_world(world.root, REDUCED, log=lines.append)
    assert {k: v for k, v in _statuses(lines).items() if k in PARTS} == dict.fromkeys(PARTS, "cached")
    assert any(line.startswith("report: cached") for line in lines)
    assert (world.base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime


def _statuses(lines: list[str]) -> dict[str, str]:
    parts = [line.split(": ", 1) for line in lines]
    return {p[0]: p[1].split()[0] for p in parts if p[0] in PARTS and not p[1].startswith("building")}


def test_changed_finetune_rebuilds_only_the_specialists(world, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(world.root, root)
    lines: list[str] = []
    changed = dataclasses.replace(REDUCED, finetune_steps=REDUCED.finetune_steps + 1)
    build_world(root, changed, log=lines.append, report=False)
    assert _statuses(lines) == {**dict.fromkeys(PARTS, "cached"), "en": "built", "ja": "built"}


def test_incomplete_part_is_rebuilt(world, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(world.root, root)
    (root / "ja" / MARKER).unlink()  # as if the build died before the marker
    lines: list[str] = []
    build_world(root, REDUCED, log=lines.append, report=False)
    assert _statuses(lines) == {**dict.fromkeys(PARTS, "cached"), "ja": "built"}
    assert _digests(root) == _digests(world.root)


def test_cli_prints_the_table_and_rejects_bad_parameters(world, capsys):
    default = WorldConfig()
    names = [
        f.name for f in dataclasses.fields(REDUCED) if getattr(REDUCED, f.name) != getattr(default, f.name)
    ]
    params = [f"--param={name}={getattr(REDUCED, name)}" for name in names]
    assert main([str(world.root), *params]) == 0
    out = capsys.readouterr().out
    assert "merge 50/50" in out and "base: cached" in out
    with pytest.raises(SystemExit) as exit_info:
        main([str(world.root), "--param", "depth=3"])
    assert exit_info.value.code == 2
