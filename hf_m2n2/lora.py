"""LoRA references (`base+adapter`, mergekit's form): a base checkpoint with a PEFT LoRA adapter applied lazily.

Each tensor the adapter changes is computed when it is read, as peft's `merge_and_unload()` would leave it:
`W + scale * B @ A` (transposed for embeddings and Conv1D weights), with `scale = alpha / r` (or `alpha / sqrt(r)`
with `use_rslora`) and per-module `rank_pattern` / `alpha_pattern`; tensors the adapter saves whole
(`modules_to_save`, saved embedding layers, trained biases) replace the base's. Only the tensor being read (or
its block of rows) is in memory, never the merged model. The adapter's config is parsed by peft itself.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_m2n2.checkpoint import Checkpoint, TensorInfo, _open_file
from hf_m2n2.errors import CheckpointError, first_line
from hf_m2n2.hub import ResolvedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the base model
_LORA = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)")
_EMBEDDING = re.compile(r"(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)")
# Wrappers peft puts around a saved module; the tensor inside replaces the base's of the same name.
_WRAPPERS = re.compile(r"\.(modules_to_save\.default|modules_to_save|base_layer)(?=\.)")
# Config settings whose merge is not `W + scale * B @ A` (each a LoRA variant); refused with their name.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow routing",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
}


@dataclass(frozen=True)
class LoraUpdate:
    """How one base tensor changes: weight `+= scale * B @ A` (`transposed`: `(B @ A)^T`, for embeddings and
    Conv1D weights), or, for `bias`, `+= scale * b`."""

    a: str | None  # adapter key of A (None for a bias)
    b: str  # adapter key of B (or of the LoRA bias)
    scale: float
    transposed: bool = False


class LoraAdapter:
    """A PEFT LoRA adapter directory, checked against the base checkpoint it is applied to.

    Args:
        adapter: the resolved adapter (a directory with `adapter_config.json` and `adapter_model.safetensors`,
            or `adapter_model.bin`, read only with `torch.load(weights_only=True)`).
        base: the base checkpoint.

    Raises:
        CheckpointError: one line naming the adapter file: no config or weights, a config peft cannot parse, a LoRA
            variant or layer kind that is not supported, or a tensor that does not fit the base.
    """

    def __init__(self, adapter: ResolvedModel, base: Checkpoint):
        self.model = adapter
        self.path = Path(adapter.path)
        self.config = _load_config(adapter)
        self.tensors = _AdapterTensors.open(adapter)
        self.updates: dict[str, LoraUpdate] = {}
        self.replacements: dict[str, str] = {}  # base tensor name -> adapter key of its replacement
        try:
            self._plan(base)
        except BaseException:
            self.tensors.close()
            raise

    @property
    def changed(self) -> list[str]:
        """The base tensors this adapter changes (updated or replaced)."""
        return list(dict.fromkeys([*self.replacements, *self.updates]))

    def _plan(self, base: Checkpoint) -> None:
        modules: dict[str, dict[str, str]] = {}
        for key in self.tensors.names:
            name = key.removeprefix(_PREFIX)
            match = _LORA.fullmatch(name) or _EMBEDDING.fullmatch(name)
            if match:
                part = match["part"].removeprefix("lora_embedding_").removeprefix("lora_")
                param = match.groupdict().get("param") or "embedding"
                modules.setdefault(match["module"], {})[f"{part}.{param}"] = key
            elif ".lora_" in name:
                self._refuse(f"tensor {key!r} is not a plain LoRA weight (lora_A/lora_B/lora_embedding_A/B)")
            else:
                self.replacements[self._target(base, _WRAPPERS.sub("", name), key)] = key
        # peft merges (B @ A)^T into Conv1D weights, stored (in, out), whatever the config's fan_in_fan_out says
        # (it picks by layer class): a non-square weight shows its layout; square ones follow the others'.
        stored = {m: self._stored_transposed(base, m, k) for m, k in modules.items()}
        seen = {v for v in stored.values() if v is not None}
        conv1d = len(seen) == 1 and True in seen
        square = [m for m, v in stored.items() if v is None and "A.weight" in modules[m]]
        if not seen and square and self.config.fan_in_fan_out:
            self._refuse(
                "fan_in_fan_out with only square LoRA targets: cannot tell Conv1D from Linear weights"
            )
        for module, keys in modules.items():
            embedding = "A.embedding" in keys or "B.embedding" in keys
            a, b = (
                (keys.get("A.embedding"), keys.get("B.embedding"))
                if embedding
                else (keys.get("A.weight"), keys.get("B.weight"))
            )
            if a is None or b is None:
                self._refuse(f"module {module!r} has only one of its LoRA A/B matrices")
            scale = self._scale(module, self.tensors.shape(a)[0])
            weight = self._target(base, f"{module}.weight", b)
            transposed = embedding or (conv1d if stored[module] is None else stored[module])
            self.updates[weight] = self._check(base, weight, LoraUpdate(a, b, scale, transposed))
            if "B.bias" in keys:  # peft's lora_bias: the base bias moves by scale * lora_B.bias
                bias = self._target(base, f"{module}.bias", keys["B.bias"])
                self.updates[bias] = self._check(base, bias, LoraUpdate(None, keys["B.bias"], scale))
        for name, key in self.replacements.items():
            if tuple(self.tensors.shape(key)) != base.info(name).shape:
                self._refuse(
                    f"tensor {key!r} has shape {list(self.tensors.shape(key))} but the base's {name!r} has "
                    f"{list(base.info(name).shape)} (resized vocabularies are not supported)"
                )

    def _scale(self, module: str, rank: int) -> float:
        """peft's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA; r and alpha per module from the patterns."""
        from peft.utils.other import get_pattern_key

        cfg = self.config
        r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
        alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha)
        if r != rank:
            self._refuse(f"module {module!r} has LoRA rank {rank} but its config says r={r}")
        return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r

    def _stored_transposed(self, base: Checkpoint, module: str, keys: dict[str, str]) -> bool | None:
        """Whether a linear LoRA target's weight is stored (in, out), as GPT-2's Conv1D; None if its shape cannot
        tell (square, or not a linear target)."""
        if "A.weight" not in keys or "B.weight" not in keys or f"{module}.weight" not in base:
            return None
        rows, cols = self.tensors.shape(keys["B.weight"])[0], self.tensors.shape(keys["A.weight"])[-1]
        shape = base.info(f"{module}.weight").shape
        return None if rows == cols else {(rows, cols): False, (cols, rows): True}.get(shape)

    def _check(self, base: Checkpoint, name: str, update: LoraUpdate) -> LoraUpdate:
        b_shape = tuple(self.tensors.shape(update.b))
        if update.a is None:
            expected = b_shape
        else:
            a_shape = tuple(self.tensors.shape(update.a))
            if len(a_shape) != 2 or len(b_shape) != 2:
                self._refuse(
                    f"tensor {update.a!r} is a convolution LoRA (shape {list(a_shape)}): not supported"
                )
            expected = (a_shape[1], b_shape[0]) if update.transposed else (b_shape[0], a_shape[1])
            if a_shape[0] != b_shape[1]:
                self._refuse(
                    f"{update.a!r} and {update.b!r} have different ranks ({a_shape[0]} vs {b_shape[1]})"
                )
        if base.info(name).shape != expected:
            self._refuse(
                f"the LoRA update of {name!r} has shape {list(expected)} but the base tensor has "
                f"{list(base.info(name).shape)}"
            )
        return update

    def _target(self, base: Checkpoint, name: str, key: str) -> str:
        if name not in base:
            self._refuse(
                f"tensor {key!r} targets {name!r}, which the base checkpoint {base.path} does not have"
            )
        return name

    def _refuse(self, message: str) -> None:
        raise CheckpointError(f"{self.tensors.file}: {message}")

    def apply(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        """`tensor` (the base's `name`, or its `rows`) with this adapter applied, in the base's dtype."""
        if name in self.replacements:
            tensor = self.tensors.get(self.replacements[name], rows).to(tensor.dtype)
        update = self.updates.get(name)
        if update is None:
            return tensor
        compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        b = self.tensors.get(update.b, None).to(compute)
        if update.a is None:
            delta = b if rows is None else b[rows[0] : rows[1]]
        else:
            a = self.tensors.get(update.a, None).to(compute)
            if update.transposed:  # (B @ A)^T, rows of it are columns of A
                delta = (a if rows is None else a[:, rows[0] : rows[1]]).T @ b.T
            else:
                delta = (b if rows is None else b[rows[0] : rows[1]]) @ a
        return (tensor.to(compute) + update.scale * delta).to(tensor.dtype)

    def close(self) -> None:
        self.tensors.close()


class LoraCheckpoint:
    """A `Checkpoint` of a base model with a LoRA adapter applied on read (same interface: names, info, get).

    Example:
        >>> ckpt = open_checkpoint(resolve_model("org/base+org/adapter"))
        >>> ckpt.get("model.layers.0.self_attn.q_proj.weight")  # W + scale * B @ A
    """

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        self.base = base
        self.adapter = adapter
        self.path = base.path

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.adapter.apply(name, self.base.get(name, rows), rows)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> LoraCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(model: ResolvedModel) -> Checkpoint | LoraCheckpoint:
    """The lazy checkpoint of a resolved model: its own, or its base with its LoRA adapter applied on read."""
    base = Checkpoint(model.path)
    if model.adapter is None:
        return base
    try:
        return LoraCheckpoint(base, LoraAdapter(model.adapter, base))
    except BaseException:
        base.close()
        raise


def _load_config(adapter: ResolvedModel) -> Any:
    file = Path(adapter.path) / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{file}: not found ({adapter.ref!r} is not a PEFT adapter)")
    try:
        from peft import LoraConfig, PeftConfig
    except ImportError as exc:
        raise CheckpointError(f"{file}: LoRA references need peft (pip install 'hf-m2n2[lora]')") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns about version differences; errors are reported below
            config = PeftConfig.from_pretrained(str(adapter.path))
    except Exception as exc:
        raise CheckpointError(f"{file}: not a valid PEFT adapter config ({first_line(exc)})") from exc
    if not isinstance(config, LoraConfig):
        raise CheckpointError(f"{file}: peft_type {config.peft_type} is not supported (only LORA)")
    for key, what in _UNSUPPORTED.items():
        if getattr(config, key, None):
            raise CheckpointError(f"{file}: {key} ({what}) is not supported; merge it with peft first")
    return config


class _AdapterTensors:
    """The adapter's tensors, read one at a time (safetensors; a `.bin` only through `torch.load(weights_only)`)."""

    def __init__(self, file: Path, handle: Any, shapes: dict[str, tuple[int, ...]]):
        self.file = file
        self._handle = handle
        self._shapes = shapes
        self._lock = threading.Lock()

    @classmethod
    def open(cls, adapter: ResolvedModel) -> _AdapterTensors:
        directory = Path(adapter.path)
        file = directory / ADAPTER_SAFETENSORS
        if file.is_file():
            from safetensors import safe_open

            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 (not a dict)
            except Exception as exc:
                raise CheckpointError(f"{file}: corrupted or truncated safetensors file ({exc})") from exc
            return cls(file, handle, shapes)
        file = directory / ADAPTER_BIN
        if file.is_file():
            state = _open_file(file)  # the checkpoint reader's: torch.load(weights_only=True), same messages
            return cls(
                file, state, {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
            )
        raise CheckpointError(f"{directory}: no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN} ({adapter.ref!r})")

    @property
    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        with self._lock:
            if isinstance(self._handle, dict):
                tensor = self._handle[key]
                return tensor if rows is None else tensor[rows[0] : rows[1]]
            if rows is None:
                return self._handle.get_tensor(key)
            return self._handle.get_slice(key)[rows[0] : rows[1]]

    def close(self) -> None:
        self._handle = None
