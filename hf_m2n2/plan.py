"""Plan a static merge: a MergeSpec over opened seeds becomes a MethodRecipe (one TensorTask per output tensor).

Follows mergekit 0.1.5's planning semantics: `models:` is one slice over every layer (the base appended when not
listed); embeddings and other tensors before the layers take the first slice's sources, tensors after the layers
(final norm, lm_head) the last slice's, both at gradient position t = 0 (mergekit since its multi-module planner,
0.1.2); layer k of an n-layer slice sits at t = k / (n - 1), a one-layer slice's layer at t = 1. Parameters are
looked up per model, then per slice, then globally.

Every tensor stored by any seed of a slice must be stored by all of them (or be a tied head the seed derives from
its embeddings), whatever the order the seeds are listed in; the one exception is a buffer transformers ignores when
loading (rotary `inv_freq` in old checkpoints), which is left out when some seed lacks it.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from hf_m2n2.architectures import architecture_signature, ties_word_embeddings
from hf_m2n2.errors import CheckpointError, SpecError
from hf_m2n2.methods import MergeMethod, Param, all_methods, get_method
from hf_m2n2.recipe import MethodRecipe, SourceTensor, TensorTask
from hf_m2n2.seeds import Seed
from hf_m2n2.spec import MergeSpec, evaluate_setting, model_ref_string, parameter_places

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Source:
    seed: int
    layer_start: int
    params: dict[str, Any] | None
    path: str


@dataclass
class _Slice:
    sources: list[_Source]
    base: int | None
    params: dict[str, Any] | None
    num_layers: int
    path: str


def torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else _DTYPES[name]


def plan_merge(
    spec: MergeSpec,
    seeds: list[Seed],
    seed_index: dict[str, int],
    *,
    random_seed: int = 0,
    allow_crimes: bool = False,
    align_rows: bool = False,
    lenient_parameters: bool = False,
) -> MethodRecipe:
    """Build the recipe of a static merge.

    Args:
        spec: the validated spec.
        seeds: opened seeds; `seed_index` maps each spec reference to its position in `seeds`.
        random_seed: run seed; each randomized tensor's generator is seeded from it and the tensor name.
        allow_crimes: merge seeds of different architectures.
        align_rows: embeddings need re-ordering by token (vocabulary alignment).
        lenient_parameters: warn about (and ignore) parameter names the method does not declare, as mergekit
            does, instead of refusing them.

    Raises:
        SpecError: a parameter or model count problem, naming the YAML path.
        CheckpointError: seeds that do not fit together (architecture, missing tensor, shape).
    """
    method = get_method(spec.merge_method)
    base = None if spec.base_model is None else seed_index[spec.base_ref()]
    slices = _normalize(spec, seeds, seed_index, method, base)
    _check_architectures(seeds, [s.seed for sl in slices for s in sl.sources], allow_crimes)
    _check_declared(spec, method, slices, lenient_parameters)
    reference = base if base is not None else slices[0].sources[0].seed
    compute_dtype = torch_dtype(spec.dtype) or torch.float32
    out_dtype = torch_dtype(spec.out_dtype) or torch_dtype(spec.dtype)
    planner = _Planner(spec, seeds, method, random_seed, out_dtype, align_rows)

    tasks: list[TensorTask] = []
    ref_seed = seeds[reference]
    non_layer = _non_layer_names(
        seeds, [reference, *(s.seed for sl in (slices[0], slices[-1]) for s in sl.sources)]
    )
    for name in non_layer:
        if ref_seed.arch.is_pre(name):
            planner.add(tasks, name, {}, slices[0], 0.0)
    by_layer = {s.seed: _names_by_layer(seeds[s.seed]) for sl in slices for s in sl.sources}
    out_layer = 0
    for sl in slices:
        for offset in range(sl.num_layers):
            t = offset / (sl.num_layers - 1) if sl.num_layers > 1 else 1.0
            first = seeds[sl.sources[0].seed]
            for in_name in _layer_names(seeds, by_layer, sl, offset):
                suffix_names = {
                    s.seed: seeds[s.seed].arch.with_layer(in_name, s.layer_start + offset) for s in sl.sources
                }
                if _uses_base(method, sl) and sl.base not in suffix_names:
                    raise SpecError(f"{sl.path}", "the base model must be one of the slice's sources")
                out_name = first.arch.with_layer(in_name, out_layer)
                planner.add(tasks, out_name, suffix_names, sl, t)
            out_layer += 1
    for name in non_layer:  # mergekit >= 0.1.2: post-layer tensors at t = 0 too
        if not ref_seed.arch.is_pre(name):
            planner.add(tasks, name, {}, slices[-1], 0.0)
    return MethodRecipe(method.name, tasks, compute_dtype, out_layer, reference, base, planner.notes)


def _normalize(
    spec: MergeSpec, seeds: list[Seed], index: dict[str, int], method: MergeMethod, base: int | None
) -> list[_Slice]:
    if method.uses_base == "required" and base is None and not any(s.base_model for s in spec.slices or []):
        raise SpecError("base_model", f"required by {method.name}")
    if spec.models is not None:
        sources = [
            _Source(index[model_ref_string(m.model)], 0, m.parameters, f"models[{i}]")
            for i, m in enumerate(spec.models)
        ]
        listed = {s.seed for s in sources}
        if base is not None and base not in listed:
            if method.uses_base == "never":
                _check_base_as_model(spec, method, len(sources) + 1)
            sources.append(_Source(base, 0, None, "base_model"))
        n_layers = {seeds[s.seed].num_layers for s in sources}
        if len(n_layers) > 1:
            detail = ", ".join(f"{seeds[s.seed].name}: {seeds[s.seed].num_layers}" for s in sources)
            raise CheckpointError(
                f"models have different layer counts ({detail}); use slices to select layers"
            )
        slices = [_Slice(sources, base, None, n_layers.pop(), "models")]
    else:
        slices = []
        for i, sl in enumerate(spec.slices or []):
            srcs = []
            lengths = set()
            for j, src in enumerate(sl.sources):
                seed = index[model_ref_string(src.model)]
                start, end = src.layer_range
                if end > seeds[seed].num_layers:
                    raise SpecError(
                        f"slices[{i}].sources[{j}].layer_range",
                        f"[{start}, {end}) exceeds {seeds[seed].name}'s {seeds[seed].num_layers} layers",
                    )
                lengths.add(end - start)
                srcs.append(_Source(seed, start, src.parameters, f"slices[{i}].sources[{j}]"))
            if len(lengths) > 1:
                raise SpecError(
                    f"slices[{i}].sources", "all sources of a slice must span the same number of layers"
                )
            slice_base = index[model_ref_string(sl.base_model)] if sl.base_model is not None else base
            slices.append(_Slice(srcs, slice_base, sl.parameters, lengths.pop(), f"slices[{i}]"))
    for sl in slices:
        _check_model_count(method, sl)
    return slices


def _check_base_as_model(spec: MergeSpec, method: MergeMethod, count: int) -> None:
    """mergekit 0.1.5 appends an unlisted base_model to `models:` for every method; one that takes no base merges
    it as one more model (karcher averages it in), so it needs the per-model parameters and fits the model count."""
    if method.max_models is not None and count > method.max_models:
        raise SpecError(
            "base_model",
            f"{method.name} takes at most {method.max_models} model(s) and merges base_model as one of them "
            "(as mergekit does): remove base_model",
        )
    for p in method.model_params:
        if p.required and p.name not in (spec.parameters or {}):
            raise SpecError(
                "base_model",
                f"{method.name} merges base_model as one more model (as mergekit does), which needs a {p.name}: "
                f"list it under models: with its {p.name}, or remove base_model",
            )
    log.warning("%s takes no base: base_model is merged as one more model, as mergekit does", method.name)


def _uses_base(method: MergeMethod, sl: _Slice) -> bool:
    return method.uses_base != "never" and sl.base is not None


def _check_model_count(method: MergeMethod, sl: _Slice) -> None:
    n = sum(1 for s in sl.sources if not (_uses_base(method, sl) and s.seed == sl.base))
    where = f"{sl.path}.sources" if sl.path.startswith("slices") else sl.path
    if n < method.min_models:
        raise SpecError(
            where, f"{method.name} needs at least {method.min_models} model(s) besides the base, got {n}"
        )
    if method.max_models is not None and n > method.max_models:
        raise SpecError(
            where, f"{method.name} takes at most {method.max_models} model(s) besides the base, got {n}"
        )


def _check_architectures(seeds: list[Seed], used: list[int], allow_crimes: bool) -> None:
    signatures = {seeds[i].name: architecture_signature(seeds[i].config) for i in dict.fromkeys(used)}
    if len(set(signatures.values())) > 1 and not allow_crimes:
        detail = "; ".join(f"{name}: {'/'.join(sig) or 'unknown'}" for name, sig in signatures.items())
        raise CheckpointError(
            f"seeds have different architectures ({detail}); pass --allow-crimes to merge anyway"
        )


def check_parameters(spec: MergeSpec, *, lenient: bool = False) -> None:
    """The parameter checks that need no models (`validate --no-resolve` runs only these; planning runs them first).

    A name the method does not declare is an error naming the nearest valid one, unless `lenient` or another
    method declares it (a recipe switched from ties to linear keeps its `density`): then a warning, and the value
    is ignored, as mergekit ignores it. Values given as plain scalars are checked as the merge would check them.

    Raises:
        SpecError: naming the YAML path of the offending parameter.
    """
    method = get_method(spec.merge_method)
    known = [p.name for p in method.params]
    anywhere = sorted({p.name for m in all_methods() for p in m.params})
    for place, params in parameter_places(spec):
        for name in params or {}:
            if name in known:
                continue
            if not (lenient or name in anywhere):
                raise SpecError(
                    f"{place}.{name}", f"not a parameter of {method.name}{_suggestion(name, known)}"
                )
            log.warning("%s.%s is not a parameter of %s; ignored", place, name, method.name)
    if method.check is not None:
        for src_path, layers in _static_inputs(spec, method):
            values = {}
            for p in method.params:
                places = layers if p.per_model else layers[1:]
                found = next(((path, params[p.name]) for path, params in places if p.name in params), None)
                if found is not None and not isinstance(found[1], (int, float, str, bool)):
                    break  # a gradient or filters: checked per tensor when planned
                values[p.name] = p.default if found is None else _coerce(p, found[1], found[0])
            else:
                _raise_problem(method, values, layers, src_path)


def _suggestion(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]}?)"
    listed = ", ".join(known) if known else "none"
    return f" (its parameters: {listed}; --lenient-parameters ignores unknown names)"


# (path of a parameters mapping, the mapping), most specific first: the source's, its slice's, the global ones
_Layers = list[tuple[str, dict[str, Any]]]


def _layers(spec: MergeSpec, *places: tuple[str, dict[str, Any] | None]) -> _Layers:
    """Where a parameter's value is looked up, most specific first: the given (path, mapping) places (a source's,
    its slice's), then the global `parameters`; the first that names the parameter wins."""
    return [
        *((f"{path}.parameters", params or {}) for path, params in places),
        ("parameters", spec.parameters or {}),
    ]


def _static_inputs(spec: MergeSpec, method: MergeMethod):
    """(source path, parameter layers) of every input model the method merges (the base excluded when used)."""
    if spec.models is not None:
        for i, m in enumerate(spec.models):
            if method.uses_base != "never" and model_ref_string(m.model) == spec.base_ref():
                continue
            yield f"models[{i}]", _layers(spec, (f"models[{i}]", m.parameters))
        return
    for i, sl in enumerate(spec.slices or []):
        base = model_ref_string(sl.base_model) if sl.base_model is not None else spec.base_ref()
        for j, src in enumerate(sl.sources):
            if method.uses_base != "never" and model_ref_string(src.model) == base:
                continue
            path = f"slices[{i}].sources[{j}]"
            yield path, _layers(spec, (path, src.parameters), (f"slices[{i}]", sl.parameters))


def _raise_problem(method: MergeMethod, values: dict[str, Any], layers: _Layers, src_path: str) -> None:
    """SpecError at the YAML path of the parameter `method.check` blames for `values`, if any."""
    problem = method.check(values)
    if problem is None:
        return
    name, message = problem
    path = next(
        (f"{where}.{name}" for where, params in layers if name in params), f"{src_path}.parameters.{name}"
    )
    raise SpecError(path, message)


def _check_declared(spec: MergeSpec, method: MergeMethod, slices: list[_Slice], lenient: bool) -> None:
    """Static checks: parameter names and scalar values (`check_parameters`); required parameters given somewhere."""
    check_parameters(spec, lenient=lenient)
    global_given = set(spec.parameters or {})
    for p in method.global_params:
        if (
            p.required
            and p.name not in global_given
            and not all(p.name in (sl.params or {}) for sl in slices)
        ):
            raise SpecError(f"parameters.{p.name}", f"required by {method.name}")
    for sl in slices:
        for src in sl.sources:
            if _uses_base(method, sl) and src.seed == sl.base:
                continue
            for p in method.model_params:
                given = p.name in (src.params or {}) or p.name in (sl.params or {}) or p.name in global_given
                if p.required and not given:
                    raise SpecError(f"{src.path}.parameters.{p.name}", f"required by {method.name}")


def _non_layer_names(seeds: list[Seed], seed_ids: list[int]) -> list[str]:
    """Tensors outside the layers stored by any of these seeds (the first's order first): a tensor one seed
    lacks is then an error naming it, whichever seed is listed first."""
    names: dict[str, None] = {}
    for k in dict.fromkeys(seed_ids):
        seed = seeds[k]
        names.update((n, None) for n in seed.checkpoint.names if seed.arch.layer_index(n) is None)
    return list(names)


def _layer_names(
    seeds: list[Seed], by_layer: dict[int, dict[int, list[str]]], sl: _Slice, offset: int
) -> list[str]:
    """Tensors of layer `offset` of a slice stored by any of its sources, named as in its first source."""
    first = sl.sources[0]
    names: dict[str, None] = {}
    for src in sl.sources:
        seed = seeds[src.seed]
        for n in by_layer[src.seed].get(src.layer_start + offset, ()):
            names[seed.arch.with_layer(n, first.layer_start + offset)] = None
    return list(names)


def _names_by_layer(seed: Seed) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n in seed.checkpoint.names:
        index = seed.arch.layer_index(n)
        if index is not None:
            out.setdefault(index, []).append(n)
    return out


def _ignored_on_load(seed: Seed, name: str) -> bool:
    """Whether transformers ignores this stored tensor when loading the seed's model class (a non-persistent
    buffer an old checkpoint still carries, like rotary `inv_freq`); mergekit's architectures never list them."""
    import re

    patterns = [r"rotary_emb\.inv_freq"]  # transformers adds this one for every model (modeling_utils)
    for arch in seed.config.get("architectures") or []:
        try:
            import transformers

            cls = getattr(transformers, arch, None)
        except Exception:
            cls = None
        patterns += list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])
    return any(re.search(p, name) for p in patterns)


class _Planner:
    def __init__(
        self,
        spec: MergeSpec,
        seeds: list[Seed],
        method: MergeMethod,
        random_seed: int,
        out_dtype: torch.dtype | None,
        align_rows: bool,
    ):
        self.spec = spec
        self.seeds = seeds
        self.method = method
        self.random_seed = random_seed
        self.out_dtype = out_dtype
        self.align_rows = align_rows
        self.notes: list[str] = []

    def add(
        self, tasks: list[TensorTask], out_name: str, in_names: dict[int, str], sl: _Slice, t: float
    ) -> None:
        """Plan one output tensor, unless it is a loader-ignored buffer that some seed lacks (then left out)."""
        names = {s.seed: in_names.get(s.seed, out_name) for s in sl.sources}
        lacking = [k for k, n in names.items() if not self._has(k, n)]
        if lacking and _ignored_on_load(self.seeds[sl.sources[0].seed], out_name):
            note = (
                f"{out_name}: a buffer transformers ignores when loading, stored by only some seeds: left out"
            )
            log.info(note)
            self.notes.append(note)
            return
        tasks.append(self.task(out_name, in_names, sl, t))

    def _has(self, seed_idx: int, name: str) -> bool:
        try:
            self._source(seed_idx, name)
        except CheckpointError:
            return False
        return True

    def task(self, out_name: str, in_names: dict[int, str], sl: _Slice, t: float) -> TensorTask:
        sources = [self._source(src.seed, in_names.get(src.seed, out_name)) for src in sl.sources]
        shapes = {}
        for src, st in zip(sl.sources, sources):
            shapes[self.seeds[src.seed].name] = self.seeds[src.seed].checkpoint.info(st.name).shape
        embed = self.seeds[sl.sources[0].seed].arch.is_embed(out_name)
        rows_differ = len({s[1:] for s in shapes.values()}) == 1 and len({s[0] for s in shapes.values()}) > 1
        if len(set(shapes.values())) > 1 and not (embed and rows_differ and self.align_rows):
            detail = ", ".join(f"{name}: {list(shape)}" for name, shape in shapes.items())
            raise CheckpointError(f"tensor {out_name!r} has different shapes ({detail})")
        ref = self.seeds[sources[0].seed].checkpoint.info(sources[0].name)
        uses_base = _uses_base(self.method, sl)
        base_pos = next((i for i, s in enumerate(sl.sources) if uses_base and s.seed == sl.base), None)
        inputs = [(s, st) for i, (s, st) in enumerate(zip(sl.sources, sources)) if i != base_pos]
        if not ref.dtype.is_floating_point:
            first = sources[base_pos if base_pos is not None else 0]
            return TensorTask(
                out_name, ref.shape, ref.dtype, "passthrough", (first,), None, {}, ({"scale": 1.0},)
            )
        params = {p.name: self._param(p, None, sl, out_name, t) for p in self.method.global_params}
        model_params = tuple(
            {p.name: self._param(p, src, sl, st.name, t) for p in self.method.model_params}
            for src, st in inputs
        )
        if self.method.check is not None:  # values from gradients and filters, as this tensor resolves them
            for (src, _), values in zip(inputs, model_params):
                layers = _layers(self.spec, (src.path, src.params), (sl.path, sl.params))
                _raise_problem(self.method, {**params, **values}, layers, src.path)
        return TensorTask(
            name=out_name,
            shape=ref.shape,
            out_dtype=self.out_dtype or ref.dtype,
            method=self.method.name,
            inputs=tuple(st for _, st in inputs),
            base=sources[base_pos] if base_pos is not None else None,
            params=params,
            model_params=model_params,
            rng_seed=_tensor_seed(self.random_seed, out_name),
            align_rows=embed and self.align_rows,
        )

    def _source(self, seed_idx: int, name: str) -> SourceTensor:
        seed = self.seeds[seed_idx]
        if name in seed.checkpoint:
            return SourceTensor(seed_idx, name)
        for head, embedding in seed.arch.tied_pairs:
            if name == head and embedding in seed.checkpoint and ties_word_embeddings(seed.config):
                return SourceTensor(seed_idx, embedding)
        raise CheckpointError(f"tensor {name!r} is missing in seed {seed.name}")

    def _param(self, p: Param, src: _Source | None, sl: _Slice, tensor: str, t: float) -> Any:
        places = [(src.path, src.params)] if src is not None else []
        aliases = self.seeds[sl.sources[0].seed].arch.aliases(tensor)
        for path, params in _layers(self.spec, *places, (sl.path, sl.params)):
            if p.name in params:
                value = evaluate_setting(params[p.name], tensor, t, aliases)
                if value is not None:
                    return _coerce(p, value, path)
        if p.required:
            where = f"{src.path}.parameters.{p.name}" if src else f"parameters.{p.name}"
            raise SpecError(where, f"required by {self.method.name}, but no filter matches tensor {tensor!r}")
        return p.default


def _coerce(p: Param, value: Any, path: str) -> Any:
    """`value` coerced for `p`, found in the parameters mapping at `path` (a SpecError names `path.<name>`)."""
    try:
        if p.kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                return value.lower() == "true"
            return bool(value)
        if p.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)  # 2.5 is not truncated to 2 (mergekit refuses it too)
            return int(value)
        if p.kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        expected = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(p.kind, "a string")
        raise SpecError(f"{path}.{p.name}", f"expected {expected}, got {value!r}") from None


def _tensor_seed(random_seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{random_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
