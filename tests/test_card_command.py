"""`hf-m2n2 card`: the card is rendered again from card.json (new template, added eval results), weights untouched."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from hf_m2n2.card import CardInfo


@pytest.fixture(scope="module")
def merged(seeds, tmp_path_factory):
    from hf_m2n2.merge import MergeOptions, run_merge

    root = tmp_path_factory.mktemp("card_cmd")
    spec = root / "spec.yaml"
    spec.write_text(
        f"merge_method: task_arithmetic\nbase_model: {seeds['base']}\n"
        f"models:\n  - model: {seeds['a']}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {seeds['b']}\n    parameters: {{weight: 0.4}}\n"
    )
    run_merge(spec, root / "out", MergeOptions(progress=False))
    return root / "out"


def test_merge_writes_card_json_that_renders_the_same_readme(merged):
    info = CardInfo.load(merged)
    assert info.kind == "merge" and info.method == "task_arithmetic"
    assert [m["name"] for m in info.models] == ["base", "ft-a", "ft-b"]
    from hf_m2n2.card import render_card

    assert str(render_card(info)) == (merged / "README.md").read_text()


def test_card_adds_lm_eval_results_as_model_index_without_touching_weights(merged, cli, tmp_path):
    weights = (merged / "model.safetensors").read_bytes()
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            {
                "results": {
                    "gsm8k": {
                        "alias": "gsm8k",
                        "exact_match,strict-match": 0.25,
                        "exact_match_stderr,strict-match": 0.01,
                    },
                    "arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.02},
                }
            }
        )
    )
    code, out, err = cli("card", merged, "--eval-results", results, "--model-id", "me/merged")
    assert code == 0, err
    assert "README.md" in out
    card = ModelCard.load(merged / "README.md")
    index = card.data.to_dict()["model-index"]
    scores = {
        (r["task"]["type"], r["dataset"]["name"], m["type"], m["value"])
        for r in index[0]["results"]
        for m in r["metrics"]
    }
    assert ("text-generation", "gsm8k", "exact_match strict-match", 0.25) in scores
    assert ("text-generation", "arc_easy", "acc none", 0.5) in scores
    assert index[0]["name"] == "out"
    assert 'model_id = "me/merged"' in card.text
    assert (merged / "model.safetensors").read_bytes() == weights
    # adding a newer score for the same task and metric replaces it rather than duplicating it
    results.write_text(json.dumps({"gsm8k": {"exact_match,strict-match": 0.5}}))
    assert cli("card", merged, "--eval-results", results)[0] == 0
    entries = [e for e in CardInfo.load(merged).eval_results if e.task == "gsm8k"]
    assert [e.value for e in entries] == [0.5]


def test_card_uses_a_custom_template(merged, cli, tmp_path):
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n\n# Custom {{ model_name }} by {{ method }}\n")
    assert cli("card", merged, "--template", template)[0] == 0
    card = ModelCard.load(merged / "README.md")
    assert card.text.strip() == "# Custom out by task_arithmetic"
    assert card.data.base_model_relation == "merge" and card.data.base_model == ["base", "ft-a", "ft-b"]
    # the template is kept in card.json: a later re-render (new eval results) still uses it
    assert cli("card", merged, "--model-id", "me/x")[0] == 0
    assert ModelCard.load(merged / "README.md").text.strip() == "# Custom out by task_arithmetic"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "card.json: not found"),
        ("bad_results", "cannot read evaluation results"),
        ("bad_template", "card template not found"),
    ],
)
def test_card_errors_are_one_line_and_leave_the_card(merged, cli, tmp_path, setup, message):
    before = (merged / "README.md").read_text()
    args = [merged]
    if setup == "missing":
        args = [tmp_path]
    elif setup == "bad_results":
        (tmp_path / "r.json").write_text("{not json")
        args += ["--eval-results", tmp_path / "r.json"]
    else:
        args += ["--template", tmp_path / "nope.md"]
    code, _, err = cli("card", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert (merged / "README.md").read_text() == before
