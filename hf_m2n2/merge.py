"""`hf-m2n2 merge`: a MergeSpec to a merged model directory (weights, config, tokenizer, card), atomically."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_m2n2.card import CardModel, merge_card_info, write_card
from hf_m2n2.errors import CheckpointError, SpecError
from hf_m2n2.hub import ResolvedModel
from hf_m2n2.materialize import CHUNK_ELEMENTS, Sink, WorkItem, compute_item, materialize, work_items
from hf_m2n2.methods import get_method
from hf_m2n2.models import ModelKind, model_kind
from hf_m2n2.outdir import (
    atomic_output_dir,
    check_output_dir,
    copy_generation_config,
    copy_tokenizer_files,
    set_config_dtype,
)
from hf_m2n2.plan import check_parameters, plan_merge
from hf_m2n2.push import PushResult, PushTarget
from hf_m2n2.recipe import MethodRecipe
from hf_m2n2.seeds import Seed, close_seeds, open_seeds
from hf_m2n2.spec import MergeSpec, load_spec, model_ref_string, parse_spec, parse_yaml, read_spec_text
from hf_m2n2.vocab import VocabPlan, check_token_sources, load_tokenizer, plan_vocab
from hf_m2n2.writer import PlannedTensor, ShardedSafetensorsWriter

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5_000_000_000
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class MergeOptions:
    """Run options (the CLI flags). Defaults follow mergekit-yaml where it has the same flag."""

    out_shard_size: int = DEFAULT_SHARD_SIZE
    copy_tokenizer: bool = True
    random_seed: int = 0
    device: str = "cpu"
    allow_crimes: bool = False
    overwrite: bool = False
    allow_nonfinite: bool = False
    workers: int = 2
    memory_budget: int = 768 << 20
    chunk_elements: int = CHUNK_ELEMENTS
    trust_remote_code: bool = False
    progress: bool = True
    push_to_hub: str | None = None  # overrides the spec's output.push_to_hub
    private: bool | None = None  # overrides output.private
    lenient_parameters: bool = False  # warn about and ignore parameter names the method does not declare
    output_format: str = (
        "diffusers"  # pipelines: `diffusers` (a folder) or `single_file` (the original layout)
    )


@dataclass
class MergeResult:
    out_dir: Path
    seeds: list[ResolvedModel]
    tensors: int
    total_bytes: int
    notes: list[str] = field(default_factory=list)
    push: PushResult | None = None


def run_merge(
    config_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], options: MergeOptions | None = None
) -> MergeResult:
    """Merge the models of a YAML spec file into `out_dir`.

    Example:
        >>> run_merge("examples/tiny_merge/spec.yaml", "out/tiny-merged")
    """
    text = read_spec_text(config_path)
    spec = parse_spec(parse_yaml(text, config_path), source=str(config_path))
    return merge(spec, out_dir, options, spec_text=text, spec_dir=Path(config_path).resolve().parent)


def merge(
    spec: MergeSpec,
    out_dir: str | os.PathLike[str],
    options: MergeOptions | None = None,
    *,
    spec_text: str | None = None,
    spec_dir: Path | None = None,
) -> MergeResult:
    """Run a static merge. Nothing is written to `out_dir` unless the whole merge succeeds.

    When the spec's `output.push_to_hub` (or `options.push_to_hub`) names a repo, the finished directory is
    uploaded to it; a failed upload leaves the local result in place.

    Raises:
        SpecError, ModelResolutionError, CheckpointError, OutputError, PushError: with a one-line message.
    """
    options = options or MergeOptions()
    out_dir = Path(out_dir)
    check_output_dir(out_dir, options.overwrite)
    target = PushTarget.resolve(spec.output, options.push_to_hub, options.private)
    refs = spec.referenced_models()
    from hf_m2n2.align.merge import align_merge, check_align_spec, is_align_method

    check_align_spec(spec)
    seeds = _open_seeds(spec, refs, spec_dir, options.trust_remote_code)
    try:
        if is_align_method(spec):  # two models of different initializations, aligned or zipped
            written = align_merge(spec, seeds, out_dir, options, spec_text, spec_dir)
            result = MergeResult(out_dir, [s.model for s in seeds], *written)
        else:
            kind = seeds_kind(spec, seeds, options)
            result = kind.merge(spec, seeds, refs, out_dir, options, spec_text, target)
    finally:
        for seed in seeds:
            seed.checkpoint.close()
    if target is not None:
        result.push = target.push(out_dir)
    return result


def _open_seeds(
    spec: MergeSpec, refs: list[str], spec_dir: Path | None, trust_remote_code: bool
) -> list[Seed]:
    single_file_config = (
        None if spec.single_file_config is None else model_ref_string(spec.single_file_config)
    )
    return open_seeds(
        refs,
        base_dir=spec_dir,
        trust_remote_code=trust_remote_code,
        variant=spec.variant,
        single_file_config=single_file_config,
    )


def seeds_kind(spec: MergeSpec, seeds: list[Seed], options: MergeOptions | None = None) -> ModelKind:
    """The one model kind of the seeds (which plans and writes the merge).

    Raises:
        CheckpointError: seeds of different kinds (a causal LM and a pipeline).
        SpecError: a pipeline-only key (`components`, `variant`, `single_file_config`) for causal LMs.
    """
    kinds = {s.kind for s in seeds}
    if len(kinds) > 1:
        detail = ", ".join(f"{s.name}: {s.kind}" for s in seeds)
        raise CheckpointError(f"seeds of different kinds cannot be merged ({detail})")
    kind = model_kind(kinds.pop())
    if kind.name == "causal_lm" and options is not None and options.output_format != "diffusers":
        raise SpecError("--output-format", f"{options.output_format}: only for text-to-image pipeline seeds")
    if kind.name == "causal_lm":
        for key in ("components", "variant", "single_file_config"):
            if getattr(spec, key) is not None:
                raise SpecError(key, "only for text-to-image pipeline seeds (model_index.json)")
    return kind


def merge_causal_lm(
    spec: MergeSpec,
    seeds: list[Seed],
    refs: list[str],
    out_dir: Path,
    options: MergeOptions,
    spec_text: str | None,
    target: PushTarget | None,
) -> MergeResult:
    seed_index = {ref: i for i, ref in enumerate(refs)}
    vocab, recipe = _plan(spec, seeds, seed_index, options)
    planned = [
        PlannedTensor(t.name, (vocab.rows, *t.shape[1:]) if t.align_rows and vocab else t.shape, t.out_dtype)
        for t in recipe.tasks
    ]
    notes = [*recipe.notes, *(vocab.notes if vocab else [])]
    with atomic_output_dir(out_dir, options.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, planned, options.out_shard_size)
        try:
            run_tasks(recipe, seeds, writer, vocab, options)
            writer.finish()
        finally:
            writer.abort()
        _write_config(tmp, seeds, recipe, vocab, planned)
        chat_template = _write_tokenizer(tmp, spec, seeds, seed_index, recipe, vocab, options)
        recipe_text = spec_text if spec_text is not None and spec.output is None else spec.to_yaml()
        (tmp / "merge_config.yaml").write_text(recipe_text)
        model_id = (
            target.repo_id if target else str(out_dir)
        )  # the snippet loads what exists: the repo or OUT
        _write_card(tmp, out_dir.name, spec, seeds, seed_index, recipe, notes, chat_template, model_id)
    return MergeResult(out_dir, [s.model for s in seeds], len(planned), sum(p.nbytes for p in planned), notes)


def _plan(
    spec: MergeSpec, seeds: list[Seed], seed_index: dict[str, int], options: MergeOptions
) -> tuple[VocabPlan | None, MethodRecipe]:
    """The output vocabulary and the recipe, every check done (`validate` and `merge` plan alike, writing nothing)."""
    vocab = _plan_vocab(spec, seeds, seed_index, options)
    recipe = plan_merge(
        spec,
        seeds,
        seed_index,
        random_seed=options.random_seed,
        allow_crimes=options.allow_crimes,
        align_rows=vocab is not None,
        lenient_parameters=options.lenient_parameters,
    )
    if vocab is not None:
        check_token_sources(vocab, recipe.tasks)
    return vocab, recipe


def _plan_vocab(
    spec: MergeSpec, seeds: list[Seed], seed_index: dict[str, int], options: MergeOptions
) -> VocabPlan | None:
    source = spec.tokenizer_source_ref()
    users = [seed_index[r] for r in spec.referenced_models() if r != source or r in _merged_refs(spec)]
    base = seed_index[spec.base_ref()] if spec.base_model is not None else None
    reference = base if base is not None else users[0]
    pad = spec.tokenizer.pad_to_multiple_of if spec.tokenizer else None
    tokens = spec.tokenizer.tokens if spec.tokenizer else None
    return plan_vocab(
        source, seeds, seed_index, users, base, reference, pad, options.trust_remote_code, tokens
    )


def _merged_refs(spec: MergeSpec) -> set[str]:
    refs = {model_ref_string(m.model) for m in spec.models or []}
    refs |= {model_ref_string(src.model) for s in spec.slices or [] for src in s.sources}
    if spec.base_model is not None:
        refs.add(spec.base_ref())
    return refs


def run_tasks(
    recipe: MethodRecipe,
    seeds: list[Seed],
    writer: Sink,
    vocab: VocabPlan | None,
    options: MergeOptions,
) -> None:
    """Materialize every task of a recipe into `writer` (a sharded writer, or the pipeline merge's sink that routes
    each component's tensors to its own writer), with the run's workers, memory budget and progress bar."""
    from tqdm.auto import tqdm

    items = work_items(recipe, options.chunk_elements)
    bar = tqdm(total=len(recipe.tasks), unit="tensor", desc="merging", disable=not options.progress)

    def compute(item: WorkItem) -> torch.Tensor | None:
        return compute_item(
            item,
            seeds,
            compute_dtype=recipe.compute_dtype,
            device=options.device,
            vocab=vocab,
            allow_nonfinite=options.allow_nonfinite,
        )

    def done(item: WorkItem) -> None:
        if not item.statistics and (item.rows is None or item.rows[1] == item.task.shape[0]):
            bar.update()

    threads = torch.get_num_threads()
    if options.workers > 1:
        torch.set_num_threads(1)  # parallel over tensors; an OpenMP team per worker oversubscribes
    try:
        materialize(
            items, compute, writer, workers=options.workers, budget_bytes=options.memory_budget, on_done=done
        )
    finally:
        torch.set_num_threads(threads)
        bar.close()


def _write_config(
    tmp: Path, seeds: list[Seed], recipe: MethodRecipe, vocab: VocabPlan | None, planned: list[PlannedTensor]
) -> None:
    ref = seeds[recipe.reference_seed]
    src = ref.model.path
    if not (src / "config.json").exists():
        log.warning("%s has no config.json; the output has none either", ref.name)
        return
    config = dict(ref.config)
    if ref.arch.num_layers_key in config:
        config[ref.arch.num_layers_key] = recipe.num_layers
    if vocab is not None:
        config[ref.arch.vocab_key] = vocab.rows
    dtypes = Counter(p.dtype for p in planned if p.dtype.is_floating_point)
    if dtypes:
        set_config_dtype(config, dtypes.most_common(1)[0][0])
    names = {p.name for p in planned}
    if config.get("tie_word_embeddings") and any(head in names for head, _ in ref.arch.tied_pairs):
        config["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_generation_config(src, tmp)


def _write_tokenizer(
    tmp: Path,
    spec: MergeSpec,
    seeds: list[Seed],
    seed_index: dict[str, int],
    recipe: MethodRecipe,
    vocab: VocabPlan | None,
    options: MergeOptions,
) -> bool:
    """Copy (or build, for `union`) the output tokenizer; apply `chat_template`. Returns whether one is set."""
    source = spec.tokenizer_source_ref()
    if not options.copy_tokenizer and source is None and spec.chat_template is None:
        return False
    if vocab is not None and vocab.union_tokenizer is not None:
        vocab.union_tokenizer.save_pretrained(str(tmp))
    else:
        owner = (
            vocab.tokenizer_seed
            if vocab is not None and vocab.tokenizer_seed is not None
            else (
                seed_index[source]
                if source not in (None, "base", "union")
                else (recipe.base_seed if recipe.base_seed is not None else recipe.reference_seed)
            )
        )
        copy_tokenizer_files(seeds[owner].model.path, tmp)
    template = _chat_template(spec.chat_template, seeds, options)
    if template is not None:
        _set_chat_template(tmp, template)
        return True
    return (tmp / "chat_template.jinja").exists() or "chat_template" in _tokenizer_config(tmp)


def _chat_template(value: str | None, seeds: list[Seed], options: MergeOptions) -> str | None:
    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return value
    if value == "chatml":
        return CHATML
    if value == "auto":
        templates = Counter()
        for seed in seeds:
            try:
                tmpl = load_tokenizer(seed, options.trust_remote_code).chat_template
            except Exception:
                tmpl = None
            if isinstance(tmpl, str):
                templates[tmpl] += 1
        if not templates:
            raise SpecError("chat_template", "auto: none of the seeds has a chat template")
        return templates.most_common(1)[0][0]
    raise SpecError("chat_template", f"unknown template {value!r} (use auto, chatml, or a Jinja template)")


def _tokenizer_config(directory: Path) -> dict:
    file = directory / "tokenizer_config.json"
    return json.loads(file.read_text()) if file.exists() else {}


def _set_chat_template(directory: Path, template: str) -> None:
    (directory / "chat_template.jinja").write_text(template)
    config = _tokenizer_config(directory)
    if config:
        config.pop("chat_template", None)  # chat_template.jinja takes its place
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_card(
    tmp: Path,
    model_name: str,
    spec: MergeSpec,
    seeds: list[Seed],
    seed_index: dict[str, int],
    recipe: MethodRecipe,
    notes: list[str],
    chat_template: bool,
    model_id: str | None = None,
) -> None:
    base = spec.base_ref()
    models = []
    for ref, i in seed_index.items():
        role = (
            "base"
            if ref == base
            else (
                "tokenizer"
                if ref == spec.tokenizer_source_ref() and ref not in _merged_refs(spec)
                else "merged"
            )
        )
        models.append(CardModel(seeds[i].model, role))
    info = merge_card_info(
        model_name=model_name,
        method=recipe.method,
        paper=get_method(recipe.method).paper,
        models=models,
        config_yaml=(tmp / "merge_config.yaml").read_text(),
        notes=notes,
        chat_template=chat_template,
        model_id=model_id,
    )
    write_card(tmp, info)


def validate(
    config_path: str | os.PathLike[str],
    *,
    resolve: bool = True,
    lenient_parameters: bool = False,
    trust_remote_code: bool = False,
) -> MergeSpec:
    """`hf-m2n2 validate`: parse the spec and check its parameters; with `resolve`, also resolve the seeds and
    plan the merge (no writes), which checks every parameter value as the merge would."""
    from hf_m2n2.align.merge import calibration_texts, check_align_spec, is_align_method, plan_align

    spec = load_spec(config_path)
    base_dir = Path(config_path).resolve().parent
    check_align_spec(spec)
    if is_align_method(spec) and spec.calibration is not None:
        calibration_texts(spec.calibration, base_dir)
    if not resolve:
        if not is_align_method(spec):
            check_parameters(spec, lenient=lenient_parameters)
    else:
        refs = spec.referenced_models()
        seeds = _open_seeds(spec, refs, base_dir, trust_remote_code)
        options = MergeOptions(trust_remote_code=trust_remote_code, lenient_parameters=lenient_parameters)
        try:
            if is_align_method(spec):
                plan_align(spec, seeds)
            else:
                seeds_kind(spec, seeds).plan(spec, seeds, refs, options)
        finally:
            close_seeds(seeds)
    return spec
