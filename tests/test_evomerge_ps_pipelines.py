"""evomerge_ps on text-to-image pipelines: CMA-ES over per-block merge weights of the seeds' UNets (the layers of a
pipeline are its UNet blocks), planned by the pipeline merge (text encoders and VAE stay the reference seed's),
exported as a merge spec that `hf-m2n2 merge` reproduces bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import load_dir
from test_clip import ROWS, TEST_ROWS, _jsonl

from hf_m2n2.evolve.build import build_run
from hf_m2n2.evolve.loop import load_archive
from hf_m2n2.evolve.runs import start_runs
from hf_m2n2.evolve.spec import parse_evolve_spec
from hf_m2n2.genomes.method import SeedPick, layer_groups
from hf_m2n2.unet_blocks import unet_block_names, unet_block_of

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    return {"fit": _jsonl(root / "fit.jsonl", ROWS), "test": _jsonl(root / "test.jsonl", TEST_ROWS)}


LINEAR = {"kind": "method", "method": "linear", "parameters": ["weight"], "layer_groups": 3}
SLERP = {"kind": "method", "method": "slerp", "parameters": ["t"], "layer_groups": 2}  # from models[0] to [1]


def _spec(pipelines, clip_judge, prompts, genome=None, models=("sd1-a", "sd1-te"), **evolve) -> dict:
    """sd1-te's text encoder differs from sd1-a's (the reference): a merge must keep sd1-a's."""
    return {
        "name": "tiny-t2i-evomerge",
        "models": [{"model": str(pipelines[m])} for m in models],
        "genome": genome or LINEAR,
        "evolve": {"algorithm": "evomerge_ps", "budget": 10, "seed": 3, "log_every": 5, **evolve},
        "evaluate": {
            "kind": "clip",
            "model": str(clip_judge),
            "prompts": str(prompts["fit"]),
            "test_prompts": str(prompts["test"]),
            "images_per_prompt": 1,
            "num_inference_steps": 2,
            "batch_size": 2,
        },
    }


def _genome_run(spec: dict, run_dir: Path):
    """The genome's parts alone (ops, target, seeds): no evaluator."""
    parsed = parse_evolve_spec(spec)
    return parsed.kind.build(parsed, np.random.default_rng(0), run_dir, None)


def _live(target) -> dict[str, torch.Tensor]:
    return {name: target.live.tensor(name).detach().clone() for name in target.live.names}


def _component(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return {f"{name}/{key}": tensor for key, tensor in load_dir(folder / name).items()}


def test_each_unet_tensor_takes_exactly_its_block_groups_values(pipelines, clip_judge, prompts, tmp_path):
    run = _genome_run(_spec(pipelines, clip_judge, prompts), tmp_path)
    template, target = run.ops.template, run.target
    unet_config = run.seeds[0].components["unet"].config
    blocks = unet_block_names(unet_config)[1:]  # IN00 .. M00 .. OUT05: the layers
    assert template.filters == ("BASE", *blocks) and run.seeds[0].num_layers == len(blocks) == 13
    assert template.groups == layer_groups(13, 3) == ((0, 4), (4, 9), (9, 13))
    assert run.ops.size == 3 * 2 and template.labels()[:2] == [
        f"IN00-IN03.{template.models[0]}.weight",
        f"IN00-IN03.{template.models[1]}.weight",
    ]

    x = np.random.default_rng(1).uniform(0, 1, run.ops.size)
    values = x.reshape(3, 2)  # group, model
    recipe = target.plan(run.ops.from_array(x))
    unet = [n for n in run.seeds[0].checkpoint.names if n.startswith("unet/")]
    assert sorted(t.name for t in recipe.tasks) == sorted(unet)  # the UNet only: nothing else is merged
    seen = set()
    for task in recipe.tasks:
        block = unet_block_of(task.name.removeprefix("unet/"), unet_config)
        layer = 0 if block == "BASE" else blocks.index(block)  # outside the blocks: the first group's
        group = next(g for g, (start, end) in enumerate(template.groups) if start <= layer < end)
        assert [p["weight"] for p in task.model_params] == list(values[group]), task.name
        seen.add(block)
    assert seen == {"BASE", *blocks}

    # the exported spec says the same per block, as filters a pipeline merge spec accepts
    config = run.ops.merge_config(x)
    assert "slices" not in config and [m["model"] for m in config["models"]] == list(template.models)
    weights = config["models"][1]["parameters"]["weight"]
    assert [w["filter"] for w in weights] == ["BASE", *blocks]
    assert [w["value"] for w in weights] == [values[0, 1]] * 5 + [values[1, 1]] * 5 + [values[2, 1]] * 4


def test_slerp_t_per_block_group(pipelines, clip_judge, prompts, tmp_path):
    """A global parameter (slerp's t) takes one value per block group, in the spec's global `parameters:`."""
    run = _genome_run(_spec(pipelines, clip_judge, prompts, SLERP), tmp_path)
    template = run.ops.template
    assert template.parameters == () and template.shared == ("t",) and run.ops.size == 2
    assert template.labels() == ["IN00-IN05.t", "M00-OUT05.t"]
    x = np.array([0.25, 0.75])
    config = run.ops.merge_config(x)
    assert config["base_model"] == template.base and "parameters" not in config["models"][0]
    assert config["models"] == [{"model": template.models[0]}]
    assert [e["value"] for e in config["parameters"]["t"]] == [0.25] * 7 + [0.75] * 7
    unet_config = run.seeds[0].components["unet"].config
    blocks = unet_block_names(unet_config)[1:]
    for task in run.target.plan(run.ops.from_array(x)).tasks:
        block = unet_block_of(task.name.removeprefix("unet/"), unet_config)
        assert task.params["t"] == (0.25 if block == "BASE" or blocks.index(block) < 6 else 0.75), task.name


def test_slerp_t_per_layer_group_of_a_causal_lm(seeds, tmp_path, cli):
    """The same genome over causal LMs: one slice per layer group, t as the slice's parameter."""
    from test_evolve_models import LIKELIHOOD_EVALUATE

    spec = {
        "models": [{"model": str(seeds["base"])}, {"model": str(seeds["a"])}],
        "genome": {"kind": "method", "method": "slerp", "parameters": ["t"]},
        "evolve": {"algorithm": "evomerge_ps", "budget": 4},
        "evaluate": LIKELIHOOD_EVALUATE,
    }
    run = _genome_run(spec, tmp_path / "run")
    x = np.array([0.2, 0.9])
    config = run.ops.merge_config(x)
    assert [sl["parameters"] for sl in config["slices"]] == [{"t": 0.2}, {"t": 0.9}]
    assert all("parameters" not in src for sl in config["slices"] for src in sl["sources"])
    run.target.write(run.ops.from_array(x))
    live = run.target.live.model.state_dict()
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, _, err = cli("merge", path, tmp_path / "merged", "--quiet")
    assert code == 0, err
    for name, tensor in load_dir(tmp_path / "merged").items():
        assert torch.equal(live[name], tensor), name


@pytest.mark.parametrize(
    "genome, models",
    [
        (LINEAR, ("sd1-a", "sd1-te")),
        (
            {
                "kind": "method",
                "method": "dare_ties",
                "parameters": ["weight", "density"],
                "base_model": "sd1",
            },
            ("sd1-a", "sd1-b"),
        ),
        (SLERP, ("sd1-a", "sd1-te")),
    ],
    ids=["linear", "dare_ties", "slerp"],
)
def test_live_pipeline_equals_hf_m2n2_merge_of_the_recipe(
    pipelines, clip_judge, prompts, tmp_path, cli, genome, models
):
    if "base_model" in genome:
        genome = {**genome, "base_model": str(pipelines[genome["base_model"]])}
    run = _genome_run(_spec(pipelines, clip_judge, prompts, genome, models), tmp_path / "run")
    ops, target = run.ops, run.target
    reference = run.seeds[-1] if "base_model" in genome else run.seeds[0]
    before = _live(target)
    x = np.random.default_rng(2).uniform(0, 1, ops.size)
    target.write(ops.from_array(x))
    live = _live(target)

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(ops.merge_config(x), sort_keys=False))
    code, _, err = cli("merge", path, tmp_path / "merged", "--quiet")
    assert code == 0, err
    merged = tmp_path / "merged"
    unet = _component(merged, "unet")
    assert set(unet) == {n for n in live if n.startswith("unet/")}
    for name, tensor in unet.items():
        assert torch.equal(live[name], tensor), name
    assert any(not torch.equal(before[n], live[n]) for n in unet)
    # only the UNet changed: the text encoder and VAE stay the reference's, in the live pipeline and the export
    for component in ("text_encoder", "vae"):
        exported = _component(merged, component)
        own = _component(Path(reference.model.path), component)
        assert set(exported) == set(own)
        for name, tensor in exported.items():
            assert torch.equal(tensor, own[name]) and torch.equal(live[name], own[name]), name

    # a seed as itself (the report's rows) is its UNet only; a genome written after it is again the export's
    other = 1 if reference is run.seeds[0] else 0
    target.write(SeedPick(other))
    picked = _live(target)
    seed_unet = _component(Path(run.seeds[other].model.path), "unet")
    for name in live:
        expected = seed_unet[name] if name.startswith("unet/") else before[name]
        assert torch.equal(picked[name], expected), name
    target.write(ops.from_array(x))
    again = _live(target)
    assert all(torch.equal(again[n], live[n]) for n in live)


@pytest.fixture(scope="module")
def finished_run(pipelines, clip_judge, prompts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t2i_evomerge_ps")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(pipelines, clip_judge, prompts), allow_unicode=True))
    start_runs(spec, root / "run", progress=False)
    return root / "run"


def test_run_on_pipelines_exports_what_it_evaluated(finished_run, pipelines, cli, tmp_path):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["algorithm"] == "evomerge_ps" and summary["forward_passes"] == 10
    report = json.loads((finished_run / "report.json").read_text())
    assert list(report) == ["sd1-a", "sd1-te", "tiny-t2i-evomerge"]
    assert all(list(row) == ["en", "ja"] for row in report.values())

    model = finished_run / "model"
    config = yaml.safe_load((model / "merge_config.yaml").read_text())
    assert config["merge_method"] == "linear" and len(config["models"]) == 2
    code, _, err = cli("merge", model / "merge_config.yaml", tmp_path / "again", "--quiet")
    assert code == 0, err
    unet_files = sorted(p.name for p in (model / "unet").glob("*.safetensors"))
    assert unet_files
    for name in unet_files:
        assert (tmp_path / "again" / "unet" / name).read_bytes() == (model / "unet" / name).read_bytes()

    # the exported pipeline is the best genome as it was evaluated: written into a fresh live pipeline
    archive = load_archive(finished_run)
    best = archive["members"][archive["best"]]["genome"]
    spec = parse_evolve_spec(yaml.safe_load((finished_run / "spec.yaml").read_text()))
    parts = build_run(spec, 3, tmp_path / "live", None)
    assert parts.ops.merge_config(parts.ops.from_state(best)) == config
    parts.genome.target.write(parts.ops.from_state(best))
    live = _live(parts.genome.target)
    for component in ("unet", "text_encoder", "vae"):
        for name, tensor in _component(model, component).items():
            assert torch.equal(live[name], tensor), name
    reference_te = _component(pipelines["sd1-a"], "text_encoder")
    assert all(torch.equal(t, reference_te[n]) for n, t in _component(model, "text_encoder").items())
    assert any(
        not torch.equal(t, _component(pipelines[s], "unet")[n])
        for s in ("sd1-a", "sd1-te")
        for n, t in _component(model, "unet").items()
    )
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"

    code, _, err = cli("export", finished_run, tmp_path / "exported", "--quiet")
    assert code == 0, err
    for name in unet_files:
        assert (tmp_path / "exported" / "unet" / name).read_bytes() == (model / "unet" / name).read_bytes()


@pytest.mark.parametrize(
    "genome, models, message",
    [
        ({**SLERP, "layer_groups": 14}, ("sd1-a", "sd1-te"), "genome.layer_groups: 14 groups for 13 layers"),
        (
            SLERP,
            ("sd1-a", "sd1-te", "sd1-b"),
            "models: slerp goes from the first model (its base) to the second",
        ),
        ({**SLERP, "parameters": ["weight"]}, ("sd1-a", "sd1-te"), "genome.parameters[0]: 'weight' is not a"),
    ],
    ids=["too-many-groups", "slerp-of-three", "slerp-weight"],
)
def test_bad_genomes_name_the_yaml_path(pipelines, clip_judge, prompts, tmp_path, genome, models, message):
    from hf_m2n2.errors import SpecError

    with pytest.raises(SpecError) as info:
        _genome_run(_spec(pipelines, clip_judge, prompts, genome, models), tmp_path)
    assert str(info.value).startswith(message)
