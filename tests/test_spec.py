"""MergeSpec parsing: mergekit's schema accepted as is, parameter settings evaluated as mergekit does."""

from __future__ import annotations

import pytest

from hf_m2n2.errors import SpecError
from hf_m2n2.spec import evaluate_setting, load_spec, parse_spec

MERGEKIT_RECIPE = """
slices:
  - sources:
      - model: org/base-7b
        layer_range: [0, 32]
      - model: org/math-7b@v1.1
        layer_range: [0, 32]
merge_method: slerp
base_model: org/base-7b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
tokenizer:
  source: union
chat_template: chatml
"""


def test_accepts_mergekit_recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(MERGEKIT_RECIPE)
    spec = load_spec(path)
    assert spec.merge_method == "slerp" and spec.dtype == "bfloat16"
    assert spec.referenced_models() == ["org/base-7b", "org/math-7b@v1.1"]
    assert spec.tokenizer_source_ref() == "union"


def test_gradient_interpolates_over_layers():
    grad = [0.0, 1.0, 0.5]
    assert evaluate_setting(grad, "x", 0.0) == 0.0
    assert evaluate_setting(grad, "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting(grad, "x", 0.5) == pytest.approx(1.0)
    assert evaluate_setting(grad, "x", 0.75) == pytest.approx(0.75)
    assert evaluate_setting(grad, "x", 1.0) == pytest.approx(0.5)


def test_filters_first_match_wins_and_star_catches_all():
    setting = [
        {"filter": "mlp", "value": 1.0},
        {"filter": "up_proj", "value": 2.0},
        {"filter": "*", "value": 3.0},
    ]
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0) == 1.0
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0) == 3.0
    assert evaluate_setting([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0) is None
    assert evaluate_setting([{"filter": "mlp", "value": [0, 1]}], "layers.1.mlp.x", 1.0) == 1.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"models": [{"model": "a/b"}]}, "merge_method: required"),
        (
            {"merge_methd": "ties", "models": [{"model": "a/b"}]},
            "merge_methd: unknown key (did you mean merge_method?)",
        ),
        ({"merge_method": "linear", "models": [{"model": "a/b", "xyz": 1}]}, "models[0].xyz: unknown key"),
        ({"merge_method": "linear"}, "models: exactly one of 'models' or 'slices'"),
        (
            {"merge_method": "linear", "models": [{"model": "a/b", "weights": 1}]},
            "models[0].weights: unknown key",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a/b"}], "dtype": "fp8"},
            "dtype: unknown dtype 'fp8'",
        ),
        (
            {"merge_method": "x", "slices": [{"sources": [{"model": "a/b", "layer_range": [4, 2]}]}]},
            "slices[0].sources[0].layer_range: must be [start, end)",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a/b", "parameters": {"weight": {"x": 1}}}]},
            "models[0].parameters.weight: expected a number",
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a/b", "parameters": {"weight": [{"filter": "mlp"}]}}],
            },
            "models[0].parameters.weight[0]: expected {filter, value}",
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a/b"}],
                "tokenizer_source": "base",
                "tokenizer": {"source": "union"},
            },
            "tokenizer: give either",
        ),
    ],
)
def test_errors_name_the_yaml_path(data, message):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert str(info.value).startswith(message), str(info.value)
