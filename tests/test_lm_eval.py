"""lm-eval fitness on a live in-memory model: per-example scores, fresh results after in-place changes, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from hf_m2n2.demo.specialists import SpecialistsConfig, build_specialists
from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate.lm_eval import LmEvalConfig, LmEvalEvaluator, check_lm_eval_config

# Same parameters and folder as test_specialists.py's reduced build: whichever file runs first builds it.
SMALL = SpecialistsConfig(base_steps=200, finetune_steps=100, finetune_lr=3e-3, fitness_size=20, test_size=40)
GSM8K = {"kind": "lm_eval", "tasks": ["gsm8k"], "metric": "exact_match", "filter": "strict-match"}


@pytest.fixture(scope="session")
def built(tmp_path_factory, session_builds):
    session_builds.take("specialists")
    return build_specialists(tmp_path_factory.getbasetemp() / "specialists-small", SMALL)


@pytest.fixture(scope="session")
def live(built):
    """The resident model (the reduced base: right on some examples, wrong on others) and its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(built.base), dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(built.base))


def _config(built, **fields) -> LmEvalConfig:
    return LmEvalConfig(
        **{
            "kind": "lm_eval",
            "tasks": built.fitness_tasks,
            "include_path": str(built.tasks_dir),
            "metric": "exact_match",
            "batch_size": 64,
            **fields,
        }
    )


@pytest.fixture(scope="session")
def evaluator(built, live):
    return LmEvalEvaluator(_config(built, test_tasks=built.test_tasks), *live)


def test_per_example_scores_match_lm_eval_aggregates(evaluator, built):
    result = evaluator.evaluate()
    assert [t.name for t in result.tasks] == built.fitness_tasks
    assert result.scores.shape == (2 * SMALL.fitness_size,)
    assert set(np.unique(result.scores)) <= {0.0, 1.0}
    assert 0 < result.scores.mean() < 1  # a real signal, not all-or-nothing
    for task in result.tasks:
        assert task.scores.mean() == pytest.approx(task.aggregate)
        assert (task.metric, task.filter) == ("exact_match", "none")
    assert np.array_equal(evaluator.scores(), result.scores)
    assert result.mean == pytest.approx(np.mean([t.scores.mean() for t in result.tasks]))


def test_test_split_is_the_held_out_tasks(evaluator, built):
    result = evaluator.evaluate("test")
    assert [t.name for t in result.tasks] == built.test_tasks
    assert result.scores.shape == (2 * SMALL.test_size,)
    assert evaluator.test_score() == pytest.approx(result.mean)


def test_in_place_weight_changes_give_fresh_scores(evaluator, live):
    model, _ = live
    before = evaluator.scores()
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
        changed = evaluator.scores()
        for name, p in model.named_parameters():
            p.copy_(saved[name])
    assert not np.array_equal(changed, before)
    assert np.array_equal(evaluator.scores(), before)


def test_cache_key_skips_evaluation(evaluator, live):
    model, _ = live
    first = evaluator.scores(cache_key="recipe-1")
    embed = model.get_input_embeddings().weight
    saved = embed.detach().clone()
    with torch.no_grad():
        embed.zero_()
        assert np.array_equal(evaluator.scores(cache_key="recipe-1"), first)
        assert not np.array_equal(evaluator.scores(cache_key="recipe-2"), first)
        embed.copy_(saved)


def test_weights_repeat_examples(built, live):
    evaluator = LmEvalEvaluator(_config(built, weights={"specialists_rev_fit": 3}), *live)
    result = evaluator.evaluate()
    add, rev = (t.scores for t in result.tasks)
    assert np.array_equal(result.scores, np.concatenate([add, rev, rev, rev]))
    groups = evaluator.example_groups()
    assert groups.shape == result.scores.shape
    assert np.array_equal(np.bincount(groups), [SMALL.fitness_size, 3 * SMALL.fitness_size])


def test_limit_and_split_override(built, live, tmp_path):
    data = {split: built.tasks_dir / "data" / f"specialists_rev_{split}.jsonl" for split in ("fit", "test")}
    (tmp_path / "rev.yaml").write_text(
        (built.tasks_dir / "specialists_rev_fit.yaml")
        .read_text()
        .replace("task: specialists_rev_fit", "task: rev_both")
        .replace(
            f"    test: {json.dumps(str(data['fit']))}",
            f"    fit: {json.dumps(str(data['fit']))}\n    test: {json.dumps(str(data['test']))}",
        )
    )
    config = LmEvalConfig(
        kind="lm_eval",
        tasks=["rev_both"],
        include_path=str(tmp_path),
        metric="exact_match",
        split="fit",
        test_split="test",
        limit=5,
    )
    evaluator = LmEvalEvaluator(config, *live)
    fit = evaluator.evaluate()
    assert fit.scores.shape == (5,)
    assert fit.tasks[0].name == "rev_both"
    assert evaluator.evaluate("test").scores.shape == (SMALL.test_size,)
    reference = LmEvalEvaluator(_config(built, tasks=["specialists_rev_fit"], limit=5), *live).scores()
    assert np.array_equal(fit.scores, reference)


def test_relative_include_path_resolves_against_base_dir(built, live):
    config = _config(built, include_path="tasks", tasks=["specialists_add_fit"], limit=2)
    assert LmEvalEvaluator(config, *live, base_dir=built.root).scores().shape == (2,)


@pytest.mark.parametrize(
    ("fields", "path", "words"),
    [
        ({"metric": "accuracy"}, "evaluate.metric", "has no metric 'accuracy'"),
        ({"filter": "strict-match"}, "evaluate.filter", "has no filter 'strict-match' (it has: none)"),
        ({"tasks": ["specialists_add_fit", "nope"]}, "evaluate.tasks[1]", "unknown lm-eval task 'nope'"),
        ({"include_path": "/nonexistent/tasks"}, "evaluate.include_path", "not a directory"),
    ],
)
def test_bad_names_raise_spec_errors(built, live, fields, path, words):
    with pytest.raises(SpecError) as info:
        LmEvalEvaluator(_config(built, include_defaults=False, **fields), *live)
    assert info.value.path == path
    assert words in info.value.message


def test_static_check_of_custom_tasks(built):
    check_lm_eval_config(_config(built, test_tasks=built.test_tasks))
    with pytest.raises(SpecError, match=r"evaluate\.metric: task 'specialists_add_fit' has no metric 'acc'"):
        check_lm_eval_config(_config(built, metric="acc"))


def test_gsm8k_config_validates_offline():
    config = LmEvalConfig(**GSM8K, split="train", limit=200, test_split="test", test_limit=500)
    assert config.held_out_tasks == ["gsm8k"] and config.filter_for("gsm8k") == "strict-match"
    check_lm_eval_config(config)  # reads lm-eval's gsm8k.yaml: no dataset, no network
    with pytest.raises(SpecError) as info:
        check_lm_eval_config(LmEvalConfig(**{**GSM8K, "filter": "strict"}))
    assert info.value.path == "evaluate.filter" and "strict-match, flexible-extract" in info.value.message
    with pytest.raises(SpecError, match="several filters"):
        check_lm_eval_config(LmEvalConfig(**{**GSM8K, "filter": None}))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tasks": []}, "at least 1 item"),
        ({"tasks": ["a", "a"]}, "duplicate task names: a"),
        ({"weights": {"a": 0}}, "integer >= 1"),
        ({"weights": {"b": 2}}, "weights: b not in tasks"),
        ({"metric": {"b": "acc"}}, "metric: b not in tasks"),
        ({"test_limit": 3}, "test_limit needs test_tasks or test_split"),
        ({"batch_sz": 3}, "Extra inputs are not permitted"),
    ],
)
def test_config_validation(fields, words):
    with pytest.raises(ValidationError, match=words):
        LmEvalConfig(**{"kind": "lm_eval", "tasks": ["a"], "metric": "exact_match", **fields})


def test_per_task_metric_mapping():
    config = LmEvalConfig(
        kind="lm_eval", tasks=["a", "b"], metric={"a": "acc", "b": "exact_match"}, filter={"b": "x"}
    )
    assert (config.metric_for("a"), config.metric_for("b")) == ("acc", "exact_match")
    assert (config.filter_for("a"), config.filter_for("b")) == (None, "x")
    with pytest.raises(ValidationError, match="no metric for b"):
        LmEvalConfig(kind="lm_eval", tasks=["a", "b"], metric={"a": "acc"})


def test_import_is_light():
    code = "import sys, hf_m2n2.evaluate.lm_eval; print(sorted({'lm_eval', 'transformers', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
