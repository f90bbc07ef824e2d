"""Cards of merged text-to-image pipelines: diffusers front matter (library_name, pipeline_tag, every seed as
base_model), a component table that says where each component's files really came from, a usage snippet that
runs, `hf-m2n2 card` re-rendering; and the Hub round trip through the local server: `merge --push`, the Hub's YAML
check, `DiffusionPipeline.from_pretrained(repo)`, and a merge of pipelines pulled by (pinned) repo id."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

pytest.importorskip("diffusers")

UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT_ENCODER = "text_encoder/model.safetensors"
REPO = "alice/tiny-pipe-merge"


def _merge(spec: dict, out: Path) -> Path:
    from hf_m2n2.merge import MergeOptions, run_merge

    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_merge(path, out, MergeOptions(progress=False))
    return out


@pytest.fixture(scope="module")
def sd1_merge(pipelines, tmp_path_factory) -> Path:
    """A linear merge of sd1-a's and sd1-te's UNets, the text encoder taken from sd1-te (whose encoder differs
    from sd1-a's), the rest from sd1-a."""
    a, b = pipelines["sd1-a"], pipelines["sd1-te"]
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 0.3}},
            {"model": str(b), "parameters": {"weight": 0.7}},
        ],
        "dtype": "float32",
        "components": {"text_encoder": {"from": str(b)}},
    }
    return _merge(spec, tmp_path_factory.mktemp("sd1_card") / "sd1-merge")


@pytest.fixture(scope="module")
def sdxl_merge(pipelines, tmp_path_factory) -> Path:
    a, b = pipelines["sdxl-a"], pipelines["sdxl-b"]
    spec = {
        "merge_method": "slerp",
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": 0.4},
        "dtype": "float32",
    }
    return _merge(spec, tmp_path_factory.mktemp("sdxl_card") / "sdxl-merge")


def _rows(text: str, heading: str) -> list[list[str]]:
    """The cells of each row of the markdown table under `## heading` (its header row left out)."""
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in cells] for cells in rows[1:]]


def _table(text: str, heading: str) -> dict[str, list[str]]:
    """The table under `## heading` as first cell -> the other cells."""
    return {cells[0]: cells[1:] for cells in _rows(text, heading)}


def _snippet(text: str) -> str:
    return re.search(r"## Usage\n.*?```python\n(.*?)\n```", text, re.S).group(1)


def _run_snippet(code: str, cwd: Path, monkeypatch) -> dict:
    """Execute a card's usage snippet in `cwd` with 2 inference steps instead of its 30."""
    assert code.count("num_inference_steps=30") == 1
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    exec(
        compile(code.replace("num_inference_steps=30", "num_inference_steps=2"), "snippet", "exec"), namespace
    )
    return namespace


def test_card_front_matter_names_the_library_task_and_every_seed(sd1_merge):
    card = ModelCard.load(sd1_merge / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == ["sd1-a", "sd1-te"] and card.data.base_model_relation == "merge"
    assert {"merge", "hf-m2n2", "linear", "stable-diffusion"} <= set(card.data.tags)
    assert "transformers" not in card.content.split("---")[1]
    assert _table(card.text, "Models") == {
        "sd1-a": ["merged, donor", "local directory"],
        "sd1-te": ["merged, donor", "local directory"],
    }
    assert "`StableDiffusionPipeline`" in card.text and "SD 1.x" in card.text
    assert "AutoModelForCausalLM" not in card.text
    # the recipe in the card is the merge_config.yaml saved with it
    assert (sd1_merge / "merge_config.yaml").read_text().rstrip() in card.text


def test_component_table_says_where_each_component_came_from(sd1_merge, pipelines):
    text = (sd1_merge / "README.md").read_text()
    table = _table(text, "Components")
    assert table == {
        "scheduler": ["PNDMScheduler", "sd1-a"],
        "text_encoder": ["CLIPTextModel", "sd1-te"],
        "tokenizer": ["CLIPTokenizer", "sd1-a"],
        "unet": ["UNet2DConditionModel", "merged (linear)"],
        "vae": ["AutoencoderKL", "sd1-a"],
    }
    index = json.loads((sd1_merge / "model_index.json").read_text())
    assert list(table) == [k for k, v in index.items() if isinstance(v, list) and v[0] is not None]
    # every row is true to the bytes: a donor's component files are that seed's (the text encoders differ)
    for component, (_, source) in table.items():
        files = sorted(p.relative_to(sd1_merge) for p in (sd1_merge / component).rglob("*") if p.is_file())
        same = {
            name: all((sd1_merge / f).read_bytes() == (pipelines[name] / f).read_bytes() for f in files)
            for name in ("sd1-a", "sd1-te")
        }
        if source == "merged (linear)":
            assert not any(same.values())
        else:
            assert same[source], component
    assert (sd1_merge / TEXT_ENCODER).read_bytes() != (pipelines["sd1-a"] / TEXT_ENCODER).read_bytes()


@pytest.mark.parametrize(
    ("fixture", "pipeline_class"),
    [("sd1_merge", "StableDiffusionPipeline"), ("sdxl_merge", "StableDiffusionXLPipeline")],
)
def test_usage_snippet_loads_the_output_and_generates(
    request, fixture, pipeline_class, tmp_path, monkeypatch
):
    out = request.getfixturevalue(fixture)
    text = (out / "README.md").read_text()
    code = _snippet(text)
    assert f'model_id = "{out}"' in code
    assert "DiffusionPipeline.from_pretrained(model_id, dtype=" in code
    namespace = _run_snippet(code, tmp_path, monkeypatch)
    pipe = namespace["pipe"]
    assert type(pipe).__name__ == pipeline_class and f"# a {pipeline_class}" in code
    torch.testing.assert_close(pipe.unet.state_dict(), load_file(out / UNET), rtol=0, atol=0)
    from PIL import Image

    with Image.open(tmp_path / "image.png") as image:
        assert image.size == (32, 32)


def test_sdxl_card_names_the_base_and_the_family(sdxl_merge):
    card = ModelCard.load(sdxl_merge / "README.md")
    assert card.data.base_model == ["sdxl-a", "sdxl-b"] and "stable-diffusion-xl" in card.data.tags
    assert _table(card.text, "Models") == {
        "sdxl-a": ["base, donor", "local directory"],
        "sdxl-b": ["merged", "local directory"],
    }
    components = _table(card.text, "Components")
    assert components["unet"] == ["UNet2DConditionModel", "merged (slerp)"]
    assert components["text_encoder_2"] == ["CLIPTextModelWithProjection", "sdxl-a"]
    assert components["tokenizer_2"] == ["CLIPTokenizer", "sdxl-a"]


def test_card_command_rerenders_a_pipeline_card(sd1_merge, cli, tmp_path):
    from hf_m2n2.card import CardInfo, render_card

    out = tmp_path / "copy"
    shutil.copytree(sd1_merge, out)
    info = CardInfo.load(out)
    assert info.kind == "pipeline_merge"
    assert (info.library_name, info.pipeline_tag) == ("diffusers", "text-to-image")
    assert str(render_card(info)) == (out / "README.md").read_text()
    weights = (out / UNET).read_bytes()
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"parti_prompts": {"clip_score,none": 31.5}}}))
    code, _, err = cli("card", out, "--model-id", "me/pipe", "--eval-results", results, "--quiet")
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert 'model_id = "me/pipe"' in card.text and card.data.library_name == "diffusers"
    assert _table(card.text, "Components")["text_encoder"] == ["CLIPTextModel", "sd1-te"]
    [result] = card.data.to_dict()["model-index"][0]["results"]
    assert result["task"] == {"type": "text-to-image"}
    assert result["metrics"] == [{"type": "clip_score none", "value": 31.5}]
    assert (out / UNET).read_bytes() == weights


def test_pipeline_card_info_refuses_a_source_that_is_not_a_model():
    from hf_m2n2.card import CardComponent, CardModel, pipeline_merge_card_info
    from hf_m2n2.hub import ResolvedModel

    model = CardModel(ResolvedModel("a", Path("a")), "merged")
    with pytest.raises(ValueError, match=r"^component vae: source 1 is not one of the 1 models$"):
        pipeline_merge_card_info(
            model_name="m",
            method="linear",
            paper="",
            models=[model],
            pipeline_class="StableDiffusionPipeline",
            family="SD 1.x",
            components=[CardComponent("vae", "AutoencoderKL", 1)],
            config_yaml="",
        )


def test_single_file_seed_rows_name_the_file_and_its_config_folder(pipelines, tmp_path):
    from hf_m2n2.pipeline_merge import export_single_file

    single = tmp_path / "sd1-te.safetensors"
    export_single_file(pipelines["sd1-te"], single)
    a = pipelines["sd1-a"]
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 0.5}},
            {"model": str(single), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
        "components": {"text_encoder": {"from": str(single)}, "tokenizer": {"from": str(single)}},
    }
    out = _merge(spec, tmp_path / "out")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["sd1-a", "sd1-te.safetensors"]
    components = _table(card.text, "Components")
    assert components["text_encoder"] == ["CLIPTextModel", "sd1-te.safetensors"]
    assert components["tokenizer"] == ["CLIPTokenizer", "sd1-te.safetensors (its config folder sd1-a)"]
    # the text encoder's tensors are the single file's (sd1-te's), not the config folder's
    merged, te = load_file(out / TEXT_ENCODER), load_file(pipelines["sd1-te"] / TEXT_ENCODER)
    assert merged.keys() == te.keys() and all(torch.equal(merged[k], v) for k, v in te.items())


def _single_file_snippet(text: str, config: Path) -> str:
    """The card's snippet, its from_single_file given a config folder: offline, diffusers cannot fetch the
    original configs (and a tiny pipeline has none)."""
    code = _snippet(text)
    assert code.count("from_single_file(path, ") == 1
    return code.replace("from_single_file(path, ", f"from_single_file(path, config={str(config)!r}, ")


def test_single_file_output_card_loads_the_file(sd1_merge, pipelines, cli, tmp_path, monkeypatch):
    spec = sd1_merge.parent / "sd1-merge.yaml"
    out = tmp_path / "sd1-file"
    code, _, err = cli("merge", spec, out, "--output-format", "single_file", "--quiet")
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "`sd1-file.safetensors`" in card.text and "from_pretrained" not in _snippet(card.text)
    assert _table(card.text, "Components")["text_encoder"] == ["CLIPTextModel", "sd1-te"]
    namespace = _run_snippet(_single_file_snippet(card.text, pipelines["sd1-a"]), tmp_path, monkeypatch)
    pipe = namespace["pipe"]
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert namespace["path"] == str(out / "sd1-file.safetensors")
    torch.testing.assert_close(pipe.unet.state_dict(), load_file(sd1_merge / UNET), rtol=0, atol=0)


# ---------------------------------------------------------------- the Hub (local server)


def _all_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


def test_merge_of_hub_pipelines_pushed_validated_and_pulled_back(hub, pipelines, cli, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    token = hub.token_of("alice")
    monkeypatch.setenv("HF_TOKEN", token)
    sha_a = hub.publish("alice/tiny-sd1-a", pipelines["sd1-a"], token)
    sha_b = hub.publish("alice/tiny-sd1-b", pipelines["sd1-b"], token)
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": f"alice/tiny-sd1-a@{sha_a}", "parameters": {"weight": 0.3}},
            {"model": "alice/tiny-sd1-b", "parameters": {"weight": 0.7}},
        ],
        "dtype": "float32",
        "components": {"text_encoder": {"from": "alice/tiny-sd1-b"}},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "merged"
    code, stdout, stderr = cli("merge", tmp_path / "spec.yaml", out, "--push", REPO)
    assert code == 0, stderr
    assert f"pushed to {hub.url}/{REPO}" in stdout

    # the card on the Hub: valid by the Hub's YAML check, every seed linked, the pinned shas recorded
    card = ModelCard.load(REPO)
    card.validate()
    assert card.data.base_model == ["alice/tiny-sd1-a", "alice/tiny-sd1-b"]
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert _table(card.text, "Models") == {
        "alice/tiny-sd1-a": ["merged, donor", f"`{sha_a}`"],
        "alice/tiny-sd1-b": ["merged, donor", f"`{sha_b}`"],
    }
    assert _table(card.text, "Components")["text_encoder"] == ["CLIPTextModel", "alice/tiny-sd1-b"]
    assert f'model_id = "{REPO}"' in card.text
    assert hub.commits(REPO)[-1]["message"] == "hf-m2n2: linear merge of alice/tiny-sd1-a, alice/tiny-sd1-b"
    assert token not in _all_text(out) and token not in _all_text(hub.cache_dir)
    assert all(token not in content.decode("utf-8", "replace") for content in hub.files(REPO).values())

    # pulled back by repo id with diffusers: the merged UNet (its formula over the seeds) and the donor's encoder
    pipe = DiffusionPipeline.from_pretrained(REPO)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    ua, ub = load_file(pipelines["sd1-a"] / UNET), load_file(pipelines["sd1-b"] / UNET)
    unet = pipe.unet.state_dict()
    for name, tensor in ua.items():
        torch.testing.assert_close(unet[name], 0.3 * tensor + 0.7 * ub[name], rtol=0, atol=1e-6)
    te = load_file(pipelines["sd1-b"] / TEXT_ENCODER)
    state = pipe.text_encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in te.items())
    assert (out / "model_index.json").read_bytes() == hub.files(REPO)["model_index.json"]

    # the pushed card's own snippet runs against the server
    namespace = _run_snippet(_snippet(card.text), tmp_path, monkeypatch)
    assert type(namespace["pipe"]).__name__ == "StableDiffusionPipeline"
    assert (tmp_path / "image.png").is_file()


def test_merge_of_pinned_hub_pipelines_fetches_listed_components_and_pins_every_sha(
    hub, pipelines, cli, tmp_path, monkeypatch
):
    token = hub.token_of("alice")
    monkeypatch.setenv("HF_TOKEN", token)
    stray = tmp_path / "stray"
    shutil.copytree(pipelines["sd1-b"], stray)
    (stray / "unlisted").mkdir()
    (stray / "unlisted" / "big.safetensors").write_bytes(b"never fetched")
    (stray / "sd-v1-5.safetensors").write_bytes(b"never fetched either")
    sha_a = hub.publish("alice/tiny-sd1-a", pipelines["sd1-a"], token)
    old = hub.publish("alice/tiny-sd1-b", pipelines["sd1"], token, commit_message="the base")
    main = hub.publish("alice/tiny-sd1-b", stray, token, commit_message="fine-tune b")
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": f"alice/tiny-sd1-a@{sha_a}", "parameters": {"weight": 0.2}},
            {"model": f"alice/tiny-sd1-b@{old}", "parameters": {"weight": 0.3}},
            {"model": "alice/tiny-sd1-b", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
        "components": {"vae": {"from": f"alice/tiny-sd1-b@{old}"}},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "merged"
    code, _, stderr = cli("merge", tmp_path / "spec.yaml", out, "--quiet")
    assert code == 0, stderr

    fetched = {r.path for r in hub.requests if "/resolve/" in r.path}
    assert not [p for p in fetched if "unlisted" in p or "sd-v1-5" in p]
    assert any(p.endswith(f"/{main}/{UNET}") for p in fetched)

    merged = load_file(out / UNET)
    ua, u0, ub = (load_file(pipelines[n] / UNET) for n in ("sd1-a", "sd1", "sd1-b"))
    for name, tensor in merged.items():
        torch.testing.assert_close(
            tensor, 0.2 * ua[name] + 0.3 * u0[name] + 0.5 * ub[name], rtol=0, atol=1e-6
        )

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["alice/tiny-sd1-a", "alice/tiny-sd1-b"]
    # one repo at two revisions: the Models table pins each, the component table names the pinned one
    assert _rows(card.text, "Models") == [
        ["alice/tiny-sd1-a", "merged, donor", f"`{sha_a}`"],
        ["alice/tiny-sd1-b", "merged, donor", f"`{old}`"],
        ["alice/tiny-sd1-b", "merged", f"`{main}`"],
    ]
    components = _table(card.text, "Components")
    assert components["vae"] == ["AutoencoderKL", f"alice/tiny-sd1-b@{old}"]
    assert components["text_encoder"] == ["CLIPTextModel", "alice/tiny-sd1-a"]
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (pipelines["sd1"] / vae).read_bytes()
    assert os.environ["HF_TOKEN"] not in _all_text(out)


def test_single_file_output_pushed_and_its_snippet_downloads_the_file(
    hub, sd1_merge, pipelines, cli, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", hub.token_of("alice"))
    out = tmp_path / "sd1-file"
    spec = sd1_merge.parent / "sd1-merge.yaml"
    code, _, err = cli("merge", spec, out, "--output-format", "single_file", "--push", REPO, "--quiet")
    assert code == 0, err
    assert {"README.md", "card.json", "merge_config.yaml", "sd1-file.safetensors"} <= set(hub.files(REPO))
    card = ModelCard.load(REPO)
    card.validate()
    namespace = _run_snippet(_single_file_snippet(card.text, pipelines["sd1-a"]), tmp_path, monkeypatch)
    assert Path(namespace["path"]).read_bytes() == (out / "sd1-file.safetensors").read_bytes()
    assert "models--alice--tiny-pipe-merge" in namespace["path"]  # downloaded: not a folder here
