"""Hub round trip over real HTTP: seeds pulled by repo id from the local Hub-protocol server, the merge pushed
back with `--push` / `hf-m2n2 push`, loaded again with transformers; every failure is one line, exit 2, and the
local result intact; the token never shows up in output or files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_dir
from huggingface_hub import ModelCard

from hf_m2n2.evolve.runs import start_runs

ALICE_REPO = "alice/merged"


@pytest.fixture
def published(hub, seeds):
    """alice/tiny-base (public), alice/tiny-ft (main = ft-a, an older commit = ft-b), alice/secret (private)."""
    token = hub.token_of("alice")
    hub.publish("alice/tiny-base", seeds["base"], token)
    old = hub.publish("alice/tiny-ft", seeds["b"], token, commit_message="ft-b")
    main = hub.publish("alice/tiny-ft", seeds["a"], token, commit_message="ft-a")
    hub.publish("alice/secret", seeds["b"], token, private=True)
    return {"old": old, "main": main, "token": token}


def _ties_spec(tmp_path: Path, published: dict, **extra) -> Path:
    spec = {
        "merge_method": "ties",
        "base_model": "alice/tiny-base",
        "models": [
            {"model": f"alice/tiny-ft@{published['main']}", "parameters": {"weight": 0.6, "density": 0.7}},
            {"model": f"alice/tiny-ft@{published['old']}", "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _all_text_written(*roots: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace") for root in roots for p in root.rglob("*") if p.is_file()
    )


def test_round_trip_merge_pull_push_and_load_back(hub, published, seeds, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", published["token"])
    spec = _ties_spec(tmp_path, published, output={"push_to_hub": ALICE_REPO})
    out = tmp_path / "merged"
    code, stdout, stderr = cli("merge", spec, out)
    assert code == 0, stderr
    head = hub.head(ALICE_REPO)
    assert f"pushed to {hub.url}/{ALICE_REPO} (commit {hub.url}/{ALICE_REPO}/commit/{head})" in stdout

    # the merge pulled the pinned revisions: it equals the merge of the local seed directories
    local = tmp_path / "local"
    local_spec = yaml.safe_load(spec.read_text())
    local_spec.pop("output")
    local_spec["base_model"] = str(seeds["base"])
    local_spec["models"][0]["model"], local_spec["models"][1]["model"] = str(seeds["a"]), str(seeds["b"])
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local_spec))
    assert cli("merge", tmp_path / "local.yaml", local, "--quiet")[0] == 0
    merged = load_dir(out)
    assert all(torch.equal(merged[k], v) for k, v in load_dir(local).items())

    # what the server holds loads with transformers and equals the local output, tensor for tensor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ALICE_REPO, dtype=torch.float32)
    state = model.state_dict()
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor.to(torch.float32)), name

    card = ModelCard.load(ALICE_REPO)
    assert card.data.base_model == ["alice/tiny-base", "alice/tiny-ft"]
    assert card.data.base_model_relation == "merge" and card.data.library_name == "transformers"
    assert {"merge", "hf-m2n2", "ties"} <= set(card.data.tags)
    assert published["main"] in card.text and published["old"] in card.text
    assert f'model_id = "{ALICE_REPO}"' in card.text
    assert (
        hub.commits(ALICE_REPO, "main")[-1]["message"]
        == "hf-m2n2: ties merge of alice/tiny-base, alice/tiny-ft"
    )

    # eval results added with `hf-m2n2 card`, pushed again: the Hub's YAML check accepts the model-index
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"gsm8k": {"exact_match,strict-match": 0.31}}}))
    assert cli("card", out, "--eval-results", results, "--quiet")[0] == 0
    code, stdout, stderr = cli("push", out, ALICE_REPO)
    assert code == 0, stderr
    card = ModelCard.load(ALICE_REPO)
    card.validate()  # POST /api/validate-yaml on the server
    metric = card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]
    assert metric == {"type": "exact_match strict-match", "value": 0.31}

    # pushing the same directory again is harmless and changes no file
    before = hub.files(ALICE_REPO)
    code, stdout, _ = cli("push", out, ALICE_REPO, "--commit-message", "again")
    assert code == 0 and "pushed to" in stdout
    assert hub.files(ALICE_REPO) == before


def test_pushed_card_links_hub_seeds_only_and_names_the_repo(
    hub, published, seeds, cli, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", published["token"])
    spec = _ties_spec(tmp_path, published)
    data = yaml.safe_load(spec.read_text())
    data["base_model"] = str(seeds["base"])  # a local directory
    spec.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert cli("merge", spec, out, "--quiet")[0] == 0
    (out / "extras").mkdir()
    (out / "extras" / "notes.txt").write_text("a file in a subfolder\n")
    local_before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    killed = tmp_path / ".out.push-999999-abcd"  # the upload view of a push that was killed (no live owner)
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"")
    code, _, stderr = cli("push", out, ALICE_REPO)
    assert code == 0, stderr
    pushed = ModelCard(hub.files(ALICE_REPO)["README.md"].decode())
    assert pushed.data.base_model == ["alice/tiny-ft"] and pushed.data.base_model_relation == "merge"
    assert "Seeds from local directories (base)" in pushed.text
    assert f'model_id = "{ALICE_REPO}"' in pushed.text
    assert ModelCard.load(out / "README.md").data.base_model == ["base", "alice/tiny-ft"]  # local card as is
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == local_before
    assert not [p for p in tmp_path.iterdir() if ".push-" in p.name]  # this upload view and the killed one's
    assert hub.files(ALICE_REPO)["extras/notes.txt"] == b"a file in a subfolder\n"
    assert hub.files(ALICE_REPO)["model.safetensors"] == local_before["model.safetensors"]


def test_push_to_a_branch_and_as_a_pull_request(hub, published, seeds, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", published["token"])
    out = tmp_path / "out"
    assert cli("merge", _ties_spec(tmp_path, published), out, "--quiet")[0] == 0
    code, stdout, stderr = cli("push", out, ALICE_REPO, "--revision", "candidate", "--private")
    assert code == 0, stderr
    assert "model.safetensors" in hub.files(ALICE_REPO, "candidate")
    code, stdout, stderr = cli("push", out, ALICE_REPO, "--create-pr")
    assert code == 0, stderr
    assert f"pull request: {hub.url}/{ALICE_REPO}/discussions/1" in stdout
    assert "model.safetensors" in hub.files(ALICE_REPO, "refs/pr/1")
    # private: alice reads it, anonymous and bob do not
    monkeypatch.delenv("HF_TOKEN")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    assert HfApi(token=published["token"]).repo_info(ALICE_REPO).private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=hub.token_of("bob")).repo_info(ALICE_REPO)


def test_token_is_never_printed_logged_or_written(hub, published, cli, tmp_path, monkeypatch, caplog):
    token = published["token"]
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level("DEBUG")
    out = tmp_path / "out"
    code, stdout, stderr = cli("merge", _ties_spec(tmp_path, published), out, "--push", ALICE_REPO, "-v")
    assert code == 0, stderr
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_for_the_error_path")
    code2, stdout2, stderr2 = cli("push", out, ALICE_REPO)
    assert code2 == 2
    printed = stdout + stderr + stdout2 + stderr2 + caplog.text
    assert token not in printed and "hf_wrong_token_for_the_error_path" not in printed
    assert token not in _all_text_written(out, tmp_path)
    assert token not in "\n".join(
        content.decode("utf-8", "replace") for content in hub.files(ALICE_REPO).values()
    )
    # on the wire, the token travels only in the Authorization header
    sent = [r for r in hub.requests if token in json.dumps([r.path, dict(r.headers)])]
    assert sent and all(token not in r.path for r in sent)
    assert all(
        r.headers.get("authorization") == f"Bearer {token}" for r in sent if "authorization" in r.headers
    )


def _check_failure(code: int, stderr: str, fragment: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], stderr


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("unknown repo", "alice/nope: repository not found"),
        ("private without token", "alice/secret: repository not found (or private and no valid token)"),
        ("invalid repo id", "invalid model reference"),
    ],
)
def test_pull_failures(hub, published, cli, tmp_path, monkeypatch, case, fragment):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    model = {
        "unknown repo": "alice/nope",
        "private without token": "alice/secret",
        "invalid repo id": "a/b--c",
    }[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": model}, {"model": "alice/tiny-base"}]})
    )
    out = tmp_path / "out"
    code, _, stderr = cli("merge", spec, out, "--quiet")
    _check_failure(code, stderr, fragment)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("no token", "authentication failed (HTTP 401)"),
        ("wrong token", "authentication failed (HTTP 401)"),
        ("other namespace", "permission denied (HTTP 403)"),
        ("server error", "Hub request failed (HTTP 500)"),
        ("network drop mid-upload", "network error while pushing"),
        ("invalid repo id", "invalid repo id 'alice/bad name!'"),
    ],
)
def test_push_failures_leave_the_local_output_and_the_repo_untouched(
    hub, published, cli, tmp_path, monkeypatch, case, fragment
):
    monkeypatch.setenv("HF_TOKEN", published["token"])
    out = tmp_path / "out"
    assert cli("merge", _ties_spec(tmp_path, published), out, "--push", ALICE_REPO, "--quiet")[0] == 0
    before_local = {p.name: p.read_bytes() for p in out.iterdir()}
    before_remote = hub.head(ALICE_REPO)
    (out / "extra.txt").write_text("a change to push\n")
    before_local["extra.txt"] = b"a change to push\n"
    repo = ALICE_REPO
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))  # no login cache either
        monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "empty_home" / "token"))
    elif case == "wrong token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")
    elif case == "other namespace":
        monkeypatch.setenv("HF_TOKEN", hub.token_of("bob"))
    elif case == "server error":
        hub.fail("POST", r"/api/repos/create", 500)
    elif case == "network drop mid-upload":
        monkeypatch.setattr(
            "huggingface_hub.utils._http.time.sleep", lambda seconds: None
        )  # skip retry waits
        hub.drop("POST", r"/commit/", times=None)
    elif case == "invalid repo id":
        repo = "alice/bad name!"
    code, _, stderr = cli("push", out, repo)
    _check_failure(code, stderr, fragment)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before_local
    assert hub.head(ALICE_REPO) == before_remote


def test_a_single_dropped_connection_is_retried_by_huggingface_hub(
    hub, published, cli, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", published["token"])
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    out = tmp_path / "out"
    assert cli("merge", _ties_spec(tmp_path, published), out, "--quiet")[0] == 0
    hub.drop("POST", r"/commit/", times=1)
    code, stdout, stderr = cli("push", out, ALICE_REPO)
    assert code == 0, stderr
    assert hub.files(ALICE_REPO)["model.safetensors"] == (out / "model.safetensors").read_bytes()


def test_merge_push_failure_keeps_the_finished_merge(hub, published, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token_of("bob"))
    out = tmp_path / "out"
    code, _, stderr = cli("merge", _ties_spec(tmp_path, published), out, "--push", ALICE_REPO, "--quiet")
    _check_failure(code, stderr, "permission denied (HTTP 403)")
    assert "the result is complete in" in stderr and (out / "model.safetensors").is_file()


def test_evolve_pushes_the_exported_model(hub, seeds, tmp_path, monkeypatch):
    from test_evolve_models import _spec

    token = hub.token_of("alice")
    monkeypatch.setenv("HF_TOKEN", token)
    hub.publish("alice/ft-a", seeds["a"], token)
    hub.publish("alice/ft-b", seeds["b"], token)
    spec = {**_spec(seeds, budget=4), "output": {"push_to_hub": "alice/evolved", "private": True}}
    spec["models"] = [{"model": "alice/ft-a"}, {"model": "alice/ft-b"}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    [summary] = start_runs(path, tmp_path / "run", progress=False)
    assert summary["push"]["commit_oid"] == hub.head("alice/evolved")
    files = hub.files("alice/evolved")
    model = tmp_path / "run" / "model"
    assert files["model.safetensors"] == (model / "model.safetensors").read_bytes()
    assert {"README.md", "recipe.json", "card.json", "config.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == ["alice/ft-a", "alice/ft-b"] and card.data.base_model_relation == "merge"
    assert {"merge", "m2n2", "hf-m2n2"} <= set(card.data.tags)
    assert card.data.to_dict()["model-index"][0]["name"] == "tiny-m2n2"
    assert 'from_pretrained("alice/evolved")' in card.text
    from huggingface_hub import HfApi

    assert HfApi(token=os.environ["HF_TOKEN"]).repo_info("alice/evolved").private


def test_resume_pushes_a_finished_run_whose_upload_failed(hub, seeds, tmp_path, monkeypatch):
    from test_evolve_models import _spec

    from hf_m2n2.evolve.runs import resume_runs
    from hf_m2n2.push import PushError

    monkeypatch.setenv("HF_TOKEN", hub.token_of("alice"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(seeds, budget=3)))
    hub.fail("POST", r"/api/repos/create", 500)
    with pytest.raises(
        PushError, match=r"HTTP 500.*retry with hf-m2n2 push .*/model alice/evolved --private"
    ):
        start_runs(path, tmp_path / "run", progress=False, push_to_hub="alice/evolved", private=True)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    [summary] = resume_runs(tmp_path / "run", progress=False)
    assert summary["push"]["commit_oid"] == hub.head("alice/evolved")
    assert json.loads((tmp_path / "run" / "push.json").read_text())["repo_id"] == "alice/evolved"
    assert "push" not in resume_runs(tmp_path / "run", progress=False)[0]  # pushed once, not again


def test_an_invalid_push_repo_id_fails_before_any_work(seeds, cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}]}
        )
    )
    code, _, err = cli("merge", spec, tmp_path / "out", "--push", "bad repo id!")
    assert code == 2 and "invalid repo id 'bad repo id!'" in err and not (tmp_path / "out").exists()
