"""Ownership of directories and temporaries by a live process, through `flock`: the kernel drops a lock when its
holder dies (kill -9 included), so a lock that can be taken means its owner is gone.

Every temporary hf-m2n2 writes (a `.OUT.tmp-PID-xxxx` directory, a `.OUT.old-PID-xxxx` swap directory, a
`.NAME.tmp-PID-xxxx` file) is locked by its writer for its whole life; `sweep_dead` removes the ones whose lock is
free, so the next run into the same place cleans up after a killed one and leaves a live one's alone. A run
directory is held through its `.lock` file for the whole run (`hold`), so a second run into it is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from hf_m2n2.errors import OutputError, StorageError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_PID = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old|push)-(?:(?P<pid>\d+)-)?")


def temporary_prefix(name: str, kind: str = "tmp") -> str:
    """The name prefix of this process's temporaries of `name` (`.model.tmp-1234-`): the pid says who wrote it."""
    return f".{name}.{kind}-{os.getpid()}-"


def lock_fd(fd: int) -> bool:
    """Take the exclusive lock on an open file or directory without waiting; False if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def own(path: Path, fd: int | None = None) -> int:
    """Lock `path` (a temporary this process just created) for as long as the returned descriptor stays open.

    Args:
        fd: a descriptor of `path` already open (a file from `mkstemp`); else `path` is opened. On failure it is
            closed either way.

    Raises:
        OutputError: the temporary vanished or was taken before it could be locked (a sweep raced it).
    """
    try:
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sweeper holds it for an instant at most
        if not os.path.samestat(os.fstat(fd), os.stat(path)):
            raise FileNotFoundError(errno.ENOENT, "removed while being created", str(path))
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        reason = "removed while being created" if exc.errno == errno.ENOENT else exc.strerror or exc
        raise OutputError(f"cannot create {path}: {reason}") from exc
    return fd


class Temporary:
    """A temporary file or directory this process created and holds locked (`temporary`).

    Attributes:
        path: where it is.
        fd: the locking descriptor (for a file, open for reading and writing).
        keep: set it to leave the temporary in place on exit (it holds the only copy of something).
    """

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd
        self.keep = False


@contextlib.contextmanager
def temporary(parent: Path, name: str, kind: str = "tmp", *, directory: bool = True) -> Iterator[Temporary]:
    """Create the locked temporary `parent/.NAME.KIND-PID-xxxx` (a directory, or an empty file) for the block.

    Whatever is still at its path when the block ends (it was not renamed away) is removed, unless `keep` is
    set; then the lock is released. A kill -9 releases the lock, so the next `sweep_dead` removes it.

    Raises:
        OutputError: it cannot be created or locked (naming it).
    """
    prefix = temporary_prefix(name, kind)
    # a full or read-only disk stays a StorageError (an evolve then points to its intact checkpoint)
    try:
        if directory:
            path, fd = Path(tempfile.mkdtemp(prefix=prefix, dir=parent)), None
        else:
            fd, name_ = tempfile.mkstemp(prefix=prefix, dir=parent)
            path = Path(name_)
    except OSError as exc:
        error = StorageError.of(exc)
        raise error or OutputError(f"cannot create a temporary in {parent}: {exc.strerror or exc}") from exc
    try:
        held = Temporary(path, own(path, fd))
    except OutputError:  # not locked (a sweep removed it, or flock failed): its name is ours alone, remove it
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        raise
    try:
        yield held
    finally:
        try:
            if not held.keep:
                _remove_if_ours(held)
        finally:
            os.close(held.fd)


def _remove_if_ours(held: Temporary) -> None:
    """Remove what is at `held.path` if it is still the temporary itself (not renamed away, not replaced)."""
    try:
        if not os.path.samestat(os.fstat(held.fd), os.lstat(held.path)):
            return
    except OSError:
        return  # renamed away (the result) or already gone
    if held.path.is_dir():
        shutil.rmtree(held.path, ignore_errors=True)
    else:
        held.path.unlink(missing_ok=True)


def is_alive_temporary(path: Path) -> bool:
    """Whether a live process holds the temporary `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return not lock_fd(fd)
    finally:
        os.close(fd)


def owner_pid(path: Path) -> int | None:
    match = _PID.match(path.name)
    return int(match["pid"]) if match and match["pid"] else None


def sweep_dead(directory: Path, pattern: str, salvage: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove the temporaries in `directory` matching `pattern` (a glob) whose owner is dead, saying so.

    Args:
        salvage: called with each dead temporary, under its lock, before it is removed: it moves out what must
            survive and returns whether the rest may go (False: the temporary is left where it is).

    Returns:
        The live ones (their owners still run).
    """
    alive = []
    for path in sorted(directory.glob(pattern)):
        if not _PID.match(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile
        try:
            if not lock_fd(fd):
                alive.append(path)
                continue
            if salvage is not None and not salvage(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        pid = owner_pid(path)
        logger.warning("removed %s left by a killed run%s", path.name, f" (pid {pid})" if pid else "")
    return alive


def temporary_target(path: Path) -> Path:
    """The path a temporary (`.NAME.tmp-PID-xxxx`) was written for (`NAME`, beside it)."""
    match = _PID.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not an hf-m2n2 temporary")
    return path.parent / match["name"]


@contextlib.contextmanager
def hold(directory: Path, what: str) -> Iterator[None]:
    """Hold `directory/.lock` while the block runs (the directory must exist).

    Args:
        what: the command, for the refusal (`another evolve`).

    Raises:
        OutputError: another live process holds it.
    """
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not lock_fd(fd):
            raise OutputError(f"{directory}: {what}{_pid_text(fd)} is running in it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def check_free(directory: Path, what: str) -> None:
    """Raise if a live process holds `directory/.lock` (before replacing the directory).

    Raises:
        OutputError: it is held.
    """
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return
    try:
        if not lock_fd(fd):
            raise OutputError(f"{directory}: {what}{_pid_text(fd)} is running in it")
    finally:
        os.close(fd)


def _pid_text(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f" (pid {text})" if text.isdigit() else ""
