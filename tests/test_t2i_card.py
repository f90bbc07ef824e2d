"""What an evolved text-to-image pipeline leaves for its users: the image grid of the seeds and the merge (its cells
are the images the evaluator draws, bit for bit), a diffusers lineage card (front matter the Hub reads, the scores
of report.json as model-index, how the images were scored, a usage snippet that runs), and the CLI front doors on
the run: `export` writes it again, `rebuild` gives the same UNet, `push` publishes it (through the local
Hub-protocol server) so that `DiffusionPipeline.from_pretrained(repo)` draws the merge's row of the grid again."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard

pytest.importorskip("diffusers")

UNET = "unet/diffusion_pytorch_model.safetensors"
REPO = "alice/t2i-merge"
FIT = [
    {"id": "en-0", "prompt": "a red circle", "group": "en"},
    {"id": "en-1", "prompt": "a blue square", "group": "en"},
    {"id": "ja-0", "prompt": "赤い丸", "scoring_text": "a red circle", "group": "ja"},
]
TEST = [
    {"id": "en-2", "prompt": "a green | triangle", "group": "en"},
    {"id": "ja-1", "prompt": "青い四角", "scoring_text": "a blue square", "group": "ja"},
]


@pytest.fixture(scope="module")
def t2i_run(pipelines, clip_judge, tmp_path_factory) -> dict:
    """An M2N2 run over two tiny SD 1.x fine-tunes scored by a tiny random CLIP judge (4 candidates, 2 steps,
    2 images per prompt, DDIM instead of the seeds' PNDM scheduler)."""
    from hf_m2n2.evolve.runs import start_runs

    root = tmp_path_factory.mktemp("t2i_card")
    for name, rows in (("fit.jsonl", FIT), ("test.jsonl", TEST)):
        (root / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    shutil.copytree(clip_judge, root / "judge")
    spec = {
        "name": "t2i-m2n2",
        "models": [{"model": str(pipelines["sd1-a"])}, {"model": str(pipelines["sd1-b"])}],
        "genome": {"kind": "blend", "block_size": 1024},
        "evolve": {"algorithm": "m2n2", "budget": 4, "seed": 3, "log_every": 2},
        "evaluate": {
            "kind": "clip",
            "model": "judge",
            "prompts": "fit.jsonl",
            "test_prompts": "test.jsonl",
            "images_per_prompt": 2,
            "num_inference_steps": 2,
            "batch_size": 4,
            "scheduler": "DDIMScheduler",
        },
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    run_dir = root / "run"
    start_runs(root / "spec.yaml", run_dir, progress=False)
    return {"root": root, "spec": spec, "run": run_dir, "model": run_dir / "model"}


def _evaluator(run: dict, pipe):
    from hf_m2n2.evaluate.clip import ClipConfig, ClipEvaluator

    return ClipEvaluator(ClipConfig(**run["spec"]["evaluate"]), pipe, base_dir=run["root"])


def _pipeline(path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path))


def _cells(grid_path: Path, entry: dict, row: int) -> list[np.ndarray]:
    """The pixels of one row's cells, shrunk back by the grid's whole enlargement factor."""
    from PIL import Image

    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    (w, h), (x0, y0), gap, scale = entry["cell"], entry["origin"], entry["gap"], int(entry["scale"])
    top = y0 + row * (h + gap)
    cells = [
        grid[top : top + h, x0 + c * (w + gap) : x0 + c * (w + gap) + w] for c in range(len(entry["prompts"]))
    ]
    for cell in cells:  # each image pixel is a scale x scale block
        assert np.array_equal(cell, np.repeat(np.repeat(cell[::scale, ::scale], scale, 0), scale, 1))
    return [cell[::scale, ::scale] for cell in cells]


def _first_images(evaluator, pipe, count: int) -> list[np.ndarray]:
    return [np.asarray(images[0]) for _, images in evaluator.images(pipe, limit=count)]


def _card(run: dict):
    return ModelCard.load(run["model"] / "README.md")


def test_grid_has_one_row_per_report_row_and_one_column_per_held_out_prompt(t2i_run):
    from PIL import Image

    report = json.loads((t2i_run["run"] / "report.json").read_text())
    entry = json.loads((t2i_run["model"] / "card.json").read_text())["details"]["grid"]
    assert entry["rows"] == list(report) == ["sd1-a", "sd1-b", "t2i-m2n2"]
    assert [p["id"] for p in entry["prompts"]] == [r["id"] for r in TEST]
    (w, h), (x0, y0), gap = entry["cell"], entry["origin"], entry["gap"]
    assert entry["scale"] == 4 and (w, h) == (128, 128)  # 32x32 images, each pixel a 4x4 block
    grid = Image.open(t2i_run["model"] / "grid.png")
    rows, columns = len(entry["rows"]), len(entry["prompts"])
    assert grid.size == (x0 + columns * w + (columns - 1) * gap, y0 + rows * h + (rows - 1) * gap)
    assert (t2i_run["run"] / "grid.png").read_bytes() == (t2i_run["model"] / "grid.png").read_bytes()


def test_grid_cells_are_the_images_the_evaluator_draws(t2i_run, pipelines, tmp_path, cli):
    entry = json.loads((t2i_run["model"] / "card.json").read_text())["details"]["grid"]
    grid = t2i_run["model"] / "grid.png"
    columns = len(entry["prompts"])
    # the seeds' rows: their own folders; the merge's: the pipeline rebuilt from the recipe
    assert cli("rebuild", t2i_run["model"] / "recipe.json", tmp_path / "rebuilt", "-q")[0] == 0
    sources = [pipelines["sd1-a"], pipelines["sd1-b"], tmp_path / "rebuilt"]
    drawn = []
    for row, source in enumerate(sources):
        pipe = _pipeline(source)
        images = _first_images(_evaluator(t2i_run, pipe), pipe, columns)
        assert all(
            np.array_equal(cell, image) for cell, image in zip(_cells(grid, entry, row), images, strict=True)
        )
        drawn.append(images)
    assert not np.array_equal(drawn[0][0], drawn[2][0])  # the rows do differ (the merge is not a seed)


def test_card_front_matter_is_a_diffusers_text_to_image_card_scoring_as_report_json(t2i_run):
    card = _card(t2i_run)
    data = card.data
    assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image"
    assert data.base_model == ["sd1-a", "sd1-b"] and data.base_model_relation == "merge"
    assert {"merge", "m2n2", "hf-m2n2", "stable-diffusion"} <= set(data.tags)
    report = json.loads((t2i_run["run"] / "report.json").read_text())
    [index] = data.to_dict()["model-index"]
    assert index["name"] == "t2i-m2n2"
    results = {r["dataset"]["name"]: r for r in index["results"]}
    assert list(results) == ["en", "ja"]
    for group, result in results.items():
        assert result["task"]["type"] == "text-to-image"
        assert result["metrics"] == [{"type": "clip_score", "value": report["t2i-m2n2"][group]}]
    front = card.content.split("---")[1]
    assert "transformers" not in front and "text-generation" not in front
    assert "AutoModelForCausalLM" not in card.text


def _section(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _table(section: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in section.splitlines()]
    return {cells[0]: cells[1:] for cells in rows[2:] if cells}


def test_card_shows_the_grid_the_scoring_and_the_scores_of_seeds_and_merge(t2i_run):
    text = _card(t2i_run).text
    images = _section(text, "Images")
    assert "](grid.png)" in images and "Rows, top to bottom: sd1-a, sd1-b, t2i-m2n2." in images
    columns = _table("| Column |" + images.split("| Column |", 1)[1])
    assert columns == {
        "1": ["en-2", "a green \\| triangle", "a green \\| triangle"],
        "2": ["ja-1", "青い四角", "a blue square"],
    }
    report = json.loads((t2i_run["run"] / "report.json").read_text())
    scores = _table(_section(text, "Scores (held-out split)"))
    for name, groups in report.items():
        assert scores[name][:2] == [f"{groups['en']:.4f}", f"{groups['ja']:.4f}"]
    scoring = _section(text, "How it was scored")
    assert "Judge: `judge` (a local directory)." in scoring
    assert "| fitness | fit.jsonl | 3 | en: 2, ja: 1 |" in scoring
    assert "| held-out | test.jsonl | 2 | en: 1, ja: 1 |" in scoring
    settings = _table("| Generation setting |" + scoring.split("| Generation setting |", 1)[1])
    assert settings == {
        "num_inference_steps": ["2"],
        "guidance_scale": ["7.5"],  # the pipeline's default
        "height": ["32"],
        "width": ["32"],
        "scheduler": ["DDIMScheduler (in place of the pipeline's own PNDMScheduler)"],
        "images_per_prompt": ["2"],
        "seed": ["0"],
    }
    components = _table(_section(text, "Components"))
    assert components["unet"] == ["UNet2DConditionModel", "evolved (m2n2)"]
    assert components["text_encoder"] == ["CLIPTextModel", "sd1-a"]
    assert "## Lineage" in text and "`hf-m2n2 rebuild recipe.json OUT_DIR`" in text


def test_usage_snippet_loads_the_pipeline_as_it_was_scored_and_draws(t2i_run, tmp_path, monkeypatch):
    code = re.search(r"## Usage\n.*?```python\n(.*?)\n```", _card(t2i_run).text, re.S).group(1)
    assert f'model_id = "{t2i_run["model"]}"' in code
    assert (
        'pipe("a green | triangle", num_inference_steps=2, guidance_scale=7.5, height=32, width=32)' in code
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "snippet", "exec"), namespace)
    assert type(namespace["pipe"].scheduler).__name__ == "DDIMScheduler"
    assert (tmp_path / "image.png").is_file()


def test_card_command_renders_the_same_card_again(t2i_run, cli, tmp_path):
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("README.md", "card.json"):
        shutil.copyfile(t2i_run["model"] / name, copy / name)
    assert cli("card", copy, "-q")[0] == 0
    assert (copy / "README.md").read_text() == (t2i_run["model"] / "README.md").read_text()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_writes_the_same_pipeline_card_and_grid(t2i_run, cli, tmp_path):
    code, _, err = cli("export", t2i_run["run"], tmp_path / "again", "-q")
    assert code == 0, err
    again, model = _files(tmp_path / "again"), _files(t2i_run["model"])
    assert {"grid.png", "fitness.png", "README.md", "card.json", UNET} <= set(model)
    assert again == model


def test_rebuild_gives_the_same_unet_bytes(t2i_run, cli, tmp_path):
    code, _, err = cli("rebuild", t2i_run["model"] / "recipe.json", tmp_path / "rebuilt", "-q")
    assert code == 0, err
    assert (tmp_path / "rebuilt" / UNET).read_bytes() == (t2i_run["model"] / UNET).read_bytes()


def test_push_publishes_pipeline_card_and_grid_and_the_repo_draws_the_merge_row(
    t2i_run, hub, cli, tmp_path, monkeypatch
):
    token = hub.token_of("alice")
    monkeypatch.setenv("HF_TOKEN", token)
    before = _files(t2i_run["model"])
    code, out, err = cli("push", t2i_run["model"], REPO)
    assert code == 0, err
    assert f"pushed to {hub.url}/{REPO}" in out
    files = hub.files(REPO)
    for name in ("grid.png", "fitness.png", "recipe.json", "model_index.json", UNET):
        assert files[name] == before[name], name
    assert _files(t2i_run["model"]) == before  # the local result is untouched

    card = ModelCard.load(REPO)
    card.validate()  # the server's model card check
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model is None  # local seeds: named in the text, not linked
    assert "Seeds from local directories (sd1-a, sd1-b)" in card.text
    assert f'model_id = "{REPO}"' in card.text and "](grid.png)" in card.text
    assert hub.commits(REPO)[-1]["message"] == "hf-m2n2: m2n2 evolution of sd1-a, sd1-b"

    # the published pipeline loads by repo id and draws the merge's row of the grid again
    pipe = _pipeline(REPO)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    entry = json.loads(files["card.json"])["details"]["grid"]
    images = _first_images(_evaluator(t2i_run, pipe), pipe, len(entry["prompts"]))
    cells = _cells(t2i_run["model"] / "grid.png", entry, entry["rows"].index("t2i-m2n2"))
    assert all(np.array_equal(c, i) for c, i in zip(cells, images, strict=True))

    assert token not in out + err
    assert all(token not in content.decode("utf-8", "replace") for content in files.values())
    assert all(token not in content.decode("utf-8", "replace") for content in _files(t2i_run["run"]).values())


def test_a_hub_judge_is_described_with_its_pinned_commit(hub, clip_judge, pipelines, tmp_path, monkeypatch):
    from hf_m2n2.evaluate.clip import ClipConfig, ClipEvaluator

    token = hub.token_of("alice")
    monkeypatch.setenv("HF_TOKEN", token)
    sha = hub.publish("alice/tiny-judge", clip_judge, token)
    (tmp_path / "fit.jsonl").write_text(json.dumps(FIT[0]) + "\n")
    config = ClipConfig(kind="clip", model="alice/tiny-judge", prompts="fit.jsonl", num_inference_steps=1)
    pipe = _pipeline(pipelines["sd1-a"])
    described = ClipEvaluator(config, pipe, base_dir=tmp_path).describe()
    assert described["judge"] == {"model": "alice/tiny-judge", "revision": None, "commit": sha, "hub": True}
    assert described["prompts"] == [
        {"split": "fitness", "file": "fit.jsonl", "select": None, "count": 1, "groups": {"en": 1}}
    ]


def test_a_fresh_evaluator_reports_the_seed_as_the_run_did_after_drawing_a_prefix(t2i_run, pipelines):
    # images(limit=1) encodes the first held-out prompt only: scoring all of them afterwards must not reuse that
    pipe = _pipeline(pipelines["sd1-a"])
    evaluator = _evaluator(t2i_run, pipe)
    assert len(evaluator.images(pipe, limit=1)) == 1
    report = json.loads((t2i_run["run"] / "report.json").read_text())
    assert evaluator.report(pipe).scores == report["sd1-a"]


def test_only_an_evaluator_that_draws_images_gives_a_grid(tmp_path):
    from PIL import Image

    from hf_m2n2.evaluate.clip import PromptRow
    from hf_m2n2.evolve.executor import LocalExecutor
    from hf_m2n2.evolve.outcome import image_grid_entry

    class Target:
        def write(self, genome):
            return genome

    class Scores:  # scores, draws nothing (an LLM benchmark)
        def scores(self, model):
            return np.ones(2)

    class Draws(Scores):
        def images(self, model, split=None, limit=None):
            rows = [PromptRow(str(i), f"prompt {i}", f"prompt {i}") for i in range(6)][:limit]
            return [(row, [Image.new("RGB", (8, 8), (model, i, 0)), None]) for i, row in enumerate(rows)]

    assert LocalExecutor(None, Target(), Scores()).images(1, 4) is None
    executor = LocalExecutor(None, Target(), Draws())
    drawn = {"seed": executor.images(10, 4), "merge": executor.images(20, 4)}
    assert image_grid_entry({"seed": None, "merge": None}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    entry = image_grid_entry(drawn, tmp_path / "grid.png")
    assert entry["rows"] == ["seed", "merge"] and [p["id"] for p in entry["prompts"]] == ["0", "1", "2", "3"]
    assert entry["scale"] == 16  # 8 pixels enlarged to at least 128
    for row, value in enumerate((10, 20)):
        cells = _cells(tmp_path / "grid.png", entry, row)
        assert [tuple(c[0, 0]) for c in cells] == [(value, i, 0) for i in range(4)]


@pytest.mark.parametrize(
    ("row", "label"),
    [
        (("en-0", "a red circle", "a red circle"), "en-0: a red circle"),
        (("ja-0", "赤い丸", "a red circle"), "ja-0 (scored as): a red circle"),
        (("ja-1", "赤い丸", "赤い丸"), "ja-1"),
        (("赤", "赤い丸", "赤い丸"), "?"),
    ],
)
def test_column_labels_fall_back_to_what_the_default_font_draws(row, label):
    from hf_m2n2.image_grid import prompt_label

    assert prompt_label(*row) == label
