"""Text-to-image pipeline families as data (SD 1.x, SD 2.x, SDXL base), and the UNet's blocks as merge "layers".

A family is recognized from the UNet's config.json (the keys diffusers itself writes for each family), not from
sizes, so the project's tiny test pipelines are classified as the real ones are. Seeds of different families are
refused before anything is read: their UNets share no tensor layout.

Gradients and filters: the UNet's blocks, in the original (ldm/sgm) numbering users know from supermerger and
sd-mecha (SD 1.x/2.x: IN00-IN11, M00, OUT00-OUT11; SDXL: IN00-IN08, M00, OUT00-OUT08; see `hf_m2n2.unet_blocks`),
are the layers a gradient runs over: block k of n sits at t = k / (n - 1), in the order IN.., M00, OUT... Everything
outside the numbered blocks (BASE: the UNet's time and class embeddings and output layers, the text encoders) and
the VAE sits at t = 0, as tensors outside the layers do for LLMs. A filter matches a tensor when it is a substring
of its name (`unet/`, `attn2`, ...) or equals its block name (`IN04`, `M00`, `BASE`, `VAE`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hf_m2n2.architectures import Architecture


@dataclass(frozen=True)
class PipelineFamily:
    """One family of text-to-image pipelines.

    Attributes:
        name: short name (`sd1`, `sd2`, `sdxl`), as in specs and single-file detection.
        label: for messages and cards.
        unet_config: UNet config.json values every member has (a key whose value is None must be absent or null).
        text_encoders: the text-encoder components the family's pipeline has, in order.
        pipeline_class: the diffusers pipeline class (for cards and single-file loading).
    """

    name: str
    label: str
    unet_config: Mapping[str, Any]
    text_encoders: tuple[str, ...]
    pipeline_class: str

    @property
    def hub_tag(self) -> str:
        """The Hub tag of the family's models (cards)."""
        return "stable-diffusion-xl" if self.name == "sdxl" else "stable-diffusion"

    def matches(self, unet_config: Mapping[str, Any]) -> bool:
        return all(unet_config.get(key) == value for key, value in self.unet_config.items())


# Tried in order: the first whose UNet config values all match.
PIPELINE_FAMILIES: tuple[PipelineFamily, ...] = (
    PipelineFamily(
        "sdxl",
        "SDXL",
        {"addition_embed_type": "text_time"},
        ("text_encoder", "text_encoder_2"),
        "StableDiffusionXLPipeline",
    ),
    PipelineFamily(
        "sd2",
        "SD 2.x",
        {"addition_embed_type": None, "use_linear_projection": True},
        ("text_encoder",),
        "StableDiffusionPipeline",
    ),
    PipelineFamily(
        "sd1",
        "SD 1.x",
        {"addition_embed_type": None, "use_linear_projection": False},
        ("text_encoder",),
        "StableDiffusionPipeline",
    ),
)


def pipeline_family(unet_config: Mapping[str, Any]) -> PipelineFamily | None:
    """The family of a UNet config (missing `use_linear_projection` reads as False, as diffusers defaults it)."""
    config = {"use_linear_projection": False, **unet_config}
    return next((f for f in PIPELINE_FAMILIES if f.matches(config)), None)


def family_named(name: str) -> PipelineFamily:
    return next(f for f in PIPELINE_FAMILIES if f.name == name)


# The released base models' UNet configs (config.json of stable-diffusion-v1-5, stable-diffusion-2-1 and
# stable-diffusion-xl-base-1.0): real shapes, for checks and benchmarks that build models on the meta device.
# The UNet config.json of stable-diffusion-v1-5 (block layout and everything the model needs to be built).
_SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stable-diffusion-2-1: the SD 1.x layout with linear projections and a 1024-wide text encoder.
_SD21_UNET = {
    **_SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers 0.19 keys).
_SDXL_UNET: dict = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
RELEASED_UNET_CONFIGS: dict[str, dict[str, Any]] = {"sd1": _SD15_UNET, "sd2": _SD21_UNET, "sdxl": _SDXL_UNET}


@dataclass(frozen=True)
class BlockArchitecture(Architecture):
    """A pipeline seed's tensors (`COMPONENT/KEY`) seen as an architecture whose layers are the UNet's blocks.

    Attributes:
        blocks: the numbered block names in gradient order (IN00, ..., M00, OUT00, ...).
        block_of: UNet tensor name (with its `unet/` prefix) -> its block name (BASE for those outside).
    """

    blocks: tuple[str, ...] = ()
    block_of: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def layer_index(self, tensor_name: str) -> int | None:
        block = self.block_of.get(tensor_name)
        return None if block is None or block == "BASE" else self.blocks.index(block)

    def with_layer(self, tensor_name: str, index: int) -> str:
        if self.layer_index(tensor_name) != index:  # a UNet's blocks are not interchangeable: no restacking
            raise ValueError(f"{tensor_name} is not in block {self.blocks[index]}")
        return tensor_name

    def is_pre(self, tensor_name: str) -> bool:
        return True  # every tensor outside the blocks is written first, at t = 0

    def layer_filters(self) -> tuple[str, ...]:
        """`BASE` (the UNet's tensors outside the numbered blocks), then the blocks: each block's filter matches
        exactly its tensors (`aliases`), as a merge spec's per-block parameters name them."""
        return ("BASE", *self.blocks)

    def aliases(self, tensor_name: str) -> tuple[str, ...]:
        component = tensor_name.split("/", 1)[0]
        if component == "unet":
            return (self.block_of.get(tensor_name, "BASE"),)
        if (
            component == "vae"
        ):  # as sd-mecha's block lists: SDXL's VAE is a block of its own, SD 1.x/2.x's BASE
            return ("VAE",) if self.name == "sdxl" else ("BASE", "VAE")
        return ("BASE",)


def block_architecture(
    family: PipelineFamily, unet_config: Mapping[str, Any], tensor_names: Iterable[str]
) -> BlockArchitecture:
    """The architecture of a pipeline seed of `family` holding `tensor_names` (`COMPONENT/KEY`)."""
    from hf_m2n2.unet_blocks import unet_block_map, unet_block_names

    unet_keys = [n.removeprefix("unet/") for n in tensor_names if n.startswith("unet/")]
    mapping = unet_block_map(unet_config, unet_keys)
    return BlockArchitecture(
        name=family.name,
        layer_pattern=r"$^",  # never matches: layers come from `block_of`
        embed_names=(),
        pre_names=(),
        blocks=tuple(b for b in unet_block_names(unet_config) if b != "BASE"),
        block_of={f"unet/{key}": block for key, block in mapping.items()},
    )
