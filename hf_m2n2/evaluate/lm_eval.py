"""lm-evaluation-harness fitness: per-example scores of a live, in-memory model.

`evaluate: {kind: lm_eval, ...}` scores a candidate with lm-eval's own tasks (built-in or custom YAML): the task
dict is loaded once, HFLM wraps the resident model once, and each call runs `lm_eval.evaluator.evaluate(...,
log_samples=True)` and reads one per-document metric (under one filter) as the score vector. Weights changed in
place between calls give fresh results: nothing about the model is cached except by an explicit `cache_key`.

Example spec section (offline, custom JSONL tasks with a fitness and a held-out split):

```yaml
evaluate:
  kind: lm_eval
  include_path: /abs/path/to/tasks     # folder of task YAMLs (relative paths resolve against the spec's folder)
  tasks: [specialists_add_fit, specialists_rev_fit]
  test_tasks: [specialists_add_test, specialists_rev_test]
  metric: exact_match
  batch_size: 64
```

With Hugging Face Hub access, lm-eval's own gsm8k (5-shot, strict answer extraction), fitness on 200 training
problems, held-out score on the first 500 test problems:

```yaml
evaluate:
  kind: lm_eval
  tasks: [gsm8k]
  split: train
  limit: 200
  test_split: test
  test_limit: 500
  metric: exact_match
  filter: strict-match
  batch_size: 16
  gen_kwargs: {max_gen_toks: 256}
```

Heavy imports (lm_eval, transformers, torch) happen inside functions: importing this module is instant.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate.base import EvaluationError, EvaluatorConfig, Report

DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's own default (simple_evaluate's fewshot_random_seed)
# tqdm bars, and HFLM's warnings about being handed a model object (which is what we mean to do)
_NOISE = re.compile(
    r"\d+%\||it/s\]|examples/s\]|`pretrained` model kwarg is not of type|Passed an already-initialized model"
)


class LmEvalConfig(EvaluatorConfig):
    """The `evaluate: {kind: lm_eval, ...}` section.

    Attributes:
        kind: always `lm_eval`.
        tasks: lm-eval task, group or tag names scored for fitness, in this order (the score vector concatenates
            their examples: tasks in this order, a group's subtasks in lm-eval's order, documents by doc_id).
        include_path: folder of custom task YAMLs (lm-eval's `--include_path`); relative to the spec's folder.
        include_defaults: also index lm-eval's ~14k built-in task YAMLs (~30 s). None: only when a task name is
            not found under `include_path`.
        limit: score only the first `limit` documents of each fitness task.
        split: evaluate the fitness tasks on this dataset split instead of their own (sets each task's
            `test_split`; plain YAML tasks only), e.g. `train` to keep the test split held out.
        test_tasks: tasks for the held-out score (`test_score`). Defaults to `tasks` when `test_split` is given.
        test_split: dataset split of the held-out tasks (as `split`).
        test_limit: as `limit`, for the held-out tasks.
        num_fewshot: few-shot examples per prompt (lm-eval's rule: a task whose YAML says 0 keeps 0); None keeps
            each task's own setting (0 when it has none).
        fewshot_seed: seed of the few-shot sampler, reset before every call so prompts never change.
        batch_size: HFLM batch size.
        apply_chat_template: False, True (the tokenizer's default template) or a template name.
        fewshot_as_multiturn: with a chat template, give few-shot examples as a multi-turn conversation.
        system_instruction: system prompt prepended to every request.
        gen_kwargs: generation settings merged into every generate_until task's `generation_kwargs`
            (e.g. `{max_gen_toks: 16}`); greedy decoding unless the task or this says `do_sample: true`.
        seed: torch seed set (on a forked RNG) before each call; matters only with sampling.
        metric: per-document metric read as the score, e.g. `exact_match`, `acc`, `acc_norm`; one name for all
            tasks or a mapping `{task: metric}` covering every task of `tasks` and `test_tasks`. The metric must
            be a per-document score in [0, 1] aggregated by mean (so the vector's mean is lm-eval's figure).
        filter: filter whose output is scored (gsm8k: `strict-match` or `flexible-extract`); one name or a
            mapping like `metric`. None: the task's only filter (`none` for tasks without a filter_list).
        weights: `{task: k}` with integer k >= 1: the task's examples appear k times in the fitness vector (a
            repeat, not a scale: under M2N2's resource competition a constant scale of one example's scores
            cancels out, a repeat does not). Tasks not named have weight 1. Not applied to `test_score`.

    Example:
        >>> config = LmEvalConfig(kind="lm_eval", tasks=["gsm8k"], metric="exact_match", filter="strict-match")
        >>> config.filter_for("gsm8k")
        'strict-match'
    """

    kind: Literal["lm_eval"]
    tasks: list[str] = Field(min_length=1)
    include_path: str | None = None
    include_defaults: bool | None = None
    limit: int | None = Field(None, ge=1)
    split: str | None = None
    test_tasks: list[str] | None = None
    test_split: str | None = None
    test_limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED
    batch_size: int = Field(32, ge=1)
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] | None = None
    seed: int = 0
    metric: str | dict[str, str]
    filter: str | dict[str, str] | None = None
    weights: dict[str, int] | None = None

    @field_validator("tasks", "test_tasks")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for name in value:
            if not isinstance(name, str) or not name.strip():
                raise ValueError("task names must be non-empty strings")
        duplicates = sorted({name for name in value if value.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate task names: {', '.join(duplicates)}")
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for name, weight in (value or {}).items():
            if weight < 1:
                raise ValueError(f"weight of {name!r} must be an integer >= 1 (a repeat count), got {weight}")
        return value

    @model_validator(mode="after")
    def _cross_fields(self) -> LmEvalConfig:
        if self.weights:
            unknown = sorted(set(self.weights) - set(self.tasks))
            if unknown:
                raise ValueError(f"weights: {', '.join(unknown)} not in tasks")
        if self.test_limit is not None and not self.has_test:
            raise ValueError("test_limit needs test_tasks or test_split")
        names = set(self.tasks) | set(self.held_out_tasks)
        for field in ("metric", "filter"):
            value = getattr(self, field)
            if isinstance(value, dict):
                unknown = sorted(set(value) - names)
                if unknown:
                    raise ValueError(f"{field}: {', '.join(unknown)} not in tasks or test_tasks")
                if field == "metric" and names - set(value):
                    raise ValueError(f"metric: no metric for {', '.join(sorted(names - set(value)))}")
        return self

    @property
    def has_test(self) -> bool:
        """Whether a held-out score is configured."""
        return self.test_tasks is not None or self.test_split is not None

    @property
    def held_out_tasks(self) -> list[str]:
        """The held-out task names (`test_tasks`, or `tasks` when only `test_split` is given; [] without test)."""
        if self.test_tasks is not None:
            return list(self.test_tasks)
        return list(self.tasks) if self.test_split is not None else []

    def metric_for(self, task: str) -> str:
        """The metric configured for a top-level task name."""
        return self.metric[task] if isinstance(self.metric, dict) else self.metric

    def filter_for(self, task: str) -> str | None:
        """The filter configured for a top-level task name (None: the task's only filter)."""
        return self.filter.get(task) if isinstance(self.filter, dict) else self.filter


@dataclass(frozen=True)
class TaskScores:
    """The scores of one leaf task in one call.

    Attributes:
        name: lm-eval's task name.
        entry: the top-level name in `tasks`/`test_tasks` it comes from (a group's name for its subtasks).
        metric: the metric read.
        filter: the filter read.
        scores: per-document scores by doc_id (no weights applied).
        aggregate: lm-eval's own aggregate figure for `metric,filter`.
    """

    name: str
    entry: str
    metric: str
    filter: str
    scores: np.ndarray
    aggregate: float


@dataclass(frozen=True)
class LmEvalResult:
    """The result of one evaluation call.

    Attributes:
        split: `fitness` or `test`.
        tasks: per leaf task, in score-vector order.
        scores: the concatenated per-example vector (fitness: task weights applied as repeats).
    """

    split: str
    tasks: tuple[TaskScores, ...]
    scores: np.ndarray

    def entry_means(self) -> dict[str, float]:
        """Mean score per top-level task name (a group's subtasks pooled, as lm-eval's size-weighted mean)."""
        pooled: dict[str, list[np.ndarray]] = {}
        for task in self.tasks:
            pooled.setdefault(task.entry, []).append(task.scores)
        return {entry: float(np.concatenate(parts).mean()) for entry, parts in pooled.items()}

    @property
    def mean(self) -> float:
        """Unweighted mean over the top-level task names of their mean scores (e.g. the average of two skills)."""
        return float(np.mean(list(self.entry_means().values())))

    @property
    def metrics(self) -> dict[str, float]:
        """lm-eval's aggregate figure per leaf task, keyed `task/metric,filter`."""
        return {f"{t.name}/{t.metric},{t.filter}": t.aggregate for t in self.tasks}


@dataclass
class _Leaf:
    task: Any
    entry: str
    metric: str
    filter: str


class LmEvalEvaluator:
    """Scores a live in-memory causal LM with lm-evaluation-harness tasks, one per-document metric per example.

    Built once per run (task index, datasets and prompts loaded once; HFLM wraps the model once), then called per
    candidate after its weights were written in place into `model`.

    Args:
        config: the validated `evaluate:` section.
        model: the resident `transformers` causal LM whose parameters change between calls.
        tokenizer: its tokenizer.
        base_dir: folder that a relative `include_path` resolves against (the spec's folder); default the cwd.
        prefix: YAML path of the section, named in errors.

    Raises:
        SpecError: unknown task, metric or filter, weights on a missing task, a split override on a non-YAML task
            (the message names the config path, e.g. `evaluate.metric`).
        EvaluationError: lm-eval is not installed, or a task's dataset cannot be loaded.

    Example:
        >>> config = LmEvalConfig(kind="lm_eval", tasks=["toy_add"], include_path="tasks", metric="exact_match")
        >>> evaluator = LmEvalEvaluator(config, model, tokenizer)  # doctest: +SKIP
        >>> evaluator.scores()  # doctest: +SKIP
        array([1., 0., 1., ...])
    """

    def __init__(
        self,
        config: LmEvalConfig,
        model: Any,
        tokenizer: Any,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        prefix: str = "evaluate",
    ):
        self.config = config
        self._prefix = prefix
        self._tokenizer = tokenizer
        self._cache: dict[tuple[str, str], Any] = {}
        manager = _task_manager(config, base_dir, prefix)
        self._fitness = self._load(manager, config.tasks, config.split, "tasks", "split")
        self._test = (
            self._load(manager, config.held_out_tasks, config.test_split, self._test_field, "test_split")
            if config.has_test
            else None
        )
        self._model: Any = None
        self._lm: Any = None
        self._wrap(model)

    @property
    def _test_field(self) -> str:
        return "test_tasks" if self.config.test_tasks is not None else "tasks"

    # ------------------------------------------------------------------ public API

    @property
    def task_names(self) -> list[str]:
        """The fitness leaf tasks, in score-vector order (without repeats)."""
        return [leaf.task.task_name for leaf in self._fitness]

    def evaluate(self, split: Literal["fitness", "test"] = "fitness", model: Any = None) -> LmEvalResult:
        """Run lm-eval once on the model's current weights.

        Args:
            split: `fitness` (`tasks`, weights applied) or `test` (`test_tasks`/`test_split`, no weights).
            model: the model to score; None (or the wrapped model) reuses the HFLM built at construction.

        Returns:
            The per-example scores, per task, with lm-eval's aggregates.

        Raises:
            ValueError: `split="test"` without a configured test.
            EvaluationError: a metric value is not a number in [0, 1].
        """
        if split not in ("fitness", "test"):
            raise ValueError(f"split must be 'fitness' or 'test', got {split!r}")
        leaves = self._fitness if split == "fitness" else self._test
        if leaves is None:
            raise ValueError("no held-out evaluation configured (test_tasks or test_split)")
        if model is not None:
            self._wrap(model)
        raw = self._run(leaves, self.config.limit if split == "fitness" else self.config.test_limit)
        results = tuple(self._task_scores(leaf, raw) for leaf in leaves)
        weights = (self.config.weights or {}) if split == "fitness" else {}
        vector = np.concatenate([np.tile(t.scores, weights.get(t.entry, 1)) for t in results])
        return LmEvalResult(split=split, tasks=results, scores=vector)

    def scores(self, model: Any = None, *, cache_key: str | None = None) -> np.ndarray:
        """Per-example fitness scores in [0, 1] (tasks concatenated in config order, weights as repeats).

        Args:
            model: the candidate (the resident model, already holding its weights); None: the wrapped model.
            cache_key: e.g. the candidate's recipe hash; a key seen before returns its cached scores unevaluated.

        Returns:
            A float64 vector, one entry per example (repeats included).
        """
        return self._cached(("fitness", cache_key), lambda: self.evaluate("fitness", model).scores)

    def test_score(self, model: Any = None, *, cache_key: str | None = None) -> float | None:
        """The held-out score: unweighted mean over the test tasks of their mean per-example score.

        Args:
            model: as for `scores`.
            cache_key: as for `scores`.

        Returns:
            The score, or None when no test is configured.
        """
        if self._test is None:
            return None
        return self._cached(("test", cache_key), lambda: self.evaluate("test", model).mean)

    def report(self, model: Any = None) -> Report:
        """Per-task mean scores on the held-out tasks (the fitness tasks when none are configured), unweighted."""
        result = self.evaluate("test" if self.config.has_test else "fitness", model)
        return Report(result.entry_means(), result.tasks[0].metric if result.tasks else "score")

    def example_groups(self) -> np.ndarray:
        """Per-example group ids of the fitness vector: the index of its top-level task in `tasks`."""
        sizes = self._fitness_sizes()
        entries = {name: i for i, name in enumerate(self.config.tasks)}
        weights = self.config.weights or {}
        return np.concatenate(
            [
                np.full(size * weights.get(leaf.entry, 1), entries[leaf.entry], dtype=np.int64)
                for leaf, size in sizes
            ]
        )

    # ------------------------------------------------------------------ construction

    def _wrap(self, model: Any) -> None:
        if model is self._model:
            return
        from lm_eval.models.huggingface import HFLM

        _silence_handed_model_warnings()
        model.eval()
        device = str(next(model.parameters()).device)
        self._lm = _quiet_call(
            lambda: HFLM(
                pretrained=model,
                tokenizer=self._tokenizer,
                device=device,
                batch_size=self.config.batch_size,
                backend="causal",  # said, not guessed from the model type: a routed model's type is its own
            )
        )
        self._model = model

    def _load(
        self, manager: Any, names: Sequence[str], split: str | None, field: str, split_field: str
    ) -> list[_Leaf]:
        leaves: list[_Leaf] = []
        seen: dict[str, str] = {}
        for i, name in enumerate(names):
            spec = (
                name
                if split is None
                else _split_override(manager, name, split, f"{self._prefix}.{split_field}")
            )
            loaded = _load_entry(manager, spec, name, f"{self._prefix}.{field}[{i}]")
            for task_name, task in loaded.items():
                if task_name in seen:
                    raise SpecError(
                        f"{self._prefix}.{field}[{i}]",
                        f"task {task_name!r} is already part of {seen[task_name]!r}",
                    )
                seen[task_name] = name
                self._configure(task)
                leaves.append(self._select(task, name))
        return leaves

    def _configure(self, task: Any) -> None:
        """Apply gen_kwargs and num_fewshot as lm-eval's simple_evaluate does."""
        config = self.config
        if config.gen_kwargs and task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value=dict(config.gen_kwargs), update=True)
        if config.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=config.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)

    def _select(self, task: Any, entry: str) -> _Leaf:
        """Check and pick the task's metric and filter."""
        metric = self.config.metric_for(entry)
        aggregations = task.aggregation()
        wanted = _check_metric_and_filter(
            task.task_name,
            metric,
            sorted(aggregations),
            _filter_names(task.get_config("filter_list")),
            self.config.filter_for(entry),
            self._prefix,
            aggregations=aggregations,
            higher_is_better=task.higher_is_better(),
        )
        return _Leaf(task=task, entry=entry, metric=metric, filter=wanted)

    # ------------------------------------------------------------------ one call

    def _run(self, leaves: list[_Leaf], limit: int | None) -> dict[str, Any]:
        import torch
        from lm_eval import evaluator

        task_dict = {
            "tasks": {leaf.task.task_name: leaf.task for leaf in leaves},
            "groups": {},
            "group_map": {},
        }
        config = self.config
        for leaf in leaves:
            leaf.task.set_fewshot_seed(seed=config.fewshot_seed)
        device = next(self._model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            return _quiet_call(
                lambda: evaluator.evaluate(
                    lm=self._lm,
                    task_dict=task_dict,
                    limit=limit,
                    log_samples=True,
                    bootstrap_iters=0,
                    system_instruction=config.system_instruction,
                    apply_chat_template=config.apply_chat_template,
                    fewshot_as_multiturn=config.fewshot_as_multiturn,
                )
            )

    def _task_scores(self, leaf: _Leaf, raw: dict[str, Any]) -> TaskScores:
        name = leaf.task.task_name
        samples = sorted(
            (s for s in raw["samples"][name] if s["filter"] == leaf.filter),
            key=lambda sample: sample["doc_id"],
        )
        values = []
        for sample in samples:
            value = sample[leaf.metric]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise EvaluationError(
                    f"{self._prefix}.metric: {leaf.metric!r} of task {name!r} gave {type(value).__name__} values, "
                    "not per-example numbers"
                )
            values.append(float(value))
        scores = np.asarray(values, dtype=np.float64)
        if not scores.size or not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
            raise EvaluationError(
                f"{self._prefix}.metric: {leaf.metric!r} of task {name!r} is not a per-example score in [0, 1]"
            )
        aggregate = float(raw["results"][name][f"{leaf.metric},{leaf.filter}"])
        return TaskScores(name, leaf.entry, leaf.metric, leaf.filter, scores, aggregate)

    def _fitness_sizes(self) -> list[tuple[_Leaf, int]]:
        limit = self.config.limit
        sizes = []
        for leaf in self._fitness:
            size = len(leaf.task.eval_docs)
            sizes.append((leaf, size if limit is None else min(size, limit)))
        return sizes

    def _cached(self, key: tuple[str, str | None], compute: Any) -> Any:
        if key[1] is None:
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


# ---------------------------------------------------------------------- task loading


def _resolve_include(
    config: LmEvalConfig, base_dir: str | os.PathLike[str] | None, prefix: str
) -> Path | None:
    if config.include_path is None:
        return None
    path = Path(config.include_path).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or os.getcwd()) / path
    if not path.is_dir():
        raise SpecError(f"{prefix}.include_path", f"not a directory: {path}")
    return path.resolve()


def _task_manager(config: LmEvalConfig, base_dir: str | os.PathLike[str] | None, prefix: str) -> Any:
    """A TaskManager indexing `include_path`, and lm-eval's built-in tasks only when needed (they cost ~30 s)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvaluationError(f"lm-eval is not installed ({exc}); install hf-m2n2[eval]") from None
    include = _resolve_include(config, base_dir, prefix)
    defaults = config.include_defaults
    if include is not None and defaults is not True:
        manager = TaskManager(include_path=str(include), include_defaults=False)
        names = set(config.tasks) | set(config.held_out_tasks)
        if defaults is False or names <= set(manager.all_tasks):
            return manager
    return TaskManager(
        include_path=None if include is None else str(include), include_defaults=defaults is not False
    )


def _load_entry(manager: Any, spec: str | dict[str, Any], name: str, path: str) -> dict[str, Any]:
    """Load one task/group/tag: its leaf tasks by name."""
    if isinstance(spec, str) and spec not in manager.all_tasks and not Path(spec).is_file():
        where = f" under {manager.include_path}" if manager.include_path else ""
        raise SpecError(path, f"unknown lm-eval task {name!r} (not found{where} nor among the indexed tasks)")
    try:
        loaded = _quiet_call(lambda: manager.load([spec]))
    except SpecError:
        raise
    except Exception as exc:
        raise EvaluationError(f"{path}: cannot load task {name!r}: {type(exc).__name__}: {exc}") from exc
    return dict(loaded["tasks"])


def _split_override(manager: Any, name: str, split: str, path: str) -> dict[str, Any]:
    """The task's full YAML config with its evaluation split replaced (lm-eval evaluates `test_split` first)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.kind is not Kind.TASK or entry.yaml_path is None:
        raise SpecError(
            path, f"a split override needs a plain YAML task; {name!r} is not one (use test_tasks)"
        )
    config = load_yaml(entry.yaml_path, resolve_func=True)
    config["test_split"] = split
    return config


def _filter_names(filter_list: Any) -> list[str]:
    if not filter_list:
        return ["none"]
    return [f["name"] if isinstance(f, Mapping) else getattr(f, "name", str(f)) for f in filter_list]


# ---------------------------------------------------------------------- metric and filter of one task


def _check_metric_and_filter(
    task: str,
    metric: str,
    metrics: Sequence[str],
    filters: Sequence[str],
    wanted: str | None,
    prefix: str,
    *,
    aggregations: Mapping[str, Any] | None = None,
    higher_is_better: Mapping[str, bool] | None = None,
    none_listed: str = "none",
) -> str:
    """Check the metric and filter configured for one leaf task; the one check of both `check_lm_eval_config`
    (the task's YAML) and `LmEvalEvaluator` (the loaded task).

    Args:
        task: the task's name, as errors name it.
        metric: the configured metric.
        metrics: the task's metrics, in the order the error lists them.
        filters: the task's filter names (`["none"]` without a filter_list).
        wanted: the configured filter (None: the task's only filter).
        prefix: YAML path of the `evaluate:` section, named in errors.
        aggregations: per metric, its aggregation (a function or a name); None (a YAML check): not checked.
        higher_is_better: per metric, its direction; None: not checked.
        none_listed: what the error lists when the task has no metric at all (the YAML check has always listed
            nothing there, the evaluator `none`).

    Returns:
        The filter to read: `wanted`, or the task's only filter.

    Raises:
        SpecError: the task has no such metric or filter, the metric is not a per-example score (aggregated by
            something else than the mean) or is lower-is-better, or the task has several filters and none was
            chosen (naming `PREFIX.metric` or `PREFIX.filter`).

    Example:
        >>> _check_metric_and_filter("gsm8k", "exact_match", ["exact_match"], ["strict-match"], None, "evaluate")
        'strict-match'
    """
    if metric not in metrics:
        raise SpecError(
            f"{prefix}.metric",
            f"task {task!r} has no metric {metric!r} (it has: {', '.join(metrics) or none_listed})",
        )
    if aggregations is not None:
        aggregation = getattr(aggregations[metric], "__name__", str(aggregations[metric]))
        if aggregation != "mean":
            raise SpecError(
                f"{prefix}.metric",
                f"metric {metric!r} of task {task!r} is aggregated by {aggregation!r}, not by mean: it is not a "
                "per-example score (use e.g. exact_match or acc)",
            )
    if higher_is_better is not None and higher_is_better.get(metric) is False:
        raise SpecError(f"{prefix}.metric", f"metric {metric!r} of task {task!r} is lower-is-better")
    if wanted is None:
        if len(filters) > 1:
            raise SpecError(
                f"{prefix}.filter", f"task {task!r} has several filters, choose one: {', '.join(filters)}"
            )
        return filters[0]
    if wanted not in filters:
        raise SpecError(
            f"{prefix}.filter", f"task {task!r} has no filter {wanted!r} (it has: {', '.join(filters)})"
        )
    return wanted


# ---------------------------------------------------------------------- offline check (no datasets)


def check_lm_eval_config(
    config: LmEvalConfig, *, base_dir: str | os.PathLike[str] | None = None, prefix: str = "evaluate"
) -> None:
    """Check task names, metrics and filters from the task YAMLs alone: no dataset is downloaded or read.

    Built-in tasks are found by a text scan of lm-eval's task folder (a few seconds), not by indexing it. Groups,
    tags and Python-class tasks are only checked for existence; the evaluator checks their leaves when it loads.

    Args:
        config: the validated section.
        base_dir: folder that a relative `include_path` resolves against.
        prefix: YAML path of the section, named in errors.

    Raises:
        SpecError: unknown task, metric or filter (naming e.g. `evaluate.tasks[1]` or `evaluate.filter`).
        EvaluationError: lm-eval is not installed.

    Example:
        >>> config = LmEvalConfig(kind="lm_eval", tasks=["gsm8k"], metric="exact_match", filter="strict-match")
        >>> check_lm_eval_config(config)  # doctest: +SKIP
    """
    try:
        from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY
        from lm_eval.tasks._index import Kind, TaskIndex
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as exc:
        raise EvaluationError(f"lm-eval is not installed ({exc}); install hf-m2n2[eval]") from None
    include = _resolve_include(config, base_dir, prefix)
    index = TaskIndex.build([include]) if include is not None else {}
    fields = [("tasks", config.tasks)]
    if config.test_tasks is not None:
        fields.append(("test_tasks", config.test_tasks))
    for field, names in fields:
        for i, name in enumerate(names):
            entry = index.get(name)
            if entry is not None and entry.kind is not Kind.TASK:
                continue
            yaml_path = entry.yaml_path if entry is not None else _find_builtin_yaml(name)
            if yaml_path is None:
                raise SpecError(f"{prefix}.{field}[{i}]", f"unknown lm-eval task {name!r}")
            task_config = load_yaml(yaml_path, resolve_func=False, recursive=True)
            if "task" not in task_config or "class" in task_config or isinstance(task_config["task"], list):
                continue  # a group or a Python task: its leaves are checked when loaded
            metrics = [m["metric"] for m in task_config.get("metric_list") or [] if isinstance(m, Mapping)]
            metrics = metrics or DEFAULT_METRIC_REGISTRY.get(
                task_config.get("output_type", "generate_until"), []
            )
            _check_metric_and_filter(
                name,
                config.metric_for(name),
                metrics,
                _filter_names(task_config.get("filter_list")),
                config.filter_for(name),
                prefix,
                none_listed="",
            )


def _find_builtin_yaml(name: str) -> Path | None:
    """The built-in task YAML declaring `task: NAME` (a text scan: ~2 s instead of lm-eval's ~30 s index)."""
    import lm_eval.tasks

    pattern = re.compile(rb"^task:\s*['\"]?" + re.escape(name.encode()) + rb"['\"]?\s*$", re.MULTILINE)
    root = Path(lm_eval.tasks.__file__).parent
    for path in sorted(root.glob("**/*.yaml")):
        if pattern.search(path.read_bytes()):
            return path
    return None


# ---------------------------------------------------------------------- progress bars


class _HandedModelFilter(logging.Filter):
    """Drops HFLM's two warnings about being handed a model object (what we mean to do; the user cannot act)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.search(record.getMessage())


def _silence_handed_model_warnings() -> None:
    """On lm-eval's HF model logger only (they reach the root handler, past `_quiet_call`'s stderr filter)."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _HandedModelFilter) for f in logger.filters):
        logger.addFilter(_HandedModelFilter())


def _quiet_call(fn: Any) -> Any:
    """Run `fn` with lm-eval's per-call progress bars suppressed; other stderr output is passed through."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            return fn()
    finally:
        _replay(buffer.getvalue())


def _replay(text: str) -> None:
    kept = [line for line in re.split(r"[\r\n]+", text) if line.strip() and not _NOISE.search(line)]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")
