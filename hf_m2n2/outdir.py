"""Output directories: all-or-nothing (write into a temporary sibling, rename onto the target at the end), and
the files besides the weights that an output takes from a seed (config dtype, generation config, tokenizer)."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_m2n2.errors import CheckpointError, OutputError, StorageError
from hf_m2n2.locks import is_alive_temporary, own, owner_pid, sweep_dead, temporary_prefix

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail before any work if OUT_DIR exists (without --overwrite) or is not a directory."""
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise OutputError(f"{out_dir} already exists (use --overwrite to replace it)")
        if not out_dir.is_dir():
            raise OutputError(f"{out_dir} exists and is not a directory")
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: parent directory does not exist")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; on success it replaces `out_dir`, on any failure it is removed.

    A crash, Ctrl-C or full disk leaves `out_dir` as it was (absent, or the previous result). The temporary is
    locked by this process while it lives, so after a kill -9 the next write into `out_dir` removes it (and a
    swap directory of a killed `--overwrite`), and a second write into `out_dir` while this one runs is refused.

    Raises:
        OutputError: `out_dir` exists and `overwrite` is false, another live process is writing it, or the
            rename fails.
    """
    target = Path(out_dir)
    check_output_dir(target, overwrite)
    parent = target.resolve().parent
    sweep_dead(parent, f".{glob.escape(target.name)}.tmp-*")
    sweep_dead(parent, f".{glob.escape(target.name)}.old-*")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(target.name), dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot create a temporary directory in {parent}: {exc.strerror or exc}") from exc
    fd = None
    try:
        fd = own(tmp)
        # checked after our own temporary exists, so of two writers starting together at most one goes on
        others = [
            p for p in parent.glob(f".{glob.escape(target.name)}.tmp-*") if p != tmp and is_alive_temporary(p)
        ]
        if others:
            pid = owner_pid(others[0])
            raise OutputError(f"{target}: another hf-m2n2{f' (pid {pid})' if pid else ''} is writing it")
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a result directory is ordinary
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, target: Path) -> None:
    old = None
    fd = None
    try:
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=temporary_prefix(target.name, "old"), dir=target.resolve().parent)
            )
            fd = own(old)  # a kill while the previous result is deleted leaves it to the next run's sweep
            os.rename(target, old / "previous")
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if old is not None and not target.exists() and (old / "previous").exists():
            os.rename(old / "previous", target)
        if old is not None and not (old / "previous").exists():
            shutil.rmtree(old, ignore_errors=True)
        raise OutputError(f"cannot move the result into {target}: {exc.strerror or exc}") from exc
    finally:
        if fd is not None:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], write: Any) -> None:
    """Write a file atomically: `write(file)` fills a temporary sibling, which is fsynced and renamed onto path.

    Args:
        path: the destination.
        write: a function taking the open binary file.
    """
    path = Path(path)
    # unique per process (two writers never share a temporary) and locked, so a sweep removes it once we die
    fd, name = tempfile.mkstemp(prefix=temporary_prefix(path.name), dir=path.parent)
    tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


def copy_generation_config(src: Path, dst: Path) -> None:
    if (src / "generation_config.json").exists():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files `src` has into `dst`.

    Raises:
        CheckpointError: one of them is a dangling or looping symlink, or unreadable (naming the file): skipping
            it would write a model whose tokenizer does not load.
    """
    for name in TOKENIZER_FILES:
        path = src / name
        if (
            path.is_symlink() and not path.exists()
        ):  # exists() follows the link: False when dangling or looping
            raise CheckpointError(
                f"{path}: a broken symlink (its target is missing or loops); the tokenizer cannot be copied"
            )
        if path.exists():
            try:
                shutil.copyfile(path, dst / name)
            except OSError as exc:
                if StorageError.of(exc) is not None:  # the output's disk refused: reported as a storage error
                    raise
                raise CheckpointError(
                    f"{path}: cannot copy the tokenizer file ({exc.strerror or exc})"
                ) from None


def set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    """Record the weights' dtype under the key(s) the config already uses (`dtype` in transformers 5)."""
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
        config[key] = str(dtype).removeprefix("torch.")
