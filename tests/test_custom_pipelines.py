"""Pipelines of their own code (`_class_name: [MODULE, CLASS]` in model_index.json, as JSDXL's): refused in one
line without --trust-remote-code; with it, the live pipeline is the seed's class, and merged or rebuilt outputs
carry the code (the module and the root modules it imports) and a card that loads them with trust_remote_code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

MODULE, CLASS = "pipeline_custom_xl", "CustomXLPipeline"
# a custom pipeline class (a subclass, as JSDXL's is) importing a sibling module and taking a custom component
PIPELINE_CODE = f"""from diffusers import StableDiffusionXLPipeline

from .custom_helpers import MARK


class {CLASS}(StableDiffusionXLPipeline):
    _optional_components = [*StableDiffusionXLPipeline._optional_components, "null_encoder"]
    mark = MARK

    def __init__(
        self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder=None,
        feature_extractor=None, null_encoder=None, force_zeros_for_empty_prompt=True, add_watermarker=None,
    ):
        super().__init__(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
            feature_extractor, force_zeros_for_empty_prompt, add_watermarker,
        )
        self.register_modules(null_encoder=null_encoder)
"""
# a component of its own code without parameters (as JSDXL's null encoder)
NULL_CODE = """from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config


class NullEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, hidden_size: int = 8):
        super().__init__()
"""


@pytest.fixture(scope="module")
def custom(pipelines, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("custom") / "custom-xl"
    shutil.copytree(pipelines["sdxl-a"], root)
    index = json.loads((root / "model_index.json").read_text())
    index = {**index, "_class_name": [MODULE, CLASS], "null_encoder": ["modeling_null", "NullEncoder"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    (root / f"{MODULE}.py").write_text(PIPELINE_CODE)
    (root / "custom_helpers.py").write_text('MARK = "from the seed\'s own code"\n')
    (root / "null_encoder").mkdir()
    (root / "null_encoder/modeling_null.py").write_text(NULL_CODE)
    (root / "null_encoder/config.json").write_text(
        json.dumps({"_class_name": "NullEncoder", "hidden_size": 8})
    )
    save_file(
        {}, root / "null_encoder/diffusion_pytorch_model.safetensors"
    )  # no tensors: diffusers needs a file
    return root


def _spec(a: Path, b: Path) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"weight": 0.5},
        "dtype": "float32",
    }


def test_a_custom_pipeline_is_refused_without_the_opt_in(cli, write_spec, pipelines, custom, tmp_path):
    from hf_m2n2.custom_code import pipeline_code

    assert pipeline_code(custom) == [f"{MODULE}.{CLASS}", "modeling_null.NullEncoder"]
    assert pipeline_code(pipelines["sdxl"]) == []
    out = tmp_path / "out"
    code, _, err = cli("merge", write_spec(_spec(custom, pipelines["sdxl-b"])), out, "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        f"custom-xl: its model_index.json needs custom code ({MODULE}.{CLASS}, modeling_null.NullEncoder) that "
        "diffusers would run; "
        "pass --trust-remote-code" in err
    )
    assert not out.exists()


def test_merged_output_carries_the_code_and_loads_as_the_seeds_class(
    cli, write_spec, pipelines, custom, tmp_path
):
    from diffusers import DiffusionPipeline

    out = tmp_path / "merged"
    code, _, err = cli(
        "merge", write_spec(_spec(custom, pipelines["sdxl-b"])), out, "-q", "--trust-remote-code"
    )
    assert code == 0, err
    for name in (f"{MODULE}.py", "custom_helpers.py"):
        assert (out / name).read_bytes() == (custom / name).read_bytes()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == [MODULE, CLASS]
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == CLASS and pipe.mark == "from the seed's own code"
    assert type(pipe.null_encoder).__name__ == "NullEncoder"
    readme = (out / "README.md").read_text()
    assert f"trust_remote_code=True).to(device)  # a {CLASS} (this repo's own code)" in readme
    plain = tmp_path / "plain"  # a pipeline of diffusers' classes: no code, no flag in the snippet
    assert cli("merge", write_spec(_spec(pipelines["sdxl-a"], pipelines["sdxl-b"])), plain, "-q")[0] == 0
    assert not list(plain.glob("*.py")) and "trust_remote_code" not in (plain / "README.md").read_text()


def test_live_pipeline_is_the_seeds_class_and_a_rebuild_carries_the_code(pipelines, custom, tmp_path):
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from hf_m2n2.blend import Blend
    from hf_m2n2.blend_ops import BlendRecipe, evolved_layout, rebuild, seed_record
    from hf_m2n2.live_pipeline import LivePipeline
    from hf_m2n2.seeds import close_seeds, open_seeds

    seeds = open_seeds([str(custom), str(pipelines["sdxl-b"])], trust_remote_code=True)
    try:
        live = LivePipeline(seeds[0], trust_remote_code=True)
        assert type(live.model).__name__ == CLASS and type(live.model.null_encoder).__name__ == "NullEncoder"
        names = [n for n in seeds[0].checkpoint.names if n.startswith("unet/")]
        blocks = evolved_layout(seeds, names, 4096).num_blocks
        blend = Blend(np.array([0, blocks]), np.array([[0.5, 0.5]]))
        BlendRecipe([seed_record(s) for s in seeds], names, 4096, 0, "float32", blend).save(
            tmp_path / "r.json"
        )
    finally:
        close_seeds(seeds)
    out = rebuild(tmp_path / "r.json", tmp_path / "rebuilt")
    assert (out / f"{MODULE}.py").is_file() and (out / "custom_helpers.py").is_file()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(pipe).__name__ == CLASS


def test_from_the_hub_the_code_files_come_with_the_pipeline(hub, custom):
    from hf_m2n2.hub import resolve_model

    token = hub.token_of("alice")
    hub.publish("alice/custom-xl", custom, token)
    resolved = resolve_model("alice/custom-xl", token=token)
    for name in (f"{MODULE}.py", "custom_helpers.py", "null_encoder/modeling_null.py"):
        assert (resolved.path / name).read_bytes() == (custom / name).read_bytes()
