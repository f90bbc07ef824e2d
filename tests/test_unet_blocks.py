"""UNet block names: the inverse of diffusers' ldm -> diffusers conversion, on real-size and tiny UNet configs."""

from __future__ import annotations

import re

import pytest
import torch

from hf_m2n2.pipeline_families import RELEASED_UNET_CONFIGS
from hf_m2n2.single_file import RESNET_TO_LDM  # diffusers resnet renames, read backwards
from hf_m2n2.unet_blocks import unet_block_map, unet_block_names, unet_block_of

SD15_UNET = RELEASED_UNET_CONFIGS["sd1"]
SD21_UNET = RELEASED_UNET_CONFIGS["sd2"]
SDXL_UNET = RELEASED_UNET_CONFIGS["sdxl"]

# The shape of the project's tiny test pipelines: 2 down blocks, one resnet each.
TINY_UNET = {
    "block_out_channels": [8, 16],
    "cross_attention_dim": 16,
    "attention_head_dim": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 8,
}

CONFIGS = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET}


def _keys(config: dict) -> list[str]:
    """The state-dict keys of a UNet2DConditionModel built on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return list(UNet2DConditionModel.from_config(config).state_dict())


@pytest.fixture(scope="module")
def unet_keys() -> dict[str, list[str]]:
    return {name: _keys(config) for name, config in CONFIGS.items()}


def _block_number(block: str) -> str:
    return str(int(block.removeprefix("IN").removeprefix("OUT")))


def _ldm_key(key: str, config: dict) -> str:
    """The original (ldm/sgm) name of a diffusers UNet key, with the block index taken from `unet_block_of`.

    Only the within-block renames are written here; which `input_blocks.N` / `output_blocks.N` a module lands in
    comes from the function under test, so diffusers' converter can judge it.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    tables = DIFFUSERS_TO_LDM_MAPPING["unet"]
    for table in tables.values():
        if key in table:
            return table[key]
    parts = key.split(".")
    block = unet_block_of(key, config)
    if parts[0] == "mid_block":
        slot = "1" if parts[1] == "attentions" else ("0" if parts[2] == "0" else "2")
        return ".".join(["middle_block", slot, *_renamed(parts[3:], parts[1])])
    side = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
    kind, rest = parts[2], parts[4:]
    if kind == "downsamplers":
        return ".".join([side, _block_number(block), "0", "op", *rest[1:]])
    if kind == "upsamplers":
        has_attention = "Attn" in config["up_block_types"][int(parts[1])]
        return ".".join([side, _block_number(block), "2" if has_attention else "1", *rest])
    slot = "0" if kind == "resnets" else "1"
    return ".".join([side, _block_number(block), slot, *_renamed(rest, kind)])


def _renamed(rest: list[str], kind: str) -> list[str]:
    if kind != "resnets":
        return rest
    head = RESNET_TO_LDM.get(rest[0], rest[0])
    return [*head.split("."), *rest[1:]]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_blocks_invert_diffusers_single_file_conversion(name, unet_keys):
    """diffusers' own ldm -> diffusers converter maps the ldm key built from each block back to the same key."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = CONFIGS[name]
    keys = unet_keys[name]
    # Stand-in values: each original key carries the diffusers key it came from.
    original = {"model.diffusion_model." + _ldm_key(key, config): key for key in keys}
    assert len(original) == len(keys)
    converted = convert_ldm_unet_checkpoint(original, config)
    assert converted == {key: key for key in keys}
    # And the block is the one the original key's input_blocks.N / middle_block / output_blocks.N names.
    for ldm_key, key in original.items():
        if match := re.match(r"model\.diffusion_model\.(input|output)_blocks\.(\d+)\.", ldm_key):
            expected = f"{'IN' if match[1] == 'input' else 'OUT'}{int(match[2]):02d}"
        elif ".middle_block." in ldm_key:
            expected = "M00"
        else:
            continue
        assert unet_block_of(key, config) == expected, ldm_key


def test_block_names_of_real_and_tiny_unets():
    assert unet_block_names(SD15_UNET) == [
        "BASE",
        *(f"IN{i:02d}" for i in range(12)),
        "M00",
        *(f"OUT{i:02d}" for i in range(12)),
    ]
    assert unet_block_names(SD21_UNET) == unet_block_names(SD15_UNET)
    assert unet_block_names(SDXL_UNET) == ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00"] + [
        f"OUT{i:02d}" for i in range(9)
    ]
    # conv_in, down 0 resnet, down 0 downsampler, down 1 resnet; 2 resnets per up block.
    assert unet_block_names(TINY_UNET) == ["BASE", "IN00", "IN01", "IN02", "IN03", "M00"] + [
        f"OUT{i:02d}" for i in range(4)
    ]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_block_has_keys_and_every_key_a_named_block(name, unet_keys):
    blocks = unet_block_map(CONFIGS[name], unet_keys[name])
    assert list(blocks) == unet_keys[name]
    assert set(blocks.values()) == set(unet_block_names(CONFIGS[name]))


@pytest.mark.parametrize(
    ("config", "key", "block"),
    [
        (SD15_UNET, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", "IN04"),
        (SD15_UNET, "conv_in.weight", "IN00"),
        (SD15_UNET, "down_blocks.0.downsamplers.0.conv.weight", "IN03"),
        (SD15_UNET, "down_blocks.3.resnets.1.conv2.bias", "IN11"),
        (SD15_UNET, "mid_block.attentions.0.proj_in.weight", "M00"),
        (SD15_UNET, "up_blocks.0.upsamplers.0.conv.weight", "OUT02"),
        (SD15_UNET, "up_blocks.3.attentions.2.proj_out.weight", "OUT11"),
        # Before the blocks: BASE; after the output blocks: the last output block (sd-mecha, supermerger).
        (SD15_UNET, "time_embedding.linear_1.weight", "BASE"),
        (SD15_UNET, "conv_norm_out.weight", "OUT11"),
        (SD15_UNET, "conv_out.bias", "OUT11"),
        (SDXL_UNET, "add_embedding.linear_2.weight", "BASE"),
        (SDXL_UNET, "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2.weight", "IN08"),
        (SDXL_UNET, "up_blocks.1.upsamplers.0.conv.weight", "OUT05"),
        (SDXL_UNET, "conv_out.weight", "OUT08"),
    ],
)
def test_block_of_known_keys(config, key, block):
    assert unet_block_of(key, config) == block


def test_per_block_layer_counts_follow_the_unet_structure():
    """layers_per_block as a list (diffusers allows it; its converter does not): up blocks take it reversed."""
    config = {**TINY_UNET, "layers_per_block": [1, 2]}
    keys = _keys(config)
    blocks = unet_block_map(config, keys)
    assert unet_block_names(config) == ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "M00"] + [
        f"OUT{i:02d}" for i in range(5)
    ]
    assert blocks["down_blocks.1.resnets.1.conv1.weight"] == "IN04"
    assert blocks["up_blocks.0.resnets.2.conv1.weight"] == "OUT02"
    assert blocks["up_blocks.0.upsamplers.0.conv.weight"] == "OUT02"
    assert blocks["up_blocks.1.attentions.1.proj_out.weight"] == "OUT04"


def test_unet_without_mid_block_has_no_m00():
    config = {**TINY_UNET, "mid_block_type": None}
    keys = _keys(config)
    assert "M00" not in unet_block_names(config)
    assert "M00" not in unet_block_map(config, keys).values()


@pytest.mark.parametrize(
    "key",
    [
        "text_model.encoder.layers.0.mlp.fc1.weight",  # another component
        "unet.conv_in.weight",  # a component prefix
        "down_blocks.4.resnets.0.conv1.weight",  # no such down block
        "down_blocks.3.downsamplers.0.conv.weight",  # the last down block has no downsampler
        "down_blocks.3.attentions.0.proj_in.weight",  # DownBlock2D has no attentions
        "up_blocks.3.upsamplers.0.conv.weight",  # nor has the last up block an upsampler
        "up_blocks.0.resnets.3.conv1.weight",  # layers_per_block + 1 resnets per up block
        "mid_block",  # a module, not a parameter
    ],
)
def test_block_of_refuses_keys_outside_the_unet(key):
    with pytest.raises(ValueError, match="is not a key of this UNet"):
        unet_block_of(key, SD15_UNET)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="not a UNet2DConditionModel config"):
        unet_block_names({"hidden_size": 64})
    with pytest.raises(ValueError, match="down blocks and 1 up blocks"):
        unet_block_names({**TINY_UNET, "up_block_types": ["UpBlock2D"]})
    with pytest.raises(ValueError, match="layers_per_block"):
        unet_block_names({**TINY_UNET, "layers_per_block": [1, 1, 1]})
