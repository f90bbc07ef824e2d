"""Diffusers pipeline repos resolved from the local Hub server with the real huggingface_hub client: only the
listed components, only the requested weights variant, pinned to one commit, and again from the cache offline.

The `hub` fixture comes from conftest.py (`hub_server.hub_fixture`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_m2n2.errors import ModelResolutionError
from hf_m2n2.hub import (
    BIN_PATTERNS,
    PIPELINE_INDEX,
    SUPPORT_PATTERNS,
    WEIGHT_PATTERNS,
    pipeline_patterns,
    resolve_model,
)

REPO = "alice/tiny-pipe"
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}
# Fetched whatever the variant: the index, the card, each listed component's config/tokenizer/scheduler files.
SUPPORT = {
    PIPELINE_INDEX,
    "README.md",
    "unet/config.json",
    "text_encoder/config.json",
    "vae/config.json",
    "safety_checker/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
}
# The weights of each variant, written by hand below (unet, safety_checker: only pickles) or by the libraries'
# own save_pretrained (text_encoder: transformers; vae: diffusers, sharded, names checked in `pipeline_dir`).
PLAIN = {
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "safety_checker/pytorch_model.bin",
}
FP16 = {
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
    "safety_checker/pytorch_model.fp16.bin",
}


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A pipeline-shaped folder: both variants of every weight, one component sharded (with its index), one with
    pickles only, and files that must never be fetched (other variant, pickles beside safetensors, root
    single-file checkpoints, an unlisted folder)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("pipe")
    (root / PIPELINE_INDEX).write_text(json.dumps(MODEL_INDEX))
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny pipeline\n")
    for name in SUPPORT - {PIPELINE_INDEX, "README.md", "text_encoder/config.json", "vae/config.json"}:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}" if name.endswith(".json") else "x\n")
    for variant, scale in (("", 1.0), (".fp16", 2.0), (".non_ema", 3.0)):
        save_file(
            {"w": torch.full((2, 3), scale)}, root / f"unet/diffusion_pytorch_model{variant}.safetensors"
        )
    torch.save({"w": torch.zeros(2)}, root / "unet/diffusion_pytorch_model.bin")
    for variant in ("", ".fp16"):
        torch.save({"w": torch.ones(2)}, root / f"safety_checker/pytorch_model{variant}.bin")
    torch.manual_seed(0)
    clip = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(clip)
    text_encoder.save_pretrained(root / "text_encoder")
    text_encoder.to(torch.float16).save_pretrained(root / "text_encoder", variant="fp16")
    vae = _tiny_vae()
    vae.save_pretrained(root / "vae", max_shard_size="20KB")
    vae.to(torch.float16).save_pretrained(root / "vae", variant="fp16", max_shard_size="10KB")
    save_file({"w": torch.zeros(1)}, root / "sd-v1-5.safetensors")
    (root / "sd-v1-5.ckpt").write_bytes(b"not a checkpoint")
    (root / "unlisted").mkdir()
    (root / "unlisted/config.json").write_text("{}")
    return root


def _vae_files(pipeline_dir: Path, fp16: bool) -> set[str]:
    """The vae files diffusers wrote for one variant (shards and index), told apart by the `.fp16` it inserts."""
    names = {p.name for p in (pipeline_dir / "vae").iterdir() if p.name != "config.json"}
    return {f"vae/{n}" for n in names if (".fp16" in n) == fp16}


def _snapshot_files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def test_vae_is_sharded_as_diffusers_names_it(pipeline_dir):
    """The fixture exercises shards: diffusers wrote several per variant, with the index it names them in."""
    for fp16, index in ((False, "index.json"), (True, "index.fp16.json")):
        files = _vae_files(pipeline_dir, fp16)
        shards = sorted(f for f in files if f != f"vae/diffusion_pytorch_model.safetensors.{index}")
        stem = "diffusion_pytorch_model.fp16" if fp16 else "diffusion_pytorch_model"
        assert shards == [
            f"vae/{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
        ]
        assert len(shards) > 1 and len(files) == len(shards) + 1


def test_pipeline_patterns_name_the_variant_files_exactly():
    shard = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
    patterns = pipeline_patterns(
        {"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"], "f": [None, None]}, "fp16"
    )
    assert patterns.weights == {
        "vae": [
            "vae/diffusion_pytorch_model.fp16.safetensors",
            f"vae/diffusion_pytorch_model.fp16{shard}.safetensors",
            "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
            "vae/model.fp16.safetensors",
            f"vae/model.fp16{shard}.safetensors",
            "vae/model.safetensors.index.fp16.json",
        ]
    }
    assert patterns.bin_weights["vae"][3:] == [
        "vae/pytorch_model.fp16.bin",
        f"vae/pytorch_model.fp16{shard}.bin",
        "vae/pytorch_model.bin.index.fp16.json",
    ]
    assert patterns.files == [
        PIPELINE_INDEX,
        "README.md",
        *(f"vae/{p}" for p in ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")),
    ]
    # a custom pipeline (`_class_name: [MODULE, CLASS]`, as JSDXL's): its code at the root, as diffusers reads it
    custom = pipeline_patterns(
        {"_class_name": ["pipeline_jsdxl", "JSDXLPipeline"], "unet": ["diffusers", "U"]}
    )
    assert custom.files[-1] == "*.py" and "unet/*.py" in custom.files
    with pytest.raises(
        ModelResolutionError, match=r"^model_index.json: invalid custom pipeline module '\.\./x'$"
    ):
        pipeline_patterns({"_class_name": ["../x", "X"]})
    plain = pipeline_patterns({"unet": ["diffusers", "UNet2DConditionModel"]}).weights["unet"]
    assert plain[:3] == [
        "unet/diffusion_pytorch_model.safetensors",
        f"unet/diffusion_pytorch_model{shard}.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]
    with pytest.raises(ModelResolutionError, match=r"^model_index.json: invalid component name '\.\./x'$"):
        pipeline_patterns({"../x": ["diffusers", "UNet2DConditionModel"]})


def test_plain_resolution_fetches_exactly_the_plain_files_at_the_pinned_commit(hub, pipeline_dir, tmp_path):
    token = hub.token_of("alice")
    sha = hub.publish(REPO, pipeline_dir, token)
    resolved = resolve_model(REPO, token=token)
    assert _snapshot_files(resolved.path) == SUPPORT | PLAIN | _vae_files(pipeline_dir, fp16=False)
    assert resolved.commit == sha == resolved.path.name and resolved.pinned == f"{REPO}@{sha}"
    assert resolved.repo_id == REPO and resolved.revision is None and resolved.variant is None

    changed = tmp_path / "changed"
    (changed / "unet").mkdir(parents=True)
    save_file({"w": torch.full((2, 3), 9.0)}, changed / "unet/diffusion_pytorch_model.safetensors")
    new = hub.publish(REPO, changed, token)
    old = resolve_model(f"{REPO}@{sha}", token=token)
    latest = resolve_model(REPO, token=token)
    assert (old.commit, old.revision, latest.commit) == (sha, sha, new)
    assert load_file(old.path / "unet/diffusion_pytorch_model.safetensors")["w"].eq(1.0).all()
    assert load_file(latest.path / "unet/diffusion_pytorch_model.safetensors")["w"].eq(9.0).all()


def test_fp16_resolution_fetches_exactly_the_fp16_files_and_the_sharded_vae_loads(hub, pipeline_dir):
    from diffusers import AutoencoderKL

    token = hub.token_of("alice")
    sha = hub.publish(REPO, pipeline_dir, token)
    resolved = resolve_model(f"{REPO}@main", token=token, variant="fp16")
    assert _snapshot_files(resolved.path) == SUPPORT | FP16 | _vae_files(pipeline_dir, fp16=True)
    assert (resolved.commit, resolved.revision, resolved.variant) == (sha, "main", "fp16")

    loaded = AutoencoderKL.from_pretrained(resolved.path, subfolder="vae", variant="fp16")
    expected = _tiny_vae().to(torch.float16).state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_pickle_only_component_is_refused_without_allow_bin(hub, pipeline_dir):
    token = hub.token_of("alice")
    hub.publish(REPO, pipeline_dir, token)
    with pytest.raises(ModelResolutionError) as err:
        resolve_model(REPO, token=token, allow_bin=False)
    assert str(err.value) == (
        f"{REPO}: weights not found for component safety_checker "
        "(found: pytorch_model.bin, pytorch_model.fp16.bin; .bin weights not allowed)"
    )


def test_missing_variant_is_one_line_naming_the_component(hub, pipeline_dir):
    token = hub.token_of("alice")
    hub.publish(REPO, pipeline_dir, token)
    with pytest.raises(ModelResolutionError) as err:
        resolve_model(REPO, token=token, variant="bf16")
    assert str(err.value) == (
        f"{REPO}: variant 'bf16' not found for component unet (found: diffusion_pytorch_model.bin, "
        "diffusion_pytorch_model.fp16.safetensors, diffusion_pytorch_model.non_ema.safetensors, "
        "diffusion_pytorch_model.safetensors)"
    )
    # unet has a non_ema variant, text_encoder (next in model_index.json) does not
    with pytest.raises(ModelResolutionError) as err:
        resolve_model(REPO, token=token, variant="non_ema")
    assert str(err.value) == (
        f"{REPO}: variant 'non_ema' not found for component text_encoder "
        "(found: model.fp16.safetensors, model.safetensors)"
    )
    with pytest.raises(ModelResolutionError, match=r"^invalid variant 'fp16\*': use letters"):
        resolve_model(REPO, token=token, variant="fp16*")


def test_an_index_naming_a_shard_the_patterns_miss_is_refused(hub, tmp_path):
    folder = tmp_path / "odd"
    (folder / "vae").mkdir(parents=True)
    (folder / PIPELINE_INDEX).write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    (folder / "vae/config.json").write_text("{}")
    shards = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-part2.safetensors",
    ]
    for i, shard in enumerate(shards):
        save_file({f"w{i}": torch.zeros(1)}, folder / "vae" / shard)
    weight_map = {"weight_map": {f"w{i}": shard for i, shard in enumerate(shards)}}
    (folder / "vae/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(weight_map))
    token = hub.token_of("alice")
    hub.publish("alice/odd-pipe", folder, token)
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("alice/odd-pipe", token=token)
    assert str(err.value) == (
        "alice/odd-pipe: vae/diffusion_pytorch_model.safetensors.index.json names "
        "diffusion_pytorch_model-part2.safetensors, which was not fetched (not in the repo, or not named as "
        "diffusers and transformers name shards)"
    )


def test_llm_repo_resolves_as_before(hub, seeds, tmp_path):
    from huggingface_hub import snapshot_download

    token = hub.token_of("alice")
    sha = hub.publish("alice/tiny-llm", seeds["base"], token, ignore_patterns=["README.md"])
    resolved = resolve_model("alice/tiny-llm", token=token)
    assert (resolved.commit, resolved.path.name, resolved.variant) == (sha, sha, None)
    before = snapshot_download(
        "alice/tiny-llm",
        allow_patterns=WEIGHT_PATTERNS + SUPPORT_PATTERNS,
        cache_dir=tmp_path / "other_cache",
    )
    assert _snapshot_files(resolved.path) == _snapshot_files(Path(before))
    assert "model.safetensors" in _snapshot_files(resolved.path)
    assert not any(Path(resolved.path).glob(BIN_PATTERNS[0]))
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("alice/tiny-llm", token=token, variant="fp16")
    assert str(err.value) == (
        "alice/tiny-llm: variant 'fp16' asked for, but this repo is not a diffusers pipeline (no model_index.json)"
    )


def test_offline_second_resolution_comes_from_the_cache(hub, pipeline_dir, monkeypatch):
    from huggingface_hub import constants

    token = hub.token_of("alice")
    hub.publish(REPO, pipeline_dir, token)
    online = resolve_model(REPO, token=token, variant="fp16")
    requests = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = resolve_model(REPO, token=token, variant="fp16")
    assert (offline.path, offline.commit) == (online.path, online.commit)
    assert _snapshot_files(offline.path) == SUPPORT | FP16 | _vae_files(pipeline_dir, fp16=True)
    assert len(hub.requests) == requests
    with pytest.raises(ModelResolutionError) as err:
        resolve_model(REPO, token=token)
    assert str(err.value) == (
        f"{REPO}: the files of the plain weights are not all in the local cache and the Hub cannot be reached "
        "(offline or no network); download them first"
    )
    assert len(hub.requests) == requests


def test_a_unet_only_repo_fetches_only_its_unet_of_the_variant(hub, tmp_path):
    """SDXL-DPO's layout: `unet/` (config, weights) and a card, no model_index.json: a component-only pipeline
    whose other files (an image, a folder of something else) are never fetched."""
    from hf_m2n2.seeds import open_seeds

    folder = tmp_path / "dpo"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet/config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    for variant, scale in (("", 1.0), (".fp16", 2.0)):
        save_file(
            {"w": torch.full((2,), scale)}, folder / f"unet/diffusion_pytorch_model{variant}.safetensors"
        )
    (folder / "README.md").write_text("# a UNet\n")
    (folder / "01.gif").write_bytes(b"GIF89a")
    (folder / "extra").mkdir()
    save_file({"w": torch.zeros(1)}, folder / "extra/model.safetensors")
    token = hub.token_of("alice")
    sha = hub.publish("alice/dpo-unet", folder, token)
    plain = resolve_model("alice/dpo-unet", token=token)
    assert _snapshot_files(plain.path) == {
        "README.md",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }
    assert plain.commit == sha
    fp16 = resolve_model("alice/dpo-unet", token=token, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in _snapshot_files(fp16.path)
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("alice/dpo-unet", token=token, variant="bf16")
    assert str(err.value) == (
        "alice/dpo-unet: variant 'bf16' not found for component unet "
        "(found: diffusion_pytorch_model.fp16.safetensors, diffusion_pytorch_model.safetensors)"
    )
    with pytest.raises(Exception, match="not a UNet2DConditionModel config"):  # opened as a pipeline seed
        open_seeds(["alice/dpo-unet"], token=token)
