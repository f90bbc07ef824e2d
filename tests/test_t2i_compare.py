"""bench/t2i_compare.py on a tiny random demo build: every method runs through `start_runs` at the same budget and
evaluator settings, and the table's numbers are the runs' report.json values."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_clip import ROWS, TEST_ROWS, _jsonl

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import t2i_compare as bench  # noqa: E402

TINY = {"images_per_prompt": 1, "num_inference_steps": 1, "batch_size": 2, "height": 16, "width": 16}


def build_layout(root: Path, sources: dict[str, Path]) -> Path:
    """The demo build's layout at `root`, from tiny random pipelines (`sd1`, `sd1-a`, `sd1-b`) and `judge`."""
    (root / "prompts").mkdir(parents=True)
    shutil.copytree(sources["judge"], root / "judge")
    for name, source in {"base": "sd1", "en": "sd1-a", "ja": "sd1-b"}.items():
        shutil.copytree(sources[source], root / name)
    _jsonl(root / "prompts" / "fit.jsonl", ROWS)
    _jsonl(root / "prompts" / "test.jsonl", TEST_ROWS)
    return root


def compare(build: Path, out: Path) -> Path:
    """The comparison this module checks, of `build` into `out`."""
    assert bench.main(_args(build, out)) == 0
    return out


@pytest.fixture(scope="module")
def made(request, tmp_path_factory, session_builds) -> tuple[Path, Path]:
    """(build, bench output): made by the session's child process (tests/session_builds.py) from the same tiny
    pipelines and judge as conftest's, or else here from conftest's."""
    from session_builds import COMPARE_ROOT

    root = tmp_path_factory.getbasetemp() / COMPARE_ROOT
    if session_builds.take("compare"):
        return root / "build", root / "out"
    sources = {**request.getfixturevalue("pipelines"), "judge": request.getfixturevalue("clip_judge")}
    build = build_layout(tmp_path_factory.mktemp("t2i_build") / "build", sources)
    return build, compare(build, tmp_path_factory.mktemp("t2i_compare"))


@pytest.fixture(scope="module")
def build(made) -> Path:
    return made[0]


@pytest.fixture(scope="module")
def compared(made) -> Path:
    return made[1]


def _args(build: Path, out: Path) -> list[str]:
    """Two runs of every method, 3 forward passes each, the tiny evaluator settings; no spec file."""
    settings = ["--budget", "3", "--runs", "2", "--seed", "7", "--evaluate", json.dumps(TINY), "--spec", ""]
    return [str(build), "--out", str(out), *settings]


def _runs(method: str) -> range:
    """The sweep does not depend on the run seed: it runs once."""
    return range(1 if method == "sweep" else 2)


def test_every_method_runs_at_the_same_budget_and_settings(compared, build):
    specs = {m: yaml.safe_load((compared / "specs" / f"{m}.yaml").read_text()) for m in bench.METHODS}
    evaluate = specs["m2n2"]["evaluate"]
    assert evaluate["model"] == str(build.resolve() / "judge") and evaluate["num_inference_steps"] == 1
    for method, spec in specs.items():
        assert spec["evaluate"] == evaluate and spec["evolve"]["budget"] == 3 and spec["evolve"]["seed"] == 7
        assert [m["model"] for m in spec["models"]] == [
            str(build.resolve() / "en"),
            str(build.resolve() / "ja"),
        ]
        for run in _runs(method):
            summary = json.loads((compared / "runs" / method / f"run-{run}" / "summary.json").read_text())
            assert summary["forward_passes"] == 3 and summary["seed"] == 7 + run
    assert specs["no_split_point"]["evolve"]["split_point"] is False
    assert specs["no_attraction"]["evolve"]["attraction"] is False
    assert specs["sweep"]["evolve"]["algorithm"] == "sweep" and "archive_size" not in specs["sweep"]["evolve"]
    assert specs["evomerge_ps"]["genome"] == {"kind": "method", "method": "linear", "parameters": ["weight"]}
    assert specs["m2n2"]["genome"]["kind"] == "blend"


def test_table_has_every_row_from_the_runs_reports(compared, capsys):
    summary = json.loads((compared / "t2i_compare.json").read_text())
    assert list(summary["methods"]) == list(bench.METHODS)
    for method, entry in summary["methods"].items():
        reports = [
            json.loads((compared / "runs" / method / f"run-{run}" / "report.json").read_text())[method]
            for run in _runs(method)
        ]
        rows = [[r["en"], r["ja"], (r["en"] + r["ja"]) / 2] for r in reports]
        assert [[run["scores"][c] for c in ("en", "ja", "mean")] for run in entry["runs"]] == rows
        assert list(entry["mean"].values()) == pytest.approx(np.mean(rows, axis=0).tolist(), abs=0)
        assert list(entry["min"].values()) == np.min(rows, axis=0).tolist()
        assert list(entry["max"].values()) == np.max(rows, axis=0).tolist()
    first = json.loads((compared / "runs" / "m2n2" / "run-0" / "report.json").read_text())
    assert summary["seed_models"] == {
        name: {**row, "mean": (row["en"] + row["ja"]) / 2} for name, row in first.items() if name != "m2n2"
    }
    assert summary["seed_rows_agree"]  # the seeds score the same in every method's report

    table = bench.markdown(summary)
    lines = table.splitlines()
    assert lines[0] == "| method | en | ja | mean | loop wall time |"
    # a row per method, one per run (one sweep), the two seed models
    assert len(lines) == 2 + len(bench.METHODS) + 2 * len(bench.METHODS) - 1 + 2
    assert "| SLERP sweep between the seeds | " in table  # one run: no range
    m2n2 = summary["methods"]["m2n2"]
    assert lines[2].startswith(
        f"| M2N2 (2 runs) | {m2n2['mean']['en']:.3f} ({m2n2['min']['en']:.3f}–{m2n2['max']['en']:.3f}) |"
    )
    assert lines[-2].startswith(f"| seed model `en` | {first['en']['en']:.3f} | {first['en']['ja']:.3f} |")


def test_a_second_call_reuses_the_finished_runs(compared, build, capsys):
    before = {p: p.stat().st_mtime_ns for p in compared.glob("runs/*/run-*/report.json")}
    assert bench.main(_args(build, compared)) == 0
    assert {p: p.stat().st_mtime_ns for p in compared.glob("runs/*/run-*/report.json")} == before
    assert "| M2N2 (2 runs) |" in capsys.readouterr().out


def test_a_spec_file_gives_the_settings_and_the_build_the_data(build, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec = {
        **bench.DEFAULT_SPEC,
        "evaluate": {**bench.DEFAULT_SPEC["evaluate"], "model": "elsewhere/judge", "seed": 9},
    }
    spec_file.write_text(yaml.safe_dump(spec))
    pointed = bench.with_build(bench.load_base_spec(spec_file), build)
    assert pointed["evaluate"]["model"] == str(build.resolve() / "judge") and pointed["evaluate"]["seed"] == 9
    with pytest.raises(ValueError, match="does not exist in the build"):
        bench.with_build(bench.load_base_spec(spec_file), tmp_path)
