"""The Gradio app (the Space): specs it writes, then the served app end to end with gradio_client (static merge,
M2N2 evolution, cancel, push without leaking the token) and the page in headless Chromium (DOM and screenshot)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
pytest.importorskip("lm_eval")

from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from helpers import CHROMIUM, chromium, gradio_table  # noqa: E402

from hf_m2n2 import app as app_module  # noqa: E402
from hf_m2n2.demo.specialists import MARKER, SKILLS, SpecialistsConfig, build_specialists  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own pandas deprecations

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_BUILD = REPO / "examples" / "specialists" / "build"
CONTROLS = (
    "seed-source",
    "method",
    "budget",
    "fitness",
    "run-btn",
    "cancel-btn",
    "status",
    "fitness-plot",
    "score-table",
    "download",
    "push-box",
    "card-preview",
)
FAKE_TOKEN = "hf_" + "Zx9" * 12


def _built_with_defaults(root: Path) -> bool:
    """`make demo` already built the full specialists there (reused as is: no rebuild in the tests)."""
    params = dataclasses.asdict(SpecialistsConfig())
    try:
        return all(
            json.loads((root / part / MARKER).read_text())["params"] == params
            for part in ("tasks", "base", *SKILLS)
        )
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="session")
def specialists(tmp_path_factory, session_builds) -> tuple[Path, SpecialistsConfig | None]:
    session_builds.take("specialists")
    if _built_with_defaults(EXAMPLES_BUILD):
        return EXAMPLES_BUILD, None
    # the reduced build of test_specialists.py, at its path (a cache hit when that module ran first)
    from test_specialists import SMALL

    built = build_specialists(tmp_path_factory.getbasetemp() / "specialists-small", SMALL)
    return built.root, SMALL


@pytest.fixture(scope="session")
def served(specialists, tmp_path_factory):
    root, config = specialists
    work = tmp_path_factory.mktemp("app-work")
    demo = app_module.build_demo(specialists_dir=root, specialists_config=config, work_dir=work)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield url, work
    demo.close()


@pytest.fixture(scope="session")
def client(served) -> Client:
    return Client(served[0], verbose=False)


def _check_model_zip(path: str) -> None:
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    assert {"model.safetensors", "config.json", "README.md"} <= names, names


def _check_scores(rows: list[dict], tasks: int) -> None:
    for row in rows:
        values = [v for k, v in row.items() if k not in ("model", "role")]
        assert len(values) == tasks + 1  # tasks and the mean
        assert all(0.0 <= v <= 1.0 for v in values), row


# ---------------------------------------------------------------------- specs (no server)


def test_core_does_not_import_gradio():
    code = (
        "import sys, hf_m2n2, hf_m2n2.cli, hf_m2n2.merge, hf_m2n2.evolve.runs, hf_m2n2.demo.specialists; "
        "sys.exit('gradio' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_static_specs_parse_for_every_method(tmp_path):
    from hf_m2n2.spec import parse_spec

    seeds, base = ["org/add", "org/rev"], "org/base"
    for name, method in app_module.static_methods().items():
        spec = app_module.static_spec(
            name, seeds, None if name == "slerp" else base, weights="0.6, 0.4", density=0.7, t=0.3
        )
        parsed = parse_spec(spec, source="app")
        assert parsed.merge_method == name
        refs = [m["model"] for m in spec["models"]]
        if name == "slerp":  # base = the first seed, t global
            assert spec["base_model"] == "org/add" and refs == seeds and spec["parameters"] == {"t": 0.3}
            continue
        assert refs == seeds
        assert ("base_model" in spec) == (method.uses_base != "never")
        declared = {p.name for p in method.params if p.per_model}
        if "weight" in declared:
            assert [m["parameters"]["weight"] for m in spec["models"]] == [0.6, 0.4]
        if "density" in declared:
            assert all(m["parameters"]["density"] == 0.7 for m in spec["models"])
    spec = app_module.static_spec("linear", seeds, None, weights="1", extra="normalize: false")
    assert spec["parameters"] == {"normalize": False}
    assert [m["parameters"]["weight"] for m in spec["models"]] == [1.0, 1.0]
    with pytest.raises(gr.Error, match="weights"):
        app_module.static_spec("linear", seeds, None, weights="1, 2, 3")
    with pytest.raises(gr.Error, match="base model"):
        app_module.static_spec("ties", seeds, None)
    with pytest.raises(gr.Error, match="YAML mapping"):
        app_module.static_spec("linear", seeds, None, extra="- 1")


def test_evolve_spec_is_a_valid_model_evolution_spec():
    from hf_m2n2.evolve.spec import parse_evolve_spec as parse_model_spec

    evaluate = app_module.lm_eval_section(["gsm8k"], test_tasks=["gsm8k"], limit=20, split="train")
    spec = parse_model_spec(app_module.evolve_spec("m2n2", ["org/a", "org/b"], evaluate, budget=40, seed=3))
    assert (spec.evolve.budget, spec.evolve.seed, spec.evolve.log_every) == (40, 3, 4)
    assert spec.evolve.checkpoint_every_steps == 1 and spec.evaluate.limit == 20
    with pytest.raises(gr.Error, match="two seeds"):
        app_module.evolve_spec("sweep", ["a", "b", "c"], evaluate, budget=4)


def test_progress_frame_and_card_preview(tmp_path):
    (tmp_path / "lineage.jsonl").write_text(
        "".join(json.dumps({"id": i, "score": s}) + "\n" for i, s in enumerate([0.2, 0.5, 0.4]))
        + '{"id": 3, "sco'  # a line being written
    )
    (tmp_path / "history.jsonl").write_text(
        json.dumps({"passes": 2, "mean_train": 0.35, "test": 0.45}) + "\n"
    )
    frame = app_module.progress_frame(tmp_path)
    frame = frame.dropna()
    best = frame[frame.series == app_module.PLOT_SERIES[0]]
    assert list(best.passes) == [1, 2, 3] and list(best.score) == [0.2, 0.5, 0.5]
    assert set(frame.series) == set(app_module.PLOT_SERIES)
    assert set(app_module.progress_frame(tmp_path / "missing").series) == set(app_module.PLOT_SERIES)
    assert app_module.passes_done(tmp_path) == 3
    (tmp_path / "README.md").write_text("---\nbase_model:\n- a\n---\n# merged\n![curve](fitness.png)\ntext\n")
    preview = app_module.card_preview(tmp_path)
    assert preview.startswith("```yaml\nbase_model:\n- a\n```") and "fitness.png" not in preview
    from hf_m2n2.hub_log import mask_secrets  # the app's one masking helper

    assert mask_secrets(f"bad token {FAKE_TOKEN}!") == "bad token <token>!"


# ---------------------------------------------------------------------- served app, driven by gradio_client


def _box_visible(demo) -> bool:
    [box] = [c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "trust-remote-code"]
    return box["props"]["visible"]


def test_custom_code_needs_the_operators_flag(tmp_path):
    """Any visitor could tick "trust the seeds' custom code" and run a seed's Python on the host. Without the
    operator's `allow_remote_code` the box is hidden and a crafted /run call setting it is refused."""
    work = tmp_path / "work"
    assert _box_visible(app_module.build_demo(work_dir=work, allow_remote_code=True))
    demo = app_module.build_demo(specialists_dir=tmp_path / "never-built", work_dir=work)
    assert not _box_visible(demo)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        with pytest.raises(AppError, match="does not run the seeds' custom code"):
            Client(url, verbose=False).predict(
                source=app_module.HUB,
                hub_ids="org/a\norg/b",
                method="linear",
                trust_remote_code=True,
                api_name="/run",
            )
    finally:
        demo.close()
    assert not list(work.iterdir()) and not (tmp_path / "never-built").exists()  # refused before any work


def test_static_merge_end_to_end(client, specialists):
    status, _, table, card, download = client.predict(
        method="linear", weights="0.5, 0.5", fitness=app_module.DEMO_TASKS, api_name="/run"
    )
    assert status.startswith("**Done**")
    rows = gradio_table(table)
    assert [(r["model"], r["role"]) for r in rows] == [
        ("add", "seed"),
        ("rev", "seed"),
        ("linear-merge", "merged"),
    ]
    _check_scores(rows, tasks=2)
    assert card.startswith("```yaml\n") and "model_name: linear-merge" in card and "base_model" in card
    assert str(specialists[0]) not in card  # seeds named add/rev, not by the server's paths
    _check_model_zip(download)


def test_static_merge_of_hub_models(client, cached_repo):
    repo, old = cached_repo["repo_id"], cached_repo["old"]
    status, _, table, card, download = client.predict(
        source=app_module.HUB,
        hub_ids=f"{repo}\n{repo}@{old}",
        method="slerp",
        t=0.3,
        score_static=False,
        api_name="/run",
    )
    assert status.startswith("**Done**"), status
    assert table["data"] == []  # not scored
    assert f"base_model:\n- {repo}" in card and "base_model_relation: merge" in card
    _check_model_zip(download)
    with pytest.raises(AppError, match="not a Hub model id"):
        client.predict(source=app_module.HUB, hub_ids="/etc\nfoo/bar", method="linear", api_name="/run")


def test_m2n2_evolution_end_to_end(client, specialists):
    status, plot, table, card, download = client.predict(method="m2n2", budget=4, api_name="/run")
    assert status.startswith("**Done**"), status
    rows = gradio_table(table)
    assert [(r["model"], r["role"]) for r in rows] == [
        ("add", "seed"),
        ("rev", "seed"),
        ("m2n2-merge", "merged"),
    ]
    _check_scores(rows, tasks=2)
    points = [dict(zip(plot["columns"], row)) for row in plot["data"] if row[1] is not None]
    best = [p for p in points if p["series"] == app_module.PLOT_SERIES[0]]
    assert [p["passes"] for p in best] == [1, 2, 3, 4]
    assert all(0 <= p["score"] <= 1 for p in points)
    assert card.startswith("```yaml\n") and "m2n2" in card and "base_model" in card
    assert str(specialists[0]) not in card
    _check_model_zip(download)


def test_cancel_stops_the_run_after_its_current_step(client, served):
    job = client.submit(method="m2n2", budget=400, api_name="/run")
    deadline = time.time() + 60
    started = re.compile(r"evolving: [1-9]\d*/400")  # at least one candidate evaluated
    while time.time() < deadline and not any(started.search(str(o[0])) for o in job.outputs()):
        time.sleep(0.2)
    assert client.predict(api_name="/cancel").startswith("**Cancelled** after")
    status = job.result(timeout=60)[0]
    assert status.startswith("**Cancelled** after") and "of 400 forward passes" in status, status
    done = int(status.split("after ")[1].split(" of")[0])
    assert 0 < done < 400
    runs = sorted(served[1].glob("*/run/checkpoint.npz"), key=lambda p: p.stat().st_mtime)
    assert runs, "the cancelled run checkpointed"
    assert not (runs[-1].parent / "summary.json").exists()
    assert client.predict(api_name="/cancel") == "Nothing to cancel."


def test_push_to_the_local_hub_uses_the_token_and_never_shows_it(client, served, hub, capfd):
    token, wrong = hub.token_of("alice"), FAKE_TOKEN
    status = client.predict(method="linear", score_static=False, api_name="/run")[0]
    assert status.startswith("**Done**")

    with pytest.raises(AppError, match="paste a write token"):
        client.predict(repo_id="alice/merged", token="", private=True, api_name="/push")
    assert not [r for r in hub.requests if r.method == "POST"]  # never the server's own HF_TOKEN

    message = client.predict(repo_id="alice/merged", token=token, private=False, api_name="/push")
    assert f"{hub.url}/alice/merged" in message and token not in message
    assert "model.safetensors" in hub.files("alice/merged")

    with pytest.raises(AppError) as error:
        client.predict(repo_id="alice/merged", token=wrong, private=True, api_name="/push")
    assert "authentication failed (HTTP 401)" in str(error.value) and wrong not in str(error.value)

    captured = capfd.readouterr()
    for secret in (token, wrong):
        assert secret not in captured.out + captured.err
        for path in served[1].rglob("*"):
            if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl", ".md"):
                assert secret not in path.read_text(errors="replace"), path
        assert all(secret.encode() not in content for content in hub.files("alice/merged").values())


# ---------------------------------------------------------------------- the page in headless Chromium


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_page_renders_in_headless_chromium(served, tmp_path):
    import numpy as np
    from PIL import Image

    url = served[0]
    shot = tmp_path / "space.png"
    dom = chromium("--dump-dom", f"--screenshot={shot}", "--window-size=1280,1600", url).stdout  # one launch
    for control in CONTROLS:
        assert f'id="{control}"' in dom, control
    assert "hf-m2n2: merge and evolve" in dom and "M2N2 (evolve)" in dom

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (1600, 1280, 3)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 64, len(colours)  # text, buttons, borders: not a blank page
    background = np.all(image == image[0, 0], axis=-1).mean()
    assert background < 0.97, background
