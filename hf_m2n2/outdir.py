"""Output directories: all-or-nothing (write into a temporary sibling, rename onto the target at the end), and
the files besides the weights that an output takes from a seed (config dtype, generation config, tokenizer)."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_m2n2.errors import CheckpointError, OutputError, StorageError
from hf_m2n2.locks import is_alive_temporary, owner_pid, sweep_dead, temporary, temporary_target

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

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
    swap directory of a killed `--overwrite`, after putting back a result it alone held), and a second write
    into `out_dir` while this one runs is refused.

    Raises:
        OutputError: `out_dir` exists and `overwrite` is false, another live process is writing it, or the
            rename fails.
    """
    target = Path(out_dir)
    parent = target.resolve().parent
    if parent.is_dir():  # first: a replace killed halfway may put a result back at `target`
        sweep_killed(parent, target.name)
    check_output_dir(target, overwrite)
    with temporary(parent, target.name) as tmp:
        # checked after our own temporary exists, so of two writers starting together at most one goes on
        # (a live writer's swap directory counts: its temporary moves into it for the final renames)
        stem = glob.escape(target.name)
        others = [
            p
            for p in (*parent.glob(f".{stem}.tmp-*"), *parent.glob(f".{stem}.old-*"))
            if p != tmp.path and is_alive_temporary(p)
        ]
        if others:
            pid = owner_pid(others[0])
            raise OutputError(f"{target}: another hf-m2n2{f' (pid {pid})' if pid else ''} is writing it")
        yield tmp.path
        os.chmod(tmp.path, 0o777 & ~_UMASK)  # mkdtemp makes it private; a result directory is ordinary
        _replace(tmp.path, target)


def sweep_killed(parent: Path, name: str | None = None) -> None:
    """Clean up after killed writes into `parent` (of `name`, or of any name): first a replace killed between
    its renames is completed or undone (`_put_back`), then the dead temporaries and swap directories go."""
    stem = "*" if name is None else glob.escape(name)
    sweep_dead(parent, f".{stem}.old-*", salvage=_put_back)
    sweep_dead(parent, f".{stem}.tmp-*")


def _process_umask() -> int:
    """The process umask, read once at import: setting it, the only portable way to read it, would briefly
    change the mode of files that other threads create, so Linux's /proc is read where it exists."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # while it is set, a file created elsewhere is private rather than world-writable
    os.umask(mask)
    return mask


_UMASK = _process_umask()

# A replace goes through a locked swap directory `.OUT.old-PID-xxxx`: the new result moves in as NEW (so a
# swap directory's NEW is always complete), the previous one follows as PREVIOUS, then NEW becomes OUT.
NEW = "new"
PREVIOUS = "previous"


def _replace(tmp: Path, target: Path) -> None:
    """Move the finished `tmp` onto `target`. Whenever a kill falls, `target` or the swap directory holds a
    complete result, and `_put_back` (the next write's sweep) moves it back if `target` is missing."""
    try:
        if not os.path.lexists(target):
            os.rename(tmp, target)
            return
    except OSError as exc:
        raise OutputError(f"cannot move the result into {target}: {exc.strerror or exc}") from exc
    with temporary(target.resolve().parent, target.name, "old") as swap:
        new, previous = swap.path / NEW, swap.path / PREVIOUS
        try:
            os.rename(tmp, new)
            os.rename(target, previous)
            os.rename(new, target)
        except OSError as exc:
            if not os.path.lexists(target) and os.path.lexists(previous):
                try:
                    os.rename(previous, target)
                except OSError:
                    # the swap directory holds the only copy of the previous result: the next write restores it
                    swap.keep = True
            raise OutputError(f"cannot move the result into {target}: {exc.strerror or exc}") from exc


def _put_back(swap: Path) -> bool:
    """If a replace was killed between its renames (its target is missing), move the swap directory's finished
    new result, else the previous one, back onto the target, saying so. Returns whether `swap` may be removed:
    not when it still holds the only copy of a result."""
    target = temporary_target(swap)
    if os.path.lexists(target):
        return True  # the replace had not started or had finished: the swap directory holds nothing needed
    for kept, what in ((swap / NEW, "its finished new result"), (swap / PREVIOUS, "the previous result")):
        if not os.path.lexists(kept):
            continue
        try:
            os.rename(kept, target)
        except OSError as exc:
            logger.warning("%s is missing; %s stays in %s (%s)", target, what, swap, exc.strerror or exc)
            return False
        logger.warning("%s: restored %s (a run killed while replacing it left it missing)", target, what)
        return True
    return True


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

    The temporary is unique per process (two writers never share one) and locked (`locks.temporary`), so a
    sweep removes it once its writer dies, and never while it lives.

    Args:
        path: the destination.
        write: a function taking the open binary file.
    """
    path = Path(path)
    with temporary(path.parent, path.name, directory=False) as tmp:
        with open(tmp.fd, "wb", closefd=False) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.fchmod(tmp.fd, 0o666 & ~_UMASK)  # mkstemp makes it private
        os.replace(tmp.path, path)
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
