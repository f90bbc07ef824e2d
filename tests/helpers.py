"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# conftest's `pipelines`: name -> (family, build_tiny_pipeline keyword arguments), built in this order
TINY_PIPELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "sd1": ("sd1", {"seed": 0}),
    "sd1-a": ("sd1", {"seed": 1, "base_seed": 0, "variants": ("fp16",)}),
    "sd1-b": ("sd1", {"seed": 2, "base_seed": 0}),
    "sdxl": ("sdxl", {"seed": 0}),
    "sdxl-a": ("sdxl", {"seed": 1, "base_seed": 0}),
    "sdxl-b": ("sdxl", {"seed": 2, "base_seed": 0}),
    "sd1-te": ("sd1", {"seed": 3, "base_seed": 0, "components": ("unet", "text_encoder")}),
    "sd1-b-sharded": ("sd1", {"seed": 2, "base_seed": 0, "max_shard_size": "300KB", "variants": ("fp16",)}),
    "sd2": ("sd2", {"seed": 0}),
}
CLIP_JUDGE_SEED = 0  # conftest's `clip_judge`


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model directory."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def write_yaml(path: Path, data: dict) -> Path:
    """Write a spec as YAML (keys in their order) and return its path."""
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


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


class _ForkedEvolve:
    """`hf_m2n2.cli.main(["evolve", SPEC, "--out", OUT, "-q"])` in a forked copy of this process: a process of its
    own that SIGKILL stops as it stops `hf-m2n2`, without a fresh interpreter's imports (torch, transformers,
    diffusers: ~10 s of a child's start). The Popen methods sigkill_evolve uses."""

    def __init__(self, spec: Path, out: Path):
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: run the command, never return into pytest
            code = 1
            try:
                from hf_m2n2.cli import main

                code = main(["evolve", str(spec), "--out", str(out), "-q"])
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        self.wait()

    def error(self) -> str:
        return f"the forked evolve exited with {self.returncode} (its traceback is in the captured stderr)"


def sigkill_evolve(
    spec: Path, out: Path, *, min_passes: int = 1, timeout: float = 60, fresh_interpreter: bool = True
) -> int:
    """Start `hf-m2n2 evolve` in a child process, SIGKILL it once its checkpoint holds `min_passes` passes, and
    return the passes of that checkpoint (the run is then resumable, unfinished).

    `fresh_interpreter=False` forks this process instead of starting `python -m hf_m2n2.cli` (the same command in
    a process of its own, killed the same way, ~10 s less start-up); test_evolve_loop keeps the real command line.
    """
    from hf_m2n2.evolve.checkpoint import load_state

    def checkpointed() -> int:
        try:
            return int(load_state(out / "checkpoint.npz")["loop"]["passes"])
        except (OSError, ValueError, KeyError):
            return 0

    process = spawn_evolve(spec, out) if fresh_interpreter else _ForkedEvolve(spec, out)
    try:
        deadline = time.monotonic() + timeout
        while checkpointed() < min_passes:
            if process.poll() is not None:
                raise AssertionError(process.stderr.read().decode() if fresh_interpreter else process.error())
            assert time.monotonic() < deadline, f"no checkpoint of {min_passes} passes within {timeout} s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    return checkpointed()


def run_method(
    name: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """Call a merge method the way the engine does: defaults filled in, per-model values given as lists."""
    from hf_m2n2.methods import REQUIRED, get_method
    from hf_m2n2.methods._common import RandomStream

    method = get_method(name)
    params = {p.name: overrides.get(p.name, p.default) for p in method.global_params}
    model_params = [
        {p.name: overrides[p.name][i] if p.name in overrides else p.default for p in method.model_params}
        for i in range(len(tensors))
    ]
    for values in (params, *model_params):
        assert REQUIRED not in values.values(), f"missing required parameter in {values}"
    stream = RandomStream(seed) if seed is not None else None
    return method.fn(list(tensors), base, params, model_params, stream)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run headless Chromium (the Space's page tests: `--dump-dom URL`, `--screenshot=FILE URL`)."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]
    return subprocess.run(
        [CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def gradio_table(value: dict) -> list[dict]:
    """A Gradio Dataframe's value, as gradio_client returns it, as rows of {header: value}."""
    return [dict(zip(value["headers"], row)) for row in value["data"]]
