"""Evolutionary Model Merge in data-flow space: the route genome against the paper's definition (T = M x r slots, an
indicator, a scaling matrix W over M x M layer pairs, A's first and last layers fixed), the routed model (a path
over resident layers, one cache entry per hop), evomerge_dfs runs, the export (loaded by transformers with its own
code; a plain passthrough frankenmerge when every scale is 1), PS+DFS lineage, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from helpers import sigkill_evolve, write_yaml
from test_evolve_models import LIKELIHOOD_EVALUATE

from hf_m2n2.errors import HfM2n2Error
from hf_m2n2.evolve.loop import load_archive
from hf_m2n2.evolve.runs import start_runs
from hf_m2n2.genomes.route import RouteLayout, RouteOps, route_of
from hf_m2n2.models.routed import RoutedLive
from hf_m2n2.route_recipe import RouteRecipe, write_route
from hf_m2n2.routed_modeling import RoutedConfig, RoutedForCausalLM
from hf_m2n2.seeds import close_seeds, open_seeds

torch.set_num_threads(1)

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 2], [1, 50, 60, 70, 80, 90, 2]])


def _spec(seeds, genome=None, models=("a", "b"), **evolve) -> dict:
    return {
        "name": "tiny-dfs",
        "models": [{"model": str(seeds[m]) if m in seeds else str(m)} for m in models],
        "genome": {"kind": "route", "repeats": 2, **(genome or {})},
        "evolve": {
            "algorithm": "evomerge_dfs",
            "budget": 12,
            "seed": 7,
            "log_every": 2,
            "checkpoint_every_steps": 1,
            "evomerge_dfs": {"popsize": 4},
            **evolve,
        },
        "evaluate": LIKELIHOOD_EVALUATE,
    }


@pytest.fixture(scope="module")
def finished_run(seeds, tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    start_runs(write_yaml(root / "spec.yaml", _spec(seeds)), root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def opened(seeds):
    opened = open_seeds([str(seeds["a"]), str(seeds["b"])])
    yield opened
    close_seeds(opened)


def _hand_route(opened_seeds, scales) -> RouteRecipe:
    """The route A0, B0, B1, A1 over two 2-layer seeds, with the given hop scales."""
    return RouteRecipe(
        seeds=[{"ref": s.name, "name": s.name, "path": str(s.model.path)} for s in opened_seeds],
        layers=[2, 2],
        repeats=2,
        scales=True,
        dtype="float32",
        genome=[],
        stored=[[0, 0], [0, 1], [1, 0], [1, 1]],
        path=[0, 2, 3, 1],
        hop_scales=list(scales),
    )


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- the genome, as the paper defines it ------------------------------------------------------------------------


def test_slots_are_layers_times_repeats_and_w_is_m_by_m():
    layout = RouteLayout((2, 3), repeats=3)
    assert (layout.num_layers, layout.slots, layout.size) == (5, 15, 15 + 25)
    assert RouteLayout((2, 3), repeats=3, scales=False).size == 15
    assert [layout.stored(i) for i in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]


def test_the_initial_genome_is_model_a_itself():
    layout = RouteLayout((2, 3), repeats=3)
    x = layout.initial()
    assert np.all(x[:2] > 0) and np.all(x[2:15] < 0) and np.all(x[15:] == 1.0)
    assert layout.decode(x) == ([0, 1], [1.0, 1.0])


def test_slot_k_visits_layer_k_mod_m_and_w_ij_scales_the_hop_from_i_to_j():
    layout = RouteLayout((2, 3), repeats=3)  # M = 5: layers A0 A1 B0 B1 B2 = 0..4
    x = np.concatenate([np.full(15, -1.0), np.ones(25)])
    for slot in (2, 4, 6):  # B0 (first repetition), B2, then A1 (second repetition: 6 mod 5 = 1)
        x[slot] = 0.3
    w = x[15:].reshape(5, 5)
    w[0, 2], w[2, 4], w[4, 1] = 0.5, 1.5, 0.25
    path, scales = layout.decode(x)
    assert path == [0, 2, 4, 1]  # A0 is always the first hop, whatever I_0 says
    assert scales == [1.0, 0.5, 1.5, 0.25]  # the first hop's input is the embedding, unscaled
    w[1, 2] = 9.0  # a pair the path does not hand over along changes nothing
    assert layout.decode(x) == (path, scales)


def test_a_first_and_last_layers_are_fixed_whatever_the_genome():
    layout = RouteLayout((3, 2), repeats=2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        path, scales = layout.decode(rng.normal(size=layout.size))
        assert path[0] == 0 and path[-1] == 2 and len(scales) == len(path)
    x = np.full(layout.size, -1.0)
    x[3] = 1.0  # only B0 on: A's last layer is appended after it
    assert layout.decode(x)[0] == [0, 3, 2]
    assert RouteLayout((3, 2), repeats=2, scales=False).decode(np.ones(10)) == (
        [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 2],
        [1.0] * 11,
    )


def test_genomes_that_route_alike_hash_alike():
    ops = RouteOps(RouteLayout((2, 2), repeats=2), 2)
    x = ops.initial_array()
    y = x.copy()
    y[5] = -0.7  # another off value
    z = x.copy()
    z[4] = 0.9  # slot 4 (A0 again) on
    assert ops.hash(x) == ops.hash(y) != ops.hash(z)
    with pytest.raises(ValueError, match="finite"):
        ops.from_array(np.full(ops.size, np.nan))


# --- the routed model ---------------------------------------------------------------------------------------------


def _tiny_llama(layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _routed_copy(model, path, scales):
    routed = RoutedForCausalLM(
        RoutedConfig(base_config=model.config.to_dict(), path=path, scales=scales)
    ).eval()
    routed.load_state_dict(model.state_dict(), strict=True)
    return routed


def test_its_own_path_gives_the_base_model_bit_for_bit():
    model = _tiny_llama()
    assert torch.equal(_logits(_routed_copy(model, [0, 1, 2], [1.0] * 3)), _logits(model))


def test_a_hand_built_path_computes_what_the_definition_says():
    from transformers.masking_utils import create_causal_mask

    model = _tiny_llama()
    path, scales = [0, 2, 2, 1], [1.0, 0.5, 1.25, 2.0]
    routed = _routed_copy(model, path, scales)
    with torch.no_grad():
        decoder = model.model
        hidden = decoder.embed_tokens(IDS)
        positions = torch.arange(IDS.shape[1]).unsqueeze(0)
        rotary = decoder.rotary_emb(hidden, position_ids=positions)
        mask = create_causal_mask(
            config=decoder.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=None,
            position_ids=positions,
        )
        for layer, scale in zip(path, scales):
            hidden = decoder.layers[layer](
                hidden * scale, attention_mask=mask, position_embeddings=rotary, position_ids=positions
            )
        expected = model.lm_head(decoder.norm(hidden))
    assert torch.allclose(_logits(routed), expected, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in routed.parameters()) == sum(p.numel() for p in model.parameters())


def test_a_layer_visited_twice_has_a_cache_entry_per_hop():
    routed = _routed_copy(_tiny_llama(), [0, 1, 1, 1, 2], [1.0, 1.0, 0.9, 1.1, 1.0])
    with torch.no_grad():
        out = routed(input_ids=IDS[:1], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        assert len(cache.layers) == 5
        cached = routed.generate(IDS[:1], max_new_tokens=8, do_sample=False)
        uncached = routed.generate(IDS[:1], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_path_outside_the_stored_layers_is_refused():
    routed = _routed_copy(_tiny_llama(), [0, 1, 2], [1.0] * 3)
    with pytest.raises(ValueError, match="visits layer 3, but there are 3 stored layers"):
        routed.set_route([0, 3], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 hops but 1 scales"):
        routed.set_route([0, 1], [1.0])


def test_the_live_model_holds_every_seed_layer_once_and_starts_as_model_a(seeds, opened):
    from transformers import AutoModelForCausalLM

    live = RoutedLive(opened)
    a = AutoModelForCausalLM.from_pretrained(str(seeds["a"])).eval()
    b = AutoModelForCausalLM.from_pretrained(str(seeds["b"])).eval()
    assert torch.equal(_logits(live.route([0, 1], [1.0, 1.0])), _logits(a))
    assert len(live.model.model.layers) == 4
    b_layer = live.model.model.layers[2].self_attn.q_proj.weight
    assert torch.equal(b_layer, b.model.layers[0].self_attn.q_proj.weight)
    routed = live.route([0, 2, 3, 1], [1.0, 0.8, 1.0, 1.2])
    assert not torch.equal(_logits(routed), _logits(a))


# --- runs and exports ---------------------------------------------------------------------------------------------


def test_a_run_exports_a_model_transformers_loads_with_its_own_code(finished_run, opened):
    from transformers import AutoModelForCausalLM

    model_dir = finished_run / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "hf_m2n2_routed" and "AutoModelForCausalLM" in config["auto_map"]
    assert (model_dir / "modeling_hf_m2n2_routed.py").is_file()
    recipe = RouteRecipe.load(model_dir / "route.json")
    archive = load_archive(finished_run)
    best = np.asarray(archive["members"][archive["best"]]["genome"])
    assert recipe.genome == best.tolist()
    layout = RouteLayout((2, 2), repeats=2)
    assert (recipe.stored, recipe.path, recipe.hop_scales) == tuple(route_of(layout, best))
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(str(model_dir))
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    assert type(loaded).__name__ == "RoutedForCausalLM"
    expected = _logits(RoutedLive(opened).route(*layout.decode(best)))
    assert torch.equal(_logits(loaded), expected)
    card = (model_dir / "README.md").read_text()
    assert "trust_remote_code=True" in card and "route.json" in card and "evomerge_dfs" in card
    half = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from hf_m2n2.demo.toy import build_tiny_llama

    base = build_tiny_llama(tmp_path / "base", seed=0, tie=True)
    refs = [
        str(build_tiny_llama(tmp_path / name, seed=i + 1, base=base, tie=True)) for i, name in enumerate("ab")
    ]
    tied = open_seeds(refs)
    try:
        live = RoutedLive(tied)
        a = AutoModelForCausalLM.from_pretrained(refs[0]).eval()
        assert torch.equal(_logits(live.route([0, 1], [1.0, 1.0])), _logits(a))
        expected = _logits(live.route([0, 2, 3, 1], [1.0, 0.5, 1.0, 1.25]))
        write_route(
            _hand_route(tied, [1.0, 0.5, 1.0, 1.25]), tied, tmp_path / "out", overwrite=False, extras=None
        )
    finally:
        close_seeds(tied)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=True).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded), expected)


def test_export_and_rebuild_write_the_same_model_again(finished_run, tmp_path, cli):
    code, _, err = cli("export", finished_run, tmp_path / "again")
    assert code == 0, err
    code, _, err = cli("rebuild", finished_run / "model" / "route.json", tmp_path / "rebuilt")
    assert code == 0, err
    for name in ("model.safetensors", "config.json", "route.json", "modeling_hf_m2n2_routed.py", "README.md"):
        assert (tmp_path / "again" / name).read_bytes() == (finished_run / "model" / name).read_bytes()
        if name != "README.md":  # rebuild writes the weights and their recipe; the card stays with the run
            assert (tmp_path / "rebuilt" / name).read_bytes() == (finished_run / "model" / name).read_bytes()
    assert "hf-m2n2 rebuild route.json OUT_DIR" in (finished_run / "model" / "README.md").read_text()


def test_all_ones_scales_export_a_plain_passthrough_frankenmerge_too(opened, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    recipe = _hand_route(opened, [1.0] * 4)  # A0, B0, B1, A1: what people write by hand
    write_route(recipe, opened, tmp_path / "routed", overwrite=False, extras=None)
    spec = yaml.safe_load((tmp_path / "routed" / "passthrough.yaml").read_text())
    assert [s["sources"][0]["layer_range"] for s in spec["slices"]] == [[0, 1], [0, 2], [1, 2]]
    code, _, err = cli("merge", tmp_path / "routed" / "passthrough.yaml", tmp_path / "plain")
    assert code == 0, err
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.num_hidden_layers == 4
    routed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "routed"), trust_remote_code=True).eval()
    assert torch.equal(_logits(plain), _logits(routed))
    recipe.hop_scales = [1.0, 0.5, 1.0, 1.0]
    write_route(recipe, opened, tmp_path / "scaled", overwrite=False, extras=None)
    assert not (tmp_path / "scaled" / "passthrough.yaml").exists()


def test_sigkill_then_resume_equals_an_uninterrupted_run(seeds, tmp_path, cli):
    slow = {
        **LIKELIHOOD_EVALUATE,
        "kwargs": {"sequences": [[1, *range(10 + i, 40 + i), 2] for i in range(40)]},
    }
    spec = {**_spec(seeds, budget=24, evomerge_dfs={"popsize": 6}), "evaluate": slow}
    path = write_yaml(tmp_path / "spec.yaml", spec)
    killed = tmp_path / "killed"
    at_kill = sigkill_evolve(path, killed, min_passes=8, timeout=120, fresh_interpreter=False)
    assert 8 <= at_kill < 24
    assert cli("evolve", "--resume", killed, "-q")[0] == 0
    assert cli("evolve", path, "--out", tmp_path / "straight", "-q")[0] == 0
    straight = tmp_path / "straight"
    for name in ("history.jsonl", "lineage.jsonl", "model/model.safetensors", "model/route.json"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name


def test_ps_then_dfs_keeps_both_recipes(seeds, tmp_path):
    ps = {
        "name": "ps",
        "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}],
        "genome": {"kind": "method", "method": "linear", "parameters": ["weight"]},
        "evolve": {"algorithm": "evomerge_ps", "budget": 3, "seed": 1, "log_every": 1},
        "evaluate": LIKELIHOOD_EVALUATE,
    }
    start_runs(write_yaml(tmp_path / "ps.yaml", ps), tmp_path / "ps", progress=False)
    ps_model = tmp_path / "ps" / "model"
    spec = _spec(seeds, models=(ps_model, "b"), budget=3)
    start_runs(write_yaml(tmp_path / "dfs.yaml", spec), tmp_path / "dfs", progress=False)
    model_dir = tmp_path / "dfs" / "model"
    kept = model_dir / "seed_recipes" / "0-merge_config.yaml"
    assert kept.read_bytes() == (ps_model / "merge_config.yaml").read_bytes()
    assert RouteRecipe.load(model_dir / "route.json").upstream[0]["file"] == "merge_config.yaml"
    card = (model_dir / "README.md").read_text()
    assert "seed_recipes/0-merge_config.yaml" in card and "PS+DFS" in card


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "models, genome, expected",
    [
        (("a", "narrow"), {}, "models: the models have different hidden sizes (ft-a: 64, narrow: 32)"),
        (("a", "gpt2"), {}, "data-flow routing supports decoders whose layers are model.layers.N"),
        (("a", "b"), {"repeats": 0}, "genome.repeats"),
        (("a",), {}, "models: List should have at least 2 items"),
    ],
)
def test_bad_seeds_and_settings_fail_with_one_line(seeds, tmp_path, cli, models, genome, expected):
    path = write_yaml(tmp_path / "spec.yaml", _spec(seeds, genome=genome, models=models))
    code, _, err = cli("evolve", path, "--out", tmp_path / "out")
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_route_whose_seeds_changed_is_refused(finished_run, seeds, tmp_path, cli, capsys):
    from hf_m2n2.demo.toy import build_tiny_llama

    shutil.copytree(finished_run, tmp_path / "run")
    recipe_file = tmp_path / "run" / "model" / "route.json"
    recipe = json.loads(recipe_file.read_text())
    recipe["seeds"][1]["path"] = str(build_tiny_llama(tmp_path / "deep", seed=9, layers=3))
    capsys.readouterr()  # the build's progress bar
    recipe_file.write_text(json.dumps(recipe))
    code, _, err = cli("export", tmp_path / "run", tmp_path / "out")
    expected = "route.json: seed deep has 3 layers but the route was found for 2"
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    recipe["seeds"][1]["path"] = str(seeds["gpt2"])
    recipe_file.write_text(json.dumps(recipe))
    code, _, err = cli("export", tmp_path / "run", tmp_path / "out")
    assert code == 2 and "route.json: gpt2 is a gpt2 model" in err, err
    recipe["seeds"][1]["path"] = str(seeds["b"])
    stored = len(recipe["stored"])
    recipe["path"] = [0, stored]
    recipe_file.write_text(json.dumps(recipe))
    code, _, err = cli("export", tmp_path / "run", tmp_path / "out")
    assert code == 2 and f"the path visits layer {stored}, but there are {stored} stored layers" in err, err
    assert not (tmp_path / "out").exists()


def test_a_routed_model_is_not_a_merge_seed(finished_run, seeds, tmp_path, cli):
    merge = {
        "merge_method": "linear",
        "models": [{"model": str(finished_run / "model"), "parameters": {"weight": 1}}],
    }
    merge["models"].append({"model": str(seeds["a"]), "parameters": {"weight": 1}})
    code, _, err = cli("merge", write_yaml(tmp_path / "merge.yaml", merge), tmp_path / "out")
    assert code == 2 and "is a routed model" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_dfs_is_only_for_route_genomes(seeds, tmp_path, cli):
    spec = _spec(seeds)
    spec["genome"] = {"kind": "blend"}
    code, _, err = cli("evolve", write_yaml(tmp_path / "spec.yaml", spec), "--out", tmp_path / "out")
    assert code == 2 and "evomerge_dfs" in err and len(err.strip().splitlines()) == 1, err


def test_a_route_genome_rejects_another_algorithm(seeds, tmp_path, cli):
    spec = _spec(seeds)
    spec["evolve"] = {"algorithm": "m2n2", "budget": 4}
    code, _, err = cli("evolve", write_yaml(tmp_path / "spec.yaml", spec), "--out", tmp_path / "out")
    expected = "genome.kind: m2n2 evolves genomes by crossover: use genome: {kind: blend"
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_routes_of_a_finished_run_decode_within_the_seeds(finished_run):
    recipe = RouteRecipe.load(finished_run / "model" / "route.json")
    assert recipe.path[0] == recipe.stored.index([0, 0]) and recipe.stored[recipe.path[-1]] == [0, 1]
    with pytest.raises(HfM2n2Error, match="cannot read the route"):
        (finished_run.parent / "bad.json").write_text("{}")
        RouteRecipe.load(finished_run.parent / "bad.json")


def test_the_shipped_dfs_compare_specs_are_valid():
    from pathlib import Path

    from hf_m2n2.evolve.config import EvolveConfig, check_evolve
    from hf_m2n2.genomes.route import RouteGenomeConfig
    from hf_m2n2.spec import load_spec

    compare = Path(__file__).resolve().parents[1] / "examples" / "specialists" / "compare"
    spec = yaml.safe_load((compare / "evomerge_dfs.yaml").read_text())  # its models are built by `make demo`
    assert RouteGenomeConfig(**spec["genome"]).repeats == 3
    evolve = EvolveConfig(**spec["evolve"])
    check_evolve(evolve)
    assert (evolve.algorithm, evolve.budget, evolve.evomerge_dfs.popsize) == ("evomerge_dfs", 60, 12)
    franken = load_spec(compare / "frankenmerge.yaml")
    assert franken.merge_method == "passthrough" and len(franken.slices) == 3
