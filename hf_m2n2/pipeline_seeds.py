"""Pipeline seeds: a diffusers text-to-image pipeline opened as one lazy checkpoint (the `pipeline` model kind's
seeds, `hf_m2n2.models.pipeline`).

A seed is a diffusers folder (`model_index.json` at its root; components `unet/`, `text_encoder/`, `vae/`, ... as
diffusers lays them out), a single-file checkpoint in the original layout (A1111 / ComfyUI / Civitai), which takes
its components' configs from a diffusers folder of the same family, or a component-only folder: `unet/` alone
(config and weights, no model_index.json: a fine-tuned UNet published without the rest, as SDXL-DPO is), whose
other components come from another seed (it can be merged or blended, never be the reference seed). Either way the seed's tensors are one lazy view
named `COMPONENT/KEY` (`unet/conv_in.weight`), KEY as the component's diffusers weights store it, so the plan,
the methods and `materialize` treat a UNet as they treat an LLM; the UNet's blocks are the layers
(`hf_m2n2.pipeline_families`).

Weights of one variant only: `variant: fp16` reads `*.fp16.safetensors` (or its sharded index) and nothing else; no
variant reads the plain files. A variant a component lacks is an error naming the files found, never a fallback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hf_m2n2.checkpoint import Checkpoint, TensorInfo
from hf_m2n2.errors import CheckpointError, SpecError
from hf_m2n2.hub import component_only_index
from hf_m2n2.models.base import Seed
from hf_m2n2.pipeline_families import PipelineFamily, block_architecture, pipeline_family

PIPELINE_INDEX = "model_index.json"
# the weight file stems of the two libraries a pipeline's components come from
WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
_BIN_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "pytorch_model"}


@dataclass
class Component:
    """One weight-bearing component of a pipeline seed.

    Attributes:
        name: its folder name in the pipeline (`unet`, `text_encoder`, ...).
        library: `diffusers` or `transformers` (from model_index.json).
        class_name: its class (`UNet2DConditionModel`, `CLIPTextModel`, ...).
        config: its config.json.
        path: its folder (for a single-file seed: the config folder's).
        files: the weight files read (one variant's); empty when the weights are a single-file seed's.
        index: the sharded index `files` were listed by, if any.
    """

    name: str
    library: str
    class_name: str
    config: dict[str, Any]
    path: Path
    files: list[Path] = field(default_factory=list)
    index: Path | None = None

    @property
    def stem(self) -> str:
        return WEIGHT_STEMS.get(self.library, "model")


@dataclass
class PipelineSeed(Seed):
    """A pipeline seed: `config` is its model_index.json; `checkpoint` names tensors `COMPONENT/KEY`.

    Attributes:
        family: its family (SD 1.x, SD 2.x, SDXL).
        components: its weight-bearing components, by name.
        folder: the diffusers folder its non-weight components (tokenizers, scheduler) and model_index.json come
            from: the seed itself, or for a single-file seed the folder its configs came from; None for a
            component-only seed (`config` then stands for its model_index.json, listing its one component).
        variant: the weight variant read.
        single_file: the original-layout file, for a single-file seed.
    """

    family: PipelineFamily | None = None
    components: dict[str, Component] = field(default_factory=dict)
    folder: Path | None = None
    variant: str | None = None
    single_file: Path | None = None

    @property
    def component_only(self) -> bool:
        """A seed of one component without the rest of a pipeline (`unet/` alone), which another seed completes."""
        return self.folder is None


class PipelineCheckpoint:
    """The lazy tensors of a pipeline's components as one checkpoint, named `COMPONENT/KEY`.

    Args:
        path: the seed (for messages).
        parts: component name -> a checkpoint of that component's tensors (named KEY).
    """

    def __init__(self, path: Path, parts: Mapping[str, Any]):
        self.path = Path(path)
        self.parts = dict(parts)

    @property
    def names(self) -> list[str]:
        return [f"{c}/{n}" for c, part in self.parts.items() for n in part.names]

    def _split(self, name: str) -> tuple[Any, str]:
        component, _, key = name.partition("/")
        part = self.parts.get(component)
        if part is None or key not in part:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found")
        return part, key

    def __contains__(self, name: str) -> bool:
        component, _, key = name.partition("/")
        return component in self.parts and key in self.parts[component]

    def info(self, name: str) -> TensorInfo:
        part, key = self._split(name)
        return part.info(key)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        part, key = self._split(name)
        return part.get(key, rows)

    def only(self, components: Sequence[str]) -> PipelineCheckpoint:
        """The same lazy view restricted to `components` (sharing the open files)."""
        return PipelineCheckpoint(self.path, {c: p for c, p in self.parts.items() if c in components})

    def close(self) -> None:
        for part in self.parts.values():
            part.close()


class _ComponentOfFile:
    """One component's tensors of a single-file checkpoint (whose names carry the `COMPONENT/` prefix)."""

    def __init__(self, single: Any, component: str):
        self.single = single
        self.prefix = f"{component}/"
        self.names = [n.removeprefix(self.prefix) for n in single.names if n.startswith(self.prefix)]
        self._names = set(self.names)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def info(self, key: str) -> TensorInfo:
        return self.single.info(self.prefix + key)

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.single.get(self.prefix + key, rows)

    def close(self) -> None:
        self.single.close()


def is_pipeline(path: Path) -> bool:
    """A diffusers folder, a single `.safetensors` file (the original single-file layout) or a component-only
    folder (`unet/` alone)."""
    path = Path(path)
    return (
        (path / PIPELINE_INDEX).is_file()
        or (path.is_file() and path.suffix == ".safetensors")
        or (path.is_dir() and component_only_index(path) is not None)
    )


def read_model_index(folder: Path) -> dict[str, Any]:
    file = folder / PIPELINE_INDEX
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def listed_components(model_index: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Component name -> (library, class) for every component model_index.json lists (null entries left out)."""
    out = {}
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        if isinstance(value[0], str) and isinstance(value[1], str):
            out[name] = (value[0], value[1])
    return out


def custom_pipeline(model_index: Mapping[str, Any]) -> tuple[str, str] | None:
    """(module, class) of a pipeline class of the repo's own code (`_class_name: [MODULE, CLASS]`, as JSDXL's
    model_index.json has it), None for a diffusers class."""
    value = model_index.get("_class_name")
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None


def pipeline_class_name(model_index: Mapping[str, Any]) -> str | None:
    """The pipeline's class name (`StableDiffusionXLPipeline`, or a custom pipeline's class)."""
    custom = custom_pipeline(model_index)
    value = model_index.get("_class_name")
    return custom[1] if custom else value if isinstance(value, str) else None


def component_weights(
    folder: Path, component: str, library: str, variant: str | None
) -> tuple[list[Path], Path | None]:
    """The weight files of one component, of `variant` only, and the sharded index that lists them (if any):
    diffusers' and transformers' naming, `STEM[.VARIANT].safetensors` or shards listed by
    `STEM.safetensors.index[.VARIANT].json`; `.bin` (single or sharded) only when there are no safetensors of that
    variant. Empty when the folder holds no weights at all.

    Raises:
        CheckpointError: the variant is not there (naming the files that are), or an index lists missing shards.
    """
    infix = f".{variant}" if variant else ""
    kinds = (
        ("safetensors", dict.fromkeys([WEIGHT_STEMS.get(library, "model"), *WEIGHT_STEMS.values()])),
        ("bin", dict.fromkeys([_BIN_STEMS.get(library, "pytorch_model"), *_BIN_STEMS.values()])),
    )
    for suffix, stems in kinds:
        for stem in stems:
            index = folder / f"{stem}.{suffix}.index{infix}.json"
            if index.is_file():
                return _shards(folder, index), index
            single = folder / f"{stem}{infix}.{suffix}"
            if single.is_file():
                return [single], None
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    if not found:
        return [], None
    if variant:
        raise CheckpointError(
            f"{folder}: variant {variant!r} not found for component {component} (found: {', '.join(found)})"
        )
    raise CheckpointError(
        f"{folder}: component {component} has only variant weights ({', '.join(found)}): give `variant:`"
    )


def component_weight_files(folder: Path, component: str, library: str, variant: str | None) -> list[Path]:
    """The weight files of one component, of `variant` only (see `component_weights`)."""
    return component_weights(folder, component, library, variant)[0]


def _shards(folder: Path, index: Path) -> list[Path]:
    try:
        shards = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: invalid index json ({exc})") from exc
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
    return shards


def _folder_components(
    folder: Path, model_index: Mapping[str, Any], variant: str | None
) -> dict[str, Component]:
    components = {}
    for name, (library, class_name) in listed_components(model_index).items():
        config_file = folder / name / "config.json"
        if not config_file.is_file():
            continue  # tokenizers, schedulers, feature extractors: copied, never merged
        files, index = component_weights(folder / name, name, library, variant)
        if not files:
            continue
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{config_file}: invalid JSON ({exc})") from exc
        components[name] = Component(name, library, class_name, config, folder / name, files, index)
    return components


def _family(seed_path: Path, unet: Component | None) -> PipelineFamily:
    if unet is None:
        raise CheckpointError(
            f"{seed_path}: a pipeline without unet/ (or without UNet weights): nothing to merge"
        )
    family = pipeline_family(unet.config)
    if family is None:
        raise CheckpointError(
            f"{seed_path}: unet/config.json is not of a known family (SD 1.x, SD 2.x, SDXL base)"
        )
    return family


def open_pipeline_folder(model: Any, variant: str | None = None) -> PipelineSeed:
    """A seed over a diffusers folder (or a component-only one): one lazy view over its components' weights of
    `variant`."""
    folder = Path(model.path)
    only = component_only_index(folder)
    model_index = read_model_index(folder) if only is None else only
    components = _folder_components(folder, model_index, variant)
    family = _family(folder, components.get("unet"))
    checkpoint = PipelineCheckpoint(folder, {})
    try:
        for name, component in components.items():
            checkpoint.parts[name] = Checkpoint(component.path, files=component.files)
    except BaseException:
        checkpoint.close()
        raise
    own = folder if only is None else None  # a component-only seed has no folder of other components
    return _seed(model, checkpoint, model_index, family, components, own, variant, None)


def open_single_file(model: Any, config_seed: PipelineSeed | None) -> PipelineSeed:
    """A seed over an original-layout single file, its components' configs taken from `config_seed`'s folder.

    Raises:
        CheckpointError: the keys match no known layout, no config folder, or a folder of another family.
    """
    from hf_m2n2.single_file import SingleFileCheckpoint

    file = Path(model.path)
    if config_seed is None:
        raise CheckpointError(
            f"{file}: a single-file seed takes its configs from a diffusers folder of its family: give "
            "single_file_config (a diffusers folder or repo), or list such a pipeline among the models"
        )
    configs = {name: c.config for name, c in config_seed.components.items()}
    single = SingleFileCheckpoint(file, configs)  # refuses a file of another family than the configs'
    if single.family != config_seed.family.name:
        single.close()
        raise CheckpointError(
            f"{file}: a {single.family} single file, but its config folder {config_seed.name} is "
            f"{config_seed.family.label}"
        )
    present = {n.split("/", 1)[0] for n in single.names}
    # the file's components are read from it (no files); those it lacks stay the config folder's, of its variant
    components = {
        name: replace(c, files=[], index=None) if name in present else c
        for name, c in config_seed.components.items()
    }
    checkpoint = PipelineCheckpoint(file, {name: _ComponentOfFile(single, name) for name in present})
    model_index = read_model_index(config_seed.folder)
    return _seed(
        model,
        checkpoint,
        model_index,
        config_seed.family,
        components,
        config_seed.folder,
        config_seed.variant,
        file,
    )


def _seed(model, checkpoint, model_index, family, components, folder, variant, single_file) -> PipelineSeed:
    unet = components.get("unet")
    try:
        if unet is None or "unet" not in checkpoint.parts:
            raise CheckpointError(f"{model.path}: no UNet weights: nothing to merge")
        arch = block_architecture(family, unet.config, checkpoint.names)
    except ValueError as exc:  # a tensor that is not a key of the UNet its config describes
        checkpoint.close()
        raise CheckpointError(f"{model.path}: {exc}") from None
    except BaseException:
        checkpoint.close()
        raise
    return PipelineSeed(
        model=model,
        checkpoint=checkpoint,
        config=model_index,
        arch=arch,
        num_layers=len(arch.blocks),
        kind="pipeline",
        family=family,
        components=components,
        folder=folder,
        variant=variant,
        single_file=single_file,
    )


def check_families(seeds: list[Any]) -> None:
    """Every seed is a pipeline of one family (checked before anything is read: their UNets share no layout).

    Raises:
        CheckpointError: naming each seed's kind or family.
    """
    kinds = {s.kind for s in seeds}
    if len(kinds) > 1:
        detail = ", ".join(f"{s.name}: {s.kind}" for s in seeds)
        raise CheckpointError(f"seeds of different kinds cannot be merged ({detail})")
    families = {s.family.name for s in seeds}
    if len(families) > 1:
        detail = ", ".join(f"{s.name}: {s.family.label}" for s in seeds)
        raise CheckpointError(
            f"seeds are pipelines of different families ({detail}); merge one family at a time"
        )


def check_reference(seed: Any, field: str, fix: str) -> None:
    """A seed whose other components a pipeline takes (a merge's reference, an evolution's fixed seed) must be a
    whole pipeline, not a component-only seed.

    Args:
        seed: the seed.
        field: the YAML path of the choice (`genome.fixed_from`, `base_model`).
        fix: what to do instead (ends the message).

    Raises:
        SpecError: naming the seed and what it holds.
    """
    if isinstance(seed, PipelineSeed) and seed.component_only:
        held = ", ".join(f"{c}/" for c in seed.components)
        raise SpecError(
            field,
            f"{seed.name} holds only {held} (no {PIPELINE_INDEX}): it cannot give the pipeline its other "
            f"components; {fix}",
        )
