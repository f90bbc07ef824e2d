"""Publishing a result directory (a merged or evolved model) to the Hub with huggingface_hub.

Tokens come from huggingface_hub's standard lookup (`HF_TOKEN`, then the login cache) unless one is passed;
they are never printed, logged or written: error messages are built from status codes, repo ids and the server's
message with the token masked (a proxy may echo the Authorization header; `hf_m2n2.hub_log`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hf_m2n2 import locks
from hf_m2n2.errors import OutputError, PushError, first_line
from hf_m2n2.hub import http_error_message
from hf_m2n2.hub_log import mask_secrets, masking

log = logging.getLogger(__name__)

# Never uploaded: temporary siblings and hidden files (e.g. editor backups, .cache of hf_hub_download).
IGNORE_PATTERNS = [".*", "**/.*", "*.tmp"]


@dataclass(frozen=True)
class PushResult:
    """Where the upload landed.

    Attributes:
        repo_url: `https://huggingface.co/ORG/NAME` (or the endpoint's equivalent).
        commit_oid: the sha of the new commit.
        commit_url: the commit's page.
        pr_url: the pull request's page when `create_pr` was asked for.
    """

    repo_id: str
    repo_url: str
    commit_oid: str
    commit_url: str
    pr_url: str | None = None


def check_repo_id(repo_id: str) -> None:
    """Raises PushError naming the rule an invalid repo id breaks (huggingface_hub's own check)."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as exc:  # HFValidationError
        raise PushError(f"invalid repo id {repo_id!r}: {first_line(exc)}") from exc


def default_commit_message(out_dir: str | os.PathLike[str]) -> str:
    """`hf-m2n2: ties merge of org/a, org/b` (or `m2n2 evolution of ...`), from the card.json written with the
    model; a generic message for directories that have none."""
    path = Path(out_dir) / "card.json"
    try:
        info = json.loads(path.read_text())
        seeds = ", ".join(dict.fromkeys(m["name"] for m in info["models"]))
        what = "evolution" if info["kind"] == "evolve" else "merge"
        return f"hf-m2n2: {info['method']} {what} of {seeds}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"hf-m2n2: upload {Path(out_dir).name}"


def push_folder(
    out_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Create the repo if needed (`create_repo(exist_ok=True)`) and upload `out_dir` in one commit.

    Pushing the same directory twice is harmless: the second commit changes nothing.

    Args:
        out_dir: a result directory (`hf-m2n2 merge` output or an evolve run's `model/`).
        repo_id: `ORG/NAME` (or `NAME` in the token owner's namespace).
        private: visibility of a newly created repo (an existing repo keeps its own).
        revision: branch to commit to (created from main if missing).
        commit_message: default: the method or algorithm and the seeds, from `card.json`.
        create_pr: open a pull request instead of committing to the branch.
        token: a Hub token; None uses `HF_TOKEN` or the login cache.
        endpoint: Hub URL; None uses `HF_ENDPOINT` (default https://huggingface.co).

    Returns:
        the repo URL and the commit (and PR) URLs.

    Raises:
        PushError: invalid repo id or directory, authentication or permission failure, server or network error.

    Example:
        >>> push_folder("out/merged", "me/my-merge").commit_url
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise PushError(f"{repo_id}: HF_HUB_OFFLINE=1 is set: unset it to push (nothing was sent)")
    out = Path(out_dir)
    # a diffusers pipeline keeps its weights in component folders (unet/, vae/, ...)
    weights = "*/*.safetensors" if (out / "model_index.json").is_file() else "*.safetensors"
    if not out.is_dir() or not any(out.glob(weights)):
        raise PushError(f"{out}: not a model directory (no {weights} files)")
    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or default_commit_message(out)
    # the explicit token is masked for this call only (a Space visitor's must not stay in the process)
    with masking(token), _hub_errors(repo_id), _hub_view(out, repo_id) as folder:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = url.repo_id
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
            ignore_patterns=IGNORE_PATTERNS,
        )
    log.info("pushed %s to %s (%s)", out, repo_id, commit.oid)
    return PushResult(
        repo_id=repo_id,
        repo_url=str(url),
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        pr_url=commit.pr_url,
    )


@contextlib.contextmanager
def _hub_view(out: Path, repo_id: str) -> Iterator[Path]:
    """The folder to upload: `out` itself, or, when its card must change for the Hub (the repo id in the usage
    snippet; seeds from local directories, which the Hub rejects as `base_model`), a hidden sibling of links to
    its files with that card. `out` itself is never modified."""
    from hf_m2n2.card import CARD_INFO, CardInfo, render_card

    if not (out / CARD_INFO).is_file():
        yield out
        return
    info = CardInfo.load(out)
    info.model_id = repo_id
    card = str(render_card(info, for_hub=True))
    readme = out / "README.md"
    if readme.is_file() and readme.read_text() == card:
        yield out
        return
    parent = out.resolve().parent
    with contextlib.suppress(OSError):  # a read-only parent has nothing of ours to remove
        locks.sweep_dead(parent, f".{glob.escape(out.name)}.push-*")  # left by a push that was killed
    with contextlib.ExitStack() as stack:
        try:
            view = stack.enter_context(locks.temporary(parent, out.name, "push"))
        except OutputError:  # a read-only parent: links from the system's temporary directory
            view = stack.enter_context(locks.temporary(Path(tempfile.gettempdir()), out.name, "push"))
        _link_tree(out, view.path, skip={"README.md"})
        (view.path / "README.md").write_text(card)
        yield view.path


def _link_tree(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    """Recreate `src`'s folders under `dst` with links to its files (upload_folder does not enter linked folders)."""
    for path in src.iterdir():
        if path.name in skip or path.name.startswith("."):
            continue
        if path.is_dir():
            (dst / path.name).mkdir()
            _link_tree(path, dst / path.name)
            continue
        try:
            os.link(path, dst / path.name)  # same filesystem: no copy of the weights
        except OSError:
            os.symlink(path.resolve(), dst / path.name)


class _hub_errors:
    """Translate huggingface_hub and network exceptions into one-line PushErrors (no URLs with secrets)."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        raise PushError(_describe(self.repo_id, exc)) from exc


def _describe(repo_id: str, exc: Exception) -> str:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled):
        return f"{repo_id}: HF_HUB_OFFLINE=1 is set: unset it to push"
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo_id}: revision not found"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo_id}: repository not found, or no write access with this token"
    if isinstance(exc, HfHubHTTPError):
        return http_error_message(repo_id, exc)
    if _is_network_error(exc):
        return f"{repo_id}: network error while pushing ({type(exc).__name__}); nothing was committed"
    return f"{repo_id}: push failed: {mask_secrets(first_line(exc))}"


def _is_network_error(exc: BaseException | None) -> bool:
    """A transport failure (refused, reset, timeout) of whichever httpx flavour this huggingface_hub uses."""
    while exc is not None:
        transport = any(
            c.__name__ == "TransportError" and c.__module__.startswith("httpx") for c in type(exc).__mro__
        )
        if transport or isinstance(exc, ConnectionError | TimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(frozen=True)
class PushTarget:
    """Where a finished run publishes: the spec's `output:` section, overridden by `--push`/`--private`."""

    repo_id: str
    private: bool = False
    revision: str | None = None

    @classmethod
    def resolve(cls, output, repo_id: str | None = None, private: bool | None = None) -> PushTarget | None:
        """The target from `output` (an `OutputConfig` or None) and the command-line overrides; the repo id is
        checked here, before any work.

        Raises:
            PushError: the repo id is invalid.
        """
        repo = repo_id or (output.push_to_hub if output else None)
        if not repo:
            return None
        check_repo_id(repo)
        visibility = private if private is not None else bool(output and output.private)
        same_repo = output is not None and output.push_to_hub == repo
        return cls(repo, visibility, output.revision if same_repo else None)

    def push(self, out_dir: str | os.PathLike[str], token: str | None = None) -> PushResult:
        """Upload a finished result; a failure says that the local result is complete and how to retry."""
        try:
            # private=None keeps the namespace's default visibility for a new repo (e.g. an organisation's)
            return push_folder(
                out_dir, self.repo_id, private=self.private or None, revision=self.revision, token=token
            )
        except PushError as exc:
            retry = f"hf-m2n2 push {out_dir} {self.repo_id}"
            retry += " --private" if self.private else ""
            retry += f" --revision {self.revision}" if self.revision else ""
            raise PushError(f"{exc} (the result is complete in {out_dir}: retry with {retry})") from exc
