"""Exception classes. Every user-facing failure is an HfM2n2Error: the CLI prints it on one line and exits 2."""

from __future__ import annotations


class HfM2n2Error(Exception):
    """Base class for errors caused by input the user can fix (spec, files, models)."""


class SpecError(HfM2n2Error):
    """The merge spec is invalid. `path` is the YAML path of the offending value (e.g. `models[1].parameters.weight`)."""

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
