"""Text-to-image pipelines as seeds of `hf-m2n2 merge`: merged values equal their formulas per component, donor
components are copied whole, block names work as filters and gradient positions, the output loads and generates
with diffusers, and every bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")


def _unet(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "unet" / "diffusion_pytorch_model.safetensors")


def _merge(cli, write_spec, spec: dict, out: Path) -> tuple[int, str]:
    code, _, err = cli("merge", write_spec(spec), out, "-q")
    return code, err


def _linear_spec(a: Path, b: Path, wa: float = 0.3, wb: float = 0.7, **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": wa}},
            {"model": str(b), "parameters": {"weight": wb}},
        ],
        "dtype": "float32",
        **extra,
    }


def test_linear_unet_merge_equals_formula_and_donors_are_copied(cli, write_spec, pipelines, tmp_path):
    a, b = pipelines["sd1-a"], pipelines["sd1-b"]
    out = tmp_path / "out"
    spec = _linear_spec(a, b, components={"text_encoder": {"from": str(b)}})
    code, err = _merge(cli, write_spec, spec, out)
    assert code == 0, err
    merged, ua, ub = _unet(out), _unet(a), _unet(b)
    assert set(merged) == set(ua)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.3 * ua[name] + 0.7 * ub[name], rtol=0, atol=1e-6)
    # the text encoder comes whole from b, the VAE and the rest from the first model
    te = "text_encoder/model.safetensors"
    assert (out / te).read_bytes() == (b / te).read_bytes()
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (a / vae).read_bytes()
    assert json.loads((out / "model_index.json").read_text()) == json.loads(
        (a / "model_index.json").read_text()
    )
    assert json.loads((out / "unet/config.json").read_text()) == json.loads(
        (a / "unet/config.json").read_text()
    )


def test_merged_sdxl_pipeline_loads_and_generates(cli, write_spec, pipelines, tmp_path):
    from diffusers import DiffusionPipeline

    a, b = pipelines["sdxl-a"], pipelines["sdxl-b"]
    out = tmp_path / "xl"
    spec = {
        "merge_method": "slerp",
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": 0.4},
        "dtype": "float32",
    }
    code, err = _merge(cli, write_spec, spec, out)
    assert code == 0, err
    merged, ua, ub = _unet(out), _unet(a), _unet(b)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    x, y = ua[name].double().flatten(), ub[name].double().flatten()
    omega = math.acos(float(torch.dot(x / x.norm(), y / y.norm()).clamp(-1, 1)))
    expected = (math.sin(0.6 * omega) * x + math.sin(0.4 * omega) * y) / math.sin(omega)
    torch.testing.assert_close(merged[name].double().flatten(), expected, rtol=0, atol=1e-5)
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    image = pipe(
        "a red square",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_block_names_are_filters_and_blocks_are_gradient_layers(cli, write_spec, pipelines, tmp_path):
    from hf_m2n2.unet_blocks import unet_block_map, unet_block_names

    a, b = pipelines["sd1-a"], pipelines["sd1-b"]
    config = json.loads((a / "unet/config.json").read_text())
    ua, ub = _unet(a), _unet(b)
    blocks = unet_block_map(config, ua)
    order = [b for b in unet_block_names(config) if b != "BASE"]  # the layers a gradient runs over
    # per-block values (an MBW recipe): BASE 0.1, IN01 0.9, everything else by a gradient over the blocks
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 1.0}},
            {"model": str(b), "parameters": {"weight": 1.0}},
        ],
        "parameters": {
            "weight": [
                {"filter": "BASE", "value": 0.1},
                {"filter": "IN01", "value": 0.9},
                {"value": [0.0, 1.0]},
            ],
            "normalize": False,
        },
        "dtype": "float32",
    }
    spec["models"][0]["parameters"] = {"weight": 1.0}
    spec["models"][1]["parameters"] = {}
    out = tmp_path / "mbw"
    code, err = _merge(cli, write_spec, spec, out)
    assert code == 0, err
    merged = _unet(out)
    checked = set()
    for name, tensor in merged.items():
        block = blocks[name]
        wb = {"BASE": 0.1, "IN01": 0.9}.get(block)
        if wb is None:
            wb = order.index(block) / (len(order) - 1)
        torch.testing.assert_close(tensor, ua[name] + wb * ub[name], rtol=0, atol=1e-6)
        checked.add(block)
    assert {"BASE", "IN00", "IN01", "M00", order[-1]} <= checked


def test_fp16_variant_reads_only_that_variant(cli, write_spec, pipelines, tmp_path):
    a = pipelines["sd1-a"]
    half = tmp_path / "half-b"
    shutil.copytree(a, half)  # a copy of a with its plain files gone: only the fp16 variant is left
    for file in half.rglob("*.safetensors"):
        if ".fp16." not in file.name:
            file.unlink()
    out = tmp_path / "out"
    spec = _linear_spec(a, half, 0.5, 0.5, variant="fp16")
    code, err = _merge(cli, write_spec, spec, out)
    assert code == 0, err
    fp16 = load_file(a / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    merged = _unet(out)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, fp16[name].float(), rtol=0, atol=0)
    # donor weights of the variant are copied under the plain names diffusers loads by default
    te = load_file(out / "text_encoder" / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in te.values())
    assert not list(out.rglob("*.fp16.*"))


def test_merged_text_encoders_when_asked(cli, write_spec, pipelines, tmp_path):
    a, te = pipelines["sd1-a"], pipelines["sd1-te"]
    out = tmp_path / "te"
    code, err = _merge(cli, write_spec, _linear_spec(a, te, components={"text_encoder": "merge"}), out)
    assert code == 0, err
    merged = load_file(out / "text_encoder/model.safetensors")
    ta, tb = load_file(a / "text_encoder/model.safetensors"), load_file(te / "text_encoder/model.safetensors")
    assert any(not torch.equal(ta[n], tb[n]) for n in ta)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.3 * ta[name] + 0.7 * tb[name], rtol=0, atol=1e-6)


def _bert_text_encoder(src: Path, dst: Path) -> Path:
    """A copy of a pipeline whose text encoder is another architecture (as JSDXL's Japanese encoder is)."""
    from transformers import BertConfig, BertModel

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "text_encoder")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    BertModel(config).save_pretrained(str(dst / "text_encoder"))
    index = json.loads((dst / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "BertModel"]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize(
    "case",
    [
        "mixed_families",
        "no_unet",
        "unknown_component",
        "donor_not_a_seed",
        "text_encoders_differ",
        "missing_variant",
        "merge_a_tokenizer",
        "llm_and_pipeline",
        "components_for_llm",
        "slices",
    ],
)
def test_bad_pipeline_input_is_one_line_exit_2_nothing_written(
    cli, write_spec, pipelines, seeds, tmp_path, case
):
    a, b = pipelines["sd1-a"], pipelines["sd1-b"]
    spec = _linear_spec(a, b)
    expected = {
        "mixed_families": "different families",
        "no_unet": "without unet/",
        "unknown_component": "components.unett",
        "donor_not_a_seed": "components.vae.from",
        "text_encoders_differ": "components.text_encoder",
        "missing_variant": "variant 'fp16' not found for component",
        "merge_a_tokenizer": "components.tokenizer",
        "llm_and_pipeline": "different kinds",
        "components_for_llm": "components",
        "slices": "slices",
    }[case]
    if case == "mixed_families":
        spec = _linear_spec(a, pipelines["sdxl-a"])
    elif case == "no_unet":
        broken = tmp_path / "no-unet"
        shutil.copytree(b, broken)
        shutil.rmtree(broken / "unet")
        spec = _linear_spec(a, broken)
    elif case == "unknown_component":
        spec["components"] = {"unett": "merge"}
    elif case == "donor_not_a_seed":
        spec["components"] = {"vae": {"from": str(pipelines["sd1"])}}
    elif case == "text_encoders_differ":
        spec = _linear_spec(a, _bert_text_encoder(b, tmp_path / "bert"), components={"text_encoder": "merge"})
    elif case == "missing_variant":
        spec["variant"] = "fp16"  # b has no fp16 files
    elif case == "merge_a_tokenizer":
        spec["components"] = {"tokenizer": "merge"}
    elif case == "llm_and_pipeline":
        spec = _linear_spec(a, seeds["a"])
    elif case == "components_for_llm":
        spec = _linear_spec(seeds["a"], seeds["b"], components={"unet": "merge"})
    elif case == "slices":
        spec = {
            "merge_method": "linear",
            "slices": [
                {
                    "sources": [
                        {"model": str(a), "layer_range": [0, 2]},
                        {"model": str(b), "layer_range": [0, 2]},
                    ]
                }
            ],
            "parameters": {"weight": 0.5},
        }
    out = tmp_path / "out"
    code, err = _merge(cli, write_spec, spec, out)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and expected in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_validate_plans_a_pipeline_merge_without_writing(cli, write_spec, pipelines, tmp_path):
    a, b = pipelines["sd1-a"], pipelines["sd1-b"]
    code, out, err = cli("validate", write_spec(_linear_spec(a, b, components={"vae": {"from": str(b)}})))
    assert code == 0, err
    code, out, err = cli("validate", write_spec(_linear_spec(a, pipelines["sdxl-b"])))
    assert code == 2 and "different families" in err


def _method_spec(method, pipelines) -> dict:
    from hf_m2n2.methods import get_method

    m = get_method(method)
    base, a, b = (str(pipelines[k]) for k in ("sd1", "sd1-a", "sd1-b"))
    per_model = {p.name: 0.5 for p in m.model_params if p.name in ("weight", "density")}
    spec = {
        "merge_method": method,
        "models": [{"model": ref, "parameters": per_model} for ref in ([a] if m.max_models == 1 else [a, b])],
        "parameters": {"t": 0.5} if any(p.name == "t" for p in m.params) else {},
        "dtype": "float32",
    }
    if m.uses_base == "required":
        spec["base_model"] = base
    return spec


@pytest.mark.parametrize(
    "method", sorted(m.name for m in __import__("hf_m2n2.methods", fromlist=["all_methods"]).all_methods())
)
def test_every_merge_method_merges_unets(cli, write_spec, pipelines, tmp_path, method):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "out"
    code, err = _merge(cli, write_spec, _method_spec(method, pipelines), out)
    assert code == 0, err
    merged, ua = _unet(out), _unet(pipelines["sd1-a"])
    assert {n: t.shape for n, t in merged.items()} == {n: t.shape for n, t in ua.items()}
    assert all(torch.isfinite(t).all() for t in merged.values())
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    sample = unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 4, 32)).sample
    assert torch.isfinite(sample).all()


def test_sharded_components_in_and_out(cli, write_spec, pipelines, tmp_path):
    from diffusers import DiffusionPipeline

    a, b, sharded = pipelines["sd1-a"], pipelines["sd1-b"], pipelines["sd1-b-sharded"]
    assert (sharded / "unet/diffusion_pytorch_model.safetensors.index.json").is_file()
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _merge(cli, write_spec, _linear_spec(a, b), whole)[0] == 0
    code, _, err = cli(
        "merge", write_spec(_linear_spec(a, sharded)), split, "-q", "--out-shard-size", "200KB"
    )
    assert code == 0, err
    index = json.loads((split / "unet/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = DiffusionPipeline.from_pretrained(str(split)).unet.state_dict()
    for name, tensor in _unet(whole).items():
        assert torch.equal(loaded[name], tensor), name


@pytest.fixture(scope="module")
def single_b(pipelines, tmp_path_factory) -> Path:
    """`sd1-b` as one original-layout single file (what A1111 / ComfyUI / Civitai users have)."""
    from hf_m2n2.pipeline_merge import export_single_file

    file = tmp_path_factory.mktemp("single") / "sd1-b.safetensors"
    export_single_file(pipelines["sd1-b"], file)
    return file


def test_single_file_seed_merges_as_its_folder_does(cli, write_spec, pipelines, single_b, tmp_path):
    a, b = pipelines["sd1-a"], pipelines["sd1-b"]
    from_folder, from_file = tmp_path / "folder", tmp_path / "file"
    assert _merge(cli, write_spec, _linear_spec(a, b), from_folder)[0] == 0
    # the single file takes its configs from the folder seed a; its text encoder is taken whole from it
    spec = _linear_spec(a, single_b, components={"text_encoder": {"from": str(single_b)}})
    code, err = _merge(cli, write_spec, spec, from_file)
    assert code == 0, err
    merged_from_file = _unet(from_file)
    assert merged_from_file.keys() == _unet(from_folder).keys()
    for name, tensor in _unet(from_folder).items():
        assert torch.equal(merged_from_file[name], tensor), name
    te = load_file(from_file / "text_encoder/model.safetensors")
    expected = load_file(b / "text_encoder/model.safetensors")
    assert te.keys() == expected.keys() and all(torch.equal(te[k], expected[k]) for k in te)


def test_single_file_output_round_trips_and_loads(cli, write_spec, pipelines, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from hf_m2n2.single_file import SingleFileCheckpoint

    a, b = pipelines["sd1-a"], pipelines["sd1-b"]
    folder_out, file_out = tmp_path / "folder", tmp_path / "merged"
    assert _merge(cli, write_spec, _linear_spec(a, b), folder_out)[0] == 0
    code, _, err = cli(
        "merge", write_spec(_linear_spec(a, b)), file_out, "-q", "--output-format", "single_file"
    )
    assert code == 0, err
    file = file_out / "merged.safetensors"
    assert sorted(p.name for p in file_out.iterdir() if p.suffix == ".safetensors") == ["merged.safetensors"]
    assert not (file_out / "unet").exists()
    reference = DiffusionPipeline.from_pretrained(str(folder_out))
    configs = {c: getattr(reference, c).config for c in ("unet", "vae")}
    configs["text_encoder"] = reference.text_encoder.config.to_dict()
    with SingleFileCheckpoint(file, configs) as ckpt:  # folder -> single file -> folder: the same tensors
        for component in ("unet", "vae", "text_encoder"):
            for key, value in getattr(reference, component).state_dict().items():
                name = f"{component}/{key}"
                if name in ckpt:
                    assert torch.equal(ckpt.get(name), value), name
    loaded = StableDiffusionPipeline.from_single_file(
        str(file),
        config=str(folder_out),
        local_files_only=True,
        tokenizer=reference.tokenizer,
        scheduler=reference.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for key, value in reference.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value), key


def test_bad_single_file_inputs_are_one_line(cli, write_spec, pipelines, single_b, tmp_path):
    from safetensors.torch import save_file

    a = pipelines["sd1-a"]
    unknown = tmp_path / "unknown.safetensors"
    save_file({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, unknown)
    for spec, expected in [
        (_linear_spec(a, unknown), "keys match no known single-file layout"),
        (_linear_spec(single_b, single_b.with_name("x.safetensors")), "does not exist"),
        (
            {"merge_method": "linear", "models": [{"model": str(single_b), "parameters": {"weight": 1.0}}]},
            "give single_file_config",
        ),
        (_linear_spec(pipelines["sdxl-a"], single_b), "single file"),
    ]:
        out = tmp_path / "out"
        code, err = _merge(cli, write_spec, spec, out)
        lines = [line for line in err.strip().splitlines() if line.startswith("error")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
        assert not out.exists()


# --- layouts real repos have (found in review): each merges right or is refused before anything is written ---


def _with_safety_checker(src: Path, dst: Path) -> Path:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    shutil.copytree(src, dst)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=100),
        vision_config=dict(small, image_size=32, patch_size=16),
        projection_dim=16,
    )
    torch.manual_seed(0)
    StableDiffusionSafetyChecker(config).save_pretrained(str(dst / "safety_checker"))
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(str(dst / "feature_extractor"))
    index = json.loads((dst / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def test_donated_component_keeps_the_donors_class(cli, write_spec, pipelines, tmp_path):
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    a, b = pipelines["sd1-a"], tmp_path / "b-euler"
    shutil.copytree(pipelines["sd1-b"], b)
    shutil.rmtree(b / "scheduler")
    EulerDiscreteScheduler(beta_schedule="scaled_linear").save_pretrained(str(b / "scheduler"))
    index = json.loads((b / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (b / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert (
        _merge(cli, write_spec, _linear_spec(a, b, components={"scheduler": {"from": str(b)}}), out)[0] == 0
    )
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == [
        "diffusers",
        "EulerDiscreteScheduler",
    ]
    assert type(DiffusionPipeline.from_pretrained(str(out)).scheduler).__name__ == "EulerDiscreteScheduler"
    assert "EulerDiscreteScheduler" in (out / "README.md").read_text()


def test_donor_with_a_one_shard_index_and_sharded_bin_weights(cli, write_spec, pipelines, tmp_path):
    from diffusers import DiffusionPipeline

    b = tmp_path / "b"
    shutil.copytree(pipelines["sd1-b"], b)
    vae = b / "vae"  # one shard listed by an index, as big-repo tooling writes it
    (vae / "diffusion_pytorch_model.safetensors").rename(
        vae / "diffusion_pytorch_model-00001-of-00001.safetensors"
    )
    names = load_file(vae / "diffusion_pytorch_model-00001-of-00001.safetensors")
    weight_map = {k: "diffusion_pytorch_model-00001-of-00001.safetensors" for k in names}
    (vae / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    te = b / "text_encoder"  # a text encoder in sharded pickles (read with torch.load(weights_only=True)),
    state = load_file(te / "model.safetensors")  # as transformers 4 wrote them (5 writes safetensors only)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for file, part in shards.items():
        torch.save({k: state[k] for k in part}, te / file)
    weight_map = {k: file for file, part in shards.items() for k in part}
    (te / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (te / "model.safetensors").unlink()
    out = tmp_path / "out"
    spec = _linear_spec(b, pipelines["sd1-a"], components={"text_encoder": {"from": str(b)}})
    code, err = _merge(cli, write_spec, spec, out)
    assert code == 0, err
    loaded = DiffusionPipeline.from_pretrained(str(out))
    expected = DiffusionPipeline.from_pretrained(str(pipelines["sd1-b"]))
    for component in ("vae", "text_encoder"):
        got = getattr(loaded, component).state_dict()
        for key, value in getattr(expected, component).state_dict().items():
            assert torch.equal(got[key], value), f"{component}/{key}"


def test_unet_only_single_file_with_a_variant_only_config_folder(cli, write_spec, pipelines, tmp_path):
    from diffusers import DiffusionPipeline

    from hf_m2n2.hub import ResolvedModel
    from hf_m2n2.pipeline_seeds import open_pipeline_folder
    from hf_m2n2.single_file import write_single_file

    half = tmp_path / "half"  # a folder with fp16 weights only
    shutil.copytree(pipelines["sd1-a"], half)
    for file in half.rglob("*.safetensors"):
        if ".fp16." not in file.name:
            file.unlink()
    seed = open_pipeline_folder(ResolvedModel(ref="b", path=pipelines["sd1-b"]))
    unet_only = tmp_path / "b-unet.safetensors"
    names = [n for n in seed.checkpoint.names if n.startswith("unet/")]
    write_single_file(
        unet_only, names, seed.checkpoint.get, {"unet": seed.components["unet"].config}, family="sd1"
    )
    seed.checkpoint.close()
    out = tmp_path / "out"
    code, err = _merge(cli, write_spec, _linear_spec(unet_only, half, 0.5, 0.5, variant="fp16"), out)
    assert code == 0, err
    pipe = DiffusionPipeline.from_pretrained(
        str(out)
    )  # the reference's missing parts: the folder's fp16 files
    vae = load_file(half / "vae/diffusion_pytorch_model.fp16.safetensors")
    assert all(torch.equal(pipe.vae.state_dict()[k].half(), v) for k, v in vae.items())


def test_single_file_output_of_a_pipeline_with_a_safety_checker_in_the_spec_dtype(
    cli, write_spec, pipelines, tmp_path
):
    from safetensors import safe_open

    a = _with_safety_checker(pipelines["sd1-a"], tmp_path / "sc-a")
    out = tmp_path / "merged"
    spec = _linear_spec(a, pipelines["sd1-b"], dtype="float16")
    code, _, err = cli("merge", write_spec(spec), out, "-q", "--output-format", "single_file")
    assert code == 0, err
    with safe_open(str(out / "merged.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if "position_ids" not in k}  # noqa: SIM118
        assert dtypes == {"F16"}
        assert not any("safety" in k for k in f.keys())  # noqa: SIM118


def test_reviewed_bad_layouts_are_one_line_before_writing(cli, write_spec, pipelines, tmp_path):
    from safetensors.torch import save_file

    a, b = pipelines["sd1-a"], pipelines["sd1-b"]
    no_te = tmp_path / "no-te"  # model_index.json lists a text encoder whose folder is gone
    shutil.copytree(a, no_te)
    shutil.rmtree(no_te / "text_encoder")
    stray = tmp_path / "stray"  # a UNet file holding a tensor that is not a key of its UNet
    shutil.copytree(b, stray)
    unet = load_file(stray / "unet/diffusion_pytorch_model.safetensors")
    save_file({**unet, "foo": torch.zeros(2)}, stray / "unet/diffusion_pytorch_model.safetensors")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle")
    for spec, expected in [
        (_linear_spec(no_te, b), "component text_encoder is missing"),
        (
            _linear_spec(a, no_te, components={"text_encoder": {"from": str(no_te)}}),
            "component text_encoder is missing",
        ),
        (_linear_spec(a, stray), "'foo' is not a key of this UNet"),
        (_linear_spec(a, ckpt), "only .safetensors single files are read"),
    ]:
        for command in ("validate", "merge"):
            out = tmp_path / "out"
            args = (
                ("validate", write_spec(spec)) if command == "validate" else ("merge", write_spec(spec), out)
            )
            code, _, err = cli(*args, "-q")
            lines = [line for line in err.strip().splitlines() if line.startswith("error")]
            assert code == 2 and len(lines) == 1 and expected in lines[0], (command, err)
            assert not out.exists()


def test_sharded_variant_seeds_and_donors(cli, write_spec, pipelines, tmp_path):
    from diffusers import DiffusionPipeline

    a, sharded = pipelines["sd1-a"], pipelines["sd1-b-sharded"]
    out = tmp_path / "out"
    spec = _linear_spec(a, sharded, 0.5, 0.5, variant="fp16", components={"vae": {"from": str(sharded)}})
    code, err = _merge(cli, write_spec, spec, out)
    assert code == 0, err
    fp16_a = load_file(a / "unet/diffusion_pytorch_model.fp16.safetensors")
    fp16_b = DiffusionPipeline.from_pretrained(str(sharded), variant="fp16").unet.state_dict()
    for name, tensor in _unet(out).items():
        torch.testing.assert_close(
            tensor, (fp16_a[name].float() + fp16_b[name].float()) / 2, rtol=0, atol=1e-6
        )
    vae = DiffusionPipeline.from_pretrained(str(out)).vae.state_dict()  # the sharded fp16 donor, plain names
    expected = DiffusionPipeline.from_pretrained(str(sharded), variant="fp16").vae.state_dict()
    assert all(torch.equal(vae[k], v) for k, v in expected.items())
