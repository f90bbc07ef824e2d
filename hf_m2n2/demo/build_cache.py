"""Cached, atomic build parts for the offline demos' builders (`specialists`, `t2i_world`, the SmolLM2 example).

A build is a folder of parts (a checkpoint, a task folder, a judge...). Each part is written into a scratch sibling
and swapped in with a marker file holding its cache key; a part whose marker holds the key the current parameters
give is reused, anything else (missing, half-written, built with other parameters) is rebuilt. A part's key is a
digest of exactly what its bytes depend on: its parameters, the library versions, the kernels in effect and the
keys of the parts it is built from.

Reproducibility: one torch thread and fixed seeds give the same bytes on one machine, but float rounding also
depends on which CPU kernels run (torch's AVX2 / AVX-512 vectorized kernels, MKL's per-ISA GEMM branches), and
training amplifies a last-bit difference. `pin_portable_kernels` selects, before torch loads, torch's unvectorized
kernels (`ATEN_CPU_CAPABILITY=default`) and MKL's SSE2-only reproducible branch (`MKL_CBWR=COMPATIBLE`), the same
code on every x86-64 CPU; `kernels_in_effect` records what was in effect, for the keys and markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = ".hf_m2n2_build.json"
# Kernels that run the same code on every x86-64 CPU (both env variables are read when torch first runs a kernel).
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


def digest(payload: Any) -> str:
    """A short stable digest of a JSON-serializable payload (keys sorted), for cache keys.

    Example:
        >>> digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})
        True
    """
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pin_portable_kernels() -> bool:
    """Select `PORTABLE_KERNELS` (where the environment does not already name others) if torch is not loaded yet.

    Returns:
        Whether it could: torch reads both variables once, so in a process that already imported torch this
        changes nothing (and sets nothing, so that the process's children are not slowed down).
    """
    if "torch" in sys.modules:
        return False
    for name, value in PORTABLE_KERNELS.items():
        os.environ.setdefault(name, value)
    return True


def kernels_in_effect() -> dict[str, str]:
    """What decides a build's rounding besides the library versions: torch's CPU kernel set, MKL's branch, the
    machine's architecture."""
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
        "machine": platform.machine(),
    }


def is_built(path: Path, key: str) -> bool:
    """Whether `path` holds a complete part built with cache key `key`."""
    try:
        return json.loads((path / MARKER).read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False


@contextmanager
def atomic_dir(path: Path, key: str, params: dict[str, Any], kernels: dict[str, str]) -> Iterator[Path]:
    """Write a part into a scratch folder, then swap it in with its marker (a crash leaves no half-built part).

    Args:
        path: where the part goes.
        key: its cache key (see `is_built`).
        params: the build parameters, recorded in the marker for people reading it.
        kernels: the kernels in effect (`kernels_in_effect()`, maybe with more entries), recorded in the marker.

    Yields:
        The scratch folder to write the part into.
    """
    scratch = path.with_name(f".{path.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    yield scratch
    marker = {"key": key, "params": params, "kernels": kernels}
    (scratch / MARKER).write_text(json.dumps(marker, sort_keys=True, indent=1) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(scratch, path)


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread (faster on tiny models, and the same bytes every build), no per-file progress bars."""
    import torch
    from transformers.utils import logging as hf_logging

    previous = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if bars:
            hf_logging.enable_progress_bar()


def build_parts(
    parts: Sequence[tuple[str, Path, Callable[[Path], None]]],
    keys: dict[str, str],
    params: dict[str, Any],
    kernels: dict[str, str],
    say: Callable[[str], None],
) -> None:
    """Build, on one torch thread and atomically, each part `(name, path, build)` whose folder does not hold the
    key `keys[name]` (`build(scratch)` writes it); say one line per part, cached or built."""
    todo = []
    for name, path, build in parts:
        if is_built(path, keys[name]):
            say(f"{name}: cached ({path})")
        else:
            todo.append((name, path, build))
    if not todo:
        return
    with one_thread():
        for name, path, build in todo:
            start = time.perf_counter()
            with atomic_dir(path, keys[name], params, kernels) as scratch:
                build(scratch)
            say(f"{name}: built in {time.perf_counter() - start:.1f} s ({path})")


def builder_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The demo builders' command line: the build folder and repeatable `--param NAME=VALUE` overrides (read them
    with `config_from_overrides`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("root", help="build folder")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a build parameter (repeatable)",
    )
    return parser


def config_from_overrides(cls: type, overrides: Sequence[str], parser: argparse.ArgumentParser) -> Any:
    """A build configuration (a dataclass of int, float and tuple-of-int fields) from `NAME=VALUE` overrides.

    Args:
        cls: the configuration dataclass (its defaults fill what is not overridden).
        overrides: `NAME=VALUE` strings (a tuple as comma-separated integers: `vae_channels=16,32`).
        parser: the command line's parser: a bad override is reported through it (one line, exit code 2).

    Returns:
        The configuration.
    """
    fields = {field.name: str(field.type) for field in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            parser.error(f"--param {item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        try:
            values[name] = _parse_value(fields[name], raw)
        except ValueError:
            parser.error(f"--param {item!r}: {raw!r} is not a {fields[name]}")
    return cls(**values)


def _parse_value(kind: str, raw: str) -> Any:
    if kind == "float":
        return float(raw)
    if kind == "int":
        return int(raw)
    if kind.startswith("tuple[int"):
        return tuple(int(part) for part in raw.split(","))
    raise ValueError(kind)
