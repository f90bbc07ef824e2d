"""Original-layout single files: diffusers folder -> single file -> diffusers' from_single_file and our lazy
view, family detection, and reads that touch only the tensor asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_m2n2.checkpoint import Checkpoint
from hf_m2n2.errors import CheckpointError
from hf_m2n2.single_file import (
    SingleFileCheckpoint,
    detect_single_file_family,
    family_from_configs,
    single_file_key_map,
    write_single_file,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


class Folder:
    """A tiny pipeline's diffusers folder read as the pipeline seed does: `COMPONENT/KEY` names."""

    def __init__(self, root: Path):
        self.root = root
        self.components = [c for c in COMPONENTS if (root / c / "config.json").exists()]
        self.configs = {c: json.loads((root / c / "config.json").read_text()) for c in self.components}
        self.checkpoints = {c: Checkpoint(root / c) for c in self.components}
        self.names = [f"{c}/{key}" for c in self.components for key in self.checkpoints[c].names]

    def read(self, name: str) -> torch.Tensor:
        component, _, key = name.partition("/")
        return self.checkpoints[component].get(key)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """family -> (its tiny diffusers folder, the single file written from it)."""
    from hf_m2n2.demo.tiny_pipelines import build_tiny_pipeline

    root = tmp_path_factory.mktemp("single_file")
    result = {}
    for family in ("sd1", "sd2", "sdxl"):
        folder = Folder(build_tiny_pipeline(root / family, family, seed=3))
        file = write_single_file(root / f"{family}.safetensors", folder.names, folder.read, folder.configs)
        result[family] = (folder, file)
    return result


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_view_gives_the_folder_tensors_bit_for_bit(exported, family):
    folder, file = exported[family]
    with SingleFileCheckpoint(file, folder.configs) as ckpt:
        assert ckpt.family == family
        assert sorted(ckpt.names) == sorted(folder.names)
        for name in folder.names:
            expected = folder.read(name)
            assert ckpt.info(name).shape == tuple(expected.shape), name
            assert ckpt.info(name).dtype == expected.dtype, name
            assert torch.equal(ckpt.get(name), expected), name
            if expected.ndim and expected.shape[0] > 2:
                assert torch.equal(ckpt.get(name, rows=(1, 3)), expected[1:3]), name


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_from_single_file_loads_the_export_equal_to_the_folder(exported, family):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    folder, file = exported[family]
    reference = DiffusionPipeline.from_pretrained(folder.root)
    # offline: configs from the folder, tokenizers and scheduler as objects (diffusers would fetch them)
    objects = {"tokenizer": reference.tokenizer, "scheduler": reference.scheduler}
    if family == "sdxl":
        cls, objects["tokenizer_2"] = StableDiffusionXLPipeline, reference.tokenizer_2
    else:
        cls = StableDiffusionPipeline
        objects.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    loaded = cls.from_single_file(str(file), config=str(folder.root), local_files_only=True, **objects)
    components = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ())
    for component in components:
        expected, got = getattr(reference, component).state_dict(), getattr(loaded, component).state_dict()
        assert expected.keys() == got.keys(), component
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{component}/{key}"


def test_export_writes_the_original_layout_with_fused_and_reshaped_tensors(exported):
    folder, file = exported["sd2"]
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
        in_proj = f.get_tensor("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
        vae_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert all(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."))
        for k in keys
    )
    qkv = [folder.read(f"text_encoder/encoder.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    assert torch.equal(in_proj, torch.cat(qkv))
    linear = folder.read("vae/encoder.mid_block.attentions.0.to_q.weight")
    assert vae_q.shape == (*linear.shape, 1, 1) and torch.equal(vae_q[:, :, 0, 0], linear)

    sdxl_folder, sdxl_file = exported["sdxl"]
    with safe_open(str(sdxl_file), "pt") as f:
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
        position_ids = f.get_tensor("conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
    assert torch.equal(projection, sdxl_folder.read("text_encoder_2/text_projection.weight").T)
    assert torch.equal(position_ids, torch.arange(77)[None])  # written for the original CLIP module
    with SingleFileCheckpoint(sdxl_file, sdxl_folder.configs) as ckpt:
        assert ckpt.dropped == ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]


def test_key_map_names_each_original_tensor_once_with_its_sources(exported):
    folder, _ = exported["sd2"]
    layout = single_file_key_map(folder.configs, folder.names)
    sources = [name for original in layout.values() for name, _ in original.sources]
    assert sorted(sources) == sorted(folder.names)
    fused = layout["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias"]
    assert {name for name, _ in fused.sources} == {
        f"text_encoder/encoder.layers.1.self_attn.{p}_proj.bias" for p in "qkv"
    }
    downsampler = layout["model.diffusion_model.input_blocks.2.0.op.weight"]  # layers_per_block is 1
    assert downsampler.sources == (("unet/down_blocks.0.downsamplers.0.conv.weight", ()),)


def test_export_in_another_dtype(exported, tmp_path):
    folder, _ = exported["sd1"]
    file = write_single_file(
        tmp_path / "half.safetensors", folder.names, folder.read, folder.configs, torch.float16
    )
    with SingleFileCheckpoint(file, folder.configs) as ckpt:
        for name in folder.names[::7]:
            assert torch.equal(ckpt.get(name), folder.read(name).to(torch.float16)), name


def test_a_unet_only_sdxl_file_is_detected_as_sdxl(exported, tmp_path):
    folder, _ = exported["sdxl"]
    unet = [n for n in folder.names if n.startswith("unet/")]
    file = write_single_file(
        tmp_path / "unet.safetensors", unet, folder.read, {"unet": folder.configs["unet"]}
    )
    with safe_open(str(file), "pt") as f:
        assert detect_single_file_family(f.keys(), file) == "sdxl"
    with SingleFileCheckpoint(file, folder.configs) as ckpt:
        assert ckpt.family == "sdxl" and sorted(ckpt.names) == sorted(unet)
        assert torch.equal(ckpt.get(unet[5]), folder.read(unet[5]))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_unet_only_sd1_or_sd2_file_is_told_apart_by_its_projection_shapes(exported, family):
    folder, file = exported[family]
    with safe_open(str(file), "pt") as f:
        unet = [k for k in f.keys() if k.startswith("model.diffusion_model.")]  # noqa: SIM118 (no __iter__)
        shapes = {k: f.get_slice(k).get_shape() for k in unet}
    assert detect_single_file_family(shapes, file, shapes) == family
    with pytest.raises(CheckpointError, match="cannot be told without tensor shapes"):
        detect_single_file_family(shapes, file)


def test_family_from_configs(exported):
    for family, (folder, _) in exported.items():
        assert family_from_configs(folder.configs) == family


def test_unknown_layout_is_one_line_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "llm.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(2, 2)}, file)
    with pytest.raises(CheckpointError) as info:
        SingleFileCheckpoint(file, {})
    first = "lm_head.weight, model.embed_tokens.weight"  # sorted
    assert str(info.value) == f"{file}: keys match no known single-file layout (first keys: {first})"
    vae_only = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, vae_only)
    with pytest.raises(CheckpointError, match="holds only a VAE"):
        SingleFileCheckpoint(vae_only, {})
    refiner = ["conditioner.embedders.0.model.ln_final.weight", "model.diffusion_model.out.2.weight"]
    with pytest.raises(CheckpointError, match="an SDXL refiner .*: not supported"):
        detect_single_file_family(refiner, "refiner.safetensors")


def test_configs_of_another_family_are_refused_in_one_line(exported):
    folder, _ = exported["sd2"]
    _, sd1_file = exported["sd1"]
    with pytest.raises(CheckpointError, match=r"a sd1 single file, but the configs given are sd2's") as info:
        SingleFileCheckpoint(sd1_file, folder.configs)
    assert "\n" not in str(info.value)
    xl_folder, _ = exported["sdxl"]
    with pytest.raises(CheckpointError, match=r"a sd1 single file, but the configs given are sdxl's"):
        SingleFileCheckpoint(sd1_file, xl_folder.configs)


def test_reading_one_tensor_reads_only_its_bytes(exported, monkeypatch):
    folder, file = exported["sd2"]
    with SingleFileCheckpoint(file, folder.configs) as ckpt:
        read = []
        preadv = os.preadv

        def counting(fd, buffers, offset):
            n = preadv(fd, buffers, offset)
            read.append(n)
            return n

        monkeypatch.setattr(os, "preadv", counting)
        plain = "unet/down_blocks.1.resnets.0.conv1.weight"
        ckpt.get(plain)
        assert sum(read) == ckpt.info(plain).nbytes
        k_proj = "text_encoder/encoder.layers.0.self_attn.k_proj.weight"  # a third of a fused in_proj_weight
        expected = folder.read(k_proj)
        read.clear()
        assert torch.equal(ckpt.get(k_proj), expected)
        assert sum(read) == ckpt.info(k_proj).nbytes < file.stat().st_size // 100


def _clip(hidden: int, inter: int, heads: int, layers: int, act: str, arch: str) -> dict:
    return {
        "architectures": [arch],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": act,
        "projection_dim": hidden,
    }


_SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
# the public SD 1.5 and SDXL base configs' structural entries (two layers per block, four / three levels)
_REAL_CONFIGS = {
    "sd1": {
        "unet": {
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "layers_per_block": 2,
        },
        "vae": _SD_VAE,
        "text_encoder": _clip(768, 3072, 12, 12, "quick_gelu", "CLIPTextModel"),
    },
    "sdxl": {
        "unet": {
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "layers_per_block": 2,
        },
        "vae": _SD_VAE,
        "text_encoder": _clip(768, 3072, 12, 12, "quick_gelu", "CLIPTextModel"),
        "text_encoder_2": _clip(1280, 5120, 20, 32, "gelu", "CLIPTextModelWithProjection"),
    },
}
# keys (and shapes) of the released SD 1.5 and SDXL base single files
_REAL_KEYS = {
    "sd1": {
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    },
}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_key_map_at_real_model_structure_gives_the_released_files_keys(family):
    from hf_m2n2.single_file import expected_shapes

    configs = _REAL_CONFIGS[family]
    names = [f"{c}/{k}" for c, config in configs.items() for k in expected_shapes(c, config)]
    layout = single_file_key_map(configs, names)  # built on the meta device: no memory
    for key, shape in _REAL_KEYS[family].items():
        assert layout[key].shape == shape, key
    blocks = {int(k.split(".")[3]) for k in layout if k.startswith("model.diffusion_model.input_blocks.")}
    assert blocks == set(range(12 if family == "sd1" else 9))
