"""Single-file checkpoints in the original (ldm/sgm) layout, read as a pipeline seed and written as an output.

A1111, ComfyUI and Civitai share Stable Diffusion models as one `.safetensors` file in the layout of the
original training code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.*` (SD 1.x, OpenAI CLIP), `cond_stage_model.model.*` (SD 2.x, OpenCLIP),
`conditioner.embedders.0.transformer.*` and `conditioner.embedders.1.model.*` (SDXL's two text encoders). A
pipeline seed names tensors `COMPONENT/KEY` with KEY as the diffusers folder stores it; this module translates
between the two.

The key map is not a hand-written table. It is derived by running diffusers' own converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint` from `diffusers.loaders.single_file_utils`) on stand-in values (`_Ref`) that
record which original key each diffusers tensor comes from and which indexing / transposition produced it (the
VAE's 1x1-conv attention weights indexed `[:, :, 0, 0]` to linear, OpenCLIP's fused `in_proj_weight` sliced
into q/k/v, OpenCLIP's `text_projection` transposed). The names kept are those of the component's model built
from its config on the meta device (so exactly what `save_pretrained` stores), and their shapes are checked
against it.

Export needs the inverse: original key names and shapes for diffusers names. Those candidates come from a
small inverse of the converters' renaming rules (`_original_key`), but they are not trusted: the forward
conversion is run on them and must give back exactly the diffusers names and shapes, with the views of each
original tensor adding up to its size, or a `ContractError` says where the two disagree. Writing then copies
each diffusers tensor into the original tensor through the very view (index, slice, transpose) the forward
conversion recorded, so fused tensors (q/k/v -> `in_proj_weight`) are concatenated and reshaped tensors
restored exactly.

Memory: nothing O(model) is held. Reading keeps the file header (names, shapes, offsets) and the key map (a
few hundred small records); a tensor is read with `pread` on request, only its own bytes (for a q/k/v slice of
a fused tensor, only its rows). Building the map instantiates each component on the meta device (no storage).
Writing streams through `ShardedSafetensorsWriter` (one shard, the header laid out first), holding one
original tensor at a time (a fused `in_proj_weight` plus the three pieces being copied into it).

Measured (real SD 1.5 / SDXL shapes from hand-written copies of their configs, float16, constant-valued
tensors, 2 shared cores): the key map costs 0.3 s (meta models) + 0.1 / 0.55 s (conversion and checks) after
the ~8.5 s import of diffusers and transformers; opening a 6.9 GB SDXL file 0.05 s; export 0.4-0.5 GB/s (2.1
GB SD 1.5 in 4.5 s, 6.9 GB SDXL in 17 s), peak RSS rising by 110-160 MB over the ~450 MB after import (the
largest tensors are 76 / 126 MB).

Keys diffusers drops on import, and what the export does about them:
- `model_ema.*`, `alphas_cumprod`, `betas`, `logvar` and other training buffers: not mapped (diffusers
  converts the non-EMA UNet weights); not written.
- CLIP `text_model.embeddings.position_ids` (a buffer transformers 5 does not save): not presented; written as
  `arange(max_position_embeddings)` (int64, shape [1, N]) because the original CLIP module stores it.
- OpenCLIP `logit_scale`, SD 2.x's `cond_stage_model.model.text_projection` and its last resblock (diffusers'
  SD 2.x text encoder has no projection and one layer fewer, as SD 2.x conditions on the penultimate layer):
  not presented, not written. Tools that build the full OpenCLIP model load such an export with those missing;
  they do not change images. (Loading in A1111/ComfyUI is not tested here: neither is installed.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch

from hf_m2n2.checkpoint import Checkpoint, TensorIndex, TensorInfo
from hf_m2n2.errors import CheckpointError, ContractError, OutputError

FAMILIES = ("sd1", "sd2", "sdxl")

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_CLIP_SD1 = "cond_stage_model.transformer."
_OPEN_CLIP_SD2 = "cond_stage_model.model."
_CLIP_SDXL = "conditioner.embedders.0.transformer."
_OPEN_CLIP_SDXL = "conditioner.embedders.1.model."

# component -> (converter kind, key prefix in the single file), per family
_LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"unet": ("unet", _UNET), "vae": ("vae", _VAE), "text_encoder": ("clip", _CLIP_SD1)},
    "sd2": {"unet": ("unet", _UNET), "vae": ("vae", _VAE), "text_encoder": ("open_clip", _OPEN_CLIP_SD2)},
    "sdxl": {
        "unet": ("unet", _UNET),
        "vae": ("vae", _VAE),
        "text_encoder": ("clip", _CLIP_SDXL),
        "text_encoder_2": ("open_clip", _OPEN_CLIP_SDXL),
    },
}

Ops = tuple[tuple, ...]  # ("index", idx) or ("T",), applied in order to the original tensor


def detect_single_file_family(
    keys: Iterable[str], file: str | os.PathLike[str], shapes: Mapping[str, Sequence[int]] | None = None
) -> str:
    """The model family ("sd1", "sd2" or "sdxl") of an original-layout single file, from its key names.

    What decides, in order:
    - SDXL: a `conditioner.embedders.*` key (sgm's text encoders), or, for a UNet-only file, the UNet's
      `label_emb.0.0.weight` (SDXL's size/crop conditioning; SD 1.x/2.x text-to-image UNets have no
      label_emb).
      diffusers itself detects a UNet-only SDXL file as SD 1.5 (it looks at a text-encoder key).
    - SD 2.x: an OpenCLIP text encoder (`cond_stage_model.model.*`); SD 1.x: OpenAI CLIP
      (`cond_stage_model.transformer.*`).
    - a UNet without a text encoder: SD 2.x when its transformer `proj_in` weights are linear (2-D, SD 2.x's
      `use_linear_projection`), SD 1.x when they are 1x1 convolutions (4-D); this needs `shapes`.
    An SDXL refiner (its only text encoder, OpenCLIP, at `conditioner.embedders.0.model.*`) is refused.
    SD 2.x-derived models with another text encoder, SD 1.x inpainting/upscaling variants and other families
    are not told apart from these: they are classed by the rules above.

    Args:
        keys: the file's tensor names.
        file: the file, named in errors.
        shapes: tensor shapes by name (needed only for a UNet-only SD 1.x / 2.x file).

    Returns:
        "sd1", "sd2" or "sdxl".

    Raises:
        CheckpointError: the keys match no known layout, hold only a VAE, or are a UNet-only file without
            shapes.
    """
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.0.model."):
        raise CheckpointError(f"{file}: an SDXL refiner (OpenCLIP as conditioner.embedders.0): not supported")
    if has("conditioner.embedders.") or f"{_UNET}label_emb.0.0.weight" in keys:
        return "sdxl"
    if has(_OPEN_CLIP_SD2):
        return "sd2"
    if has(_CLIP_SD1):
        return "sd1"
    if has(_UNET):
        proj_in = sorted(k for k in keys if k.startswith(_UNET) and k.endswith(".proj_in.weight"))
        if shapes is None or not proj_in:
            raise CheckpointError(
                f"{file}: a UNet-only file: SD 1.x or 2.x cannot be told without tensor shapes"
            )
        return "sd2" if len(shapes[proj_in[0]]) == 2 else "sd1"
    if has(_VAE):
        raise CheckpointError(f"{file}: holds only a VAE (first_stage_model.*): its model family is unknown")
    raise CheckpointError(
        f"{file}: keys match no known single-file layout (first keys: {', '.join(sorted(keys)[:3])})"
    )


def family_from_configs(configs: Mapping[str, Mapping]) -> str:
    """The family a pipeline's component configs describe: SDXL has a second text encoder (or the UNet's
    "text_time" conditioning); SD 2.x's OpenCLIP text encoder uses GELU where SD 1.x's OpenAI CLIP uses
    QuickGELU.

    Raises:
        CheckpointError: neither a text encoder nor an SDXL UNet config to tell SD 1.x from SD 2.x.
    """
    unet = configs.get("unet", {})
    if "text_encoder_2" in configs or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    if "text_encoder" in configs:
        return "sd1" if configs["text_encoder"].get("hidden_act") == "quick_gelu" else "sd2"
    if "use_linear_projection" in unet:
        return "sd2" if unet["use_linear_projection"] else "sd1"
    raise CheckpointError("component configs name no text encoder or UNet: the model family is unknown")


class _Ref:
    """A stand-in for an original tensor inside diffusers' converters: remembers its key and the views taken
    of it (shapes tracked on the meta device). `contiguous`/`clone`/`detach` do not change values: no-ops."""

    def __init__(self, key: str, meta: torch.Tensor, ops: Ops = ()):
        self.key, self.meta, self.ops = key, meta, ops

    @property
    def shape(self) -> torch.Size:
        return self.meta.shape

    @property
    def ndim(self) -> int:
        return self.meta.ndim

    def dim(self) -> int:
        return self.meta.ndim

    def size(self, *dim: int):
        return self.meta.size(*dim)

    def __getitem__(self, idx) -> _Ref:
        return _Ref(self.key, self.meta[idx], (*self.ops, ("index", idx)))

    @property
    def T(self) -> _Ref:  # noqa: N802 (torch's name)
        return _Ref(self.key, self.meta.T, (*self.ops, ("T",)))

    def contiguous(self) -> _Ref:
        return self

    clone = detach = contiguous


def _apply(tensor: torch.Tensor, ops: Ops) -> torch.Tensor:
    """`tensor` seen through the recorded ops (a view: writing into it writes the original)."""
    for op in ops:
        tensor = tensor[op[1]] if op[0] == "index" else tensor.T
    return tensor


def _row_range(steps: Ops, rows: int) -> tuple[int, int] | None:
    """(start, stop) when `steps` only take a contiguous block of rows (dim 0) of a tensor with `rows` rows."""
    if len(steps) != 1 or steps[0][0] != "index":
        return None
    idx = steps[0][1] if isinstance(steps[0][1], tuple) else (steps[0][1],)
    if not isinstance(idx[0], slice) or idx[0].step not in (None, 1):
        return None
    if any(i != slice(None) for i in idx[1:]):
        return None
    return idx[0].indices(rows)[:2]


def _convert(kind: str, prefix: str, shapes: Mapping[str, Sequence[int]], config: Mapping) -> dict[str, _Ref]:
    """Run diffusers' converter for one component on stand-ins of its original tensors (diffusers key ->
    _Ref)."""
    from diffusers.loaders import single_file_utils as sfu

    refs = {
        k: _Ref(k, torch.empty(tuple(s), device="meta")) for k, s in shapes.items() if k.startswith(prefix)
    }
    if kind == "unet":
        converted = sfu.convert_ldm_unet_checkpoint(refs, dict(config))
    elif kind == "vae":
        converted = sfu.convert_ldm_vae_checkpoint(refs, dict(config))
    elif kind == "clip":
        converted = sfu.convert_ldm_clip_checkpoint(refs)
    else:
        text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
        converted = sfu.convert_open_clip_checkpoint(text_model, refs, prefix=prefix)
    if kind in ("clip", "open_clip") and not _has_text_model_wrapper(config):
        # as diffusers' create_diffusers_clip_model_from_ldm: transformers 5's CLIPTextModel has no
        # `text_model.` prefix
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted


def _has_text_model_wrapper(config: Mapping) -> bool:
    """Whether the text encoder's keys start with `text_model.` (transformers 5:
    CLIPTextModelWithProjection)."""
    return any(k.startswith("text_model.") for k in expected_shapes("text_encoder", config))


def expected_shapes(component: str, config: Mapping) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a diffusers folder stores for `component` with this config (the model built
    on the meta device: no memory)."""
    kind = component if component in ("unet", "vae") else "text"
    return dict(_model_shapes_cached(kind, json.dumps(dict(config), sort_keys=True)))


@lru_cache(maxsize=16)
def _model_shapes_cached(kind: str, config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = json.loads(config_json)
    if kind == "text":
        arch = (config.get("architectures") or ["CLIPTextModel"])[0]
        cls = getattr(transformers, arch, None)
        if cls is None or not arch.startswith("CLIPTextModel"):
            raise CheckpointError(f"text encoder architecture {arch!r} has no single-file layout")
    # imported above, outside: tensors made at import time must not land on the meta device
    with torch.device("meta"):
        if kind == "unet":
            model = UNet2DConditionModel.from_config(config)
        elif kind == "vae":
            model = AutoencoderKL.from_config(config)
        else:
            model = cls(transformers.CLIPTextConfig.from_dict(config))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


class SingleFileCheckpoint(TensorIndex):
    """Read-only, lazy view of an original-layout single file under the pipeline seed's names
    (`unet/...`, `vae/...`, `text_encoder/...`, `text_encoder_2/...`): the interface of `Checkpoint`.

    Only the header is read at construction; `get` reads one tensor's bytes (derived tensors are derived on
    read).

    Args:
        file: the `.safetensors` file.
        configs: component name -> its config.json dict (from a diffusers folder of the same family). A
            component the file holds needs its config; one the file lacks is absent from `names`.

    Raises:
        CheckpointError: unreadable file, unknown layout, a component without config, a component's tensors
            incomplete or of other shapes than its config gives.

    Example:
        >>> ckpt = SingleFileCheckpoint("model.safetensors", {"unet": unet_config, "vae": vae_config})
        >>> ckpt.get("unet/conv_in.weight").shape
    """

    def __init__(self, file: str | os.PathLike[str], configs: Mapping[str, Mapping]):
        self.path = Path(file)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        self._reader = Checkpoint(self.path, files=[self.path])
        self._sources: dict[str, tuple[str, Ops]] = {}
        self._infos: dict[str, TensorInfo] = {}
        shapes = {n: self._reader.info(n).shape for n in self._reader.names}
        try:
            self.family = detect_single_file_family(shapes, self.path, shapes)
            configured = family_from_configs(configs)
            if configured != self.family:
                raise CheckpointError(
                    f"{self.path}: a {self.family} single file, but the configs given are {configured}'s"
                )
            for component, (kind, prefix) in _LAYOUTS[self.family].items():
                if not any(k.startswith(prefix) for k in shapes):
                    continue
                if component not in configs:
                    raise CheckpointError(
                        f"{self.path}: holds a {component} but no {component} config was given"
                    )
                converted = _convert(kind, prefix, shapes, configs[component])
                self._add_component(component, converted, configs[component])
        except BaseException:
            self._reader.close()
            raise
        used = {key for key, _ in self._sources.values()}
        self.dropped: list[str] = [k for k in shapes if k not in used]
        """The file's keys that no presented tensor comes from (EMA weights, buffers, ignored layers)."""

    def _add_component(self, component: str, converted: Mapping[str, _Ref], config: Mapping) -> None:
        expected = expected_shapes(component, config)
        missing = [k for k in expected if k not in converted]
        if missing:
            raise CheckpointError(
                f"{self.path}: {component} is incomplete: "
                f"{len(missing)} tensors missing (first: {missing[0]})"
            )
        for key, shape in expected.items():
            ref = converted[key]
            if tuple(ref.shape) != shape:
                raise CheckpointError(
                    f"{self.path}: {ref.key} gives {component}/{key} of shape {list(ref.shape)}, "
                    f"its config expects {list(shape)}"
                )
            name = f"{component}/{key}"
            self._sources[name] = (ref.key, ref.ops)
            original = self._reader.info(ref.key)
            offset = original.offset if not ref.ops else None
            self._infos[name] = TensorInfo(self.path, original.dtype, shape, offset)

    def source(self, name: str) -> str:
        """The original key tensor `name` is read from."""
        self.info(name)
        return self._sources[name][0]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or its rows [start, stop) along dim 0) into a new CPU tensor of its stored
        dtype."""
        self.info(name)
        key, ops = self._sources[name]
        if not ops:
            return self._reader.get(key, rows)
        block = _row_range(ops, self._reader.info(key).shape[0])
        if block is not None:  # a q/k/v block of a fused tensor: read only its rows
            start, stop = block
            if rows is not None and not 0 <= rows[0] <= rows[1] <= stop - start:
                raise CheckpointError(
                    f"{self.path}: rows {rows} out of range for {name!r} ({stop - start} rows)"
                )
            first, last = (start, stop) if rows is None else (start + rows[0], start + rows[1])
            return self._reader.get(key, (first, last))
        tensor = _apply(self._reader.get(key), ops).clone(memory_format=torch.contiguous_format)
        return tensor if rows is None else tensor[rows[0] : rows[1]].clone()

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> SingleFileCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class OriginalTensor:
    """One tensor of the original layout: its shape, and the pipeline-seed tensors it is assembled from, each
    with the view of the original tensor it fills (or `constant`, for a buffer diffusers does not store)."""

    shape: tuple[int, ...]
    sources: tuple[tuple[str, Ops], ...] = ()
    constant: torch.Tensor | None = None


RESNET_TO_LDM = {  # diffusers' update_unet_resnet_ldm_to_diffusers renames, reversed
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN_BACK = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _original_key(
    kind: str, key: str, shape: tuple[int, ...], config: Mapping, names: set[str]
) -> tuple[str, tuple[int, ...]]:
    """A candidate (original key without the component prefix, original shape) for one diffusers tensor.

    Only a candidate: `single_file_key_map` checks it by converting it forward with diffusers' converter."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    parts = key.split(".")
    if kind == "unet":
        fixed = {**MAP["unet"]["layers"]}
        if config.get("addition_embed_type") == "text_time":
            fixed.update(MAP["unet"]["addition_embed_type"])
        if config.get("class_embed_type") in ("timestep", "projection"):
            fixed.update(MAP["unet"]["class_embed_type"])
        if key in fixed:
            return fixed[key], shape
        per = config["layers_per_block"] + 1
        if parts[0] in ("down_blocks", "up_blocks"):
            block, what = int(parts[1]), parts[2]
            side, first = (
                ("input_blocks", 1 + block * per)
                if parts[0] == "down_blocks"
                else ("output_blocks", block * per)
            )
            if what == "resnets":
                return (
                    f"{side}.{first + int(parts[3])}.0.{RESNET_TO_LDM.get(parts[4], parts[4])}.{parts[-1]}",
                    shape,
                )
            if what == "attentions":
                return f"{side}.{first + int(parts[3])}.1.{'.'.join(parts[4:])}", shape
            if what == "downsamplers":
                return f"input_blocks.{first + per - 1}.0.op.{parts[-1]}", shape
            if what == "upsamplers":
                slot = 2 if any(n.startswith(f"up_blocks.{block}.attentions.") for n in names) else 1
                return f"output_blocks.{first + per - 1}.{slot}.conv.{parts[-1]}", shape
        if parts[0] == "mid_block":
            index = 2 * int(parts[2]) if parts[1] == "resnets" else 1
            rest = ".".join(parts[3:])
            if parts[1] == "resnets":
                rest = f"{RESNET_TO_LDM.get(parts[3], parts[3])}.{parts[-1]}"
            return f"middle_block.{index}.{rest}", shape
    elif kind == "vae":
        if key in MAP["vae"]:
            return MAP["vae"][key], shape
        coder = parts[0]
        if parts[1] == "mid_block":
            if parts[2] == "resnets":
                rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                return f"{coder}.mid.block_{int(parts[3]) + 1}.{rest}", shape
            layer = ".".join(parts[4:-1])
            conv = len(shape) == 2  # 1x1 convolutions in the original
            return f"{coder}.mid.attn_1.{_VAE_ATTN_BACK[layer]}.{parts[-1]}", (
                *shape,
                1,
                1,
            ) if conv else shape
        block = int(parts[2])
        if coder == "decoder":
            block = len(config["up_block_types"]) - 1 - block
        side = "down" if coder == "encoder" else "up"
        if parts[3] == "resnets":
            rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.{side}.{block}.block.{parts[4]}.{rest}", shape
        sampler = "downsample" if coder == "encoder" else "upsample"
        return f"{coder}.{side}.{block}.{sampler}.conv.{parts[-1]}", shape
    elif kind == "clip":
        return key if key.startswith("text_model.") else f"text_model.{key}", shape
    else:
        full = (
            key if key.startswith("text_model.") or key == "text_projection.weight" else f"text_model.{key}"
        )
        layers = MAP["openclip"]["layers"]
        if full in layers:
            return layers[full], tuple(reversed(shape)) if full == "text_projection.weight" else shape
        back = full
        for new, old in reversed(list(MAP["openclip"]["transformer"].items())):
            back = back.replace(new, old)
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".attn.{proj}." in back:  # q, k and v are one fused tensor in OpenCLIP
                return f"transformer.{back.replace(f'.attn.{proj}.', '.attn.in_proj_')}", (
                    3 * shape[0],
                    *shape[1:],
                )
        return f"transformer.{back}", shape
    raise ContractError(f"no original key for {kind} tensor {key!r}")


def single_file_key_map(
    configs: Mapping[str, Mapping], names: Iterable[str], family: str | None = None
) -> dict[str, OriginalTensor]:
    """The original-layout tensors a single file of these pipeline-seed tensors holds, in file order.

    Args:
        configs: component name -> config.json dict, for every component in `names`.
        names: pipeline-seed names (`unet/...`, `vae/...`, `text_encoder/...`, `text_encoder_2/...`).
        family: "sd1", "sd2" or "sdxl"; by default `family_from_configs(configs)`.

    Returns:
        original key -> OriginalTensor (shape, the names it is assembled from and how).

    Raises:
        OutputError: a name of no component of the family, a component without config or not given whole.
    """
    family = family or family_from_configs(configs)
    by_component: dict[str, set[str]] = {}
    for name in names:
        component, _, key = name.partition("/")
        if component not in _LAYOUTS[family]:
            raise OutputError(f"{name}: no {family} single-file layout for component {component!r}")
        by_component.setdefault(component, set()).add(key)
    result: dict[str, OriginalTensor] = {}
    for component, (kind, prefix) in _LAYOUTS[family].items():
        keys = by_component.get(component)
        if not keys:
            continue
        if component not in configs:
            raise OutputError(f"no {component} config given for writing its tensors")
        config = configs[component]
        expected = expected_shapes(component, config)
        if keys != set(expected):
            absent = sorted(set(expected) - keys) or sorted(keys - set(expected))
            raise OutputError(f"{component}: tensors do not match its config (first difference: {absent[0]})")
        originals: dict[str, tuple[int, ...]] = {}
        for key, shape in expected.items():
            original, original_shape = _original_key(kind, key, shape, config, set(expected))
            originals[prefix + original] = original_shape
        result.update(_verified(component, kind, prefix, originals, expected, config))
        if kind == "clip":  # a buffer the original CLIP module stores and diffusers does not
            n = config["max_position_embeddings"]
            ids = torch.arange(n, dtype=torch.int64)[None]
            result[f"{prefix}text_model.embeddings.position_ids"] = OriginalTensor((1, n), constant=ids)
    return result


def _verified(
    component: str,
    kind: str,
    prefix: str,
    originals: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    config: Mapping,
) -> dict[str, OriginalTensor]:
    """The candidate originals converted forward by diffusers: they must give back exactly `expected` (names
    and shapes), and the views taken of each original must add up to its size."""
    converted = _convert(kind, prefix, originals, config)
    sources: dict[str, list[tuple[str, Ops]]] = {k: [] for k in originals}
    for key, shape in expected.items():
        ref = converted.get(key)
        if ref is None or tuple(ref.shape) != shape:
            got = None if ref is None else list(ref.shape)
            raise ContractError(
                f"{component}/{key}: inverse key map disagrees with diffusers' conversion ({got})"
            )
        sources[ref.key].append((f"{component}/{key}", ref.ops))
    out: dict[str, OriginalTensor] = {}
    for key, shape in originals.items():
        covered = sum(_apply(torch.empty(shape, device="meta"), ops).numel() for _, ops in sources[key])
        if covered != torch.Size(shape).numel():
            raise ContractError(
                f"{key}: {covered} of {torch.Size(shape).numel()} elements come from diffusers"
            )
        out[key] = OriginalTensor(shape, tuple(sources[key]))
    return out


def write_single_file(
    out_file: str | os.PathLike[str],
    names: Sequence[str],
    read: Callable[[str], torch.Tensor],
    configs: Mapping[str, Mapping],
    dtype: torch.dtype | None = None,
    family: str | None = None,
) -> Path:
    """Write pipeline-seed tensors as one original-layout `.safetensors` (what `from_single_file`, A1111 and
    ComfyUI load), streaming: each name is read once and one original tensor is held at a time.

    The file is written through `ShardedSafetensorsWriter` (one shard, `max_shard_bytes` unbounded) in a
    temporary folder beside `out_file`, then renamed over it.

    Args:
        out_file: the file to write (replaced if it exists).
        names: the pipeline-seed names to write: whole components (`unet/...`, `vae/...`, ...).
        read: returns the tensor of a name.
        configs: component name -> config.json dict for every component written.
        dtype: the dtype every tensor is written in; by default that of `read(names[0])` (read once more for
            that). The position_ids buffers are int64 whatever the dtype.
        family: "sd1", "sd2" or "sdxl"; by default `family_from_configs(configs)`.

    Returns:
        `out_file` as a Path.

    Raises:
        OutputError: names that do not form whole components of the family, a tensor of the wrong shape, or
            the file cannot be written.
    """
    from hf_m2n2.writer import PlannedTensor, ShardedSafetensorsWriter

    out_file = Path(out_file)
    layout = single_file_key_map(configs, names, family)
    if not layout:
        raise OutputError(f"{out_file}: no tensors to write")
    if dtype is None:
        dtype = read(names[0]).dtype

    def dtype_of(original: OriginalTensor) -> torch.dtype:
        return original.constant.dtype if original.constant is not None else dtype

    planned = [PlannedTensor(key, original.shape, dtype_of(original)) for key, original in layout.items()]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_file.name}.", dir=out_file.parent))
    try:
        writer = ShardedSafetensorsWriter(tmp, planned, max_shard_bytes=1 << 62, stem="model")
        try:
            for key, original in layout.items():
                writer.write(key, _assemble(key, original, read, dtype_of(original)))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        os.replace(tmp / "model.safetensors", out_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_file


def _assemble(
    key: str, original: OriginalTensor, read: Callable[[str], torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """One original tensor: a constant, a tensor as read, or several read tensors copied into their views."""
    if original.constant is not None:
        return original.constant
    if len(original.sources) == 1 and not original.sources[0][1]:
        name = original.sources[0][0]
        tensor = read(name)
        if tuple(tensor.shape) != original.shape:
            raise OutputError(f"{name}: shape {list(tensor.shape)}, expected {list(original.shape)}")
        return tensor.to(dtype)
    out = torch.empty(original.shape, dtype=dtype)
    for name, ops in original.sources:
        view, tensor = _apply(out, ops), read(name)
        if view.shape != tensor.shape:
            raise OutputError(f"{name}: shape {list(tensor.shape)}, expected {list(view.shape)} (for {key})")
        view.copy_(tensor)
    return out
