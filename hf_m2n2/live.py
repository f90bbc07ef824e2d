"""LiveModel: one resident model whose parameters are overwritten in place for every candidate.

Built without random init (accelerate's `init_empty_weights`, then filled from a seed), optionally dispatched
with an accelerate device map and CPU/disk offload so a model larger than the device can still be evaluated.
It is a materialize sink: `write(name, tensor)` copies a tensor into the parameter (or into its offloaded copy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_m2n2.checkpoint import Checkpoint
from hf_m2n2.errors import CheckpointError


class LiveModel:
    """A causal LM resident in memory (or dispatched), whose weights are replaced tensor by tensor.

    Args:
        model_dir: a seed's directory: its config builds the model and its weights fill it first.
        dtype: parameter dtype of the live model.
        device: where the model lives when `device_map` is None.
        device_map: an accelerate device map (`auto`, or a dict module -> device/`cpu`/`disk`).
        max_memory: accelerate's per-device budget, e.g. `{"cpu": "200MB"}` forces disk offload.
        offload_folder: where disk-offloaded weights go (required when something lands on `disk`).

    Example:
        >>> live = LiveModel("out/seeds/tiny-math")
        >>> live.write("model.norm.weight", torch.ones(64))
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        device_map: str | Mapping[str, Any] | None = None,
        max_memory: Mapping[str, Any] | None = None,
        offload_folder: str | os.PathLike[str] | None = None,
        trust_remote_code: bool = False,
    ):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(str(self.model_dir), trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.eval()
        self.dtype = dtype
        self.offloaded = False
        self.device_map: dict[str, Any] | None = None
        if device_map is None and max_memory is None:
            self.model = _filled(model, Checkpoint(self.model_dir), dtype).to(device)
        else:
            self.model = self._dispatch(model, device_map or "auto", max_memory, offload_folder)
        self.device = torch.device(device) if self.device_map is None else _execution_device(self.model)
        self._targets = self.model.state_dict(keep_vars=True)

    def _dispatch(self, model, device_map, max_memory, offload_folder):
        from accelerate import infer_auto_device_map, load_checkpoint_and_dispatch

        if device_map == "auto" or max_memory is not None:
            no_split = getattr(model, "_no_split_modules", None) or []
            device_map = infer_auto_device_map(
                model,
                max_memory=dict(max_memory or {}),
                dtype=self.dtype,
                no_split_module_classes=list(no_split),
            )
        if set(dict(device_map).values()) == {"disk"}:
            raise CheckpointError("evaluate.max_memory is too small: every module would be offloaded to disk")
        if any(v == "disk" for v in dict(device_map).values()) and offload_folder is None:
            raise CheckpointError("the device map offloads to disk: give evaluate.offload_folder")
        self.device_map = dict(device_map)
        self.offloaded = (
            any(v in ("disk", "cpu") for v in self.device_map.values())
            and len(set(self.device_map.values())) > 1
        )
        return load_checkpoint_and_dispatch(
            model,
            str(self.model_dir),
            device_map=self.device_map,
            offload_folder=None if offload_folder is None else str(offload_folder),
            dtype=self.dtype,
        )

    @property
    def names(self) -> list[str]:
        return list(self._targets)

    def tensor(self, name: str) -> torch.Tensor | None:
        """The live parameter or buffer called `name` (on `meta` when offloaded), None if the model has none."""
        return self._targets.get(name)

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Overwrite one weight (or its rows from `row_start`) in place: resident, CPU- or disk-offloaded."""
        target = self._targets.get(name)
        if target is None:
            raise CheckpointError(f"live model has no tensor {name!r}")
        write_in_place(self.model, name, target, tensor, row_start)


def write_in_place(
    model: Any,
    key: str,
    target: torch.Tensor,
    tensor: torch.Tensor,
    row_start: int = 0,
    label: str | None = None,
) -> None:
    """Copy `tensor` into `model`'s parameter `key` (`target`; or rows of it from `row_start`), or, when the
    parameter is offloaded (on `meta`), into the copy accelerate's hooks load at forward time.

    Raises:
        CheckpointError: rows of an offloaded parameter (naming it `label`, default `key`).
    """
    with torch.no_grad():
        if target.device.type != "meta":
            whole = tensor.shape == target.shape
            (target if whole else target[row_start : row_start + tensor.shape[0]]).copy_(tensor)
        elif row_start:
            raise CheckpointError(f"{label or key!r} is offloaded: write it whole")
        else:
            _write_offloaded(model, key, tensor)


def _filled(model, ckpt: Checkpoint, dtype: torch.dtype):
    """Replace the empty (meta) parameters by the checkpoint's tensors; buffers built at init stay as they are."""
    try:
        return fill_model(model, {name: (ckpt, name) for name in ckpt.names}, dtype, str(ckpt.path))
    finally:
        ckpt.close()


def fill_model(model: Any, sources: Mapping[str, tuple[Any, str]], dtype: torch.dtype, where: str) -> Any:
    """Replace a model built on `meta` by tensors read lazily: `sources` maps each of its state-dict names to
    (a checkpoint, the tensor's name there); only the names the model has are read. Tied weights are tied again.

    Raises:
        CheckpointError: a parameter got no tensor (naming `where`).
    """
    wanted = model.state_dict()
    state = {name: ckpt.get(source).to(dtype) for name, (ckpt, source) in sources.items() if name in wanted}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise CheckpointError(f"{where}: no weights for {len(empty)} parameters (first: {empty[0]})")
    return model


def _execution_device(model) -> torch.device:
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    return next(model.parameters()).device


def _write_offloaded(model, name: str, tensor: torch.Tensor) -> None:
    """Write into the copy accelerate's hooks load at forward time: a CPU state dict or a `.dat` memmap."""
    module_name, _, attr = name.rpartition(".")
    hook = getattr(model.get_submodule(module_name), "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is None:
        raise CheckpointError(f"tensor {name!r} is on the meta device without an offload hook")
    key = getattr(weights_map, "prefix", "") + attr
    dataset = getattr(weights_map, "dataset", weights_map)
    # a CPU state dict: accelerate's loader's, or the plain dict diffusers' sequential CPU offload hooks read
    state = dataset if isinstance(dataset, dict) else getattr(dataset, "state_dict", {})
    if key in state:
        state[key].copy_(tensor)
        return
    info = dataset.index[key]
    stored = tensor.to(getattr(torch, info["dtype"]) if info["dtype"] != "bfloat16" else torch.bfloat16).cpu()
    if info["dtype"] == "bfloat16":  # accelerate stores bf16 as int16 bit patterns
        array = stored.view(torch.int16).numpy()
    else:
        array = stored.numpy()
    mm = np.memmap(
        os.path.join(dataset.save_folder, f"{key}.dat"),
        dtype=array.dtype,
        mode="r+",
        shape=tuple(info["shape"]) or (1,),
    )
    mm[...] = array.reshape(mm.shape)
    # no flush: readers map the same page cache; msync per tensor cost most of an offloaded write
    del mm
