"""Seeds: the input models of a run, resolved, with lazy tensor access, config and architecture."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_m2n2.architectures import Architecture, detect_architecture, num_layers
from hf_m2n2.checkpoint import Checkpoint
from hf_m2n2.errors import CheckpointError
from hf_m2n2.hub import ResolvedModel, resolve_model


@dataclass
class Seed:
    model: ResolvedModel
    checkpoint: Checkpoint
    config: dict[str, Any]
    arch: Architecture
    num_layers: int

    @property
    def name(self) -> str:
        return self.model.name


def load_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{file}: invalid JSON ({exc})") from exc


def open_seed(model: ResolvedModel) -> Seed:
    checkpoint = Checkpoint(model.path)
    config = load_config(model.path)
    arch = detect_architecture(config, checkpoint.names)
    return Seed(model, checkpoint, config, arch, num_layers(config, arch, checkpoint.names))


def open_seeds(refs: Sequence[str], *, base_dir: Path | None = None, token=None) -> list[Seed]:
    """Resolve and open every reference (in order, each once)."""
    return [open_seed(resolve_model(ref, base_dir=base_dir, token=token)) for ref in refs]
