"""Model references (`org/name`, `org/name@revision`, a local directory, `base+adapter`) resolved to local files
and a pinned sha."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from hf_m2n2.errors import ModelResolutionError, first_line

# What a merge needs from a repo: weights, configs, tokenizer files and the card (for its license).
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
SUPPORT_PATTERNS = [
    "*.json",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "vocab.txt",
    "merges.txt",
    "*.jinja",
    "README.md",
]
# A PEFT adapter repo: its config, its weights (safetensors, else the pickle) and its card.
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
ADAPTER_BIN_PATTERNS = ["adapter_config.json", "adapter_model.bin", "README.md"]

_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to a local directory.

    Attributes:
        ref: the reference as written in the spec.
        path: local directory holding the files.
        repo_id: Hub repo id, or None for a local directory.
        revision: the revision asked for (branch, tag or sha), if any.
        commit: the pinned commit sha the files come from (None for a local directory).
        adapter: for a `base+adapter` reference, the resolved PEFT LoRA adapter applied to this base (the other
            attributes describe the base).
    """

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    adapter: ResolvedModel | None = None

    @property
    def name(self) -> str:
        """A readable name for cards and logs: the repo id, or the directory name for local models
        (`base+adapter` for a LoRA reference)."""
        own = self.repo_id or self.path.name
        return f"{own}+{self.adapter.name}" if self.adapter else own

    @property
    def pinned(self) -> str:
        """`org/name@sha` for Hub models, the directory name for local ones (`base@sha+adapter@sha` with a LoRA)."""
        own = (
            f"{self.repo_id}@{self.commit}"
            if self.repo_id and self.commit
            else (self.repo_id or self.path.name)
        )
        return f"{own}+{self.adapter.pinned}" if self.adapter else own

    @property
    def locator(self) -> str:
        """How a spec or recipe finds this model again: `repo_id@commit` for Hub models, the absolute directory
        otherwise (`BASE+ADAPTER` of those with a LoRA)."""
        own = f"{self.repo_id}@{self.commit}" if self.repo_id and self.commit else str(self.path.resolve())
        return f"{own}+{self.adapter.locator}" if self.adapter else own


def split_reference(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); no `@` -> (ref, None)."""
    if "@" in ref:
        name, _, revision = ref.rpartition("@")
        if name and revision:
            return name, revision
    return ref, None


def split_lora_reference(ref: str) -> tuple[str, str | None]:
    """`base+adapter` -> (`base`, `adapter`), as mergekit's ModelReference parses it (each part may carry its own
    `@revision`); no `+` -> (ref, None).

    Raises:
        ModelResolutionError: more than one `+`, or an empty part.
    """
    if "+" not in ref:
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ModelResolutionError(f"invalid model reference {ref!r}: expected MODEL+LORA_ADAPTER (one '+')")
    return parts[0], parts[1]


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def resolve_model(
    ref: str,
    *,
    base_dir: Path | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_bin: bool = True,
    variant: str | None = None,
) -> ResolvedModel:
    """Resolve a model reference to a local directory.

    A reference that names an existing directory (relative to the working directory, then to `base_dir`) is used
    in place. Anything else is a Hub repo id, fetched with `huggingface_hub.snapshot_download` (weights, configs
    and tokenizer files only), which honours `HF_HUB_OFFLINE`, `HF_TOKEN`, `HF_ENDPOINT` and the cache.

    A `base+adapter` reference (mergekit's LoRA form; each part `org/name[@revision]` or a directory) resolves
    both parts: the result describes the base, with the PEFT adapter in `adapter` (fetched with its config and
    weights only). A directory whose name contains `+` is still taken as a directory.

    Args:
        ref: `org/name`, `org/name@revision`, a directory, or `BASE+ADAPTER` of those.
        base_dir: second place to look for relative directories (the spec file's folder).
        token: passed to huggingface_hub (None: its standard lookup).
        cache_dir: Hugging Face cache directory (None: the default).
        allow_bin: also fetch `pytorch_model*.bin` (a LoRA adapter's `adapter_model.bin`) when the repo has no
            safetensors.

    Returns:
        The resolved model, with the pinned commit sha for Hub models.

    Raises:
        ModelResolutionError: the directory does not exist, the repo id is invalid, the repo or revision is not
            found (or not cached while offline), or access is denied.

    Example:
        >>> resolve_model("HuggingFaceTB/SmolLM2-135M@main").commit
    """
    model_patterns = (
        WEIGHT_PATTERNS + SUPPORT_PATTERNS,
        BIN_PATTERNS + SUPPORT_PATTERNS if allow_bin else None,
    )
    if "+" in ref and not any(c.is_dir() for c in _local_candidates(ref, base_dir)):
        base_ref, adapter_ref = split_lora_reference(ref)
        base = _resolve(base_ref, base_dir, token, cache_dir, model_patterns, "model directory")
        try:
            adapter_patterns = (ADAPTER_PATTERNS, ADAPTER_BIN_PATTERNS if allow_bin else None)
            adapter = _resolve(adapter_ref, base_dir, token, cache_dir, adapter_patterns, "directory")
        except ModelResolutionError as exc:
            raise ModelResolutionError(f"LoRA adapter of {ref!r}: {exc}") from exc
        return replace(base, ref=ref, adapter=adapter)
    return _resolve(ref, base_dir, token, cache_dir, model_patterns, "model directory")


def _resolve(ref, base_dir, token, cache_dir, patterns, what) -> ResolvedModel:
    for candidate in _local_candidates(ref, base_dir):
        if candidate.is_dir() or (candidate.is_file() and candidate.suffix == ".safetensors"):
            return ResolvedModel(ref=ref, path=candidate)  # a single-file pipeline checkpoint is a file
    repo_id, revision = split_reference(ref)
    if _looks_like_path(repo_id):
        raise ModelResolutionError(f"{what} {ref!r} does not exist")
    return _download(ref, repo_id, revision, token=token, cache_dir=cache_dir, patterns=patterns)


def _local_candidates(ref: str, base_dir: Path | None) -> list[Path]:
    path = Path(ref).expanduser()
    if path.is_absolute() or base_dir is None:
        return [path]
    return [path, base_dir / path]


def _download(ref, repo_id, revision, *, token, cache_dir, patterns) -> ResolvedModel:
    """Fetch a snapshot; `patterns` is (safetensors patterns, pickle patterns or None when a pickle is refused)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    safe_patterns, bin_patterns = patterns
    patterns = safe_patterns
    if bin_patterns is not None and not _has_safetensors(repo_id, revision, token):
        patterns = bin_patterns
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, token=token, cache_dir=cache_dir
        )
    except HFValidationError as exc:
        raise ModelResolutionError(f"invalid model reference {ref!r}: {first_line(exc)}") from exc
    except GatedRepoError as exc:
        raise ModelResolutionError(f"{repo_id}: gated repo, access not granted for this token") from exc
    except RevisionNotFoundError as exc:
        raise ModelResolutionError(f"{repo_id}: revision {revision!r} not found") from exc
    except RepositoryNotFoundError as exc:
        raise ModelResolutionError(
            f"{repo_id}: repository not found (or private and no valid token)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        if revision and _cached_repo(repo_id, cache_dir):
            raise ModelResolutionError(
                f"{where}: revision {revision!r} not found in the local cache"
            ) from exc
        raise ModelResolutionError(
            f"{where}: not found locally and the Hub cannot be reached (offline or no network); "
            "download it first or pass a local directory"
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelResolutionError(http_error_message(where, exc)) from exc
    path = Path(path)
    commit = path.name if _SHA.match(path.name) else None
    return ResolvedModel(ref=ref, path=path, repo_id=repo_id, revision=revision, commit=commit)


def http_error_message(where: str, exc) -> str:
    """One line for a huggingface_hub HTTP error, from its status and the server's message (never the headers,
    which carry the token; the message itself with the token masked, since a proxy may echo the headers)."""
    from hf_m2n2.hub_log import mask_secrets

    status = exc.response.status_code if getattr(exc, "response", None) is not None else None
    if status == 401:
        return f"{where}: authentication failed (HTTP 401): set HF_TOKEN or run `hf auth login`"
    if status == 403:
        return f"{where}: permission denied (HTTP 403): the token has no access to this repo or namespace"
    server = exc.server_message.splitlines()[0] if getattr(exc, "server_message", None) else ""
    return mask_secrets(f"{where}: Hub request failed (HTTP {status}){': ' + server if server else ''}")


def _has_safetensors(repo_id: str, revision: str | None, token) -> bool:
    """Ask the Hub whether the repo has safetensors weights; offline, assume so (the cache decides)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        # one request (repo_info is not retried, list_repo_files backs off ~23 s on a dead endpoint first)
        info = HfApi().model_info(repo_id, revision=revision, token=token)
    except Exception:  # resolution errors are reported by snapshot_download with a precise class
        return True
    return any(s.rfilename.endswith(".safetensors") for s in info.siblings or [])


def _cached_repo(repo_id: str, cache_dir) -> bool:
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE)
    return (root / f"models--{repo_id.replace('/', '--')}").is_dir()
