"""The local Hub server against the real huggingface_hub and transformers clients, over real HTTP (no mocks).

The `hub` fixture comes from conftest.py (`hub_server.hub_fixture`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import torch
from hub_server import TEST_TOKENS, HubServer, pointed_at
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file

from hf_m2n2.demo.toy import build_tiny_llama

ALICE, BOB = (next(t for t, user in TEST_TOKENS.items() if user == name) for name in ("alice", "bob"))
REPO = "alice/tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny2") / "model", seed=1)


def folder_files(folder: str | os.PathLike[str]) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def without_gitattributes(files: dict[str, bytes]) -> dict[str, bytes]:
    return {path: content for path, content in files.items() if path != ".gitattributes"}


def changed_folder(tiny: Path) -> Path:
    """A folder differing from `tiny` in one file (so that a push has something to commit)."""
    folder = tiny.parent / "changed"
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("changed\n")
    return folder


def test_upload_folder_then_snapshot_at_pinned_sha(hub, tiny):
    api = HfApi(token=ALICE)
    api.create_repo(REPO, exist_ok=True)
    commit = api.upload_folder(repo_id=REPO, folder_path=tiny, commit_message="first weights")
    assert (
        commit.commit_url == f"{hub.url}/{REPO}/commit/{commit.oid}"
        and commit.commit_message == "first weights"
    )
    snapshot = snapshot_download(REPO, revision=commit.oid)
    downloaded = folder_files(snapshot)
    assert downloaded[".gitattributes"]  # the Hub's initial commit, as on huggingface.co
    assert without_gitattributes(downloaded) == folder_files(tiny)
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *folder_files(tiny)])
    assert api.model_info(REPO).sha == commit.oid == hub.head(REPO)


def test_create_repo_twice_and_identical_push(hub, tiny):
    api = HfApi(token=ALICE)
    url = api.create_repo("tiny", private=False)  # no namespace: the token's user
    assert url.repo_id == REPO and api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    first = api.upload_folder(repo_id=REPO, folder_path=tiny).oid
    # Unchanged files are skipped client-side (preupload gives their blob ids): no new commit, as on the Hub.
    assert api.upload_folder(repo_id=REPO, folder_path=tiny).oid == first == hub.head(REPO)


def test_old_commit_stays_downloadable(hub, tiny, tiny2):
    old = hub.publish(REPO, tiny, ALICE)
    new = hub.publish(REPO, tiny2, ALICE, commit_message="second weights")
    assert [c["sha"] for c in hub.commits(REPO)][-2:] == [old, new]
    assert [c["message"] for c in hub.commits(REPO)] == [
        "initial commit",
        "Upload folder using huggingface_hub",
        "second weights",
    ]
    assert without_gitattributes(folder_files(snapshot_download(REPO, revision=old))) == folder_files(tiny)
    assert without_gitattributes(folder_files(snapshot_download(REPO))) == folder_files(tiny2)
    path = hf_hub_download(REPO, "model.safetensors", revision=old)
    assert Path(path).read_bytes() == (tiny / "model.safetensors").read_bytes()


def test_from_pretrained_at_sha_equals_uploaded_tensors(hub, tiny, tiny2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = hub.publish(REPO, tiny, ALICE)
    hub.publish(REPO, tiny2, ALICE)
    model = AutoModelForCausalLM.from_pretrained(REPO, revision=sha)
    expected = load_file(tiny / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    tokenizer = AutoTokenizer.from_pretrained(REPO, revision=sha)
    assert tokenizer("hello").input_ids == AutoTokenizer.from_pretrained(tiny)("hello").input_ids


def test_private_repo_is_hidden_without_the_owners_token(hub, tiny):
    hub.publish(REPO, tiny, ALICE, private=True)
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        snapshot_download(REPO)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json")
    with pytest.raises(RepositoryNotFoundError) as other_user:
        hf_hub_download(REPO, "config.json", token=BOB)
    assert other_user.value.response.status_code == 404
    assert HfApi(token=ALICE).model_info(REPO).private is True
    assert (
        Path(hf_hub_download(REPO, "config.json", token=ALICE)).read_bytes()
        == (tiny / "config.json").read_bytes()
    )


def test_wrong_token_is_401_and_other_namespace_403(hub, tiny):
    with pytest.raises(HfHubHTTPError) as wrong:
        HfApi(token="hf_not_a_token").create_repo(REPO, exist_ok=True)
    assert wrong.value.response.status_code == 401
    hub.publish(REPO, tiny, ALICE)
    with pytest.raises(HfHubHTTPError) as wrong_push:
        HfApi(token="hf_not_a_token").upload_folder(repo_id=REPO, folder_path=changed_folder(tiny))
    assert wrong_push.value.response.status_code == 401
    bob = HfApi(token=BOB)
    with pytest.raises(HfHubHTTPError) as forbidden:
        bob.create_repo("alice/other")
    assert forbidden.value.response.status_code == 403
    bob.create_repo(REPO, exist_ok=True)  # exists and is readable: huggingface_hub accepts the 403
    with pytest.raises(HfHubHTTPError) as forbidden_push:
        bob.upload_folder(repo_id=REPO, folder_path=changed_folder(tiny))
    assert forbidden_push.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as no_token:
        HfApi(token=False).create_branch(REPO, branch="dev")
    assert no_token.value.response.status_code == 401


def test_whoami(hub):
    assert HfApi(token=ALICE).whoami()["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_not_a_token").whoami()
    assert err.value.response.status_code == 401


def test_missing_repo_revision_and_file_raise_the_hubs_errors(hub, tiny):
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("alice/missing")
    hub.publish(REPO, tiny, ALICE)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")


def _one_file_commit(path: str, content: bytes) -> list[CommitOperationAdd]:
    return [CommitOperationAdd(path_in_repo=path, path_or_fileobj=content)]


def test_server_error_on_commit_leaves_repo_unchanged(hub, tiny):
    sha = hub.publish(REPO, tiny, ALICE)
    hub.fail("POST", r"/commit/", 500)
    api = HfApi(token=ALICE)
    with pytest.raises(HfHubHTTPError) as err:  # create_commit does not retry its commit POST
        api.create_commit(REPO, operations=_one_file_commit("extra.txt", b"x"), commit_message="boom")
    assert err.value.response.status_code == 500
    assert hub.head(REPO) == sha and "extra.txt" not in hub.files(REPO)
    big = os.urandom(3_000_000)  # a few MB travel inline (base64) in the commit
    commit = api.create_commit(REPO, operations=_one_file_commit("extra.bin", big), commit_message="ok")
    assert commit.oid == hub.head(REPO) != sha
    assert Path(hf_hub_download(REPO, "extra.bin")).read_bytes() == big


def test_dropped_commit_is_a_transport_error_and_leaves_repo_unchanged(hub, tiny):
    sha = hub.publish(REPO, tiny, ALICE)
    hub.drop("POST", r"/commit/")
    api = HfApi(token=ALICE)
    with pytest.raises(httpx2.TransportError):
        api.create_commit(
            REPO, operations=_one_file_commit("big.bin", os.urandom(2_000_000)), commit_message="x"
        )
    assert hub.head(REPO) == sha and "big.bin" not in hub.files(REPO)


def test_upload_folder_retries_a_dropped_commit_once(hub, tiny):
    hub.publish(REPO, tiny, ALICE)
    before = hub.head(REPO)
    hub.drop("POST", r"/commit/main")
    # upload_folder (unlike create_commit) retries its commit POST, here after a 1 s sleep.
    commit = HfApi(token=ALICE).upload_folder(repo_id=REPO, folder_path=changed_folder(tiny))
    commits = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert len(commits) == 3 and hub.head(REPO) == commit.oid != before
    assert hub.files(REPO)["notes.txt"] == b"changed\n"


def test_create_pr_is_downloadable_and_leaves_main(hub, tiny):
    main = hub.publish(REPO, tiny, ALICE)
    api = HfApi(token=ALICE)
    commit = api.upload_folder(
        repo_id=REPO, folder_path=changed_folder(tiny), create_pr=True, commit_message="prop"
    )
    assert commit.pr_url == f"{hub.url}/{REPO}/discussions/1" and commit.pr_revision == "refs/pr/1"
    assert hub.head(REPO) == main
    assert (Path(snapshot_download(REPO, revision="refs/pr/1")) / "notes.txt").read_text() == "changed\n"
    # create_commit(create_pr=True) sends `?create_pr=1` and reads `pullRequestUrl` from the commit answer.
    legacy = api.create_commit(
        REPO, operations=_one_file_commit("b.txt", b"b"), commit_message="b", create_pr=True
    )
    assert legacy.pr_revision == "refs/pr/2" and hub.files(REPO, "refs/pr/2")["b.txt"] == b"b"
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert {ref.ref for ref in refs.pull_requests} == {"refs/pr/1", "refs/pr/2"}
    # Anyone may open a pull request on a public repo.
    by_bob = HfApi(token=BOB).upload_folder(repo_id=REPO, folder_path=changed_folder(tiny), create_pr=True)
    assert by_bob.pr_revision == "refs/pr/3"


def test_upload_to_branch(hub, tiny):
    main = hub.publish(REPO, tiny, ALICE)
    api = HfApi(token=ALICE)
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    commit = api.upload_folder(repo_id=REPO, folder_path=changed_folder(tiny), revision="dev")
    assert hub.head(REPO) == main and hub.head(REPO, "dev") == commit.oid
    assert "notes.txt" in api.list_repo_files(REPO, revision="dev")
    assert "notes.txt" not in api.list_repo_files(REPO)
    branches = {ref.name: ref.target_commit for ref in api.list_repo_refs(REPO).branches}
    assert branches == {"main": main, "dev": commit.oid}


def test_model_card_load_and_validate(hub, tiny, tmp_path):
    hub.publish("alice/a", tiny, ALICE)
    hub.publish("alice/b", tiny, ALICE)
    card = "---\nlicense: apache-2.0\nlibrary_name: transformers\nbase_model: [alice/a, alice/b]\n"
    card += "base_model_relation: merge\ntags: [merge]\n---\n# Tiny\n"
    folder = tmp_path / "card"
    folder.mkdir()
    (folder / "README.md").write_text(card)
    hub.publish(REPO, folder, ALICE)
    loaded = ModelCard.load(REPO)
    assert loaded.data.base_model == ["alice/a", "alice/b"] and loaded.data.base_model_relation == "merge"
    assert HfApi().model_info(REPO).card_data.library_name == "transformers"
    loaded.validate()
    with pytest.raises(ValueError, match="base_model_relation"):
        ModelCard(card.replace("relation: merge", "relation: blend")).validate()
    # As on the Hub, base models must be ids of existing models (not local directory names).
    with pytest.raises(ValueError, match='"base_model" with value "ft-a" is not valid'):
        ModelCard(card.replace("alice/a", "ft-a")).validate()
    (folder / "README.md").write_text(card.replace("alice/b", "/models/b"))
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):  # upload_folder checks it first
        HfApi(token=ALICE).upload_folder(repo_id=REPO, folder_path=folder)


def test_tokens_travel_only_in_the_authorization_header(hub, tiny):
    hub.publish(REPO, tiny, ALICE, private=True)
    snapshot_download(REPO, token=ALICE)
    assert hub.requests
    for request in hub.requests:
        assert ALICE not in request.path
        assert all(ALICE not in value for name, value in request.headers.items() if name != "authorization")


def test_hf_endpoint_env_is_enough_in_a_fresh_process(hub, tiny, tmp_path):
    sha = hub.publish(REPO, tiny, ALICE)
    code = (
        "import json, sys; from huggingface_hub import snapshot_download, HfApi;"
        "print(json.dumps([snapshot_download(sys.argv[1]), HfApi().model_info(sys.argv[1]).sha]))"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-c", code, REPO], env=env, capture_output=True, text=True, check=True
    )
    folder, remote_sha = json.loads(out.stdout)
    assert remote_sha == sha and without_gitattributes(folder_files(folder)) == folder_files(tiny)


def test_pointed_at_outside_pytest(tmp_path, tiny):
    with HubServer(tmp_path / "root", {"tok": "carol"}) as server, pointed_at(server.url, tmp_path / "cache"):
        sha = server.publish("carol/tiny", tiny, "tok")
        assert snapshot_download("carol/tiny", revision=sha).startswith(str(tmp_path / "cache"))
    # A new server on the same root serves the same repos.
    with HubServer(tmp_path / "root") as server:
        assert server.head("carol/tiny") == sha
