"""Evolving real checkpoints: a spec whose `models:` are the seeds, Blend genomes written into one live model,
scored by lm-eval (or a Python function), and at the end the best member exported with its lineage card.

Example (`examples/specialists/spec.yaml`):

```yaml
name: m2n2
models:
  - model: build/add
  - model: build/rev
genome: {kind: blend, block_size: 4096, slerp_scope: global}
evolve: {algorithm: m2n2, budget: 60, seed: 42, log_every: 5, checkpoint_every_steps: 1}
evaluate:
  kind: lm_eval
  include_path: build/tasks
  tasks: [specialists_add_fit, specialists_rev_fit]
  test_tasks: [specialists_add_test, specialists_rev_test]
  metric: exact_match
```
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from hf_m2n2.errors import HfM2n2Error, SpecError
from hf_m2n2.evaluate.lm_eval import LmEvalConfig
from hf_m2n2.evolve.config import EvolveConfig, PythonEvaluateConfig, check_evolve, validation_error
from hf_m2n2.evolve.loop import LINEAGE
from hf_m2n2.method_genome import MethodGenomeConfig
from hf_m2n2.spec import InputModel, OutputConfig, model_ref_string

MODEL_DIR = "model"
REPORT = "report.json"
TIMING = "timing.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlendGenomeConfig(_Strict):
    """The `genome:` section of a model evolution: Blend genomes over the seeds, and the live model.

    Attributes:
        block_size: elements per block (granularity of split points and Gram sums).
        slerp_scope: SLERP angle from the full vectors (`global`, reference), per segment (`segment`, paper) or
            per tensor (`tensor`).
        include, exclude: glob patterns of the tensors that evolve; the others come from `fixed_from`.
        fixed_from: the seed (as written in `models`) whose config, tokenizer and non-evolved tensors are used.
        dtype: dtype of the live model and of the blending arithmetic (and of the exported weights).
        device: where the live model and the resident seeds live (`cpu`, `cuda`, ...).
        resident: keep the seeds' evolved tensors in memory on `device` (else read them per candidate).
        device_map, max_memory, offload_folder: accelerate dispatch of the live model (CPU/disk offload).
    """

    kind: Literal["blend"] = "blend"
    block_size: int = Field(65536, ge=1)
    slerp_scope: Literal["global", "segment", "tensor"] = "global"
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    fixed_from: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    resident: bool = True
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[str, int | str] | None = None
    offload_folder: str | None = None


EvaluateConfig = Annotated[LmEvalConfig | PythonEvaluateConfig, Field(discriminator="kind")]


def _genome_kind(value: Any) -> str:
    kind = value.get("kind", "blend") if isinstance(value, dict) else getattr(value, "kind", "blend")
    return f"{kind}_genome"  # tags must not collide with field names (error paths follow the data)


GenomeConfig = Annotated[
    Annotated[BlendGenomeConfig, Tag("blend_genome")] | Annotated[MethodGenomeConfig, Tag("method_genome")],
    Discriminator(
        _genome_kind,
        custom_error_type="invalid_genome_kind",
        custom_error_message="unknown genome kind (expected blend or method)",
    ),
]


class ModelEvolveSpec(_Strict):
    """A model evolution spec: seeds (`models:`, mergekit style), genome, strategy and fitness."""

    name: str | None = None
    models: list[InputModel] = Field(min_length=2)
    genome: GenomeConfig = BlendGenomeConfig()
    evolve: EvolveConfig
    evaluate: EvaluateConfig
    output: OutputConfig | None = None

    @property
    def label(self) -> str:
        return self.name or self.evolve.algorithm

    def seed_refs(self) -> list[str]:
        return [model_ref_string(m.model) for m in self.models]


def is_model_spec(data: Any) -> bool:
    return isinstance(data, dict) and "models" in data


def parse_model_spec(data: dict[str, Any]) -> ModelEvolveSpec:
    """Validate a model evolution spec (the parsed YAML mapping).

    Raises:
        SpecError: with the YAML path of the first problem.
    """
    try:
        spec = ModelEvolveSpec(**data)
    except ValidationError as exc:
        raise validation_error(exc, data) from None
    check_evolve(spec.evolve)
    if isinstance(spec.genome, MethodGenomeConfig):
        from hf_m2n2.method_genome import check_method_spec

        check_method_spec(spec)
        return spec
    algorithm = spec.evolve.algorithm
    if algorithm == "evomerge_ps":
        raise SpecError(
            "genome.kind", "evomerge_ps evolves merge-method parameters: use genome: {kind: method, ...}"
        )
    if algorithm == "cma_es":
        raise SpecError(
            "evolve.algorithm",
            "cma_es evolves dense vectors; Blend genomes use m2n2, ga, map_elites or sweep",
        )
    if spec.evolve.mutation_std:
        raise SpecError("evolve.mutation_std", "Blend genomes of pretrained seeds are not mutated")
    if algorithm == "sweep" and len(spec.models) != 2:
        raise SpecError("models", "the sweep needs exactly two seeds")
    refs = spec.seed_refs()
    if len(set(refs)) != len(refs):
        raise SpecError("models", "a seed is listed twice")
    if spec.genome.fixed_from is not None and spec.genome.fixed_from not in refs:
        raise SpecError("genome.fixed_from", f"{spec.genome.fixed_from!r} is not one of the models")
    return spec


@dataclass
class ModelRun:
    """The parts of a model evolution that outlive the loop (for export and the report)."""

    spec: ModelEvolveSpec
    seeds: list[Any]
    ops: Any
    live: Any
    evaluator: Any
    fixed: int
    tensor_names: list[str]
    timing: CandidateTiming | None = None


@dataclass
class CandidateTiming:
    """Seconds per scored candidate: writing it into the live model (materialize) vs running the evaluator.

    Only score-cache misses are timed (hits are counted). In memory: a resumed run times the candidates of its last
    session only. On an accelerator, kernels still running after the write are counted as evaluation.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    cache_hits: int = 0

    def add(self, kind: str, materialize_s: float, evaluate_s: float) -> None:
        self.records.append(
            {"kind": kind, "materialize_s": round(materialize_s, 4), "evaluate_s": round(evaluate_s, 4)}
        )

    def to_dict(self) -> dict[str, Any]:
        """`{"fit": {...}, "test": {...}, "cache_hits": n, "records": [...]}`: count, total and mean seconds of
        materialize and evaluate for fitness (`fit`) and held-out (`test`) calls, then every record in order."""
        out: dict[str, Any] = {}
        for kind in ("fit", "test"):
            rows = [r for r in self.records if r["kind"] == kind]
            stats: dict[str, Any] = {"count": len(rows)}
            for part in ("materialize_s", "evaluate_s"):
                total = sum(r[part] for r in rows)
                stats[f"{part}_total"] = round(total, 3)
                stats[f"{part}_mean"] = round(total / len(rows), 4) if rows else None
            out[kind] = stats
        return {**out, "cache_hits": self.cache_hits, "records": self.records}


class BlendEvaluator:
    """Scores Blend genomes: writes the candidate into the live model, then asks the model evaluator.

    Scores are cached by the genome's hash (a recipe evaluated twice, e.g. a re-drawn seed, costs nothing).
    `timing` records the seconds of the write and of the evaluation of every candidate actually scored.
    """

    def __init__(self, ops: Any, inner: Any):
        self.ops = ops
        self.inner = inner
        self._cache: dict[tuple[str, str], Any] = {}
        self.timing = CandidateTiming()

    def _call(self, kind: str, genome: Any) -> Any:
        key = (kind, self.ops.hash(genome) if hasattr(self.ops, "hash") else genome_hash(genome))
        if key not in self._cache:
            start = time.perf_counter()
            model = self.ops.write(genome)
            written = time.perf_counter()
            method = getattr(self.inner, "scores" if kind == "fit" else "test_score")
            self._cache[key] = method(model)
            self.timing.add(kind, written - start, time.perf_counter() - written)
        else:
            self.timing.cache_hits += 1
        return self._cache[key]

    def scores(self, genome: Any) -> np.ndarray:
        return self._call("fit", genome)

    def test_score(self, genome: Any) -> float | None:
        return self._call("test", genome)

    def example_groups(self) -> np.ndarray | None:
        return self.inner.example_groups()


def genome_hash(genome: Any) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(genome.breakpoints).tobytes())
    digest.update(np.ascontiguousarray(genome.coefs).tobytes())
    return digest.hexdigest()[:20]


def build_model_run(
    spec: ModelEvolveSpec, seed: int, run_dir: Path, spec_dir: Path | None
) -> tuple[Any, ModelRun]:
    """Open the seeds, build the live model, Gram sums (cached in the run directory), ops, evaluator, strategy.

    Returns:
        (RunParts for the loop, ModelRun for the export).
    """
    if isinstance(spec.genome, MethodGenomeConfig):
        from hf_m2n2.method_genome import build_method_run

        return build_method_run(spec, seed, run_dir, spec_dir)

    from hf_m2n2.blend import select_tensors
    from hf_m2n2.blend_ops import BlendOps, SeedTensors, evolved_layout, seed_gram
    from hf_m2n2.evolve.build import RunParts, build_strategy
    from hf_m2n2.live import LiveModel
    from hf_m2n2.plan import torch_dtype
    from hf_m2n2.seeds import open_seeds

    refs = spec.seed_refs()
    seeds = open_seeds(refs, base_dir=spec_dir)
    genome = spec.genome
    fixed = refs.index(genome.fixed_from) if genome.fixed_from else 0
    floating = [
        n for n in seeds[fixed].checkpoint.names if seeds[fixed].checkpoint.info(n).dtype.is_floating_point
    ]
    names = select_tensors(floating, genome.include, genome.exclude)
    if not names:
        raise SpecError("genome.include", "no tensor matches the include/exclude patterns")
    layout = evolved_layout(seeds, names, genome.block_size)
    dtype = torch_dtype(genome.dtype)
    offload = None
    if genome.offload_folder is not None:
        offload = Path(genome.offload_folder)
        offload = offload if offload.is_absolute() else run_dir / offload
    live = LiveModel(
        seeds[fixed].model.path,
        dtype=dtype,
        device=genome.device,
        device_map=genome.device_map,
        max_memory=genome.max_memory,
        offload_folder=offload,
    )
    tensors = SeedTensors(
        seeds, names, dtype, live.device if genome.device_map is None else "cpu", genome.resident
    )
    gram = seed_gram(layout, tensors, run_dir / "gram.npz")
    ops = BlendOps(layout, gram, tensors, live, genome.slerp_scope, defer_writes=True)
    inner = _inner_evaluator(spec, live, seeds[fixed], spec_dir)
    evaluator = BlendEvaluator(ops, inner)
    _, strategy_stream = np.random.SeedSequence(seed).spawn(2)
    groups = evaluator.example_groups() if spec.evolve.algorithm == "map_elites" else None
    strategy = build_strategy(
        spec.evolve, ops, ops.seed_genomes(), seed=strategy_stream, mutation_std=0.0, groups=groups
    )
    run = ModelRun(spec, seeds, ops, live, inner, fixed, names, timing=evaluator.timing)
    return RunParts(ops, evaluator, strategy, 0.0), run


def _inner_evaluator(spec: ModelEvolveSpec, live: Any, fixed_seed: Any, spec_dir: Path | None) -> Any:
    if isinstance(spec.evaluate, LmEvalConfig):
        from transformers import AutoTokenizer

        from hf_m2n2.evaluate.lm_eval import LmEvalEvaluator

        tokenizer = AutoTokenizer.from_pretrained(str(fixed_seed.model.path))
        return LmEvalEvaluator(spec.evaluate, live.model, tokenizer, base_dir=spec_dir)
    from hf_m2n2.evaluate.python import PythonEvaluator

    return PythonEvaluator.from_config(spec.evaluate)


def ancestors(lineage_path: Path, best_id: int) -> list[dict[str, Any]]:
    """The lineage records of `best_id` and all its ancestors, oldest first."""
    records = {}
    if lineage_path.exists():
        for line in lineage_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["id"]] = record
    wanted, stack = set(), [best_id]
    while stack:
        node = stack.pop()
        if node in wanted or node not in records:
            continue
        wanted.add(node)
        stack.extend(records[node]["parents"])
    return [records[i] for i in sorted(wanted)]


def finish_model_run(
    run: ModelRun, run_dir: Path, summary: dict[str, Any], strategy: Any, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Export the best member (weights, recipe, lineage card, fitness plot) to `run_dir/model` and write the
    held-out report `{model_name: {task: score}}` of every seed and the merged model to `run_dir/report.json`
    (and the per-candidate materialize/evaluate seconds to `run_dir/timing.json`)."""
    if run.timing is not None:
        (run_dir / TIMING).write_text(json.dumps(run.timing.to_dict(), indent=2) + "\n")
    if isinstance(run.spec.genome, MethodGenomeConfig):
        from hf_m2n2.method_genome import finish_method_run

        return finish_method_run(run, run_dir, summary, strategy, progress)
    from hf_m2n2.blend_ops import BlendRecipe, export_blend, seed_record

    outcome = RunOutcome.of(run, run_dir, summary, strategy)
    genome = run.spec.genome
    recipe = BlendRecipe(
        [seed_record(s) for s in run.seeds],
        run.tensor_names,
        genome.block_size,
        run.fixed,
        genome.dtype,
        outcome.best.genome,
        outcome.lineage,
    )
    export_blend(
        recipe,
        run.seeds,
        run_dir / MODEL_DIR,
        overwrite=True,
        write_card=lambda tmp: outcome.write_card(tmp, recipe_file="recipe.json"),
    )
    return outcome.save_report(progress)


@dataclass
class RunOutcome:
    """What a finished model run exports, whatever its genome: the best member, its lineage, the held-out
    report of every seed and of the merge, and the fitness plot."""

    run: Any
    run_dir: Path
    summary: dict[str, Any]
    best: Any
    lineage: list[dict[str, Any]]
    merged_name: str
    report: dict[str, dict[str, float]]
    tasks: list[str]
    metric: str
    plot_name: str | None

    @classmethod
    def of(cls, run: Any, run_dir: Path, summary: dict[str, Any], strategy: Any) -> RunOutcome:
        best = strategy.best()
        if best is None:
            raise HfM2n2Error("the run has no archive member to export")
        merged_name = run.spec.name or f"{run.spec.evolve.algorithm}-merge"
        report, tasks, metric = _held_out_report(run, best.genome, merged_name)
        lineage = ancestors(run_dir / LINEAGE, best.lineage.id)
        return cls(
            run, run_dir, summary, best, lineage, merged_name, report, tasks, metric, _fitness_plot(run_dir)
        )

    def write_card(self, out: Path, **card_fields: Any) -> None:
        """Add the fitness plot, README.md and card.json (seeds, held-out scores, lineage, push target) to `out`."""
        from hf_m2n2.card import evolve_card_info, write_card

        run, report, tasks = self.run, self.report, self.tasks
        if self.plot_name:
            (out / self.plot_name).write_bytes((self.run_dir / self.plot_name).read_bytes())
        output = getattr(run.spec, "output", None)
        info = evolve_card_info(
            model_name=self.merged_name,
            algorithm=run.spec.evolve.algorithm,
            seeds=[s.model for s in run.seeds],
            tasks=tasks,
            metric=self.metric,
            merged=[report[self.merged_name][t] for t in tasks],
            seed_scores={s.name: [report[s.name][t] for t in tasks] for s in run.seeds},
            lineage=self.lineage,
            passes=self.summary["forward_passes"],
            run_seed=self.summary["seed"],
            plot=self.plot_name,
            model_id=output.push_to_hub if output is not None else None,
            **card_fields,
        )
        write_card(out, info)

    def save_report(self, progress: bool) -> dict[str, dict[str, float]]:
        (self.run_dir / REPORT).write_text(json.dumps(self.report, indent=2) + "\n")
        if progress:
            print(format_report(self.report, self.tasks))
        return self.report


def _held_out_report(
    run: ModelRun, best_genome: Any, merged_name: str
) -> tuple[dict[str, dict[str, float]], list[str], str]:
    """Per-task held-out scores of every seed and of the merged model (fitness split when there is none)."""
    from hf_m2n2.evaluate.lm_eval import LmEvalEvaluator

    report: dict[str, dict[str, float]] = {}
    candidates = [(s.name, g) for s, g in zip(run.seeds, run.ops.seed_genomes())] + [
        (merged_name, best_genome)
    ]
    metric = "score"
    for name, genome in candidates:
        model = run.ops.write(genome)
        if isinstance(run.evaluator, LmEvalEvaluator):
            split = "test" if run.evaluator.config.has_test else "fitness"
            result = run.evaluator.evaluate(split, model)
            report[name] = result.entry_means()
            metric = result.tasks[0].metric if result.tasks else metric
        else:
            test = run.evaluator.test_score(model)
            report[name] = {"test": float(test if test is not None else np.mean(run.evaluator.scores(model)))}
    tasks = list(next(iter(report.values())))
    return report, tasks, metric


def format_report(report: dict[str, dict[str, float]], tasks: list[str]) -> str:
    width = max(len(n) for n in report) + 2
    lines = ["".ljust(width) + "".join(t[:22].rjust(24) for t in tasks) + "mean".rjust(10)]
    for name, scores in report.items():
        values = [scores[t] for t in tasks]
        lines.append(name.ljust(width) + "".join(f"{v:24.4f}" for v in values) + f"{np.mean(values):10.4f}")
    return "\n".join(lines)


def _fitness_plot(run_dir: Path) -> str | None:
    try:
        from hf_m2n2.plots import plot_runs
    except ImportError:
        return None
    name = "fitness.png"
    try:
        plot_runs([run_dir], run_dir / name, metric="best_train")
    except Exception:  # a missing matplotlib or an empty history must not lose the exported model
        return None
    return name


def export_run(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """`hf-m2n2 export`: stream the best model of a finished run again, with its card and plot, into `out_dir`.

    Raises:
        HfM2n2Error: `run_dir` is not a finished model evolution run.
    """
    import shutil

    from hf_m2n2.blend_ops import BlendRecipe, rebuild

    model = Path(run_dir) / MODEL_DIR
    if (model / "merge_config.yaml").is_file() and not (model / "recipe.json").is_file():
        from hf_m2n2.method_genome import export_method_run

        return export_method_run(model, out_dir, overwrite=overwrite)
    if not (model / "recipe.json").is_file():
        raise HfM2n2Error(f"{run_dir} has no exported model ({MODEL_DIR}/recipe.json): is the run finished?")
    BlendRecipe.load(model / "recipe.json")
    out = rebuild(model / "recipe.json", out_dir, overwrite=overwrite)
    for extra in ("README.md", "card.json", "fitness.png"):
        if (model / extra).is_file():
            shutil.copyfile(model / extra, out / extra)
    return out
