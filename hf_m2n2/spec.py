"""MergeSpec: mergekit-compatible merge YAML, parsed and validated with errors that name the YAML path."""

from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from hf_m2n2.errors import SpecError

M = TypeVar("M", bound=BaseModel)

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


class StrictModel(BaseModel):
    """The base of every spec section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRefDict(StrictModel):
    path: str
    revision: str | None = None


def model_ref_string(value: Any) -> str:
    """A model reference as one string: `org/name`, `org/name@revision`, or a directory."""
    if isinstance(value, str):
        return value
    if isinstance(value, ModelRefDict):
        return f"{value.path}@{value.revision}" if value.revision else value.path
    raise TypeError(value)


def _coerce_ref(value: Any) -> Any:
    if isinstance(value, dict) and "model" in value and set(value) <= {"model", "lora"}:
        # mergekit's ModelReference mapping: {model: PATH | {path, revision}, lora: PATH | {path, revision}}
        parts = [_coerce_ref(value[k]) for k in ("model", "lora") if value.get(k) is not None]
        if len(parts) == 1:
            return parts[0]
        value = "+".join(model_ref_string(p) for p in parts)
    if isinstance(value, dict):
        return ModelRefDict(**value)
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty model reference")
        from hf_m2n2.errors import ModelResolutionError
        from hf_m2n2.hub import split_lora_reference

        try:  # resolution's own rule (a directory whose name has a `+` is a resolution matter, not the YAML's)
            split_lora_reference(value)
        except ModelResolutionError as exc:
            raise ValueError(str(exc)) from None
        return value
    raise ValueError("expected a model reference (org/name, org/name@revision, a directory, or MODEL+LORA)")


ModelRef = str | ModelRefDict


class InputModel(StrictModel):
    model: ModelRef
    parameters: dict[str, Any] | None = None

    _ref = field_validator("model", mode="before")(_coerce_ref)


class InputSlice(StrictModel):
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = None

    _ref = field_validator("model", mode="before")(_coerce_ref)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class OutputSlice(StrictModel):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelRef | None = None
    residual_weight: float | None = None
    parameters: dict[str, Any] | None = None

    _ref = field_validator("base_model", mode="before")(lambda v: None if v is None else _coerce_ref(v))


class ModelTokenEmbedding(StrictModel):
    """`{kind: model_token, model: M, token: "<x>"}` or `token_id: N`: that row of model M's own embeddings."""

    kind: Literal["model_token"]
    model: ModelRef
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    _ref = field_validator("model", mode="before")(_coerce_ref)


class ZeroEmbedding(StrictModel):
    """`{kind: zero}`: a row of zeros."""

    kind: Literal["zero"]


def _token_source_tag(value: Any) -> str:
    if isinstance(value, dict) and "kind" in value:
        return {"model_token": "model_token", "zero": "zero"}.get(value["kind"], "unknown kind")
    if isinstance(value, (ModelTokenEmbedding, ZeroEmbedding)):
        return value.kind
    return "model"


def _coerce_token_source(value: Any) -> Any:
    if isinstance(value, dict) and "kind" in value:
        if value["kind"] not in ("model_token", "zero"):
            raise ValueError(f"unknown kind {value['kind']!r} (use model_token or zero)")
        if value["kind"] == "model_token" and (value.get("token") is None) == (value.get("token_id") is None):
            raise ValueError("model_token: give exactly one of token and token_id")
        return value
    return _coerce_ref(value)


TokenSource = Annotated[
    Annotated[ModelTokenEmbedding, Tag("model_token")]
    | Annotated[ZeroEmbedding, Tag("zero")]
    | Annotated[ModelRef, Tag("model")],
    Discriminator(_token_source_tag),
]


class TokenEmbeddingConfig(StrictModel):
    """How one output token's embedding row is made (mergekit's `tokenizer.tokens` entry).

    Attributes:
        source: a merged model (its row for this token), `{kind: model_token, ...}` or `{kind: zero}`.
        force: give every model this row, even those that have the token (default: only those that lack it).
    """

    source: TokenSource | None = None
    force: bool = False

    _source = field_validator("source", mode="before")(
        lambda v: None if v is None else _coerce_token_source(v)
    )


class TokenizerConfig(StrictModel):
    """`tokenizer:`: the output vocabulary (`source`: union, base or a model), per-token embedding sources
    (`tokens`, each token added to the vocabulary if new) and `pad_to_multiple_of`."""

    source: str | ModelRefDict = "union"
    tokens: dict[str, TokenEmbeddingConfig] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)

    _ref = field_validator("source", mode="before")(_coerce_ref)


class CalibrationConfig(StrictModel):
    """`calibration:` (an hf-m2n2 extension of mergekit's schema): the unlabeled text the feature-matching merge
    methods (`permute`, `zipit`) run both models on.

    Attributes:
        data: a `.jsonl` file of `{"text": ...}` lines or a text file with one sample per line (relative to the
            spec's folder).
        samples: how many samples to use (the first ones).
        max_length: tokens per sample (longer ones are truncated); every token position counts.
    """

    data: str
    samples: int = Field(64, ge=1)
    max_length: int = Field(128, ge=2)


class OutputConfig(StrictModel):
    """The `output:` section: where `hf-m2n2 merge` / `evolve` publish the result when they finish.

    Attributes:
        push_to_hub: Hub repo id (`ORG/NAME`) to create if needed and upload to.
        private: visibility of a newly created repo.
        revision: branch to commit to (default main).
    """

    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None


class ComponentFrom(StrictModel):
    """`{from: MODEL}`: a pipeline component taken whole from one seed (a donor) instead of merged."""

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    from_: ModelRef = Field(alias="from")

    _ref = field_validator("from_", mode="before")(_coerce_ref)


def _coerce_component(value: Any) -> Any:
    if value == "merge" or isinstance(value, (dict, ComponentFrom)):
        return value
    raise ValueError("expected `merge` or {from: MODEL}")


ComponentChoice = Annotated[Literal["merge"] | ComponentFrom, BeforeValidator(_coerce_component)]


class MergeSpec(StrictModel):
    """A merge recipe, in mergekit's YAML schema.

    Exactly one of `models` and `slices` is given. Parameters (global, per slice, per model) are scalars,
    gradient lists (interpolated over the layer index within a slice) or `[{filter, value}]` lists.

    Example:
        >>> spec = load_spec("examples/tiny_merge/spec.yaml")
        >>> spec.merge_method
        'linear'
    """

    merge_method: str
    models: list[InputModel] | None = Field(None, min_length=1)
    slices: list[OutputSlice] | None = Field(None, min_length=1)
    base_model: ModelRef | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | ModelRefDict | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    components: dict[str, ComponentChoice] | None = None  # pipelines: per component, merged or from a donor
    variant: str | None = None  # pipelines: read `*.VARIANT.safetensors` weights (fp16), nothing else
    single_file_config: ModelRef | None = (
        None  # pipelines: the diffusers folder single-file seeds take configs from
    )
    output: OutputConfig | None = None
    calibration: CalibrationConfig | None = None  # hf-m2n2's feature-matching methods (permute, zipit)

    _ref = field_validator("base_model", "tokenizer_source", "single_file_config", mode="before")(
        lambda v: None if v is None else _coerce_ref(v)
    )

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r} (use float32, float16 or bfloat16)")
        return DTYPES[value]

    def base_ref(self) -> str | None:
        return None if self.base_model is None else model_ref_string(self.base_model)

    def tokenizer_source_ref(self) -> str | None:
        """`base`, `union`, a model reference, or None (from `tokenizer_source` or `tokenizer.source`)."""
        source = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        return None if source is None else model_ref_string(source)

    def referenced_models(self) -> list[str]:
        """Every model the spec names, in first-mention order (base first)."""
        refs: list[str] = []
        if self.base_model is not None:
            refs.append(model_ref_string(self.base_model))
        for m in self.models or []:
            refs.append(model_ref_string(m.model))
        for s in self.slices or []:
            if s.base_model is not None:
                refs.append(model_ref_string(s.base_model))
            refs.extend(model_ref_string(src.model) for src in s.sources)
        source = self.tokenizer_source_ref()
        if source not in (None, "base", "union"):
            refs.append(source)
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        """The recipe as mergekit YAML (without `output:`, which is where it went, not how it was made)."""
        return yaml.safe_dump(
            self.model_dump(mode="json", exclude_none=True, exclude={"output"}), sort_keys=False
        )


def yaml_path(loc: tuple[Any, ...], data: Any) -> str:
    """A pydantic error location as a YAML path, following the data to drop union tags and validator names."""
    out, node = "", data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            out, node = f"{out}[{part}]", node[part]
        elif isinstance(part, str) and isinstance(node, dict) and (part in node or last):
            out, node = f"{out}.{part}" if out else part, node.get(part)
    return out


def validation_error(
    exc: ValidationError, data: Any, prefix: str = "", model: type[BaseModel] | None = None
) -> SpecError:
    """The first pydantic error as a SpecError with its YAML path; an unknown key comes first (a misspelled key
    often also makes a required one look missing) and, given the model, names the nearest valid key."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    message = {"extra_forbidden": "unknown key", "missing": "required"}.get(err["type"], err["msg"])
    if err["type"] == "extra_forbidden" and model is not None and err["loc"]:
        close = difflib.get_close_matches(str(err["loc"][-1]), sorted(_field_names(model)), n=1, cutoff=0.75)
        if close:
            message += f" (did you mean {close[0]}?)"
    path = yaml_path(tuple(err["loc"]), data)
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    return SpecError(path, message.removeprefix("Value error, "))


def _field_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Every key a model and the models inside it accept (the candidates of "did you mean")."""
    seen = set() if seen is None else seen
    if model in seen:
        return set()
    seen.add(model)
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(field.alias or name)
        stack = [field.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                names |= _field_names(annotation, seen)
            else:
                stack.extend(get_args(annotation))
    return names


def parse_model(model: type[M], data: Any, *, source: str = "spec") -> M:
    """Validate a whole spec (the parsed YAML mapping) against its model: the one parse function of every spec.

    Raises:
        SpecError: not a mapping, or the YAML path of the first problem.
    """
    if not isinstance(data, dict):
        raise SpecError("", f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model(**data)
    except ValidationError as exc:
        raise validation_error(exc, data, model=model) from None
    except TypeError as exc:
        raise SpecError("", f"{source}: {exc}") from None


def parse_spec(data: Any, *, source: str = "spec") -> MergeSpec:
    """Validate a merge spec given as a mapping (the parsed YAML).

    Raises:
        SpecError: with the YAML path of the first problem.
    """
    if isinstance(data, dict) and "modules" in data:
        raise SpecError("modules", "multi-module merges are not supported; use models or slices")
    spec = parse_model(MergeSpec, data, source=source)
    if (spec.models is None) == (spec.slices is None):
        raise SpecError("models", "exactly one of 'models' or 'slices' must be given")
    if spec.tokenizer_source is not None and spec.tokenizer is not None:
        raise SpecError("tokenizer", "give either tokenizer_source or tokenizer, not both")
    _check_parameter_values(spec)
    return spec


EVOLVE_SECTIONS = ("evolve", "genome", "evaluate")


def is_evolve_spec(data: Any) -> bool:
    """The one rule that tells spec files apart: an evolve spec has an `evolve:`, `genome:` or `evaluate:`
    section; anything else is a (mergekit-style) merge spec."""
    return isinstance(data, dict) and any(key in data for key in EVOLVE_SECTIONS)


def load_spec(path: str | os.PathLike[str]) -> MergeSpec:
    """Read and validate a merge YAML file.

    Raises:
        SpecError: the file is missing, not valid YAML, an evolve spec, or not a valid spec (message names the
            YAML path).
    """
    text = read_spec_text(path)
    data = parse_yaml(text, path)
    if is_evolve_spec(data):
        raise SpecError(
            "", f"{path}: an evolve spec (it has evolve:, genome: or evaluate:): use hf-m2n2 evolve"
        )
    return parse_spec(data, source=str(path))


def read_spec_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SpecError("", f"{path}: cannot read ({exc.strerror or exc})") from None


def parse_yaml(text: str, path: str | os.PathLike[str] = "spec") -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError("", f"{path}:{where}: malformed YAML ({problem})") from None


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parameter_places(spec: MergeSpec) -> list[tuple[str, dict[str, Any] | None]]:
    """Every `parameters` mapping of a spec with its YAML path: global, per model, per slice, per slice source."""
    places: list[tuple[str, dict[str, Any] | None]] = [("parameters", spec.parameters)]
    for i, m in enumerate(spec.models or []):
        places.append((f"models[{i}].parameters", m.parameters))
    for i, s in enumerate(spec.slices or []):
        places.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            places.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
    return places


def _check_parameter_values(spec: MergeSpec) -> None:
    """Check each parameter is a scalar, a gradient list, or a list of {filter, value}."""
    for prefix, params in parameter_places(spec):
        for name, value in (params or {}).items():
            check_setting(f"{prefix}.{name}", value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool, str))


def check_setting(path: str, value: Any) -> None:
    if _is_scalar(value):
        return
    if isinstance(value, list) and value:
        if all(_is_scalar(v) for v in value):
            return
        for i, cond in enumerate(value):
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise SpecError(f"{path}[{i}]", "expected {filter, value}")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise SpecError(f"{path}[{i}].filter", "expected a string")
            check_setting(f"{path}[{i}].value", cond["value"])
        return
    raise SpecError(path, "expected a number, a gradient list or a list of {filter, value}")


def evaluate_setting(setting: Any, tensor_name: str, t: float, aliases: tuple[str, ...] = ()) -> Any:
    """The value of a parameter setting for one tensor at gradient position t in [0, 1] (None: no filter matched).

    Gradients interpolate linearly between their anchor points spread evenly over [0, 1]; non-numeric lists pick
    the anchor at or below t; filter lists take the first entry whose filter is a substring of the tensor name
    or equals one of its `aliases` (a UNet block name) (a missing filter or `*` matches everything).
    """
    if _is_scalar(setting):
        return setting
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        pos = t * (len(setting) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(setting) - 1)
        frac = pos - lo
        return (1 - frac) * setting[lo] + frac * setting[hi]
    if all(_is_scalar(v) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in tensor_name or flt in aliases:
            return evaluate_setting(cond["value"], tensor_name, t, aliases)
    return None
