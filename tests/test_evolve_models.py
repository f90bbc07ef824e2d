"""Evolving real checkpoints end to end: Blend genomes in a live model, export, report, rebuild, export again."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import load_dir
from huggingface_hub import ModelCard

from hf_m2n2.errors import SpecError
from hf_m2n2.evolve.runs import resume_runs, start_runs
from hf_m2n2.evolve.spec import parse_evolve_spec

SEQUENCES = [[1, 40 + i, 41 + i, 42 + i, 43 + i, 2] for i in range(6)]
# Per-example fitness: each sequence's token likelihood under the candidate (a Python evaluator, no lm-eval).
LIKELIHOOD_EVALUATE = {
    "kind": "python",
    "callable": "hf_m2n2.demo.tasks.likelihood:token_likelihood",
    "test_callable": "hf_m2n2.demo.tasks.likelihood:mean_likelihood",
    "kwargs": {"sequences": SEQUENCES},
}
HELD_OUT = [[1, 90 + i, 91 + i, 92 + i, 2] for i in range(3)]


def _spec(seeds, **evolve):
    return {
        "name": "tiny-m2n2",
        "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}],
        "genome": {"kind": "blend", "block_size": 2048, "slerp_scope": "segment"},
        "evolve": {
            "algorithm": "m2n2",
            "budget": 8,
            "seed": 3,
            "log_every": 2,
            "checkpoint_every_steps": 1,
            **evolve,
        },
        "evaluate": LIKELIHOOD_EVALUATE,
    }


@pytest.fixture(scope="module")
def finished_run(seeds, tmp_path_factory):
    root = tmp_path_factory.mktemp("evolve_models")
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(seeds)))
    start_runs(spec_path, root / "run", progress=False)
    return root / "run"


def test_run_exports_model_card_report_and_lineage(finished_run, seeds):
    model = finished_run / "model"
    assert (model / "model.safetensors").exists() and (model / "recipe.json").exists()
    report = json.loads((finished_run / "report.json").read_text())
    assert set(report) == {"ft-a", "ft-b", "tiny-m2n2"}
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["forward_passes"] == 8
    card = ModelCard.load(model / "README.md")
    assert card.data.base_model == ["ft-a", "ft-b"] and card.data.base_model_relation == "merge"
    assert {"merge", "m2n2", "hf-m2n2"} <= set(card.data.tags)
    lineage = [json.loads(line) for line in (finished_run / "lineage.jsonl").read_text().splitlines()]
    assert len(lineage) == 8 and lineage[0]["origin"] == "seed"
    best = summary["best_candidate"]["id"]
    recipe = json.loads((model / "recipe.json").read_text())
    assert recipe["lineage"][-1]["id"] == best


def test_rebuild_and_export_reproduce_the_weights_bit_for_bit(finished_run, cli, tmp_path):
    code, _, err = cli("rebuild", finished_run / "model" / "recipe.json", tmp_path / "rebuilt", "--quiet")
    assert code == 0, err
    original = (finished_run / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "rebuilt" / "model.safetensors").read_bytes() == original
    code, _, err = cli("export", finished_run, tmp_path / "exported", "--quiet")
    assert code == 0, err
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == original
    assert (tmp_path / "exported" / "README.md").exists()
    merged = load_dir(tmp_path / "exported")
    assert "model.embed_tokens.weight" in merged


def test_resume_of_a_finished_run_keeps_it(finished_run):
    before = (finished_run / "model" / "model.safetensors").read_bytes()
    [summary] = resume_runs(finished_run, progress=False)
    assert summary["forward_passes"] == 8
    assert (finished_run / "model" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "change, message",
    [
        ({"evolve": {"algorithm": "cma_es", "budget": 4}}, "evolve.algorithm: cma_es evolves dense vectors"),
        (
            {"genome": {"kind": "blend", "fixed_from": "nope"}},
            "genome.fixed_from: 'nope' is not one of the models",
        ),
        ({"genome": {"kind": "blend", "slerp_scope": "layer"}}, "genome.slerp_scope"),
    ],
)
def test_model_spec_errors_name_the_path(seeds, change, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_evolve_spec({**_spec(seeds), **change})


@pytest.mark.parametrize(
    ("example", "first_seed"),
    [
        ("wizardmath-agentevol", "WizardMath"),
        ("jsdxl-sdxl", "stabilityai/japanese-stable-diffusion-xl"),
        ("sd15", "Lykon/dreamshaper-8"),
    ],
)
def test_real_scale_spec_validates_offline(cli, example, first_seed):
    """The real-scale specs (WizardMath-7B + AgentEvol-7B on gsm8k; JSDXL + SDXL + SDXL-DPO and two SD 1.5
    fine-tunes on CLIP scores) validate without the Hub with --no-resolve (lm-eval config and prompts files checked
    statically); resolving their seeds needs them in the cache, as evolve does: one line naming the first."""
    from pathlib import Path

    spec = Path(__file__).resolve().parents[1] / "examples" / example / "spec.yaml"
    code, out, err = cli("validate", spec, "--no-resolve")
    assert code == 0, err
    assert "valid m2n2 evolve spec" in out
    code, _, err = cli("validate", spec)
    assert code == 2 and len(err.strip().splitlines()) == 1 and first_seed in err


def test_the_wizardmath_agentevol_spec_is_the_papers_fitness():
    """GSM8K (lm-eval) and WebShop sessions together: AgentEvol's template and rounds, AgentEval's test ids held out,
    the server read from the environment; M2N2's capacity `max` for the continuous rewards."""
    from pathlib import Path

    from hf_m2n2.evolve.spec import load_evolve_spec

    path = Path(__file__).resolve().parents[1] / "examples" / "wizardmath-agentevol" / "spec.yaml"
    spec, _ = load_evolve_spec(path)
    math, agent = spec.evaluate
    assert math.kind == "lm_eval" and math.tasks == ["gsm8k"] and math.test_split == "test"
    assert agent.kind == "webshop" and agent.server == "${WEBSHOP_SERVER}" and agent.chat_template == "llama2"
    assert agent.max_rounds == 10 and agent.max_length == 4096
    assert agent.test_sessions == ["hf://datasets/AgentGym/AgentEval@main/webshop_test.json"]
    assert spec.evolve.capacity == "max"


def test_the_jsdxl_spec_is_the_papers_setting():
    """JSDXL's text side fixed, only UNets blended, its custom code allowed; Japanese prompts scored against
    English captions, fitness and held-out rows of both groups."""
    import re
    from pathlib import Path

    from hf_m2n2.evaluate.clip import fitness_rows, test_rows
    from hf_m2n2.evolve.spec import load_evolve_spec

    path = Path(__file__).resolve().parents[1] / "examples" / "jsdxl-sdxl" / "spec.yaml"
    spec, _ = load_evolve_spec(path)
    jsdxl = "stabilityai/japanese-stable-diffusion-xl"
    assert spec.trust_remote_code and spec.genome.fixed_from == jsdxl and spec.genome.include == ["unet/*"]
    assert spec.seed_refs() == [
        jsdxl,
        "stabilityai/stable-diffusion-xl-base-1.0",
        "mhdang/dpo-sdxl-text2image-v1",
    ]
    fit, held_out = fitness_rows(spec.evaluate, path.parent), test_rows(spec.evaluate, path.parent)
    assert (len(fit), len(held_out)) == (24, 12)
    japanese = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
    for row in fit + held_out:
        assert japanese.search(row.prompt) and row.scoring_text.isascii() and row.scoring_text != row.prompt
    assert {r.group for r in fit} == {r.group for r in held_out} == {"culture", "general"}
    assert not {r.id for r in fit} & {r.id for r in held_out}


def test_validate_checks_what_evolve_checks_before_its_first_candidate(seeds, tmp_path, cli):
    def validate(spec: dict, *flags: str) -> tuple[int, str]:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        code, _, err = cli("validate", path, *flags)
        return code, err

    assert validate(_spec(seeds)) == (0, "")
    missing = {**_spec(seeds), "models": [{"model": str(seeds["a"])}, {"model": str(tmp_path / "nope")}]}
    code, err = validate(missing)
    assert code == 2 and "nope" in err
    assert validate(missing, "--no-resolve")[0] == 0
    mixed = {**_spec(seeds), "models": [{"model": str(seeds["a"])}, {"model": str(seeds["narrow"])}]}
    code, err = validate(mixed)
    assert code == 2 and "different shapes" in err
    callable_missing = {**_spec(seeds), "evaluate": {**LIKELIHOOD_EVALUATE, "callable": "hf_m2n2.nope:f"}}
    code, err = validate(callable_missing, "--no-resolve")
    assert code == 2 and "evaluate.callable: cannot import module 'hf_m2n2.nope'" in err


def test_differing_embedding_rows_name_the_fix(seeds, tmp_path):
    """32001 vs 32000 rows (here 260 vs 259): a clear error pointing at genome.exclude, not a shape crash."""
    spec = _spec(seeds)
    spec["models"] = [{"model": str(seeds["base"])}, {"model": str(seeds["wide"])}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    from hf_m2n2.errors import HfM2n2Error

    with pytest.raises(HfM2n2Error, match="genome.exclude"):
        start_runs(path, tmp_path / "run", progress=False)
    spec["genome"]["exclude"] = ["model.embed_tokens.weight", "lm_head.weight"]
    spec["genome"]["fixed_from"] = str(seeds["wide"])
    path.write_text(yaml.safe_dump(spec))
    start_runs(path, tmp_path / "run2", progress=False)
    assert load_dir(tmp_path / "run2" / "model")["model.embed_tokens.weight"].shape[0] == 260
