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
