"""Model references (`org/name`, `org/name@revision`, a local directory, `base+adapter`) resolved to local files
and a pinned sha; a Hub repo holding `model_index.json` is a diffusers pipeline, fetched component by component
for one weights variant."""

from __future__ import annotations

import json
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

# A diffusers pipeline's root file: it lists the components (`"unet": ["diffusers", "UNet2DConditionModel"]`).
PIPELINE_INDEX = "model_index.json"
# Components a repo may hold alone, in their pipeline subfolder and without model_index.json (SDXL-DPO's
# `mhdang/dpo-sdxl-text2image-v1` is `unet/` and a card): a component-only pipeline seed, whose other components
# come from another seed.
COMPONENT_ONLY = ("unet",)
# The first request for a Hub seed, to tell a pipeline (or a component-only one) from an LLM. The root
# `config.json` rides along so that an LLM's probe matches a file (huggingface_hub warns "No files matched"
# otherwise); an LLM needs it anyway.
_PROBE_PATTERNS = [PIPELINE_INDEX, "config.json", *(f"{c}/config.json" for c in COMPONENT_ONLY)]
# Per component: config, tokenizer and scheduler files (`c/*.json` also matches weight indexes: see _INDEXES), and
# the code of a custom component (`["modeling_x", "X"]` reads `c/modeling_x.py`) or a transformers model's
# `auto_map`: fetched, never run unless the user opts in (`trust_remote_code`).
_COMPONENT_SUPPORT = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
# Every weight index, plain (`x.safetensors.index.json`) or of a variant (`x.safetensors.index.fp16.json`): kept
# out of the support files' `c/*.json`, since only the requested variant's index may come (with its weights).
_INDEXES = ["*.index.json", "*.index.*.json"]
# Weight file names of diffusers models (diffusers.utils.constants: SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) and
# transformers models (transformers.utils: SAFE_WEIGHTS_NAME, WEIGHTS_NAME).
_SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_BIN_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
# Shard suffix as both libraries' save_pretrained write it (huggingface_hub's split_state_dict_into_shards:
# `-{i:05d}-of-{n:05d}`) and diffusers' variant_compatible_siblings reads it (`\d{5}-of-\d{5}`). Digits, not `*`:
# `model-*-of-*.safetensors` would also match a legacy variant shard `model-00001-of-00002.fp16.safetensors`.
_SHARD = "-" + "[0-9]" * 5 + "-of-" + "[0-9]" * 5
# What the "found:" list of a missing-variant error shows of a component's files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack")
# A variant becomes part of file names and glob patterns: letters, digits, `_` and `-` only (fp16, bf16, non_ema).
_VARIANT = re.compile(r"^[A-Za-z0-9_-]+$")
_COMPONENT = re.compile(r"^\w+$")


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
        variant: the weights variant asked for (`fp16`: a pipeline's `*.fp16.safetensors`), None for the plain
            weights. A Hub pipeline's snapshot holds that variant's weights; a local directory may hold several.
    """

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    adapter: ResolvedModel | None = None
    variant: str | None = None

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

    A Hub repo whose root holds `model_index.json` is a diffusers pipeline: a first request fetches that file,
    then each component it lists comes with its config, tokenizer and scheduler files and the weights of
    `variant` only (see `pipeline_patterns`), all from the commit the first request pinned. A repo holding only
    `unet/` (no model_index.json, no root config.json: SDXL-DPO's) is a component-only pipeline: that folder's
    config and weights of `variant` only (`component_only_index`).

    A `base+adapter` reference (mergekit's LoRA form; each part `org/name[@revision]` or a directory) resolves
    both parts: the result describes the base, with the PEFT adapter in `adapter` (fetched with its config and
    weights only). A directory whose name contains `+` is still taken as a directory.

    Args:
        ref: `org/name`, `org/name@revision`, a directory, or `BASE+ADAPTER` of those.
        base_dir: second place to look for relative directories (the spec file's folder).
        token: passed to huggingface_hub (None: its standard lookup).
        cache_dir: Hugging Face cache directory (None: the default).
        allow_bin: also fetch `pytorch_model*.bin` (a LoRA adapter's `adapter_model.bin`, a pipeline component's
            `.bin` of the variant) when the repo (the component) has no safetensors.
        variant: a pipeline's weights variant (`fp16` fetches `*.fp16.safetensors`); None: the plain weights.
            Recorded, not checked, for a local directory.

    Returns:
        The resolved model, with the pinned commit sha for Hub models.

    Raises:
        ModelResolutionError: the directory does not exist, the repo id is invalid, the repo or revision is not
            found (or not cached while offline), or access is denied; a variant for a Hub repo that is not a
            pipeline, or that a pipeline component with weights does not have.

    Example:
        >>> resolve_model("HuggingFaceTB/SmolLM2-135M@main").commit
        >>> resolve_model("stabilityai/stable-diffusion-xl-base-1.0", variant="fp16").path / "unet"
    """
    _check_variant(variant)
    model_patterns = (
        WEIGHT_PATTERNS + SUPPORT_PATTERNS,
        BIN_PATTERNS + SUPPORT_PATTERNS if allow_bin else None,
    )
    seed = _Seed(variant=variant, allow_bin=allow_bin)
    if "+" in ref and not any(c.is_dir() for c in _local_candidates(ref, base_dir)):
        base_ref, adapter_ref = split_lora_reference(ref)
        base = _resolve(base_ref, base_dir, token, cache_dir, model_patterns, "model directory", seed)
        try:
            adapter_patterns = (ADAPTER_PATTERNS, ADAPTER_BIN_PATTERNS if allow_bin else None)
            adapter = _resolve(adapter_ref, base_dir, token, cache_dir, adapter_patterns, "directory")
        except ModelResolutionError as exc:
            raise ModelResolutionError(f"LoRA adapter of {ref!r}: {exc}") from exc
        return replace(base, ref=ref, adapter=adapter)
    return _resolve(ref, base_dir, token, cache_dir, model_patterns, "model directory", seed)


@dataclass(frozen=True)
class PipelinePatterns:
    """What `resolve_model` fetches of a diffusers pipeline repo, as `snapshot_download` patterns.

    Attributes:
        files: `model_index.json`, the card, and each component's config, tokenizer and scheduler files.
        ignore: the weight indexes that `files`' `c/*.json` would match (the requested ones come with `weights`).
        weights: component -> its safetensors weights of the variant (one file, or shards and their index).
        bin_weights: component -> the same as PyTorch pickles, fetched only for a component whose `weights`
            matched nothing.
    """

    files: list[str]
    ignore: list[str]
    weights: dict[str, list[str]]
    bin_weights: dict[str, list[str]]


def pipeline_components(model_index: dict) -> list[str]:
    """The components a `model_index.json` lists, in its order: keys whose value is a `[library, class]` pair of
    strings (`_class_name` and the like are metadata, `[null, null]` an absent component, a bool a setting).

    Raises:
        ModelResolutionError: a component name that is not a plain identifier (it becomes a folder pattern).
    """
    names = [
        key
        for key, value in model_index.items()
        if not key.startswith("_")
        and isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    ]
    for name in names:
        if not _COMPONENT.match(name):
            raise ModelResolutionError(f"{PIPELINE_INDEX}: invalid component name {name!r}")
    return names


def pipeline_patterns(model_index: dict, variant: str | None = None) -> PipelinePatterns:
    """The files of a diffusers pipeline to fetch for one weights variant.

    Weight names follow diffusers and transformers exactly (see `_variant_name`): for variant `fp16`, component
    `unet` gets `unet/diffusion_pytorch_model.fp16.safetensors`, shards `unet/diffusion_pytorch_model.fp16-
    00001-of-00002.safetensors` and their index `unet/diffusion_pytorch_model.safetensors.index.fp16.json`
    (`model.*` for transformers components); no variant drops the `.fp16` parts. Nothing at the repo root but
    `model_index.json`, the card and a custom pipeline's code (`_class_name: [MODULE, CLASS]`: diffusers reads
    `MODULE.py` and the modules it imports: the `.py` files) (no single-file checkpoints), no other variant, no
    `.ckpt`.

    Args:
        model_index: the parsed `model_index.json`.
        variant: `fp16`, `bf16`, ...; None for the plain weights.

    Returns:
        The patterns, per component for the weights.

    Raises:
        ModelResolutionError: an invalid component name, custom pipeline module or variant.

    Example:
        >>> pipeline_patterns({"vae": ["diffusers", "AutoencoderKL"]}, "fp16").weights["vae"][0]
        'vae/diffusion_pytorch_model.fp16.safetensors'
    """
    _check_variant(variant)
    components = pipeline_components(model_index)
    files = [PIPELINE_INDEX, "README.md"] + [f"{c}/{p}" for c in components for p in _COMPONENT_SUPPORT]
    custom = model_index.get("_class_name")
    if isinstance(custom, list | tuple) and custom and isinstance(custom[0], str):
        if not _COMPONENT.match(custom[0]):
            raise ModelResolutionError(f"{PIPELINE_INDEX}: invalid custom pipeline module {custom[0]!r}")
        files.append("*.py")  # the module and the root modules it imports (JSDXL's `modeling_clipnull.py`)
    return PipelinePatterns(
        files=files,
        ignore=list(_INDEXES),
        weights={c: _weight_patterns(c, _SAFETENSORS_NAMES, variant) for c in components},
        bin_weights={c: _weight_patterns(c, _BIN_NAMES, variant) for c in components},
    )


def _check_variant(variant: str | None) -> None:
    """Raises ModelResolutionError for a variant that cannot be part of a file name pattern."""
    if variant is not None and not _VARIANT.match(variant):
        raise ModelResolutionError(
            f"invalid variant {variant!r}: use letters, digits, '_' and '-' (e.g. fp16)"
        )


def _variant_name(name: str, variant: str | None) -> str:
    """`name` with `.variant` before its last extension: the rule of diffusers.utils.hub_utils._add_variant and
    transformers.modeling_utils._add_variant (`model.safetensors` -> `model.fp16.safetensors`,
    `model.safetensors.index.json` -> `model.safetensors.index.fp16.json`)."""
    if variant is None:
        return name
    stem, _, extension = name.rpartition(".")
    return f"{stem}.{variant}.{extension}"


def _weight_patterns(component: str, names: tuple[str, ...], variant: str | None) -> list[str]:
    """One file, its shards and their index, for each weight name. Both libraries' save_pretrained put the shard
    suffix before the extension of the variant name (`model.fp16-00001-of-00002.safetensors`)."""
    patterns = []
    for name in names:
        stem, _, extension = _variant_name(name, variant).rpartition(".")
        patterns += [
            f"{component}/{stem}.{extension}",
            f"{component}/{stem}{_SHARD}.{extension}",
            f"{component}/{_variant_name(name + '.index.json', variant)}",
        ]
    return patterns


@dataclass(frozen=True)
class _Seed:
    """How a seed (not an adapter) is resolved: probed for a pipeline, with this variant and pickle rule."""

    variant: str | None
    allow_bin: bool


def _resolve(ref, base_dir, token, cache_dir, patterns, what, seed: _Seed | None = None) -> ResolvedModel:
    variant = seed.variant if seed else None
    for candidate in _local_candidates(ref, base_dir):
        if candidate.is_dir() or (candidate.is_file() and candidate.suffix == ".safetensors"):
            # a single-file pipeline checkpoint is a file
            return ResolvedModel(ref=ref, path=candidate, variant=variant)
        if candidate.is_file():
            raise ModelResolutionError(
                f"{ref}: a {candidate.suffix or 'plain'} file: only .safetensors single files are read "
                "(a pickled .ckpt can run code when loaded): convert it to .safetensors first"
            )
    repo_id, revision = split_reference(ref)
    if _looks_like_path(repo_id):
        raise ModelResolutionError(f"{what} {ref!r} does not exist")
    if seed is not None:
        where = f"{repo_id}@{revision}" if revision else repo_id
        probe = _snapshot(ref, repo_id, revision, where, _PROBE_PATTERNS, token=token, cache_dir=cache_dir)
        if (probe / PIPELINE_INDEX).is_file():
            return _download_pipeline(ref, repo_id, revision, probe, seed, token=token, cache_dir=cache_dir)
        only = component_only_index(probe)
        if only is not None:
            return _download_pipeline(
                ref, repo_id, revision, probe, seed, token=token, cache_dir=cache_dir, model_index=only
            )
        if variant is not None:
            raise ModelResolutionError(
                f"{where}: variant {variant!r} asked for, but this repo is not a diffusers pipeline "
                f"(no {PIPELINE_INDEX})"
            )
    return _download(ref, repo_id, revision, token=token, cache_dir=cache_dir, patterns=patterns)


def component_only_index(folder: Path) -> dict[str, list[str]] | None:
    """The model_index.json a component-only folder stands for (`{"unet": ["diffusers", CLASS]}`), or None.

    A folder is component-only when it has neither `model_index.json` nor a root `config.json` (an LLM's, or a
    model saved at the root) and one of `COMPONENT_ONLY` holds a `config.json`; the class is the config's
    `_class_name` (what diffusers' save_pretrained records).

    Example:
        >>> component_only_index(Path("dpo-sdxl"))  # a folder holding unet/config.json and its weights
        {'unet': ['diffusers', 'UNet2DConditionModel']}
    """
    folder = Path(folder)
    if (folder / PIPELINE_INDEX).exists() or (folder / "config.json").exists():
        return None
    for component in COMPONENT_ONLY:
        config = folder / component / "config.json"
        if config.is_file():
            try:
                class_name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                class_name = None  # read (and reported) when the seed is opened
            return {
                component: [
                    "diffusers",
                    class_name if isinstance(class_name, str) else "UNet2DConditionModel",
                ]
            }
    return None


def _local_candidates(ref: str, base_dir: Path | None) -> list[Path]:
    path = Path(ref).expanduser()
    if path.is_absolute() or base_dir is None:
        return [path]
    return [path, base_dir / path]


def _download(ref, repo_id, revision, *, token, cache_dir, patterns) -> ResolvedModel:
    """Fetch a snapshot; `patterns` is (safetensors patterns, pickle patterns or None when a pickle is refused)."""
    safe_patterns, bin_patterns = patterns
    patterns = safe_patterns
    if bin_patterns is not None and not _has_safetensors(repo_id, revision, token):
        patterns = bin_patterns
    where = f"{repo_id}@{revision}" if revision else repo_id
    path = _snapshot(ref, repo_id, revision, where, patterns, token=token, cache_dir=cache_dir)
    commit = path.name if _SHA.match(path.name) else None
    return ResolvedModel(ref=ref, path=path, repo_id=repo_id, revision=revision, commit=commit)


def _download_pipeline(
    ref, repo_id, revision, probe: Path, seed: _Seed, *, token, cache_dir, model_index: dict | None = None
) -> ResolvedModel:
    """Fetch a pipeline's components for `seed.variant` from the commit `probe` (holding model_index.json) is;
    `model_index` stands for the file in a component-only repo (`component_only_index`).

    Raises:
        ModelResolutionError: an unreadable model_index.json, a component with weights (a `config.json`: what
            diffusers' and transformers' models save, and schedulers and tokenizers do not) but none of the
            variant, an index naming a shard the repo lacks, or (offline) files not in the cache.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"{repo_id}@{revision}" if revision else repo_id
    if model_index is None:
        try:
            model_index = json.loads((probe / PIPELINE_INDEX).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelResolutionError(f"{where}: unreadable {PIPELINE_INDEX}: {first_line(exc)}") from exc
    if not isinstance(model_index, dict):
        raise ModelResolutionError(f"{where}: {PIPELINE_INDEX} is not a JSON object")
    try:
        patterns = pipeline_patterns(model_index, seed.variant)
    except ModelResolutionError as exc:
        raise ModelResolutionError(f"{where}: {exc}") from exc
    # Every request names the probe's commit: the components come from the commit model_index.json came from.
    commit = probe.name

    def fetch(allow: list[str], ignore: list[str] | None = None) -> Path:
        try:
            return _snapshot(ref, repo_id, commit, where, allow, ignore, token=token, cache_dir=cache_dir)
        except ModelResolutionError as exc:
            # the probe found the commit: what is not found locally is some of these files (offline, huggingface_hub
            # raises IncompleteSnapshotError, or LocalEntryNotFoundError for a file once it has the tree listing)
            if not isinstance(exc.__cause__, LocalEntryNotFoundError):
                raise
            asked = f"variant {seed.variant!r}" if seed.variant else "the plain weights"
            raise ModelResolutionError(
                f"{where}: the files of {asked} are not all in the local cache and the Hub cannot be reached "
                "(offline or no network); download them first"
            ) from exc

    fetch(patterns.files, patterns.ignore)
    path = fetch([p for component in patterns.weights.values() for p in component])
    missing = [
        c for c, allow in patterns.weights.items() if _wants_weights(path, c) and not _present(path, allow)
    ]
    if missing and seed.allow_bin:
        fetch([p for c in missing for p in patterns.bin_weights[c]])
        missing = [c for c in missing if not _present(path, patterns.bin_weights[c])]
    if missing:
        raise _missing_weights(where, repo_id, commit, path, missing[0], seed, token)
    for component in patterns.weights:
        indexes = _present(path, patterns.weights[component] + patterns.bin_weights[component])
        _check_shards(where, path, [i for i in indexes if i.endswith(".json")])
    return ResolvedModel(
        ref=ref, path=path, repo_id=repo_id, revision=revision, commit=commit, variant=seed.variant
    )


def _wants_weights(path: Path, component: str) -> bool:
    """Whether a component is a model (diffusers' ModelMixin and transformers' PreTrainedModel save `config.json`;
    schedulers, tokenizers and image processors save `*_config.json`)."""
    return (path / component / "config.json").is_file()


def _present(path: Path, patterns: list[str]) -> list[str]:
    """The snapshot's files matching `patterns` (no `*` in weight patterns: a match stays in its folder)."""
    return sorted(p.relative_to(path).as_posix() for pattern in patterns for p in path.glob(pattern))


def _missing_weights(
    where, repo_id, commit, path: Path, component: str, seed: _Seed, token
) -> ModelResolutionError:
    """The one-line error for a component without weights of the variant, listing the weights it does have."""
    asked = f"variant {seed.variant!r}" if seed.variant else "weights"
    found = _component_weights(repo_id, commit, path, component, token)
    listing = ", ".join(found) or "no weights"
    if not seed.allow_bin and any(name.endswith(".bin") for name in found):
        listing += "; .bin weights not allowed"
    return ModelResolutionError(f"{where}: {asked} not found for component {component} (found: {listing})")


def _component_weights(repo_id: str, commit: str, path: Path, component: str, token) -> list[str]:
    """A component's weight files on the Hub at `commit` (one request); offline, those in the local snapshot."""
    from huggingface_hub import HfApi, constants

    names: list[str] | None = None
    if not constants.HF_HUB_OFFLINE:
        try:
            siblings = HfApi().model_info(repo_id, revision=commit, token=token).siblings or []
            names = [s.rfilename for s in siblings]
        except Exception:  # only the error message's detail depends on it: fall back to the local files
            names = None
    if names is None:
        names = [p.relative_to(path).as_posix() for p in (path / component).rglob("*") if p.is_file()]
    prefix = f"{component}/"
    return sorted(
        n[len(prefix) :]
        for n in names
        if n.startswith(prefix) and n.endswith(_WEIGHT_SUFFIXES) and "/" not in n[len(prefix) :]
    )


def _check_shards(where: str, path: Path, indexes: list[str]) -> None:
    """Every shard that the fetched weight indexes (paths relative to the snapshot) name is there: shards named
    other than the libraries name them would slip past the patterns.

    Raises:
        ModelResolutionError: an unreadable index, or one naming a missing file.
    """
    for index in indexes:
        try:
            shards = set(json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelResolutionError(f"{where}: unreadable weight index {index}") from exc
        absent = sorted(s for s in shards if not ((path / index).parent / s).is_file())
        if absent:
            raise ModelResolutionError(
                f"{where}: {index} names {absent[0]}, which was not fetched (not in the repo, or not named as "
                "diffusers and transformers name shards)"
            )


def _snapshot(ref, repo_id, revision, where, allow, ignore=None, *, token, cache_dir) -> Path:
    """`snapshot_download` with its errors as one-line ModelResolutionErrors (the huggingface_hub error chained)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow,
            ignore_patterns=ignore,
            token=token,
            cache_dir=cache_dir,
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
    return Path(path)


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
