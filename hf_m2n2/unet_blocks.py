"""UNet block names (supermerger / sd-mecha "MBW" numbering) for diffusers UNet2DConditionModel keys.

Merge-block-weighted recipes from sd-webui-supermerger and sd-mecha give one value per block of the original
(ldm / sgm) UNet: ``BASE``, ``IN00``.. (``input_blocks.N``), ``M00`` (``middle_block``), ``OUT00``..
(``output_blocks.N``); SD 1.x/2.x have IN00-IN11 and OUT00-OUT11, SDXL IN00-IN08 and OUT00-OUT08. This module
names the block of each *diffusers* UNet key, derived from the UNet's config.json (no key table), as the exact
inverse of diffusers' single-file conversion (``convert_ldm_unet_checkpoint``):

- ``input_blocks.0`` is ``conv_in``; then, per down block, one input block per resnet (with the attention of
  the same index), then one for its downsampler (every down block but the last has one);
- ``middle_block`` is all of ``mid_block``;
- per up block, ``layers_per_block + 1`` output blocks (resnet + attention of the same index); the upsampler
  belongs to the last output block of its up block.

Keys outside the numbered blocks follow sd-mecha 1.1.8 (``convert_sd1_blocks_to_ldm`` /
``convert_sdxl_blocks_to_sgm``, checked key by key by ``bench/check_unet_blocks_sdmecha.py``):

- ``time_embedding`` (ldm ``time_embed``) -> ``BASE``; ``add_embedding`` and ``class_embedding`` (ldm
  ``label_emb``) -> ``BASE`` (sd-mecha's SDXL rule; SD 1.x checkpoints have no ``label_emb``). Recent
  supermerger versions do not merge these keys at all ("Not Merge"); older ones used the base alpha, which is
  what ``BASE`` means here too.
- ``conv_norm_out`` / ``conv_out`` (ldm ``out.0`` / ``out.2``) -> the last output block (``OUT11`` for SD 1.x,
  ``OUT08`` for SDXL): both tools treat ``out.*`` as "after the output blocks".
- diffusers-only conditioning modules with no ldm counterpart (``encoder_hid_proj``, ``position_net``,
  ``time_embedding.cond_proj``) -> ``BASE``, as sd-mecha does for any key outside the numbered blocks.

Text encoders and the VAE are not UNet keys: sd-mecha gives them ``BASE`` (and ``VAE`` for the SDXL VAE);
callers that see a pipeline's other components decide that for themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

BASE = "BASE"
MIDDLE = "M00"

# diffusers' defaults for config keys a (hand-written) config may leave out.
_DEFAULT_LAYERS_PER_BLOCK = 2
_DEFAULT_MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"

# Top-level modules before the numbered blocks (conditioning): their keys take the BASE value.
_BEFORE_BLOCKS = ("time_embedding", "add_embedding", "class_embedding", "encoder_hid_proj", "position_net")
# Top-level modules after the output blocks: their keys join the last output block.
_AFTER_BLOCKS = ("conv_norm_out", "conv_out")


class _Layout(NamedTuple):
    """The block names of one UNet shape, and the block of each module prefix of its keys."""

    names: tuple[str, ...]
    prefixes: Mapping[str, str]


def _input(index: int) -> str:
    return f"IN{index:02d}"


def _output(index: int) -> str:
    return f"OUT{index:02d}"


def _has_attentions(block_type: str) -> bool:
    # CrossAttnDownBlock2D, AttnUpBlock2D, SimpleCrossAttnDownBlock2D, ...: the blocks with `attentions`.
    return "Attn" in block_type


@functools.lru_cache(maxsize=32)
def _build_layout(
    down_types: tuple[str, ...], up_types: tuple[str, ...], layers: tuple[int, ...], has_mid: bool
) -> _Layout:
    prefixes: dict[str, str] = dict.fromkeys(_BEFORE_BLOCKS, BASE)
    prefixes["conv_in"] = _input(0)
    index = 1
    for block, (kind, count) in enumerate(zip(down_types, layers)):
        for layer in range(count):
            prefixes[f"down_blocks.{block}.resnets.{layer}"] = _input(index)
            if _has_attentions(kind):
                prefixes[f"down_blocks.{block}.attentions.{layer}"] = _input(index)
            index += 1
        if block < len(down_types) - 1:
            prefixes[f"down_blocks.{block}.downsamplers.0"] = _input(index)
            index += 1
    names = [BASE, *(_input(i) for i in range(index))]
    if has_mid:
        prefixes["mid_block"] = MIDDLE
        names.append(MIDDLE)
    index = 0
    for block, (kind, count) in enumerate(zip(up_types, reversed(layers))):
        for layer in range(count + 1):
            prefixes[f"up_blocks.{block}.resnets.{layer}"] = _output(index)
            if _has_attentions(kind):
                prefixes[f"up_blocks.{block}.attentions.{layer}"] = _output(index)
            index += 1
        if block < len(up_types) - 1:
            prefixes[f"up_blocks.{block}.upsamplers.0"] = _output(index - 1)
    prefixes.update(dict.fromkeys(_AFTER_BLOCKS, _output(index - 1)))
    names.extend(_output(i) for i in range(index))
    return _Layout(tuple(names), prefixes)


def _layout(unet_config: Mapping[str, Any]) -> _Layout:
    """The layout of a UNet2DConditionModel config (config.json dict); ValueError if it is not one."""
    try:
        down = tuple(unet_config["down_block_types"])
        up = tuple(unet_config["up_block_types"])
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"not a UNet2DConditionModel config: no down_block_types/up_block_types ({exc})"
        ) from None
    if not down or len(down) != len(up):
        raise ValueError(
            f"UNet config has {len(down)} down blocks and {len(up)} up blocks: expected the same"
        )
    per_block = unet_config.get("layers_per_block", _DEFAULT_LAYERS_PER_BLOCK)
    layers = (per_block,) * len(down) if isinstance(per_block, int) else tuple(per_block)
    if len(layers) != len(down) or not all(isinstance(n, int) and n > 0 for n in layers):
        raise ValueError(f"UNet config layers_per_block {per_block!r} does not fit {len(down)} down blocks")
    has_mid = unet_config.get("mid_block_type", _DEFAULT_MID_BLOCK_TYPE) is not None
    return _build_layout(down, up, layers, has_mid)


def _block(key: str, layout: _Layout) -> str:
    parts = key.split(".")
    # A numbered sub-module ("down_blocks.1.attentions.0") or a top-level one ("mid_block", "conv_in"),
    # followed by at least a parameter name.
    for length in (4, 1):
        if len(parts) > length and (block := layout.prefixes.get(".".join(parts[:length]))) is not None:
            return block
    raise ValueError(
        f"{key!r} is not a key of this UNet (expected e.g. 'down_blocks.0.resnets.0.conv1.weight')"
    )


def unet_block_names(unet_config: Mapping[str, Any]) -> list[str]:
    """The block names of a diffusers UNet, in order: BASE, IN00.., M00, OUT00.. (ldm/sgm numbering).

    Args:
        unet_config: the UNet's config.json dict (``unet.config`` works too).

    Returns:
        ``["BASE", "IN00", ..., "M00", "OUT00", ...]``: every value `unet_block_of` can return for this UNet
        (``M00`` only when the UNet has a mid block). SD 1.5 gives IN00-IN11 and OUT00-OUT11, SDXL IN00-IN08
        and OUT00-OUT08.

    Raises:
        ValueError: the config is not a UNet2DConditionModel config.
    """
    return list(_layout(unet_config).names)


def unet_block_of(key: str, unet_config: Mapping[str, Any]) -> str:
    """The supermerger / sd-mecha block of one diffusers UNet state-dict key.

    Args:
        key: a UNet key without component prefix, e.g. ``"down_blocks.1.attentions.0.proj_in.weight"``.
        unet_config: the UNet's config.json dict.

    Returns:
        The block name, e.g. ``"IN04"`` for that key in SD 1.5; ``"BASE"`` for the time / added-condition
        embeddings; the last output block for ``conv_norm_out`` / ``conv_out`` (see the module docstring).

    Raises:
        ValueError: the key is not a parameter of this UNet's modules, or the config is not a UNet config.

    Example:
        >>> unet_block_of("conv_in.weight", {"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"]})
        'IN00'
    """
    return _block(key, _layout(unet_config))


def unet_block_map(unet_config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, str]:
    """The block of each of many UNet keys (the layout is derived once).

    Args:
        unet_config: the UNet's config.json dict.
        keys: UNet state-dict keys without component prefix.

    Returns:
        ``{key: block}`` in the order of `keys`.

    Raises:
        ValueError: a key is not a key of this UNet, or the config is not a UNet config.
    """
    layout = _layout(unet_config)
    return {key: _block(key, layout) for key in keys}
