"""Exception classes, in two families.

User errors (`HfM2n2Error` and its subclasses) come from input the user can fix: a spec, a file, a model, an
output directory. The CLI prints them on one line and exits 2. Where one matches a built-in exception it also
inherits it (a `SpecError` is a `ValueError`), and it carries the offending value as attributes.

`InfrastructureError` is a service or machine failing under a run (an environment server down, workers lost):
the run checkpoints and stops with one line, and `--resume` continues. It is never scored as a candidate failure.

`ContractError` is a bug in the calling code (a strategy told about a candidate it never asked): a traceback,
not a one-line user error.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its class name when the message is empty (for
    one-line errors that quote a library's multi-line message).

    Example:
        >>> first_line(ValueError("bad value\\nmore detail"))
        'bad value'
    """
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


class HfM2n2Error(Exception):
    """Base class for errors caused by input the user can fix (spec, files, models)."""


class SpecError(HfM2n2Error, ValueError):
    """A spec is invalid.

    Attributes:
        path: the YAML path of the offending value (e.g. `models[1].parameters.weight`; empty: the whole file).
        message: what is wrong with it.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ModelResolutionError(HfM2n2Error):
    """A model reference could not be resolved to local files (missing dir, repo not cached, bad revision)."""


class CheckpointError(HfM2n2Error):
    """A checkpoint file is missing, corrupted, unsafe or incompatible with the others."""


class OutputError(HfM2n2Error):
    """The output directory cannot be written (exists, disk full, permission)."""


class StorageError(OutputError, OSError):
    """The disk refused a write (full, over quota, read-only, failing, or a file size limit): what was already
    safe stays as it was (a previous output, the last checkpoint).

    Attributes:
        errno: the OSError's errno.
        filename: the file being written, when the system said.
    """

    WRITE_ERRNOS = frozenset({"ENOSPC", "EDQUOT", "EROFS", "EFBIG"})  # only ever a write's
    ERRNOS = WRITE_ERRNOS | {"EIO"}  # EIO: a failing disk, under a read as well as a write

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:  # OSError's own would print "[Errno N] None"
        return self.message

    @classmethod
    def of(cls, exc: BaseException) -> StorageError | None:
        """The StorageError for an OSError that says the disk refused a write (else None)."""
        import errno as errnos

        if isinstance(exc, StorageError) or not isinstance(exc, OSError):
            return exc if isinstance(exc, StorageError) else None
        if exc.errno is None or errnos.errorcode.get(exc.errno) not in cls.ERRNOS:
            return None
        where = f"{exc.filename}: " if exc.filename else ""
        return cls(f"{where}cannot write: {exc.strerror or exc}", exc.errno, exc.filename)

    @classmethod
    def is_write_side(cls, exc: OSError) -> bool:
        """Whether the errno can only come from a write (so it is the output's, whatever file it names)."""
        import errno as errnos

        return exc.errno is not None and errnos.errorcode.get(exc.errno) in cls.WRITE_ERRNOS


class UnknownMethodError(HfM2n2Error, LookupError):
    """A merge method name that no method registers."""


class MethodParameterError(HfM2n2Error, ValueError):
    """A parameter value is outside what the merge method accepts (e.g. della's density +/- epsilon)."""


class PushError(HfM2n2Error):
    """The upload failed (bad repo id, no or wrong token, server error, network); the local files are intact."""


class EvaluationError(HfM2n2Error, RuntimeError):
    """The evaluator cannot score candidates at all (it failed before producing any valid score vector)."""


class InfrastructureError(HfM2n2Error, ConnectionError):
    """A service the evaluation depends on failed (a server down, workers lost, disk full).

    Evaluators raise it instead of returning scores: the run checkpoints what it has, stops with this message
    and exit code 2, and `hf-m2n2 evolve --resume DIR` continues once the service is back. Scoring the candidate
    0 instead would put an outage into the archive.

    Attributes:
        service: what failed (a URL, a worker name), for the one-line message.
    """

    def __init__(self, service: str, message: str):
        self.service = service
        self.message = message
        super().__init__(f"{service}: {message}")


class ContractError(RuntimeError):
    """The calling code broke an interface's contract (a bug, reported with a traceback)."""
