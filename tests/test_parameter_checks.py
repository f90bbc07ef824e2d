"""Parameter checks: `validate` rejects what `merge` rejects (before anything is written), with the YAML path;
a misspelled parameter is an error naming the nearest valid one unless --lenient-parameters."""

from __future__ import annotations

import logging

import pytest


def _della(seeds, **model_params):
    return {
        "merge_method": "della",
        "base_model": str(seeds["base"]),
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(seeds["b"]), "parameters": {"weight": 0.5, "density": 0.5, **model_params}},
        ],
        "parameters": {"epsilon": 0.55},
    }


def _errors(cli, *args) -> str:
    code, _, err = cli(*args)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


DELLA_MESSAGE = (
    "error: parameters.epsilon: epsilon=0.55 with density=0.5 puts keep probabilities outside (0, 1); "
    "choose epsilon < min(density, 1 - density)\n"
)


def test_della_epsilon_fails_validate_and_merge_alike(seeds, write_spec, cli, tmp_path):
    spec = write_spec(_della(seeds))
    assert _errors(cli, "validate", spec) == DELLA_MESSAGE
    assert _errors(cli, "validate", spec, "--no-resolve") == DELLA_MESSAGE
    out = tmp_path / "out"
    assert _errors(cli, "merge", spec, out) == DELLA_MESSAGE
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["spec.yaml"]


def test_value_from_a_gradient_is_checked_per_tensor_when_planned(seeds, write_spec, cli, tmp_path):
    spec = _della(seeds, epsilon=[0.1, 0.6])  # fine at the first layer, not at the last
    spec["parameters"] = {"epsilon": 0.1}
    path = write_spec(spec)
    assert cli("validate", path, "--no-resolve")[0] == 0  # not knowable without the layer count
    message = _errors(cli, "validate", path)
    assert message.startswith("error: models[1].parameters.epsilon: epsilon=0.6")
    assert _errors(cli, "merge", path, tmp_path / "out") == message
    spec = _della(seeds, density=0.9)  # the default epsilon 0.15 reaches 1.05
    spec["parameters"] = {}
    assert _errors(cli, "validate", write_spec(spec), "--no-resolve").startswith(
        "error: models[1].parameters.epsilon: epsilon=0.15 with density=0.9"
    )


def test_a_fractional_integer_parameter_is_refused_not_truncated(seeds, write_spec, cli, tmp_path):
    spec = write_spec(
        {
            "merge_method": "karcher",
            "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}],
            "parameters": {"max_iter": 2.5},
        }
    )
    message = "error: parameters.max_iter: expected an integer, got 2.5\n"
    assert _errors(cli, "validate", spec) == message
    assert _errors(cli, "merge", spec, tmp_path / "out") == message
    assert not (tmp_path / "out").exists()


def test_misspelled_parameter_is_an_error_with_the_nearest_name(seeds, write_spec, cli, tmp_path):
    spec = {
        "merge_method": "ties",
        "base_model": str(seeds["base"]),
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 0.5, "densty": 0.5}},
            {"model": str(seeds["b"]), "parameters": {"weight": 0.5}},
        ],
    }
    path = write_spec(spec)
    expected = "error: models[0].parameters.densty: not a parameter of ties (did you mean density?)\n"
    assert _errors(cli, "validate", path) == expected
    assert _errors(cli, "validate", path, "--no-resolve") == expected
    assert _errors(cli, "merge", path, tmp_path / "out") == expected
    assert not (tmp_path / "out").exists()
    spec["parameters"] = {"bogus_key": 1}
    spec["models"][0]["parameters"].pop("densty")
    assert "parameters.bogus_key: not a parameter of ties (its parameters: int8_mask, normalize" in _errors(
        cli, "validate", write_spec(spec), "--no-resolve"
    )


def test_lenient_parameters_warns_and_merges_with_the_default(seeds, write_spec, cli, tmp_path, caplog):
    spec = {
        "merge_method": "ties",
        "base_model": str(seeds["base"]),
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 0.5, "densty": 0.5}},
            {"model": str(seeds["b"]), "parameters": {"weight": 0.5}},
        ],
    }
    path = write_spec(spec)
    with caplog.at_level(logging.WARNING):
        assert cli("validate", path, "--lenient-parameters")[0] == 0
        assert cli("merge", path, tmp_path / "out", "--lenient-parameters", "-q")[0] == 0
    assert "models[0].parameters.densty is not a parameter of ties; ignored" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("linear", {"weight": 1.0, "density": 0.5}),  # a recipe switched from ties keeps its density
        ("karcher", {"weight": 1.0}),  # mergekit's karcher takes no weight and ignores it
    ],
)
def test_parameters_of_other_methods_are_ignored_with_a_warning(
    seeds, write_spec, cli, caplog, method, params
):
    spec = {
        "merge_method": method,
        "models": [
            {"model": str(seeds["a"]), "parameters": params},
            {"model": str(seeds["b"]), "parameters": params},
        ],
    }
    with caplog.at_level(logging.WARNING):
        assert cli("validate", write_spec(spec))[0] == 0
    assert f"is not a parameter of {method}; ignored" in caplog.text


MERGEKIT_EXAMPLES = {  # mergekit's examples/*.yml (the parameter parts; model names as in the repo)
    "ties.yml": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters: {density: [1, 0.7, 0.1], weight: 1.0}
  - model: garage-bAInd/Platypus2-13B
    parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight: [{filter: mlp, value: 0.5}, {value: 0}]
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters: {normalize: true, int8_mask: true}
dtype: float16
""",
    "bio-merge.yml": """
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters: {density: 0.5, weight: 0.5}
  - model: BioMistral/BioMistral-7B
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters: {normalize: false, int8_mask: true}
dtype: float16
""",
    "gradient-slerp.yml": """
slices:
  - sources:
      - {model: psmathur/orca_mini_v3_13b, layer_range: [0, 40]}
      - {model: garage-bAInd/Platypus2-13B, layer_range: [0, 40]}
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
    - value: 0.5
dtype: float16
""",
    "linear.yml": """
models:
  - {model: psmathur/orca_mini_v3_13b, parameters: {weight: 1.0}}
  - {model: WizardLM/WizardLM-13B-V1.2, parameters: {weight: 0.3}}
  - {model: garage-bAInd/Platypus2-13B, parameters: {weight: 0.5}}
merge_method: linear
dtype: float16
""",
    "arcee_fusion.yml": """
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
""",
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_EXAMPLES))
def test_mergekit_examples_validate_without_the_flag(name, write_spec, cli):
    code, out, err = cli("validate", write_spec(MERGEKIT_EXAMPLES[name]), "--no-resolve")
    assert code == 0, err
    assert "not a parameter" not in err
