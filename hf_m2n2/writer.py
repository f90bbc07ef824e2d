"""A streaming sharded safetensors writer: a fixed list of tensors written in any order, from several threads,
with bounded memory (direct I/O where the file system allows it)."""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_m2n2.checkpoint import SAFETENSORS_DTYPES, tensor_nbytes
from hf_m2n2.errors import OutputError, StorageError

_ST_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_dtype_name(dtype: torch.dtype) -> str:
    return _ST_NAMES[dtype]


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the writer expects: name, shape and dtype are fixed before any data is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclass
class _Slot:
    file: Path
    offset: int
    nbytes: int
    done: int = 0  # bytes written so far (rows may arrive in pieces)

    @property
    def written(self) -> bool:
        return self.done == self.nbytes


_DIRECT_BLOCK = 4096  # direct I/O moves whole blocks, from and to block-aligned addresses
_BOUNCE_BYTES = 8 << 20
_BOUNCE = threading.local()  # each writing thread's aligned buffer


class _BufferedFile:
    """An output file written through the page cache, flushed to disk in the background every `flush_bytes`
    (so little is left to flush at the end)."""

    def __init__(self, fd: int, flusher: ThreadPoolExecutor, flush_bytes: int):
        self.fd = fd
        self._flusher = flusher
        self._flush_bytes = flush_bytes
        self._unflushed = 0
        self._lock = threading.Lock()
        self._flushes: list = []

    def pwrite(self, data: memoryview, offset: int) -> None:
        _pwrite_all(self.fd, data, offset)
        with self._lock:
            self._unflushed += len(data)
            if self._unflushed >= self._flush_bytes:
                self._unflushed = 0
                self._flushes.append(self._flusher.submit(os.fdatasync, self.fd))

    def close(self) -> None:
        # a failed background flush is reported here: a later fsync may no longer see the lost write
        for flush in self._flushes:
            flush.result()


class _DirectFile:
    """An output file written with O_DIRECT: straight from memory to disk, without copying into the page cache
    (which cost most of a merge's system time) and with nothing left to flush at the end.

    Direct I/O moves whole aligned blocks from aligned memory, so each piece's aligned middle is copied through
    a per-thread aligned bounce buffer, and the partial blocks at its edges are gathered in memory until every
    byte of them has arrived (each byte of the file is written exactly once). The last block is written whole
    and the file truncated to `size` when closed.
    """

    def __init__(self, fd: int, size: int, file: Path):
        self.fd = fd
        self.size = size
        self.file = file
        self._partial: dict[int, tuple[bytearray, int]] = {}  # block number -> (its bytes, how many arrived)
        self._lock = threading.Lock()

    def pwrite(self, data: memoryview, offset: int) -> None:
        end = offset + len(data)
        head_end = min(end, -(-offset // _DIRECT_BLOCK) * _DIRECT_BLOCK)
        tail_start = max(head_end, end // _DIRECT_BLOCK * _DIRECT_BLOCK)
        if head_end > offset:
            self._gather(data[: head_end - offset], offset)
        if tail_start > head_end:
            self._write_aligned(data[head_end - offset : tail_start - offset], head_end)
        if end > tail_start:
            self._gather(data[tail_start - offset :], tail_start)

    def _gather(self, piece: memoryview, offset: int) -> None:
        """Add `piece` (within one block) to its block; write the block once it is complete."""
        block = offset // _DIRECT_BLOCK
        start = block * _DIRECT_BLOCK
        with self._lock:
            buf, arrived = self._partial.pop(block, (None, 0))
            buf = buf if buf is not None else bytearray(_DIRECT_BLOCK)
            buf[offset - start : offset - start + len(piece)] = piece
            arrived += len(piece)
            if arrived < min(_DIRECT_BLOCK, self.size - start):
                self._partial[block] = (buf, arrived)
                return
        self._write_aligned(memoryview(buf), start)

    def _write_aligned(self, data: memoryview, offset: int) -> None:
        bounce = getattr(_BOUNCE, "buffer", None)
        if bounce is None:
            bounce = _BOUNCE.buffer = memoryview(mmap.mmap(-1, _BOUNCE_BYTES))  # page-aligned
        for start in range(0, len(data), _BOUNCE_BYTES):
            piece = data[start : start + _BOUNCE_BYTES]
            bounce[: len(piece)] = piece
            try:
                done = os.pwrite(self.fd, bounce[: len(piece)], offset + start)
            except OSError as exc:
                # our writes are aligned, so EINVAL means the kernel cut the write short (a file size limit, a
                # full disk): write buffered, which succeeds or reports the real cause
                if exc.errno != errno.EINVAL:
                    raise
                done = 0
            if done < len(piece):
                self._pwrite_buffered(piece[done:], offset + start + done)

    def _pwrite_buffered(self, data: memoryview, offset: int) -> None:
        fd = os.open(self.file, os.O_WRONLY)
        try:
            _pwrite_all(fd, data, offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._partial:
            raise OutputError(f"{len(self._partial)} blocks were never completed")
        os.ftruncate(self.fd, self.size)  # the last block was written whole


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _open_output(file: Path, size: int, flusher: ThreadPoolExecutor, flush_bytes: int):
    """`file` opened for writing with direct I/O where the file system supports it, else through the page
    cache."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            fd = os.open(file, flags | direct, 0o644)
        except OSError:
            pass
        else:
            try:  # some file systems accept the flag but not the writes
                out = _DirectFile(fd, size, file)
                out._write_aligned(memoryview(bytes(_DIRECT_BLOCK)), 0)
                return out
            except OSError:
                os.close(fd)
    return _BufferedFile(os.open(file, flags, 0o644), flusher, flush_bytes)


class ShardedSafetensorsWriter:
    """Writes a fixed list of tensors into safetensors shards, streaming, in any order, from several threads.

    The safetensors library serializes only complete in-memory dicts; a model must be written tensor by tensor
    with bounded memory, so shard headers are laid out up front from the planned shapes and each tensor's bytes
    are written at its offset when it is ready (with direct I/O where the file system allows it).

    Args:
        directory: where the shards and the index go (an existing, empty temporary directory).
        planned: every tensor to be written, in output order.
        max_shard_bytes: a new shard starts when adding a tensor would exceed this (a tensor larger than the
            limit gets a shard of its own).
        stem: the file names' stem: `model` (transformers) or `diffusion_pytorch_model` (diffusers), giving
            `STEM.safetensors`, or `STEM-00001-of-0000N.safetensors` shards with `STEM.safetensors.index.json`.
    """

    def __init__(
        self,
        directory: Path,
        planned: Sequence[PlannedTensor],
        max_shard_bytes: int,
        flush_bytes: int = 256 << 20,
        stem: str = "model",
    ):
        self.directory = Path(directory)
        self.index_name = f"{stem}.safetensors.index.json"
        self.flush_bytes = flush_bytes
        self._lock = threading.Lock()
        # Page-cache writes are flushed to disk in the background while later tensors compute, not all at the end.
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush")
        groups = _group_shards(planned, max_shard_bytes)
        self.total_size = sum(t.nbytes for t in planned)
        if len(groups) == 1:
            names = [f"{stem}.safetensors"]
        else:
            names = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        self._slots: dict[str, _Slot] = {}
        self._files: dict[Path, _BufferedFile | _DirectFile] = {}
        self.weight_map: dict[str, str] = {}
        try:
            for file_name, group in zip(names, groups):
                self._open_shard(self.directory / file_name, group)
        except OSError as exc:
            self.abort()
            raise _write_error(exc, f"cannot write {self.directory}") from exc

    def _open_shard(self, file: Path, group: Sequence[PlannedTensor]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in group:
            header[t.name] = {
                "dtype": safetensors_dtype_name(t.dtype),
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
        data_start = 8 + len(raw)
        out = self._files[file] = _open_output(file, data_start + offset, self._flusher, self.flush_bytes)
        out.pwrite(memoryview(len(raw).to_bytes(8, "little") + raw), 0)
        for t in group:
            start = header[t.name]["data_offsets"][0]  # type: ignore[index]
            self._slots[t.name] = _Slot(file, data_start + start, t.nbytes)
            self.weight_map[t.name] = file.name

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write a planned tensor, or a block of its rows starting at `row_start` (thread-safe)."""
        slot = self._slots.get(name)
        if slot is None:
            raise OutputError(f"tensor {name!r} was not planned for output")
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        start = row_start * (data.nbytes // tensor.shape[0]) if row_start else 0
        if start + data.nbytes > slot.nbytes:
            raise OutputError(
                f"tensor {name!r}: {data.nbytes} bytes at offset {start}, planned {slot.nbytes}"
            )
        try:
            self._files[slot.file].pwrite(memoryview(data), slot.offset + start)
        except OSError as exc:
            raise _write_error(exc, f"writing {slot.file.name}") from exc
        with self._lock:
            slot.done += data.nbytes

    def finish(self) -> None:
        """Check every planned tensor was written, flush to disk, write the index (if sharded)."""
        missing = [name for name, slot in self._slots.items() if not slot.written]
        if missing:
            raise OutputError(f"{len(missing)} planned tensors were never written (first: {missing[0]})")
        try:
            self._flusher.shutdown(wait=True)
            for out in self._files.values():
                out.close()
                os.fsync(out.fd)
                os.close(out.fd)
            self._files.clear()
            if len({s.file for s in self._slots.values()}) > 1:
                index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
                (self.directory / self.index_name).write_text(json.dumps(index, indent=2) + "\n")
        except OSError as exc:
            raise _write_error(exc, f"finishing {self.directory.name}") from exc

    def abort(self) -> None:
        self._flusher.shutdown(wait=True)
        for out in self._files.values():
            with contextlib.suppress(OSError):
                os.close(out.fd)
        self._files.clear()


def _write_error(exc: OSError, what: str) -> OutputError:
    """A write's OSError as one line: a StorageError when the disk refused it (full, limit, failing)."""
    if StorageError.of(exc) is not None:
        return StorageError(f"{what}: {exc.strerror or exc}", exc.errno)
    return OutputError(f"{what}: {exc.strerror or exc}")


def _group_shards(planned: Iterable[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in planned:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups
