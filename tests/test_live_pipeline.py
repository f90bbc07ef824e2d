"""LivePipeline: a diffusers pipeline built without random init and overwritten in place generates exactly what
diffusers' own loading of the same weights generates, resident or offloaded to CPU and disk; Blend recipes over
pipeline seeds rebuild and export as diffusers folders whose UNet equals the formula and which diffusers loads."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from hf_m2n2.blend import Blend  # noqa: E402
from hf_m2n2.blend_ops import BlendRecipe, BlendTarget, SeedTensors, evolved_layout, seed_record  # noqa: E402
from hf_m2n2.errors import CheckpointError  # noqa: E402
from hf_m2n2.live_pipeline import LivePipeline  # noqa: E402
from hf_m2n2.models import model_kind  # noqa: E402
from hf_m2n2.seeds import close_seeds, open_seeds  # noqa: E402

UNET = "unet/diffusion_pytorch_model.safetensors"


def _image(pipeline) -> torch.Tensor:
    """Two denoising steps at 32x32 from a fixed generator: equal weights give the same bits."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipeline(
        "a red cube", num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt"
    )
    return out.images


def _loaded(path: Path, **components):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), **components)


@pytest.fixture(scope="module")
def opened(pipelines):
    seeds = open_seeds([str(pipelines["sd1-a"]), str(pipelines["sd1-b"])])
    yield seeds
    close_seeds(seeds)


@pytest.fixture(scope="module")
def image_b(pipelines):
    return _image(_loaded(pipelines["sd1-b"]))


def _write_seed(live: LivePipeline, seed) -> None:
    for name in seed.checkpoint.names:
        live.write(name, seed.checkpoint.get(name))


def test_resident_pipeline_is_filled_without_random_init(opened, pipelines):
    live = LivePipeline(opened[0])
    assert set(live.names) == set(opened[0].checkpoint.names)  # every component's tensors, COMPONENT/KEY
    assert type(live.model).__name__ == "StableDiffusionPipeline"
    assert torch.equal(_image(live.model), _image(_loaded(pipelines["sd1-a"])))


def test_sdxl_pipeline_with_two_text_encoders(pipelines):
    (seed,) = open_seeds([str(pipelines["sdxl-a"])])
    try:
        live = LivePipeline(seed)
        assert {n.split("/")[0] for n in live.names} == {"unet", "vae", "text_encoder", "text_encoder_2"}
        assert torch.equal(_image(live.model), _image(_loaded(pipelines["sdxl-a"])))
    finally:
        close_seeds([seed])


def test_sd1_safety_checker_of_a_pipeline_module_is_built_and_filled(tmp_path):
    """SD 1.x lists `["stable_diffusion", "StableDiffusionSafetyChecker"]`: a class of a diffusers pipeline module."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from hf_m2n2.demo.tiny_pipelines import build_pipeline, save_pipeline

    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(tiny, vocab_size=100, bos_token_id=98, eos_token_id=99, pad_token_id=99),
        vision_config=dict(tiny, image_size=32, patch_size=8),
        projection_dim=16,
    )
    base = build_pipeline("sd1", seed=0)
    parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    checked = StableDiffusionPipeline(
        **parts,
        safety_checker=StableDiffusionSafetyChecker(config),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
    )
    folder = save_pipeline(checked, tmp_path / "checked")
    (seed,) = open_seeds([str(folder)])
    try:
        live = LivePipeline(seed)
        assert any(n.startswith("safety_checker/vision_model.") for n in live.names)
        assert torch.equal(_image(live.model), _image(_loaded(folder)))
    finally:
        close_seeds([seed])


def test_in_place_writes_replace_the_pipeline(opened, image_b):
    live = LivePipeline(opened[0])
    pointers = {n: live.tensor(n).data_ptr() for n in live.names}
    _write_seed(live, opened[1])
    assert torch.equal(_image(live.model), image_b)
    assert {n: live.tensor(n).data_ptr() for n in live.names} == pointers  # in place, nothing reallocated


@pytest.mark.parametrize(
    "offload",
    [
        {"max_memory": {"cpu": "600KB"}},  # the UNet (1.5 MB) split between CPU and disk, the rest resident
        {
            "device_map": {
                "unet": "disk",
                "vae": {"encoder": "cpu", "decoder": "disk", "quant_conv": "disk", "post_quant_conv": "cpu"},
            }
        },
    ],
    ids=["budget", "per-component"],
)
def test_offloaded_pipeline_generates_what_diffusers_loads(opened, image_b, tmp_path, offload):
    live = LivePipeline(opened[0], offload_folder=tmp_path / "offload", **offload)
    assert live.offloaded
    assert "disk" in set(live.device_maps["unet"].values())
    on_disk = [n for n in live.names if n.startswith("unet/") and live.tensor(n).device.type == "meta"]
    assert on_disk  # those weights live in accelerate's memmaps: the writes must reach them
    _write_seed(live, opened[1])
    assert torch.equal(_image(live.model), image_b)


def test_diffusers_model_cpu_offload_sees_the_writes(opened, image_b):
    """diffusers' hooks move each component to `device` when it runs (on a CPU a no-op, the same mechanism)."""
    live = LivePipeline(opened[0], device_map="model_cpu_offload")
    assert live.offloaded and live.model.unet._hf_hook is not None
    _write_seed(live, opened[1])
    assert torch.equal(_image(live.model), image_b)


def test_stale_offload_folder_is_not_reused(opened, pipelines, tmp_path):
    folder = tmp_path / "offload"
    _write_seed(LivePipeline(opened[0], device_map={"unet": "disk"}, offload_folder=folder), opened[1])
    live = LivePipeline(opened[0], device_map={"unet": "disk"}, offload_folder=folder)  # a's weights again
    assert torch.equal(_image(live.model), _image(_loaded(pipelines["sd1-a"])))


@pytest.mark.parametrize(
    "components", [("unet", "vae", "text_encoder"), ("unet",)], ids=["whole", "unet-only"]
)
def test_single_file_seed_fills_from_the_file_and_its_config_folder(opened, pipelines, tmp_path, components):
    """An original-layout file of b: its components from the file, the others (a UNet-only file's VAE and text
    encoder) and the tokenizer, scheduler and model_index.json from its config folder (the base sd1)."""
    from diffusers import UNet2DConditionModel

    from hf_m2n2.single_file import write_single_file

    b = opened[1]
    names = [n for n in b.checkpoint.names if n.split("/")[0] in components]
    configs = {c: b.components[c].config for c in components}
    file = write_single_file(tmp_path / "b.safetensors", names, b.checkpoint.get, configs)
    seeds = open_seeds([str(pipelines["sd1"]), str(file)])
    try:
        assert seeds[1].single_file is not None
        live = LivePipeline(seeds[1])
        assert set(live.names) == set(opened[0].checkpoint.names)
        if len(components) == 3:
            expected = _loaded(pipelines["sd1-b"])
        else:
            expected = _loaded(
                pipelines["sd1"], unet=UNet2DConditionModel.from_pretrained(str(pipelines["sd1-b"] / "unet"))
            )
        assert torch.equal(_image(live.model), _image(expected))
    finally:
        close_seeds(seeds)


def test_variant_weights_and_transformers4_text_encoder_keys(pipelines, tmp_path):
    # the fp16 variant's values, cast to the live dtype
    (seed,) = open_seeds([str(pipelines["sd1-a"])], variant="fp16")
    try:
        live = LivePipeline(seed)
        fp16 = load_file(pipelines["sd1-a"] / "unet/diffusion_pytorch_model.fp16.safetensors")
        assert torch.equal(live.tensor("unet/conv_in.weight"), fp16["conv_in.weight"].float())
        assert live.tensor("unet/conv_in.weight").dtype == torch.float32
    finally:
        close_seeds([seed])
    # a text encoder saved by transformers 4 (`text_model.` prefix, a position_ids buffer) loads as diffusers does
    old = shutil.copytree(pipelines["sd1-a"], tmp_path / "old")
    file = old / "text_encoder/model.safetensors"
    state = {f"text_model.{k}": v for k, v in load_file(file).items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, file)
    (seed,) = open_seeds([str(old)])
    try:
        live = LivePipeline(seed)
        assert "text_encoder/text_model.encoder.layers.0.mlp.fc1.weight" in live.names
        assert torch.equal(_image(live.model), _image(_loaded(pipelines["sd1-a"])))
    finally:
        close_seeds([seed])


def test_bad_options_are_one_line_errors(opened, tmp_path):
    seed = opened[0]
    with pytest.raises(CheckpointError, match="needs an accelerator device"):
        LivePipeline(seed, device_map="sequential_cpu_offload")
    with pytest.raises(CheckpointError, match="'unet2', not a component"):
        LivePipeline(seed, device_map={"unet2": "cpu"})
    with pytest.raises(CheckpointError, match="offloads unet to disk: give offload_folder"):
        LivePipeline(seed, device_map={"unet": "disk"})
    with pytest.raises(CheckpointError, match="device_map of vae: .* post_quant_conv.weight"):
        LivePipeline(seed, device_map={"vae": {"encoder": "cpu", "decoder": "disk"}}, offload_folder=tmp_path)
    with pytest.raises(CheckpointError, match="every component would be offloaded to disk"):
        LivePipeline(seed, max_memory={"cpu": 1}, offload_folder=tmp_path)
    live = LivePipeline(seed)
    with pytest.raises(CheckpointError, match="no tensor 'unet/nope.weight'"):
        live.write("unet/nope.weight", torch.zeros(1))


# -- Blend recipes over pipeline seeds: the live target, rebuild and export --------------------------------------


@pytest.fixture(scope="module")
def recipe(opened, tmp_path_factory):
    """A two-segment Blend of the UNets: 0.3 a + 0.7 b on the first third of the blocks, a after."""
    names = [n for n in opened[0].checkpoint.names if n.startswith("unet/")]
    layout = evolved_layout(opened, names, 4096)
    split = layout.num_blocks // 3
    blend = Blend(np.array([0, split, layout.num_blocks]), np.array([[0.3, 0.7], [1.0, 0.0]]))
    recipe = BlendRecipe([seed_record(s) for s in opened], names, 4096, 0, "float32", blend)
    path = tmp_path_factory.mktemp("recipe") / "recipe.json"
    recipe.save(path)
    return path, layout, split


def _expected_unet(opened, layout, split) -> dict[str, torch.Tensor]:
    flat = [torch.cat([s.checkpoint.get(t.name).reshape(-1) for t in layout.tensors]) for s in opened]
    cut = int(layout.block_starts[split])
    merged = torch.cat([0.3 * flat[0][:cut] + 0.7 * flat[1][:cut], flat[0][cut:]])
    out, start = {}, 0
    for t in layout.tensors:
        size = int(np.prod(t.shape))
        out[t.name.removeprefix("unet/")] = merged[start : start + size].reshape(t.shape)
        start += size
    return out


@pytest.fixture(scope="module")
def rebuilt(recipe, tmp_path_factory):
    from hf_m2n2.blend_ops import rebuild

    return rebuild(recipe[0], tmp_path_factory.mktemp("rebuilt") / "out")


def test_rebuild_writes_a_diffusers_folder_whose_unet_is_the_blend(rebuilt, recipe, opened, pipelines):
    a = pipelines["sd1-a"]
    unet = load_file(rebuilt / UNET)
    expected = _expected_unet(opened, *recipe[1:])
    assert set(unet) == set(expected)
    for name, tensor in unet.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    for copied in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (rebuilt / copied).read_bytes() == (a / copied).read_bytes()  # untouched components: whole
    for same in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        assert json.loads((rebuilt / same).read_text()) == json.loads((a / same).read_text())
    assert (rebuilt / "tokenizer").is_dir() and (rebuilt / "recipe.json").is_file()
    assert not list(rebuilt.glob("*.safetensors"))  # nothing at the root: every weight is in its component


def test_live_pipeline_through_the_kind_generates_what_the_rebuilt_folder_does(
    rebuilt, recipe, opened, tmp_path
):
    """The genome kinds' path: the kind's live target, a BlendTarget write, and the exported bytes agree."""
    path, layout, _ = recipe
    blend = BlendRecipe.load(path).blend
    live = model_kind("pipeline").live_target(
        opened[0],
        dtype=torch.float32,
        device="cpu",
        device_map=None,
        max_memory={"cpu": "600KB"},
        offload_folder=tmp_path / "offload",
        trust_remote_code=False,
    )
    assert isinstance(live, LivePipeline) and live.offloaded
    BlendTarget(
        layout, SeedTensors(opened, [t.name for t in layout.tensors], torch.float32, "cpu"), live
    ).write(blend)
    assert torch.equal(_image(live.model), _image(_loaded(rebuilt)))


def test_cli_rebuild_and_export_of_a_pipeline_run(recipe, rebuilt, cli, tmp_path):
    code, _, err = cli("rebuild", recipe[0], tmp_path / "again", "--quiet")
    assert code == 0, err
    assert (tmp_path / "again" / UNET).read_bytes() == (rebuilt / UNET).read_bytes()
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    shutil.copyfile(recipe[0], run / "model" / "recipe.json")
    (run / "model" / "README.md").write_text("card\n")
    code, _, err = cli("export", run, tmp_path / "exported", "--quiet")
    assert code == 0, err
    assert (tmp_path / "exported" / UNET).read_bytes() == (rebuilt / UNET).read_bytes()
    assert (tmp_path / "exported" / "README.md").read_text() == "card\n"
    _loaded(tmp_path / "exported")  # diffusers loads it


def test_export_of_a_method_genome_run_over_pipelines(pipelines, tmp_path):
    """A method genome's run keeps merge_config.yaml: `hf-m2n2 export` merges it again into a diffusers folder."""
    from hf_m2n2.evolve.outcome import export_run

    a, b = pipelines["sd1-a"], pipelines["sd1-b"]
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "merge_config.yaml").write_text(
        "merge_method: linear\n"
        f"models:\n  - model: {a}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.75}}\n"
        "dtype: float32\n"
    )
    out = export_run(tmp_path / "run", tmp_path / "out")
    merged, ua, ub = load_file(out / UNET), load_file(a / UNET), load_file(b / UNET)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.25 * ua[name] + 0.75 * ub[name], rtol=0, atol=1e-6)
    _image(_loaded(out))


def test_rebuild_with_a_single_file_seed_fixed(recipe, rebuilt, opened, pipelines, tmp_path):
    """b as an original-layout file, and the fixed seed: its VAE and text encoder streamed out of the file."""
    from hf_m2n2.blend_ops import rebuild
    from hf_m2n2.single_file import write_single_file

    b = opened[1]
    configs = {c: comp.config for c, comp in b.components.items()}
    file = write_single_file(tmp_path / "b.safetensors", b.checkpoint.names, b.checkpoint.get, configs)
    seeds = open_seeds([str(pipelines["sd1-a"]), str(file)])
    try:
        original = BlendRecipe.load(recipe[0])
        again = replace(original, seeds=[seed_record(s) for s in seeds], fixed_from=1)
        again.save(tmp_path / "recipe.json")
    finally:
        close_seeds(seeds)
    out = rebuild(tmp_path / "recipe.json", tmp_path / "out")
    unet, expected = (
        load_file(out / UNET),
        load_file(rebuilt / UNET),
    )  # the file's tensors are b's, bit for bit
    assert set(unet) == set(expected) and all(torch.equal(t, expected[k]) for k, t in unet.items())
    vae = load_file(out / "vae/diffusion_pytorch_model.safetensors")
    assert set(vae) == {n.split("/", 1)[1] for n in b.checkpoint.names if n.startswith("vae/")}
    assert all(torch.equal(t, b.checkpoint.get(f"vae/{k}")) for k, t in vae.items())
    assert torch.equal(_image(_loaded(out)), _image(_loaded(pipelines["sd1-b"], unet=_loaded(out).unet)))


def test_recipe_records_the_weights_variant_and_rebuild_reads_it(pipelines, tmp_path):
    from hf_m2n2.blend_ops import rebuild

    (seed,) = open_seeds([str(pipelines["sd1-a"])], variant="fp16")
    try:
        names = [n for n in seed.checkpoint.names if n.startswith("unet/")]
        layout = evolved_layout([seed], names, 4096)
        record = seed_record(seed)
        recipe = BlendRecipe([record], names, 4096, 0, "float32", Blend.seed(0, 1, layout.num_blocks))
        recipe.save(tmp_path / "recipe.json")
    finally:
        close_seeds([seed])
    assert record["variant"] == "fp16"
    unet = load_file(rebuild(tmp_path / "recipe.json", tmp_path / "out") / UNET)
    fp16 = load_file(pipelines["sd1-a"] / "unet/diffusion_pytorch_model.fp16.safetensors")
    assert set(unet) == set(fp16) and all(torch.equal(t, fp16[k].float()) for k, t in unet.items())
