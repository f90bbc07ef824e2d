"""Small helpers shared by the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model directory."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def copy_seed(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
