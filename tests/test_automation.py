"""scripts/push_to_hub.sh, the one script the push-to-hub workflow and the composite action run, end to end in a
fresh process against the local Hub-protocol server (reached through HF_ENDPOINT, as on GitHub through the
real Hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "push_to_hub.sh"


def _run_script(hub, spec: Path, repo_id: str, work: Path, token: str, **env) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(work / "hf_home"),
        "HF_TOKEN": token,
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), str(spec), repo_id, str(work)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture
def hub_seeds(hub, seeds):
    token = hub.token_of("alice")
    for name, key in (("alice/tiny-base", "base"), ("alice/ft-a", "a"), ("alice/ft-b", "b")):
        hub.publish(name, seeds[key], token)
    return token


@pytest.mark.parametrize("kind", ["merge", "evolve"])
def test_script_runs_the_spec_pushes_and_collects_artifacts(hub, hub_seeds, tmp_path, kind):
    if kind == "merge":
        spec = {
            "merge_method": "task_arithmetic",
            "base_model": "alice/tiny-base",
            "models": [
                {"model": "alice/ft-a", "parameters": {"weight": 0.5}},
                {"model": "alice/ft-b", "parameters": {"weight": 0.5}},
            ],
        }
    else:
        from test_evolve_models import _spec

        spec = _spec({"a": "alice/ft-a", "b": "alice/ft-b"}, budget=4)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    work = tmp_path / "work"
    result = _run_script(hub, path, f"alice/{kind}-ci", work, hub_seeds, PRIVATE="true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"pushed to {hub.url}/alice/{kind}-ci" in result.stdout
    assert hub_seeds not in result.stdout + result.stderr

    files = hub.files(f"alice/{kind}-ci")
    model_dir = work / "result" / ("model" if kind == "evolve" else "")
    assert files["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == (
        ["alice/tiny-base", "alice/ft-a", "alice/ft-b"] if kind == "merge" else ["alice/ft-a", "alice/ft-b"]
    )
    artifacts = {p.name for p in (work / "artifacts").iterdir()}
    expected = {"README.md", "card.json"} | (
        {"merge_config.yaml"} if kind == "merge" else {"recipe.json", "report.json", "fitness.png"}
    )
    assert expected <= artifacts, artifacts
    assert json.loads((work / "artifacts" / "card.json").read_text())["model_id"] == f"alice/{kind}-ci"
    from huggingface_hub import HfApi

    assert HfApi(token=hub_seeds).repo_info(f"alice/{kind}-ci").private  # PRIVATE=true


def test_script_fails_with_exit_2_on_a_bad_token(hub, hub_seeds, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "models": [{"model": "alice/ft-a"}, {"model": "alice/ft-b"}]}
        )
    )
    result = _run_script(hub, spec, "alice/bad-token", tmp_path / "work", "hf_not_a_valid_token")
    assert result.returncode == 2
    assert "authentication failed (HTTP 401)" in result.stderr
    assert "hf_not_a_valid_token" not in result.stdout + result.stderr
