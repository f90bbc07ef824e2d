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
from collections.abc import Iterator
from pathlib import Path

from hf_m2n2.errors import OutputError

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


def own(path: Path) -> int:
    """Lock `path` (a temporary this process just created) for as long as the returned descriptor stays open.

    Raises:
        OutputError: the temporary vanished or was taken before it could be locked (a sweep raced it).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sweeper holds it for an instant at most
        if not os.path.samestat(os.fstat(fd), os.stat(path)):
            raise FileNotFoundError(errno.ENOENT, "removed while being created", str(path))
    except OSError as exc:
        os.close(fd)
        raise OutputError(f"cannot create {path}: {exc.strerror or exc}") from exc
    return fd


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


def sweep_dead(directory: Path, pattern: str) -> list[Path]:
    """Remove the temporaries in `directory` matching `pattern` (a glob) whose owner is dead, saying so.

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
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        pid = owner_pid(path)
        logger.warning("removed %s left by a killed run%s", path.name, f" (pid {pid})" if pid else "")
    return alive


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
