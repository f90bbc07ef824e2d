"""The Space's text-to-image mode: the CLIP section and prompt files its form writes; the previews of the best
candidate so far that its gallery shows (written by the run itself: they follow the best-so-far candidate, change
no score and survive `--resume`); the served page end to end with gradio_client, and in headless Chromium."""

from __future__ import annotations

import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
pytest.importorskip("diffusers")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from helpers import CHROMIUM, chromium, gradio_table  # noqa: E402

from hf_m2n2 import app as app_module  # noqa: E402
from hf_m2n2.evaluate.previews import BEST, PREVIEW_DIR, BestPreviews, pick_prompts, read_previews  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own pandas deprecations

T2I_CONTROLS = (
    "mode",
    "t2i-source",
    "t2i-judge",
    "t2i-prompts",
    "t2i-prompts-file",
    "t2i-images-per-prompt",
    "t2i-steps",
    "t2i-guidance",
    "t2i-size",
    "t2i-algorithm",
    "t2i-budget",
    "t2i-run-btn",
    "cancel-btn",
    "fitness-plot",
    "best-gallery",
    "score-table",
    "card-preview",
)
PROMPTS = [  # (id, prompt, scoring text, group)
    ("en-0", "a red circle", None, "en"),
    ("en-1", "a blue square", None, "en"),
    ("ja-0", "赤い丸", "a red circle", "ja"),
    ("ja-1", "青い四角", "a blue square", "ja"),
]


def _one_line_error(excinfo) -> str:
    message = getattr(excinfo.value, "message", None) or str(excinfo.value)  # gr.Error's str() is its repr
    assert "\n" not in message.strip(), message
    return message


def _write_jsonl(path: Path, rows) -> Path:
    lines = []
    for key, prompt, scoring, group in rows:
        row = {"id": key, "prompt": prompt, "group": group}
        if scoring:
            row["scoring_text"] = scoring
        lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory, session_builds):
    """The bundled text-to-image world, built with test_t2i_world's reduced config (every part trained briefly) in
    the folder that module's tests build it in: one build per session; the app reuses it (its recorded config)."""
    from test_t2i_world import REDUCED, REDUCED_ROOT

    session_builds.take("world")

    return app_module.bundled_t2i(tmp_path_factory.getbasetemp() / REDUCED_ROOT, REDUCED)


# ---------------------------------------------------------------------- the form's specs (no server)


def test_clip_section_and_prompt_files_make_a_valid_evolve_spec(tmp_path, world):
    from hf_m2n2.evaluate import check_offline
    from hf_m2n2.evolve.spec import parse_evolve_spec

    typed = app_module.prompts_file("a red circle\n\n  a blue square  \n", None, tmp_path, "prompts")
    assert typed == "prompts.txt"
    assert (tmp_path / typed).read_text() == "a red circle\na blue square\n"
    uploaded = app_module.prompts_file("", str(world.test_prompts), tmp_path, "test_prompts")
    assert uploaded == "test_prompts.jsonl"
    assert app_module.prompts_file("  \n", None, tmp_path, "prompts") is None
    (tmp_path / "judge").symlink_to(world.judge, target_is_directory=True)

    section = app_module.clip_section(
        "judge", typed, test_prompts=uploaded, images_per_prompt=2, num_inference_steps=3, size=32
    )
    assert section == {
        "kind": "clip",
        "model": "judge",
        "prompts": "prompts.txt",
        "test_prompts": "test_prompts.jsonl",
        "images_per_prompt": 2,
        "num_inference_steps": 3,
        "height": 32,
        "width": 32,
        "batch_size": 8,
    }
    spec = parse_evolve_spec(app_module.evolve_spec("m2n2", ["en", "ja"], section, budget=6, seed=5))
    assert spec.evaluate.kind == "clip" and spec.evaluate.images_per_prompt == 2
    assert spec.evolve.capacity == "max"  # CLIP scores are continuous
    assert spec.evolve.checkpoint_every_steps == 1  # the page follows every pass
    check_offline(spec.evaluate, tmp_path)  # the files read, the judge is a CLIP model
    # guidance left blank: the pipeline's own default, not written
    assert "guidance_scale" not in app_module.clip_section("judge", typed)


def test_bad_text_to_image_input_is_one_line_naming_the_field(tmp_path):
    with pytest.raises(gr.Error) as error:
        app_module.clip_section("judge", "p.txt", images_per_prompt=0)
    assert _one_line_error(error).startswith("evaluate.images_per_prompt: ")
    with pytest.raises(gr.Error) as error:
        app_module.clip_section("judge", "p.txt", num_inference_steps=2.5)
    assert _one_line_error(error) == "evaluate.num_inference_steps: expected a whole number, got 2.5"
    with pytest.raises(gr.Error) as error:
        app_module.clip_section("", "p.txt")
    assert _one_line_error(error).startswith("evaluate.model: ")

    bad = tmp_path / "upload" / "mine.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"id": "a", "prompt": "a red circle"}\nnot json\n')
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(gr.Error) as error:
        app_module.prompts_file("", str(bad), run, "prompts")
    message = _one_line_error(error)
    assert message.startswith("evaluate.prompts: prompts.jsonl:2: not JSON") and str(run) not in message
    with pytest.raises(gr.Error, match="not both"):
        app_module.prompts_file("a red circle", str(bad), run, "prompts")
    assert app_module.optional_number(" 7.5 ", "evaluate.guidance_scale") == 7.5
    assert app_module.optional_number("", "evaluate.guidance_scale") is None
    with pytest.raises(gr.Error) as error:
        app_module.optional_number("high", "evaluate.guidance_scale")
    assert _one_line_error(error) == "evaluate.guidance_scale: expected a number, got 'high'"
    with pytest.raises(gr.Error) as error:
        app_module.clip_section("judge", "p.txt", size=40.5)
    assert _one_line_error(error) == "evaluate.height: expected a whole number, got 40.5"

    csv = tmp_path / "upload" / "p.csv"
    csv.write_text("a,b\n")
    with pytest.raises(gr.Error, match=r"evaluate.test_prompts: expected a .txt or .jsonl file, got 'p.csv'"):
        app_module.prompts_file("", str(csv), run, "test_prompts")


# ---------------------------------------------------------------------- previews of the best candidate so far


class _Row:
    def __init__(self, index: int, group: str):
        self.id, self.prompt, self.group = f"{group}-{index}", f"prompt {index}", group


def _drawn(candidate: int, n: int = 3, images: int = 2):
    """What an evaluator drew: per prompt, `images` uint8 images whose pixels name the candidate."""
    rows = [_Row(i, "en" if i < 2 else "ja") for i in range(n)]
    return [
        (row, [np.full((4, 4, 3), 10 * candidate + 3 * i + k, dtype=np.uint8) for k in range(images)])
        for i, row in enumerate(rows)
    ]


def test_previews_keep_the_best_candidate_so_far(tmp_path, caplog):
    from PIL import Image

    assert pick_prompts(["en", "en", "en", "ja", "ja"], 3) == [0, 3, 1]
    assert pick_prompts([None, None], 8) == [0, 1]
    preview = tmp_path / PREVIEW_DIR
    previews = BestPreviews(preview, prompts=2)
    means = [0.2, 0.5, 0.4, 0.5, float("nan"), 0.9]
    shown = []
    for candidate, mean in enumerate(means):
        previews.offer(candidate, np.array([mean - 0.1, mean, mean + 0.1]), _drawn(candidate))
        record = read_previews(tmp_path)
        shown.append(record["candidate"])
        finite = [m if np.isfinite(m) else -1 for m in means[: candidate + 1]]
        assert record["score"] == pytest.approx(max(finite))
    assert shown == [0, 1, 1, 1, 1, 5]  # the first of equals stays; NaN never wins
    record = read_previews(tmp_path)
    # two prompts, one per group first, two images each; the pixels are the ones offered
    assert [(e["prompt_id"], e["group"]) for e in record["images"]] == [("en-0", "en")] * 2 + [
        ("ja-2", "ja")
    ] * 2
    assert [e["score"] for e in record["images"]] == pytest.approx([0.8, 0.8, 1.0, 1.0])
    for entry, (i, k) in zip(record["images"], [(0, 0), (0, 1), (2, 0), (2, 1)]):
        pixels = np.asarray(Image.open(entry["path"]))
        assert (pixels == 50 + 3 * i + k).all()
    # the current candidate's folder and the one before it stay (a reader may hold the previous best.json)
    assert sorted(p.name for p in preview.iterdir()) == [BEST, "candidate-1", "candidate-5"]

    # a resumed run starts from the preview on disk: equal or lower scores do not replace it
    again = BestPreviews(preview, prompts=2)
    assert not again.offer(5, np.full(3, 0.9), _drawn(7))
    assert not again.offer(6, np.full(3, 0.3), _drawn(6))
    assert read_previews(tmp_path)["candidate"] == 5
    assert again.offer(7, np.full(3, 1.5), _drawn(7)) and read_previews(tmp_path)["candidate"] == 7

    # a disk that refuses the write is a warning, never a failed run
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / PREVIEW_DIR).write_text("a file where the folder goes")
    with caplog.at_level("WARNING", logger="hf_m2n2.evaluate.previews"):
        assert not BestPreviews(blocked / PREVIEW_DIR, prompts=2).offer(0, np.ones(3), _drawn(0))
    assert "previews of candidate 0 not written" in caplog.text
    assert read_previews(tmp_path / "nothing") is None


def _clip_spec(root: Path, pipelines, clip_judge, previews: int) -> Path:
    prompts = _write_jsonl(root / "fit.jsonl", PROMPTS)
    spec = {
        "name": "t2i",
        "models": [{"model": str(pipelines["sd1-a"])}, {"model": str(pipelines["sd1-b"])}],
        "genome": {"kind": "blend", "block_size": 1024},
        "evolve": {"algorithm": "m2n2", "budget": 5, "seed": 1, "log_every": 5, "checkpoint_every_steps": 1},
        "evaluate": {
            "kind": "clip",
            "model": str(clip_judge),
            "prompts": str(prompts),
            "images_per_prompt": 1,
            "num_inference_steps": 2,
            "previews": previews,
        },
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def test_previews_follow_the_run_change_no_score_and_survive_resume(
    tmp_path, pipelines, clip_judge, monkeypatch
):
    """One run without previews; one with them, killed right after candidate 3 was previewed and scored (before
    the loop was told: its checkpoint is behind the preview) and resumed. Both end with the same report, and the
    preview is the best candidate of the lineage, its images what that candidate draws."""
    from diffusers import DiffusionPipeline

    from hf_m2n2.evaluate.clip import ClipConfig, ClipEvaluator
    from hf_m2n2.evolve.runs import resume_runs, start_runs

    (tmp_path / "plain").mkdir()
    (tmp_path / "shown").mkdir()
    start_runs(
        _clip_spec(tmp_path / "plain", pipelines, clip_judge, 0), tmp_path / "plain-run", progress=False
    )
    assert not (tmp_path / "plain-run" / PREVIEW_DIR).exists()

    offered = []
    original = ClipEvaluator.candidate_scored

    def killed_after_three(self, candidate_id, scores):
        original(self, candidate_id, scores)
        offered.append(candidate_id)
        if candidate_id == 3 and len(offered) == 4:
            raise KeyboardInterrupt  # as a kill: no checkpoint of this step

    monkeypatch.setattr(ClipEvaluator, "candidate_scored", killed_after_three)
    spec = _clip_spec(tmp_path / "shown", pipelines, clip_judge, 8)
    with pytest.raises(KeyboardInterrupt):
        start_runs(spec, tmp_path / "shown-run", progress=False)
    resume_runs(tmp_path / "shown-run", progress=False)
    assert offered[:5] == [0, 1, 2, 3, 3]  # candidate 3 was scored again after the resume

    run, plain = tmp_path / "shown-run", tmp_path / "plain-run"
    for name in ("report.json", "lineage.jsonl", "history.jsonl"):
        assert (run / name).read_bytes() == (plain / name).read_bytes(), name
    lineage = [json.loads(line) for line in (run / "lineage.jsonl").read_text().splitlines()]
    scores = [record["score"] for record in lineage]
    record = read_previews(run)
    assert record["score"] == max(scores) and record["candidate"] == scores.index(max(scores))
    assert len(record["images"]) == len(PROMPTS)

    # the best candidate is the exported one here (the archive keeps all 5): it draws the previewed images
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_candidate"]["id"] == record["candidate"]
    pipe = DiffusionPipeline.from_pretrained(str(run / "model"))
    config = ClipConfig(
        kind="clip",
        model=str(clip_judge),
        prompts=str(tmp_path / "shown" / "fit.jsonl"),
        num_inference_steps=2,
    )
    evaluator = ClipEvaluator(config, pipe)
    assert float(evaluator.scores(pipe).mean()) == pytest.approx(record["score"], abs=1e-6)
    from PIL import Image

    drawn = {row.id: images[0] for row, images in evaluator.last_images}
    for entry in record["images"]:
        assert np.array_equal(np.asarray(Image.open(entry["path"])), drawn[entry["prompt_id"]])


# ---------------------------------------------------------------------- the served page


@pytest.fixture(scope="session")
def served_t2i(world, tmp_path_factory):
    work = tmp_path_factory.mktemp("app-t2i-work")
    demo = app_module.build_demo(
        specialists_dir=tmp_path_factory.getbasetemp() / "never-built", work_dir=work, t2i_dir=world.root
    )
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield url, work
    demo.close()


@pytest.fixture(scope="session")
def t2i_client(served_t2i) -> Client:
    return Client(served_t2i[0], verbose=False)


def test_text_to_image_run_end_to_end(t2i_client, served_t2i, world):
    job = t2i_client.submit(budget=4, steps=2, api_name="/run_t2i")
    during = []  # (status, gallery) of each update while the run goes
    deadline = time.time() + 240
    while not job.done() and time.time() < deadline:
        during = [(o[0], o[2]) for o in job.outputs()]
        time.sleep(0.2)
    status, plot, gallery, table, card, download = job.result(timeout=60)
    assert status.startswith("**Done**"), status

    live = [g for s, g in during if s.startswith("**Running**") and isinstance(g, list) and g]
    assert live, "the gallery showed a candidate's images while the run went"
    assert any(re.search(r"best so far: candidate \d+ \(mean score \d", s) for s, _ in during)

    assert len(gallery) == 8  # the 8 bundled fitness prompts (one image each), the best candidate's
    captions = [item["caption"] for item in gallery]
    assert (
        sum(c.startswith("en · ") for c in captions) == 4
        and sum(c.startswith("ja · ") for c in captions) == 4
    )
    from PIL import Image

    assert all(min(Image.open(item["image"]).size) >= 128 for item in gallery)  # 32 px, shown 4x, unblurred

    rows = gradio_table(table)
    assert [(r["model"], r["role"]) for r in rows] == [
        ("en", "seed"),
        ("ja", "seed"),
        ("m2n2-merge", "merged"),
    ]
    assert list(rows[0]) == ["model", "role", "en", "ja", "mean"]  # one column per prompt group
    assert all(0 <= r[k] <= 100 for r in rows for k in ("en", "ja", "mean"))
    points = [dict(zip(plot["columns"], row)) for row in plot["data"] if row[1] is not None]
    best = [p for p in points if p["series"] == app_module.PLOT_SERIES[0]]
    assert [p["passes"] for p in best] == [1, 2, 3, 4]

    assert card.startswith("```yaml\n") and "base_model:\n- en\n- ja" in card and "m2n2" in card
    assert str(world.root) not in card  # seeds named en/ja, not by the server's paths
    with zipfile.ZipFile(download) as archive:
        names = set(archive.namelist())
    assert {"model_index.json", "recipe.json", "README.md"} <= names and any(
        n.startswith("unet/") for n in names
    )
    spec = yaml.safe_load(next(served_t2i[1].glob("*/spec.yaml")).read_text())
    assert spec["models"] == [{"model": "en"}, {"model": "ja"}] and spec["evaluate"]["model"] == "judge"


def test_text_to_image_refuses_local_paths_and_bad_prompts(t2i_client, tmp_path, served_t2i):
    before = set(served_t2i[1].iterdir())
    with pytest.raises(AppError, match="'/etc' is not a Hub model id"):
        t2i_client.predict(source=app_module.T2I_HUB, pipelines="/etc\nfoo/bar", api_name="/run_t2i")
    with pytest.raises(AppError, match="not a Hub model id"):
        t2i_client.predict(judge="/root/judge", api_name="/run_t2i")
    bad = _write_jsonl(tmp_path / "mine.jsonl", PROMPTS[:1])
    bad.write_text(bad.read_text() + '{"id": "x", "prompt": ""}\n')
    with pytest.raises(
        AppError, match=r"evaluate.prompts: prompts.jsonl:2: 'prompt' must be a non-empty string"
    ):
        t2i_client.predict(prompts_file=handle_file(str(bad)), api_name="/run_t2i")
    assert set(served_t2i[1].iterdir()) <= before  # refused runs leave no directory


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_text_to_image_page_renders_in_headless_chromium(served_t2i, tmp_path):
    from PIL import Image

    url = served_t2i[0] + "?mode=t2i"
    shot = tmp_path / "space-t2i.png"
    dom = chromium("--dump-dom", f"--screenshot={shot}", "--window-size=1280,1600", url).stdout  # one launch
    for control in T2I_CONTROLS:
        assert f'id="{control}"' in dom, control
    selected = re.search(r'<button[^>]*role="tab"[^>]*aria-selected="true"[^>]*>', dom)
    assert selected and 'data-tab-id="t2i"' in selected.group(0)  # the address opened the text-to-image tab
    assert app_module.T2I_BUNDLED in dom and "Best candidate so far" in dom

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (1600, 1280, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 64  # text, buttons, borders: not a blank page
    assert np.all(image == image[0, 0], axis=-1).mean() < 0.97
