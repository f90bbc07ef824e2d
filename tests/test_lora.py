"""LoRA references (`base+adapter`): merged tensors equal peft's own `merge_and_unload()`, read lazily."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import populate_hf_cache
from helpers import load_dir

Q0 = "model.layers.0.self_attn.q_proj.weight"


def _adapter(base: Path, out: Path, seed: int, model_cls=None, **config) -> Path:
    """Save a peft LoRA adapter of `base` whose B is random (not a no-op), built by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = (model_cls or AutoModelForCausalLM).from_pretrained(str(base), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out / embedding-saving notices
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "modules_to_save" in name or (name.endswith(".bias") and param.requires_grad):
                    param.add_(torch.randn_like(param))  # a trained head or bias, different from the base's
        peft_model.save_pretrained(str(out))
    return out


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft itself makes of base + adapter: `PeftModel.from_pretrained(...).merge_and_unload()`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="session")
def adapters(seeds, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = seeds["base"]
    return {
        "plain": _adapter(base, root / "plain", 10, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "rs": _adapter(
            base,
            root / "rs",
            11,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "o_proj", "embed_tokens"],
            rank_pattern={"layers.0.self_attn.q_proj": 2},
            alpha_pattern={"o_proj": 3},
        ),
        "head": _adapter(
            base, root / "head", 12, r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["lm_head"]
        ),
    }


def _merge(cli, write_spec, tmp_path, models, name="out", **extra) -> dict[str, torch.Tensor]:
    spec = write_spec({"merge_method": "linear", "dtype": "float32", "models": models, **extra})
    code, _, stderr = cli("merge", spec, tmp_path / name, "--quiet")
    assert code == 0, stderr
    return load_dir(tmp_path / name)


def _assert_equal_state(merged, expected, atol=1e-6):
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=atol, msg=name)


def test_merge_of_base_plus_adapter_equals_peft_merge_and_unload(seeds, adapters, write_spec, cli, tmp_path):
    ref = f"{seeds['base']}+{adapters['plain']}"
    merged = _merge(cli, write_spec, tmp_path, [{"model": ref, "parameters": {"weight": 1.0}}])
    expected = _peft_merged(seeds["base"], adapters["plain"])
    _assert_equal_state(merged, expected)
    assert not torch.equal(merged[Q0], load_dir(seeds["base"])[Q0])  # the adapter did something
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "- base\n" in front and "- plain\n" in front  # the base and the adapter are both linked


def test_rslora_scale_patterns_and_embedding_lora(seeds, adapters, write_spec, cli, tmp_path):
    """rsLoRA: alpha / sqrt(r), with r and alpha per module from rank_pattern / alpha_pattern; an embedding
    adapter adds (B A)^T. All as peft merges them."""
    from safetensors.torch import load_file

    ref = f"{seeds['base']}+{adapters['rs']}"
    merged = _merge(cli, write_spec, tmp_path, [{"model": ref, "parameters": {"weight": 1.0}}])
    _assert_equal_state(merged, _peft_merged(seeds["base"], adapters["rs"]))
    lora = load_file(str(adapters["rs"] / "adapter_model.safetensors"))
    base = load_dir(seeds["base"])
    prefix = "base_model.model.model.layers.0.self_attn."
    a, b = lora[prefix + "q_proj.lora_A.weight"], lora[prefix + "q_proj.lora_B.weight"]
    assert a.shape[0] == 2  # rank_pattern
    torch.testing.assert_close(merged[Q0], base[Q0] + 8 / math.sqrt(2) * b @ a, rtol=0, atol=1e-6)
    a, b = lora[prefix + "o_proj.lora_A.weight"], lora[prefix + "o_proj.lora_B.weight"]
    o0 = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(merged[o0], base[o0] + 3 / math.sqrt(4) * b @ a, rtol=0, atol=1e-6)


def test_modules_to_save_replace_the_base_tensor(seeds, adapters, write_spec, cli, tmp_path):
    from safetensors.torch import load_file

    ref = f"{seeds['base']}+{adapters['head']}"
    merged = _merge(cli, write_spec, tmp_path, [{"model": ref, "parameters": {"weight": 1.0}}])
    saved = load_file(str(adapters["head"] / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    assert torch.equal(merged["lm_head.weight"], saved)
    assert not torch.equal(saved, load_dir(seeds["base"])["lm_head.weight"])
    _assert_equal_state(merged, _peft_merged(seeds["base"], adapters["head"]))


def test_merge_of_lora_model_with_another_model_equals_formula(seeds, adapters, write_spec, cli, tmp_path):
    """The mapping form `{model: BASE, lora: ADAPTER}` too (mergekit's ModelReference)."""
    lora = {"model": str(seeds["base"]), "lora": str(adapters["plain"])}
    merged = _merge(
        cli,
        write_spec,
        tmp_path,
        [
            {"model": lora, "parameters": {"weight": 0.3}},
            {"model": str(seeds["a"]), "parameters": {"weight": 0.7}},
        ],
    )
    applied, other = _peft_merged(seeds["base"], adapters["plain"]), load_dir(seeds["a"])
    for name in other:
        torch.testing.assert_close(merged[name], 0.3 * applied[name] + 0.7 * other[name], rtol=0, atol=1e-6)


def test_row_blocks_are_the_rows_of_the_whole_tensor(seeds, adapters):
    """Tensors are read in row blocks in a bounded-memory merge: a block of rows is those rows of the tensor."""
    from hf_m2n2.hub import resolve_model
    from hf_m2n2.lora import open_checkpoint

    with open_checkpoint(resolve_model(f"{seeds['base']}+{adapters['rs']}")) as ckpt:
        for name in (Q0, "model.embed_tokens.weight"):
            whole = ckpt.get(name)
            torch.testing.assert_close(ckpt.get(name, (5, 37)), whole[5:37], rtol=0, atol=0)


def test_hub_references_with_revisions_resolve_from_the_cache(seeds, adapters, cached_repo, hf_home):
    """`org/base@rev+org/adapter` resolves each part through huggingface_hub (here offline, from the cache)."""
    from hf_m2n2.hub import resolve_model
    from hf_m2n2.lora import open_checkpoint

    populate_hf_cache(hf_home, "hf-m2n2-test/tiny-lora", {"c" * 40: adapters["plain"]}, {"main": "c" * 40})
    model = resolve_model(f"{cached_repo['repo_id']}@{cached_repo['old']}+hf-m2n2-test/tiny-lora")
    assert model.commit == cached_repo["old"] and model.adapter.commit == "c" * 40
    assert model.pinned == f"{cached_repo['repo_id']}@{cached_repo['old']}+hf-m2n2-test/tiny-lora@{'c' * 40}"
    expected = _peft_merged(seeds["b"], adapters["plain"])  # the old revision holds ft-b's weights
    with open_checkpoint(model) as ckpt:
        torch.testing.assert_close(ckpt.get(Q0), expected[Q0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_gpt2_conv1d_adapter_equals_peft(seeds, write_spec, cli, tmp_path, fan_in_fan_out):
    """GPT-2 stores Conv1D weights (in, out): peft merges (B A)^T there, whatever the config's fan_in_fan_out says
    (peft corrects it per layer; with False, hf-m2n2 tells Conv1D from the stored shapes)."""
    adapter = _adapter(
        seeds["gpt2"], tmp_path / "gpt2-lora", 13, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": fan_in_fan_out}))
    merged = _merge(
        cli, write_spec, tmp_path, [{"model": f"{seeds['gpt2']}+{adapter}", "parameters": {"weight": 1}}]
    )
    expected = _peft_merged(seeds["gpt2"], adapter)
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_linear_layers_ignore_a_fan_in_fan_out_flag_as_peft_does(seeds, adapters, tmp_path):
    """peft merges nn.Linear targets as B @ A even when the config says fan_in_fan_out (it corrects the flag per
    layer): the non-square gate_proj shows the layout, the square q_proj follows it."""
    from hf_m2n2.hub import resolve_model
    from hf_m2n2.lora import open_checkpoint

    adapter = _adapter(
        seeds["base"], tmp_path / "fifo", 15, r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"]
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    expected = _peft_merged(seeds["base"], adapter)
    with open_checkpoint(resolve_model(f"{seeds['base']}+{adapter}")) as ckpt:
        for name in (Q0, "model.layers.0.mlp.gate_proj.weight"):
            torch.testing.assert_close(ckpt.get(name), expected[name], rtol=0, atol=1e-6, msg=name)


def test_trained_biases_and_lora_bias_equal_peft(seeds, tmp_path):
    """`bias="all"` saves every bias (replacing the base's); `lora_bias` adds scale * lora_B.bias."""
    from hf_m2n2.hub import resolve_model
    from hf_m2n2.lora import open_checkpoint

    adapter = _adapter(
        seeds["gpt2"],
        tmp_path / "bias",
        14,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn"],
        bias="all",
        lora_bias=True,
    )
    expected = _peft_merged(seeds["gpt2"], adapter)
    base = load_dir(seeds["gpt2"])
    with open_checkpoint(resolve_model(f"{seeds['gpt2']}+{adapter}")) as ckpt:
        assert not torch.equal(
            ckpt.get("transformer.h.0.attn.c_attn.bias"), base["transformer.h.0.attn.c_attn.bias"]
        )
        assert not torch.equal(ckpt.get("transformer.h.1.ln_2.bias"), base["transformer.h.1.ln_2.bias"])
        for name in ckpt.names:
            torch.testing.assert_close(ckpt.get(name), expected[name], rtol=0, atol=1e-6, msg=name)


def test_seed_live_target_holds_the_adapted_weights(seeds, adapters):
    """Evolve seeds: the live model built from a `base+adapter` seed holds the adapted weights."""
    from hf_m2n2.hub import resolve_model
    from hf_m2n2.models import model_kind
    from hf_m2n2.seeds import open_seed

    seed = open_seed(resolve_model(f"{seeds['base']}+{adapters['head']}"))
    live = model_kind(seed.kind).live_target(seed)
    expected = _peft_merged(seeds["base"], adapters["head"])
    for name in ("lm_head.weight", "model.layers.1.self_attn.k_proj.weight"):
        torch.testing.assert_close(live.tensor(name), expected[name], rtol=0, atol=1e-6)
    seed.checkpoint.close()


def _broken(adapter: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return out


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "LoRA adapter of"),
        ("no_config", "adapter_config.json: not found"),
        ("bad_json", "adapter_config.json: not a valid PEFT adapter config"),
        ("dora", "adapter_config.json: use_dora (DoRA) is not supported"),
        ("no_weights", "no adapter_model.safetensors or adapter_model.bin"),
        ("two_plus", "expected MODEL+LORA_ADAPTER"),
    ],
)
def test_bad_adapters_are_one_line_errors(seeds, adapters, write_spec, cli, tmp_path, case, needle):
    adapter = tmp_path / "adapter"
    if case == "no_config":
        shutil.copytree(adapters["plain"], adapter)
        (adapter / "adapter_config.json").unlink()
    elif case == "bad_json":
        shutil.copytree(adapters["plain"], adapter)
        (adapter / "adapter_config.json").write_text("{not json")
    elif case == "dora":
        adapter = _broken(adapters["plain"], tmp_path, use_dora=True)
    elif case == "no_weights":
        shutil.copytree(adapters["plain"], adapter)
        (adapter / "adapter_model.safetensors").unlink()
    ref = f"{seeds['base']}+{adapter}" + ("+x" if case == "two_plus" else "")
    spec = write_spec({"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1}}]})
    code, _, stderr = cli("merge", spec, tmp_path / "out", "--quiet")
    assert code == 2
    assert needle in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert case == "two_plus" or str(adapter) in stderr  # names the adapter (its file)
    assert not (tmp_path / "out").exists()


def test_hub_server_references_merge_and_link_both_repos(seeds, adapters, hub, write_spec, cli, tmp_path):
    """Both parts are downloaded through huggingface_hub (the adapter with its config and weights only); the card
    links the base and the adapter by repo id."""
    from hub_server import TEST_TOKENS
    from huggingface_hub import HfApi

    api = HfApi(token=next(iter(TEST_TOKENS)))
    for repo, folder in (("alice/tiny-base", seeds["base"]), ("alice/tiny-lora", adapters["plain"])):
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(
            repo_id=repo, folder_path=folder, ignore_patterns=["README.md"]
        )  # peft's names a path
    merged = _merge(
        cli, write_spec, tmp_path, [{"model": "alice/tiny-base+alice/tiny-lora", "parameters": {"weight": 1}}]
    )
    _assert_equal_state(merged, _peft_merged(seeds["base"], adapters["plain"]))
    front = (tmp_path / "out" / "README.md").read_text().split("---")[1]
    assert "- alice/tiny-base\n" in front and "- alice/tiny-lora\n" in front
    adapter_files = {p.name for p in hub.cache_dir.glob("models--alice--tiny-lora/snapshots/*/*")}
    assert adapter_files == {"adapter_config.json", "adapter_model.safetensors"}


# a fitness the tiny seeds' token likelihoods give (evolution tests over LoRA seeds)
_LIKELIHOOD = {
    "kind": "python",
    "callable": "hf_m2n2.demo.tasks.likelihood:token_likelihood",
    "kwargs": {"sequences": [[1, 40 + i, 41 + i, 2] for i in range(4)]},
}


def test_blend_evolution_over_a_lora_seed_rebuilds_from_its_recipe(seeds, adapters, cli, tmp_path):
    """An evolve seed `base+adapter`: the run's recipe names both parts, so `rebuild` gives the same bytes."""
    import yaml

    from hf_m2n2.evolve.runs import start_runs

    lora_ref = f"{seeds['base']}+{adapters['plain']}"
    spec = {
        "name": "lora-m2n2",
        "models": [{"model": lora_ref}, {"model": f"{seeds['a']}+{adapters['head']}"}],
        "genome": {"kind": "blend", "block_size": 2048},
        "evolve": {"algorithm": "m2n2", "budget": 4, "seed": 3},
        "evaluate": _LIKELIHOOD,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    start_runs(tmp_path / "spec.yaml", tmp_path / "run", progress=False)
    recipe = json.loads((tmp_path / "run" / "model" / "recipe.json").read_text())
    assert recipe["seeds"][0]["locator"] == f"{seeds['base'].resolve()}+{adapters['plain'].resolve()}"
    code, _, err = cli("rebuild", tmp_path / "run" / "model" / "recipe.json", tmp_path / "rebuilt", "--quiet")
    assert code == 0, err
    original = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "rebuilt" / "model.safetensors").read_bytes() == original


def test_method_evolution_over_lora_seeds_exports_a_spec_naming_the_adapters(seeds, adapters, tmp_path):
    """A method genome's exported merge spec names each `base+adapter` seed with both parts."""
    import yaml

    from hf_m2n2.evolve.runs import start_runs

    refs = [f"{seeds['a']}+{adapters['plain']}", f"{seeds['b']}+{adapters['head']}"]
    spec = {
        "name": "lora-ps",
        "models": [{"model": r} for r in refs],
        "genome": {
            "kind": "method",
            "method": "task_arithmetic",
            "base_model": str(seeds["base"]),
            "parameters": ["weight"],
        },
        "evolve": {"algorithm": "evomerge_ps", "budget": 4, "seed": 5},
        "evaluate": _LIKELIHOOD,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    start_runs(tmp_path / "spec.yaml", tmp_path / "run", progress=False)
    config = yaml.safe_load((tmp_path / "run" / "model" / "merge_config.yaml").read_text())
    named = {src["model"] for s in config["slices"] for src in s["sources"]}
    lora_refs = {f"{seeds[m].resolve()}+{adapters[a].resolve()}" for m, a in (("a", "plain"), ("b", "head"))}
    assert named == lora_refs | {str(seeds["base"].resolve())}


def _mapped(file: Path) -> bool:
    """Whether this process still maps `file` (safetensors keeps an open file mapped until its handle goes)."""
    return str(file.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("failure", ["custom_code", "unresolved"])
def test_seeds_opened_before_a_failure_are_closed(seeds, adapters, tmp_path, failure):
    """open_seeds opened every seed (LoRA adapters included) before refusing one for its custom code or failing on
    a later reference, and closed none: the error's traceback kept the adapter file mapped."""
    from test_user_safety import TOKENIZER_CODE, _custom_code_seed

    from hf_m2n2.errors import HfM2n2Error
    from hf_m2n2.seeds import open_seeds

    later = (
        _custom_code_seed(seeds["b"], tmp_path / "tok-code", tokenizer=TOKENIZER_CODE)
        if failure == "custom_code"
        else tmp_path / "absent"
    )
    adapter = tmp_path / "lora"
    shutil.copytree(adapters["plain"], adapter)
    with pytest.raises(HfM2n2Error) as info:
        open_seeds([f"{seeds['base']}+{adapter}", str(later)], trust_remote_code=False)
    assert ("custom code" if failure == "custom_code" else "does not exist") in str(info.value)
    assert not _mapped(adapter / "adapter_model.safetensors")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_an_adapter_refused_for_its_base_is_closed(seeds, adapters, tmp_path):
    """A LoRA adapter that does not fit its base (here a Llama adapter on GPT-2) left its file open."""
    from hf_m2n2.errors import CheckpointError
    from hf_m2n2.hub import resolve_model
    from hf_m2n2.lora import open_checkpoint

    adapter = tmp_path / "lora"
    shutil.copytree(adapters["plain"], adapter)
    with pytest.raises(CheckpointError, match="which the base checkpoint .* does not have") as info:
        open_checkpoint(resolve_model(f"{seeds['gpt2']}+{adapter}"))
    assert str(adapter / "adapter_model.safetensors") in str(info.value)
    assert not _mapped(adapter / "adapter_model.safetensors")


def _bin_adapter(adapter: Path, out: Path) -> Path:
    """The adapter with its weights as `adapter_model.bin` (peft's `safe_serialization=False` form)."""
    from safetensors.torch import load_file

    shutil.copytree(adapter, out, ignore=shutil.ignore_patterns("adapter_model.safetensors"))
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), out / "adapter_model.bin")
    return out


def test_bin_adapters_merge_and_unsafe_ones_are_refused_as_checkpoints_are(
    seeds, adapters, write_spec, cli, tmp_path
):
    """An `adapter_model.bin` goes through the checkpoint reader (torch.load weights_only): the same result as
    peft, and a pickle holding more than tensors is refused with the checkpoint reader's message."""
    adapter = _bin_adapter(adapters["plain"], tmp_path / "bin-lora")
    expected = _peft_merged(
        seeds["base"], adapters["plain"]
    )  # (before the merges: its progress bar is not theirs)
    merged = _merge(
        cli, write_spec, tmp_path, [{"model": f"{seeds['base']}+{adapter}", "parameters": {"weight": 1}}]
    )
    _assert_equal_state(merged, expected)

    torch.save({"x": torch.zeros(2), "hook": Path("/")}, adapter / "adapter_model.bin")
    spec = write_spec(
        {"merge_method": "linear", "models": [{"model": f"{seeds['base']}+{adapter}"}]}, "bad.yaml"
    )
    code, _, err = cli("merge", spec, tmp_path / "refused", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        f"{adapter / 'adapter_model.bin'}: refused to load: it contains a pickled object that is not a tensor"
        in err
    )


def test_adapter_bin_is_downloaded_only_where_base_bin_would_be(seeds, adapters, hub, tmp_path):
    """`allow_bin=False` kept base `.bin` files out but still fetched an adapter's `adapter_model.bin`."""
    from hf_m2n2.hub import resolve_model

    token = hub.token_of("alice")
    no_card = {"ignore_patterns": ["README.md"]}  # the cards name local paths as base_model
    hub.publish("alice/tiny-base", seeds["base"], token, **no_card)
    hub.publish("alice/bin-lora", _bin_adapter(adapters["plain"], tmp_path / "bin-lora"), token, **no_card)
    refused = resolve_model("alice/tiny-base+alice/bin-lora", allow_bin=False, token=token)
    assert not (refused.adapter.path / "adapter_model.bin").exists()
    allowed = resolve_model("alice/tiny-base+alice/bin-lora", token=token)
    assert (allowed.adapter.path / "adapter_model.bin").is_file()


def test_a_lora_reference_has_one_syntax_rule(tmp_path, monkeypatch):
    """The spec parser and resolution parsed `base+adapter` with two rules (the parser let anything that exists
    relative to the working directory through, even a file); now the parser applies resolution's rule."""
    from hf_m2n2.errors import ModelResolutionError, SpecError
    from hf_m2n2.hub import resolve_model
    from hf_m2n2.spec import parse_spec

    monkeypatch.chdir(tmp_path)
    Path("a+b+c").write_text("a file, not a model")
    with pytest.raises(ModelResolutionError) as resolution:
        resolve_model("a+b+c")
    with pytest.raises(SpecError) as parsing:
        parse_spec({"merge_method": "linear", "models": [{"model": "a+b+c"}]}, source="spec.yaml")
    assert str(resolution.value) in str(parsing.value) and "models[0].model" in str(parsing.value)
    parse_spec({"merge_method": "linear", "models": [{"model": "not/here+org/lora"}]}, source="spec.yaml")
