"""Lazy checkpoint reading (safetensors, mmap'd; `.bin` only through `torch.load(weights_only=True)`)."""

from __future__ import annotations

import json
import math
import os
import pickle
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_m2n2.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int | None = None  # absolute byte offset of the data (safetensors)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


class TensorIndex:
    """Names, shapes and dtypes of a lazy checkpoint's tensors (`_infos`), looked up with one error for a miss."""

    path: Path
    _infos: dict[str, TensorInfo]

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found") from None


class Checkpoint(TensorIndex):
    """Read-only, lazy view of the tensors of one model directory.

    Tensors are read one at a time on request; nothing is loaded at construction beyond the file headers.

    Args:
        path: a directory holding `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
            any `*.safetensors`, or (only if there are none) `pytorch_model*.bin`.
        files: the weight files to read instead (a diffusers component's files of one variant).

    Raises:
        CheckpointError: no weights found, a corrupted header, or an unsafe `.bin`.

    Example:
        >>> ckpt = Checkpoint("path/to/model")
        >>> ckpt.info("model.norm.weight").shape
    """

    def __init__(self, path: str | os.PathLike[str], files: list[Path] | None = None):
        self.path = Path(path)
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()
        files = _weight_files(self.path) if files is None else files
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors or pytorch_model*.bin weights found")
        for file in files:
            for name, info in self._read_header(file).items():
                self._infos.setdefault(name, info)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or its rows [start, stop) along dim 0) into a new CPU tensor of its stored dtype."""
        info = self.info(name)
        handle = self._open(info.file)
        if info.offset is None:
            tensor = handle[name]
            return tensor if rows is None else tensor[rows[0] : rows[1]].clone()
        return _pread_tensor(handle, info, name, rows)

    def _read_header(self, file: Path) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        if file.suffix == ".safetensors":
            data_start, header = _safetensors_header(file)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {entry['dtype']}")
                offset = data_start + entry["data_offsets"][0]
                infos[name] = TensorInfo(file, dtype, tuple(entry["shape"]), offset)
        else:
            for name, value in self._open(file).items():
                if isinstance(value, torch.Tensor):
                    infos[name] = TensorInfo(file, value.dtype, tuple(value.shape))
        return infos

    def _open(self, file: Path):
        with self._lock:
            if file not in self._handles:
                self._handles[file] = _open_file(file)
            return self._handles[file]

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                if isinstance(handle, int):
                    os.close(handle)
            self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _weight_files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    for index_name, pattern in ((SAFETENSORS_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: invalid index json ({exc})") from exc
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
            return files
        files = sorted(path.glob(pattern))
        if files:
            return files
    return []


def _safetensors_header(file: Path) -> tuple[int, dict]:
    """(data start, header) of a safetensors file, after the safetensors library has validated it."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu"):
            pass  # validates the header and that the file holds every tensor's bytes
    except Exception as exc:
        raise CheckpointError(f"{file}: corrupted or truncated safetensors file ({exc})") from exc
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def _pread_tensor(fd: int, info: TensorInfo, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
    # pread into our own buffer instead of safetensors' mmap: the page cache is not charged to this process's RSS
    shape, offset, nbytes = info.shape, info.offset, info.nbytes
    if rows is not None:
        row_bytes = nbytes // shape[0] if shape and shape[0] else 0
        shape = (rows[1] - rows[0], *shape[1:])
        offset += rows[0] * row_bytes
        nbytes = (rows[1] - rows[0]) * row_bytes
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        done += n
    return buf.view(info.dtype).reshape(shape)


def _open_file(file: Path):
    if file.suffix == ".safetensors":
        return os.open(file, os.O_RDONLY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; errors are reported below
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        reason = next(
            (ln.strip() for ln in str(exc).splitlines() if "unsupported" in ln.lower()), "unsupported object"
        )
        raise CheckpointError(
            f"{file}: refused to load: it contains a pickled object that is not a tensor ({reason})"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot read PyTorch checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type(state).__name__}")
    return state
