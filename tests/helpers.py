"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def spawn_evolve(spec: Path, out: Path) -> subprocess.Popen:
    """`hf-m2n2 evolve SPEC --out OUT -q` in a child process (one torch thread), for tests that SIGKILL it."""
    return subprocess.Popen(
        [sys.executable, "-m", "hf_m2n2.cli", "evolve", str(spec), "--out", str(out), "-q"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
