"""The tiny specialists build: deterministic, cached per part, a specialist better than the base on its skill."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_m2n2.demo.specialists import (
    MARKER,
    PORTABLE_KERNELS,
    SKILLS,
    SpecialistsConfig,
    build_specialists,
    heldout_examples,
    kernels_in_effect,
    main,
    pin_portable_kernels,
    specialists_report,
    task_name,
)

# Reduced builds for CI (the real build's figures are in the build's report.json and the README).
SMALL = SpecialistsConfig(base_steps=200, finetune_steps=100, finetune_lr=3e-3, fitness_size=20, test_size=40)
TINY = SpecialistsConfig(base_steps=5, finetune_steps=2, fitness_size=4, test_size=4)


@pytest.fixture(scope="session")
def small_build(tmp_path_factory, session_builds):
    """The reduced build, under a fixed session path so that test_lm_eval.py reuses it from the cache."""
    session_builds.take("specialists")
    return build_specialists(tmp_path_factory.getbasetemp() / "specialists-small", SMALL)


@pytest.fixture(scope="session")
def small_report(small_build):
    return specialists_report(small_build, points=(0.5,))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for part in ("base", *SKILLS)
        for path in sorted((root / part).iterdir())
    }


def test_layout_is_hub_like_and_tasks_use_absolute_paths(small_build):
    for path in (small_build.base, *small_build.models.values()):
        names = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert small_build.fitness_tasks == ["specialists_add_fit", "specialists_rev_fit"]
    assert small_build.test_tasks == ["specialists_add_test", "specialists_rev_test"]
    for name in small_build.fitness_tasks + small_build.test_tasks:
        text = (small_build.tasks_dir / f"{name}.yaml").read_text()
        data = Path(json.loads(text.split("test: ", 1)[1].splitlines()[0]))
        assert data.is_absolute() and data.is_file()


def test_splits_are_disjoint_and_sized():
    examples = heldout_examples(SMALL)
    for skill in SKILLS:
        fit, test = examples[skill]["fit"], examples[skill]["test"]
        assert (len(fit), len(test)) == (SMALL.fitness_size, SMALL.test_size)
        assert not {p for p, _ in fit} & {p for p, _ in test}
    assert examples["add"]["fit"][0][0].endswith("=")
    prompt, answer = examples["rev"]["fit"][0]
    assert answer == prompt[:-1][::-1].upper()


def test_build_is_deterministic_and_cached(tmp_path):
    lines: list[str] = []
    first = build_specialists(tmp_path / "one", TINY, log=lines.append)
    assert all("built" in line for line in lines)
    build_specialists(tmp_path / "two", TINY)
    assert _digests(first.root) == _digests(tmp_path / "two")

    lines.clear()
    mtime = (first.base / "model.safetensors").stat().st_mtime_ns
    build_specialists(tmp_path / "one", TINY, log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["tasks", "base", "add", "rev"]
    assert all("cached" in line for line in lines)
    assert (first.base / "model.safetensors").stat().st_mtime_ns == mtime


def test_changed_finetune_rebuilds_only_the_specialists(tmp_path):
    build_specialists(tmp_path, TINY)
    lines: list[str] = []
    changed = SpecialistsConfig(**{**TINY.__dict__, "finetune_steps": 6})
    build_specialists(tmp_path, changed, log=lines.append)
    status = {line.split(":")[0]: line.split(":")[1].split()[0] for line in lines}
    assert status == {"tasks": "cached", "base": "cached", "add": "built", "rev": "built"}


def test_incomplete_part_is_rebuilt(tmp_path):
    built = build_specialists(tmp_path, TINY)
    (built.models["add"] / ".hf_m2n2_build.json").unlink()  # as if the build died before the marker
    lines: list[str] = []
    build_specialists(tmp_path, TINY, log=lines.append)
    assert any(line.startswith("add: built") for line in lines)


def test_specialist_beats_base_on_its_skill(small_report):
    # In the reduced CI build the text skill is learned; addition needs the full build (see the README's table).
    assert small_report["rev"]["rev"] >= small_report["base"]["rev"] + 0.3
    assert small_report["rev"]["rev"] > small_report["add"]["rev"]
    for row in small_report.values():
        assert row["mean"] == pytest.approx((row["add"] + row["rev"]) / 2)


def test_cli_builds_with_overrides(tmp_path, capsys):
    params = [
        f"--param={name}={getattr(TINY, name)}"
        for name in ("base_steps", "finetune_steps", "fitness_size", "test_size")
    ]
    assert main([str(tmp_path), *params]) == 0
    out = capsys.readouterr().out
    assert "base: built" in out and (tmp_path / "rev" / "model.safetensors").is_file()
    assert _digests(tmp_path) == _digests(build_specialists(tmp_path / "api", TINY).root)


def test_cli_build_uses_portable_kernels_and_other_kernels_rebuild(tmp_path):
    # The command line pins torch's unvectorized kernels and MKL's SSE2-only branch before torch loads (when the
    # environment names no others); its marker says so. A build made under other kernels is not reused.
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}
    params = [f"--param={name}={value}" for name, value in TINY.__dict__.items()]
    cmd = [sys.executable, "-m", "hf_m2n2.demo.specialists", str(tmp_path), *params]
    subprocess.run(cmd, check=True, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    kernels = json.loads((tmp_path / "base" / MARKER).read_text())["kernels"]
    assert (kernels["cpu_capability"], kernels["mkl_cbwr"]) == ("DEFAULT", "COMPATIBLE")

    before = dict(os.environ)
    assert pin_portable_kernels() is False  # torch is loaded here: nothing changes, nothing leaks to children
    assert dict(os.environ) == before
    if kernels_in_effect() != kernels:
        lines: list[str] = []
        build_specialists(tmp_path, TINY, log=lines.append)
        status = {line.split(":")[0]: line.split(":")[1].split()[0] for line in lines}
        assert status == {"tasks": "cached", "base": "built", "add": "built", "rev": "built"}


def test_cli_rejects_unknown_parameter(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--param", "depth=3"])


def test_task_names():
    assert task_name("add", "fit") == "specialists_add_fit"
    assert torch.get_num_threads() == 1
