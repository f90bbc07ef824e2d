"""Component-only pipeline seeds: a folder (or Hub repo) holding just `unet/` (config and weights, no
model_index.json), as SDXL-DPO's `mhdang/dpo-sdxl-text2image-v1` is. Its UNet is merged and blended like any
pipeline seed's; its other components come from the reference seed, which it can never be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("diffusers")

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def unet_only(pipelines, tmp_path_factory) -> Path:
    """`sdxl-b`'s `unet/` folder alone, with a card beside it (what a UNet-only Hub repo holds)."""
    root = tmp_path_factory.mktemp("unet-only") / "dpo-like"
    shutil.copytree(pipelines["sdxl-b"] / "unet", root / "unet")
    (root / "README.md").write_text("a fine-tuned UNet\n")
    return root


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def test_a_unet_only_folder_opens_as_a_component_only_pipeline_seed(pipelines, unet_only):
    from hf_m2n2.hub import component_only_index
    from hf_m2n2.seeds import open_seeds

    assert component_only_index(unet_only) == {"unet": ["diffusers", "UNet2DConditionModel"]}
    assert component_only_index(pipelines["sdxl"]) is None  # a whole pipeline
    full, only = open_seeds([str(pipelines["sdxl-a"]), str(unet_only)])
    try:
        assert (full.kind, only.kind) == ("pipeline", "pipeline")
        assert (full.component_only, only.component_only) == (False, True)
        assert only.family.name == "sdxl" and list(only.components) == ["unet"]
        assert {n.split("/", 1)[0] for n in only.checkpoint.names} == {"unet"}
        expected = _tensors(unet_only / UNET_FILE)
        assert set(only.checkpoint.names) == {f"unet/{k}" for k in expected}
        key = next(iter(expected))
        assert torch.equal(only.checkpoint.get(f"unet/{key}"), expected[key])
    finally:
        full.checkpoint.close()
        only.checkpoint.close()


def test_static_merge_blends_its_unet_and_takes_the_rest_from_the_reference(
    cli, write_spec, pipelines, unet_only, tmp_path
):
    from diffusers import DiffusionPipeline

    a = pipelines["sdxl-a"]
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 0.25}},
            {"model": str(unet_only), "parameters": {"weight": 0.75}},
        ],
        "dtype": "float32",
    }
    out = tmp_path / "merged"
    code, _, err = cli("merge", write_spec(spec), out, "-q")
    assert code == 0, err
    merged, ua, ub = (_tensors(p / UNET_FILE) for p in (out, a, unet_only))
    assert merged.keys() == ua.keys()
    for key, value in merged.items():
        assert torch.allclose(value, 0.25 * ua[key] + 0.75 * ub[key], atol=1e-6), key
    for name in ("text_encoder", "text_encoder_2", "vae"):  # taken whole from the reference, sdxl-a
        for file in (a / name).glob("*.safetensors"):
            assert (out / name / file.name).read_bytes() == file.read_bytes()
    assert json.loads((out / "model_index.json").read_text()) == json.loads(
        (a / "model_index.json").read_text()
    )
    pipe = DiffusionPipeline.from_pretrained(out)
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_a_component_only_seed_as_the_reference_is_one_line(cli, write_spec, pipelines, unet_only, tmp_path):
    first = {
        "merge_method": "linear",
        "models": [{"model": str(unet_only)}, {"model": str(pipelines["sdxl-a"])}],
        "parameters": {"weight": 0.5},
    }
    based = {**first, "merge_method": "task_arithmetic", "base_model": str(unet_only)}
    for spec, field in ((first, "models"), (based, "base_model")):
        out = tmp_path / "out"
        code, _, err = cli("merge", write_spec(spec), out, "-q")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{field}: dpo-like holds only unet/ (no model_index.json)" in err
        assert "the base_model (or the first model)" in err
        assert not out.exists()
    # a donor of a component it does not have
    donor = {**_two(pipelines["sdxl-a"], unet_only), "components": {"vae": {"from": str(unet_only)}}}
    code, _, err = cli("merge", write_spec(donor), tmp_path / "out", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "component vae is missing" in err, err


def _two(a: Path, b: Path) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"weight": 0.5},
    }


def _evolve_spec(models: list[Path], fixed: Path | None) -> dict:
    genome = {"kind": "blend", "block_size": 4096}
    if fixed is not None:
        genome["fixed_from"] = str(fixed)
    return {
        "models": [{"model": str(m)} for m in models],
        "genome": genome,
        "evolve": {"algorithm": "m2n2", "budget": 4, "seed": 0},
        "evaluate": {"kind": "clip", "model": "openai/clip-vit-base-patch32", "prompts": "p.txt"},
    }


def test_validate_refuses_a_component_only_fixed_seed(cli, pipelines, unet_only, tmp_path):
    (tmp_path / "p.txt").write_text("a red square\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_evolve_spec([pipelines["sdxl-a"], unet_only], pipelines["sdxl-a"])))
    code, out, err = cli("validate", spec)
    assert code == 0 and "valid m2n2 evolve spec" in out, err
    for fixed in (unet_only, None):  # named, or by default the first model
        models = [pipelines["sdxl-a"], unet_only] if fixed else [unet_only, pipelines["sdxl-a"]]
        spec.write_text(yaml.safe_dump(_evolve_spec(models, fixed)))
        code, _, err = cli("validate", spec)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "genome.fixed_from: dpo-like holds only unet/ (no model_index.json)" in err
        assert "fix a seed that has them (genome.fixed_from)" in err


def test_a_blend_writes_only_the_unet_of_the_live_pipeline_and_rebuilds_bit_for_bit(
    pipelines, unet_only, tmp_path
):
    from hf_m2n2.blend import Blend
    from hf_m2n2.blend_ops import BlendRecipe, BlendTarget, SeedTensors, evolved_layout, rebuild, seed_record
    from hf_m2n2.live_pipeline import LivePipeline
    from hf_m2n2.models import model_kind
    from hf_m2n2.seeds import close_seeds, open_seeds

    seeds = open_seeds([str(pipelines["sdxl-a"]), str(unet_only)])
    try:
        names = [n for n in seeds[0].checkpoint.names if n.startswith("unet/")]
        assert model_kind("pipeline").default_evolved(seeds[0]) == ["unet/*"]
        layout = evolved_layout(seeds, names, 4096)
        live = LivePipeline(seeds[0])
        before = {n: live.tensor(n).clone() for n in live.names}
        split = layout.num_blocks // 2
        blend = Blend(np.array([0, split, layout.num_blocks]), np.array([[0.0, 1.0], [0.5, 0.5]]))
        BlendTarget(layout, SeedTensors(seeds, names, torch.float32, "cpu"), live).write(blend)
        first = layout.tensors[0]  # in the first segment: the UNet-only seed's values
        assert first.first_block + first.num_blocks <= split
        assert torch.equal(live.tensor(first.name), seeds[1].checkpoint.get(first.name))
        last = layout.tensors[-1]  # in the second: the mean of both
        mean = 0.5 * seeds[0].checkpoint.get(last.name) + 0.5 * seeds[1].checkpoint.get(last.name)
        assert torch.allclose(live.tensor(last.name), mean)
        untouched = [n for n in live.names if not n.startswith("unet/")]
        assert untouched and all(torch.equal(live.tensor(n), before[n]) for n in untouched)

        recipe = BlendRecipe([seed_record(s) for s in seeds], names, 4096, 0, "float32", blend)
        recipe.save(tmp_path / "recipe.json")
        out = rebuild(tmp_path / "recipe.json", tmp_path / "rebuilt")
        rebuilt = _tensors(out / UNET_FILE)
        assert all(torch.equal(rebuilt[n.split("/", 1)[1]], live.tensor(n)) for n in names)
        assert (out / "model_index.json").is_file() and (out / "text_encoder").is_dir()
    finally:
        close_seeds(seeds)
