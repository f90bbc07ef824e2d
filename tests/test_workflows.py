"""The GitHub workflows and the composite action pass two linters from PyPI: check-jsonschema against
SchemaStore's workflow/action schemas, and zizmor's audits (offline)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is a dev dependency (pip install -e .[dev])"
    return path


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT)


def test_workflows_and_action_match_the_schemas():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "push-to-hub.yml"}
    schema = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *WORKFLOWS)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    action = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", ROOT / "action.yml")
    assert action.returncode == 0, action.stdout + action.stderr


def test_zizmor_finds_nothing_medium_or_worse():
    result = _run(_tool("zizmor"), "--offline", "--min-severity", "medium", *WORKFLOWS, ROOT / "action.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_linters_reject_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    stepz: []\n")
    assert (
        _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", broken).returncode != 0
    )
    injectable = tmp_path / "injectable.yml"
    injectable.write_text(
        "on:\n  issues:\n    types: [opened]\npermissions: {}\njobs:\n  x:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ github.event.issue.title }}\n"
    )
    assert _run(_tool("zizmor"), "--offline", "--min-severity", "medium", injectable).returncode != 0


def test_the_workflow_runs_the_action_and_the_action_runs_the_tested_script():
    import yaml

    workflow = yaml.safe_load((ROOT / ".github/workflows/push-to-hub.yml").read_text())
    steps = workflow["jobs"]["push"]["steps"]
    assert any(step.get("uses") == "./" for step in steps)
    inputs = workflow[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as True
    assert {"spec", "repo_id", "private"} <= set(inputs)
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert {"spec", "repo-id", "hf-token", "python-version"} <= set(action["inputs"])
    runs = [step.get("run", "") for step in action["runs"]["steps"]]
    assert any("scripts/push_to_hub.sh" in run for run in runs)
