"""Shared fixtures: tiny seed checkpoints built once per session, offline Hugging Face settings, CLI runner."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Before anything imports huggingface_hub (it reads these once): offline, and a private HF cache for the session.
_HF_HOME = tempfile.mkdtemp(prefix="hf_m2n2_test_hf_home_")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from hf_m2n2.demo.toy import build_tiny_llama  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def session_builds(request, tmp_path_factory):
    """The reduced specialists, the reduced text-to-image world and test_t2i_compare's comparison, made by a
    low-priority child process from the session's start when collected tests need them (tests/session_builds.py);
    their fixtures call `.take(part)` and make the part themselves when the child has not."""
    from session_builds import SessionBuilds

    fixtures = {name for item in request.session.items for name in item.fixturenames}
    builds = SessionBuilds(tmp_path_factory.getbasetemp(), fixtures)
    yield builds
    builds.stop()


@pytest.fixture(scope="session")
def hf_home() -> Path:
    return Path(_HF_HOME)


@pytest.fixture(scope="session")
def seeds(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama seeds: a base, two fine-tunes of it, one with an extra token (260 embedding rows), one with a
    different license, one of a different hidden size, and a tiny GPT-2."""
    root = tmp_path_factory.mktemp("seeds")
    out = {
        "base": build_tiny_llama(root / "base", seed=0, license="apache-2.0"),
    }
    out["a"] = build_tiny_llama(root / "ft-a", seed=1, base=out["base"], license="apache-2.0")
    out["b"] = build_tiny_llama(root / "ft-b", seed=2, base=out["base"], license="apache-2.0")
    out["wide"] = build_tiny_llama(
        root / "ft-wide", seed=3, base=out["base"], extra_tokens=["<extra_tok>"], license="mit"
    )
    out["narrow"] = build_tiny_llama(root / "narrow", seed=4, hidden=32)
    out["gpt2"] = _tiny_gpt2(root / "gpt2")
    return out


def _tiny_gpt2(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    model.save_pretrained(str(path))
    return path


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec mapping (or raw text) to a YAML file and return its path."""

    def write(spec, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
        return path

    return write


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh local Hub-protocol server (users alice and bob), huggingface_hub and transformers pointed at it."""
    from hub_server import hub_fixture

    yield from hub_fixture(tmp_path, monkeypatch)


@pytest.fixture
def cli(capsys):
    """Run `hf-m2n2 ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from hf_m2n2.cli import main

    def run(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def populate_hf_cache(hf_home: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> None:
    """Lay out a model repo in the Hugging Face cache as huggingface_hub itself does (offline resolution)."""
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for sha, src in snapshots.items():
        shutil.copytree(src, repo_dir / "snapshots" / sha)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for ref, sha in refs.items():
        (repo_dir / "refs" / ref).write_text(sha)


@pytest.fixture(scope="session")
def cached_repo(seeds, hf_home) -> dict[str, str]:
    """`hf-m2n2-test/tiny-ft` in the offline cache: `main` is ft-a's weights, an older commit holds ft-b's."""
    repo_id = "hf-m2n2-test/tiny-ft"
    main_sha, old_sha = "a" * 40, "b" * 40
    populate_hf_cache(hf_home, repo_id, {main_sha: seeds["a"], old_sha: seeds["b"]}, {"main": main_sha})
    return {"repo_id": repo_id, "main": main_sha, "old": old_sha}


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    """Tiny diffusers pipelines (hf_m2n2.demo.tiny_pipelines): per family a base and two UNet fine-tunes of it
    (`sd1`, `sd1-a`, `sd1-b`, `sdxl`, `sdxl-a`, `sdxl-b`, `sd2`); `sd1-a` also has an fp16 variant of its weights,
    `sd1-te` a fine-tuned text encoder too, `sd1-b-sharded` is `sd1-b` saved in shards (and an fp16 variant, in shards
    too). Their parameters: helpers.TINY_PIPELINES."""
    from helpers import TINY_PIPELINES

    from hf_m2n2.demo.tiny_pipelines import build_tiny_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    return {
        name: build_tiny_pipeline(root / name, family, **kwargs)
        for name, (family, kwargs) in TINY_PIPELINES.items()
    }


@pytest.fixture(scope="session")
def clip_judge(tmp_path_factory) -> Path:
    """A tiny random CLIP judge (CLIPModel + CLIPProcessor, 32x32 images) for `evaluate: {kind: clip}`."""
    from helpers import CLIP_JUDGE_SEED

    from hf_m2n2.demo.tiny_pipelines import build_tiny_judge

    return build_tiny_judge(tmp_path_factory.mktemp("clip-judge") / "judge", seed=CLIP_JUDGE_SEED)
