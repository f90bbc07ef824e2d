"""LivePipeline: one resident diffusers pipeline whose weights are overwritten in place for every candidate.

The pipeline-kind counterpart of `hf_m2n2.live.LiveModel`, and a `LiveTarget` like it: tensors are named as the
seeds name them, `COMPONENT/KEY` (`unet/conv_in.weight`), so `materialize()` and the genome kinds write a
candidate into it exactly as into an LLM. Weight-bearing components are built empty from the reference seed's
configs (accelerate's `init_empty_weights`: no random init) and filled from its lazy checkpoint (a folder, or a
single file whose components the config folder completes); tokenizers, scheduler and model_index.json come from
the seed's diffusers folder through `DiffusionPipeline.from_pretrained`, which receives the filled components.

Offload, for pipelines bigger than the device:
- `device_map="model_cpu_offload"` / `"sequential_cpu_offload"`: diffusers' own hooks, moving components (or
  submodules) to `device` when they run (sequential needs an accelerator; model offload also runs on a CPU);
- `device_map="auto"` or `max_memory`: an accelerate device map per component (the UNet first) within one shared
  budget, the rest on CPU or disk (`offload_folder/COMPONENT/`); this works on CPU-only machines too;
- `device_map={COMPONENT: device or accelerate device map}`: given per component.
Writes reach offloaded weights (accelerate's CPU state dict or its `.dat` memmaps), so the next generation
uses them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hf_m2n2.checkpoint import Checkpoint
from hf_m2n2.errors import CheckpointError
from hf_m2n2.live import write_in_place
from hf_m2n2.pipeline_seeds import PipelineSeed, component_weight_files, listed_components

DIFFUSERS_OFFLOAD = ("model_cpu_offload", "sequential_cpu_offload")
_FIRST = ("unet", "transformer")  # the denoiser runs every step: it gets the device budget first


class LivePipeline:
    """A diffusers pipeline resident in memory (or dispatched), whose weights are replaced tensor by tensor.

    Args:
        seed: the reference pipeline seed (`hf_m2n2.pipeline_seeds.PipelineSeed`): its configs build the
            pipeline and its weights fill it first.
        dtype: dtype of the weight-bearing components.
        device: where the pipeline runs (the execution device under offload).
        device_map: None (all on `device`), `model_cpu_offload`, `sequential_cpu_offload`, `auto`, or a dict
            component -> device or accelerate device map.
        max_memory: accelerate's budget shared by all components, e.g. `{"cpu": "300KB"}` forces disk offload.
        offload_folder: where disk-offloaded weights go (required when something lands on `disk`).
        trust_remote_code: let diffusers run a custom pipeline's code.

    Raises:
        CheckpointError: a component of an unsupported library, weights missing for a parameter, an offload
            that needs an accelerator on a CPU, or a budget that puts everything on disk.

    Example:
        >>> live = LivePipeline(open_seeds(["pipes/sd1-a"])[0])  # doctest: +SKIP
        >>> live.write("unet/conv_in.bias", torch.zeros(16))  # doctest: +SKIP
        >>> image = live.model("a cat", num_inference_steps=2).images[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        seed: PipelineSeed,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        device_map: str | Mapping[str, Any] | None = None,
        max_memory: Mapping[str, Any] | None = None,
        offload_folder: str | os.PathLike[str] | None = None,
        trust_remote_code: bool = False,
    ):
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device)
        self.device_maps: dict[str, dict[str, Any]] = {}
        self.offloaded = False
        if device_map == "sequential_cpu_offload" and self.device.type == "cpu":
            raise CheckpointError(f"device_map {device_map!r} needs an accelerator device, not {self.device}")
        components = weight_components(seed)
        empty = {
            name: _empty_component(_config_folder(seed, name), library, class_name, dtype, trust_remote_code)
            for name, (library, class_name) in components.items()
        }
        maps = self._device_maps(empty, device_map, max_memory)
        self._keys: dict[str, tuple[str, str]] = {}  # COMPONENT/KEY -> (component, key in its module)
        for name, module in empty.items():  # one component at a time: filled, then placed or offloaded
            if next(module.parameters(), None) is None:  # nothing to fill (JSDXL's null encoder): built as is
                module.to(self.device)
                continue
            component_map = maps.get(name)
            folder = None
            if component_map is not None and "disk" in component_map.values():
                if offload_folder is None:
                    raise CheckpointError(f"the device map offloads {name} to disk: give offload_folder")
                folder = Path(offload_folder) / name  # one folder per component: their keys collide
            keys = _fill(seed, name, components[name][0], module, dtype, component_map, folder)
            self._keys.update({f"{name}/{k}": (name, m) for k, m in keys.items()})
            if component_map is not None:
                self._dispatch(name, module, component_map, folder)
            elif device_map is None:
                module.to(self.device)
        self.components = empty
        self.model = _assemble(seed, empty, dtype, trust_remote_code)
        if device_map in DIFFUSERS_OFFLOAD:
            getattr(self.model, f"enable_{device_map}")(device=self.device)
            self.offloaded = True
        self._targets = {
            name: dict(module.state_dict(keep_vars=True)) for name, module in self.components.items()
        }

    def _device_maps(
        self, empty: dict[str, torch.nn.Module], device_map: Any, max_memory: Mapping[str, Any] | None
    ) -> dict[str, dict[str, Any]]:
        """The accelerate device map of each dispatched component (none: resident on `device`, or diffusers'
        offload), decided on the empty components before any weight is read."""
        if (device_map is None and max_memory is None) or device_map in DIFFUSERS_OFFLOAD:
            return {}
        if isinstance(device_map, Mapping):
            unknown = sorted(set(device_map) - set(empty))
            if unknown:
                raise CheckpointError(
                    f"device_map names {unknown[0]!r}, not a component ({', '.join(empty)})"
                )
            maps = {name: (dict(m) if isinstance(m, Mapping) else {"": m}) for name, m in device_map.items()}
            return {name: maps.get(name, {"": self.device}) for name in empty}
        if device_map in (None, "auto"):
            return _shared_budget_maps(empty, dict(max_memory or {}), self.dtype)
        raise CheckpointError(
            f"device_map {device_map!r}: use auto, {', '.join(DIFFUSERS_OFFLOAD)} or a dict"
        )

    def _dispatch(
        self, name: str, module: torch.nn.Module, device_map: dict[str, Any], folder: Path | None
    ) -> None:
        """Place a filled component by its device map; its disk part is already in `folder` (`_fill`)."""
        from accelerate import dispatch_model

        devices = set(device_map.values())
        if device_map == {"": "disk"}:  # accelerate hooks submodules, not the root: name its children
            device_map = {child: "disk" for child, _ in module.named_children()}
        self.device_maps[name] = device_map
        if len(devices) == 1 and "disk" not in devices:
            module.to(next(iter(devices)))
            return
        main = self.device if self.device.type != "cpu" else None
        try:
            dispatch_model(
                module,
                device_map=device_map,
                main_device=main,
                offload_dir=None if folder is None else str(folder),
            )
        except ValueError as exc:  # a map that leaves parameters out, an unknown device
            raise CheckpointError(f"device_map of {name}: {exc}") from None
        self.offloaded = True

    @property
    def names(self) -> list[str]:
        """Every tensor a candidate can write, `COMPONENT/KEY` as the seeds name them."""
        return list(self._keys)

    def tensor(self, name: str) -> torch.Tensor | None:
        """The live parameter or buffer called `name` (on `meta` when offloaded), None if the pipeline has none."""
        where = self._keys.get(name)
        return None if where is None else self._targets[where[0]].get(where[1])

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Overwrite one weight (or its rows from `row_start`) in place: resident, CPU- or disk-offloaded.

        Raises:
            CheckpointError: the pipeline has no such tensor, or rows of an offloaded one.
        """
        where = self._keys.get(name)
        if where is None:
            raise CheckpointError(f"live pipeline has no tensor {name!r}")
        component, key = where
        write_in_place(
            self.components[component], key, self._targets[component][key], tensor, row_start, name
        )


def weight_components(seed: PipelineSeed) -> dict[str, tuple[str, str]]:
    """(library, class) of every weight-bearing component of the seed's pipeline: those listed in its
    model_index.json with a config.json in its folder (tokenizers and schedulers have none)."""
    folder = Path(seed.folder or seed.model.path)
    listed = listed_components(seed.config)
    return {
        n: lc for n, lc in listed.items() if n in seed.components or (folder / n / "config.json").is_file()
    }


def _source(seed: PipelineSeed, name: str, library: str) -> Any:
    """The lazy tensors of one component: the seed's own, else (a single file without it) the config folder's."""
    parts = getattr(seed.checkpoint, "parts", {})
    if name in parts:
        return parts[name]
    component = seed.components.get(name)
    if component is not None and component.files:  # a single file's seed: the config folder's weights
        return Checkpoint(component.path, files=component.files)
    folder = Path(seed.folder or seed.model.path) / name
    files = component_weight_files(folder, name, library, seed.variant)
    if not files:
        raise CheckpointError(f"{seed.name}: no weights for component {name} (in the seed or in {folder})")
    return Checkpoint(folder, files=files)


def _component_class(folder: Path, library: str, class_name: str, trust_remote_code: bool = False) -> type:
    """The class model_index.json names: from diffusers or transformers, from a diffusers pipeline module
    (SD 1.x's `["stable_diffusion", "StableDiffusionSafetyChecker"]`), or from the component folder's own code
    (`["modeling_x", "X"]` with `modeling_x.py` in it, run only with `trust_remote_code`), as diffusers' own loader
    finds it."""
    import importlib

    if (folder / f"{library}.py").is_file():
        from diffusers.utils import get_class_from_dynamic_module

        try:
            return get_class_from_dynamic_module(
                str(folder),
                module_file=f"{library}.py",
                class_name=class_name,
                trust_remote_code=trust_remote_code,
            )
        except ValueError as exc:  # diffusers refuses to run it without trust_remote_code
            raise CheckpointError(f"{folder}: component class {library}.{class_name}: {exc}") from None

    modules = {"diffusers": "diffusers", "transformers": "transformers"}
    name = modules.get(library, f"diffusers.pipelines.{library}")
    try:
        cls = getattr(importlib.import_module(name), class_name, None)
    except ImportError:
        cls = None
    if cls is None:
        raise CheckpointError(
            f"{folder}: component class {library}.{class_name} not found (diffusers, transformers)"
        )
    return cls


def _empty_component(
    folder: Path, library: str, class_name: str, dtype: torch.dtype, trust_remote_code: bool = False
) -> torch.nn.Module:
    """A component built from its config.json on the meta device (buffers made at init stay real)."""
    from accelerate import init_empty_weights
    from transformers import PreTrainedModel

    cls = _component_class(folder, library, class_name, trust_remote_code)
    with init_empty_weights():
        if issubclass(cls, PreTrainedModel):
            module = cls._from_config(cls.config_class.from_pretrained(str(folder)), dtype=dtype)
        elif hasattr(cls, "load_config"):
            module = cls.from_config(cls.load_config(str(folder)))
        else:
            raise CheckpointError(f"{folder}: {class_name} is neither a diffusers nor a transformers model")
    return module.eval()


def _config_folder(seed: PipelineSeed, name: str) -> Path:
    component = seed.components.get(name)
    return Path(component.path) if component is not None else Path(seed.folder or seed.model.path) / name


def _fill(
    seed: PipelineSeed,
    name: str,
    library: str,
    module: torch.nn.Module,
    dtype: torch.dtype,
    device_map: Mapping[str, Any] | None,
    folder: Path | None,
) -> dict[str, str]:
    """Fill an empty component from the seed, tensor by tensor: parameters its device map puts on disk go
    straight to accelerate's memmaps in `folder` (never all in memory), the rest into the module. Returns
    checkpoint key -> module key.

    Raises:
        CheckpointError: a parameter has no weights in the seed.
    """
    from accelerate.utils import offload_weight, save_offload_index

    source = _source(seed, name, library)
    parameters = dict(module.named_parameters())
    keys = _key_map(source.names, module.state_dict(), getattr(module, "base_model_prefix", ""))
    state, index, filled = {}, {}, set()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        # accelerate reuses a folder's index.json: an earlier run's entries must not survive
        (folder / "index.json").unlink(missing_ok=True)
    try:
        for key, module_key in keys.items():
            tensor = source.get(key)
            tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
            if (
                folder is not None
                and module_key in parameters
                and _device_of(module_key, device_map) == "disk"
            ):
                offload_weight(tensor, module_key, str(folder), index=index)
            else:
                state[module_key] = tensor
            filled.add(module_key)
    finally:
        if source is not getattr(seed.checkpoint, "parts", {}).get(name):
            source.close()
    if index:
        save_offload_index(index, str(folder))
    module.load_state_dict(state, strict=False, assign=True)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    empty = [n for n, p in module.named_parameters() if p.device.type == "meta" and n not in filled]
    if empty:
        raise CheckpointError(
            f"{seed.name}: no weights for {len(empty)} parameters of {name} (first: {empty[0]})"
        )
    return keys


def _device_of(key: str, device_map: Mapping[str, Any] | None) -> Any:
    """The device an accelerate device map gives a tensor: that of its longest listed module prefix."""
    if device_map is None:
        return None
    best = None
    for prefix, device in device_map.items():
        if (prefix == "" or key == prefix or key.startswith(prefix + ".")) and (
            best is None or len(prefix) > best[0]
        ):
            best = (len(prefix), device)
    return None if best is None else best[1]


def _key_map(names: list[str], wanted: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """Checkpoint key -> module key: the same, or with the model's base prefix added or removed (transformers 4
    saved `CLIPTextModel` as `text_model.*`, transformers 5 builds it without). Keys matching nothing (an old
    `position_ids` buffer) are left out, as `from_pretrained` leaves them."""
    out = {}
    for key in names:
        head, _, rest = key.partition(".")
        for candidate in (key, rest if head and rest else None, f"{prefix}.{key}" if prefix else None):
            if candidate is not None and candidate in wanted:
                out[key] = candidate
                break
    return out


def _assemble(
    seed: PipelineSeed, modules: dict[str, torch.nn.Module], dtype: torch.dtype, trust_remote_code: bool
) -> Any:
    """The pipeline from the seed's folder (tokenizers, scheduler, model_index.json), given the filled modules."""
    from diffusers import DiffusionPipeline

    from hf_m2n2.quiet import quiet_loading

    folder = Path(seed.folder or seed.model.path)
    with quiet_loading():
        return DiffusionPipeline.from_pretrained(
            str(folder), dtype=dtype, trust_remote_code=trust_remote_code, **modules
        )


def _shared_budget_maps(
    components: Mapping[str, torch.nn.Module], max_memory: dict[str, Any], dtype: torch.dtype
) -> dict[str, dict[str, Any]]:
    """One accelerate device map per component, the denoiser first, all within one `max_memory` budget: what a
    component puts on a device is taken off the budget the next ones get."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, convert_file_size_to_int, get_max_memory

    budget = get_max_memory(max_memory or None)
    budget = {k: convert_file_size_to_int(v) if isinstance(v, str) else int(v) for k, v in budget.items()}
    order = sorted(components, key=lambda n: (n not in _FIRST, list(components).index(n)))
    maps = {}
    for name in order:
        module = components[name]
        no_split = list(getattr(module, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(
            module, max_memory=dict(budget), dtype=dtype, no_split_module_classes=no_split
        )
        sizes = compute_module_sizes(module, dtype=dtype)
        for submodule, device in device_map.items():
            if device in budget:
                budget[device] = max(0, budget[device] - sizes[submodule])
        maps[name] = dict(device_map)
    if all(set(m.values()) == {"disk"} for m in maps.values()):
        raise CheckpointError("max_memory is too small: every component would be offloaded to disk")
    return maps
