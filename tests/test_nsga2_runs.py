"""`algorithm: nsga2` in runs: one objective per example group, a Pareto front written as pareto.json (and plotted),
every member exportable by index with its held-out scores (`hf-m2n2 export RUN OUT --front K`), for route and
method genomes; checkpoint/resume as every other algorithm."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import sigkill_evolve, write_yaml
from test_evolve_models import LIKELIHOOD_EVALUATE

from hf_m2n2.evolve.loop import load_archive
from hf_m2n2.evolve.runs import start_runs
from hf_m2n2.route_recipe import RouteRecipe

GROUPED = {
    **LIKELIHOOD_EVALUATE,
    "groups_callable": "hf_m2n2.demo.tasks.likelihood:sequence_halves",
    "kwargs": {"sequences": [[1, 10 + i, 20 + i, 30 + i, 2] for i in range(6)]},
}


def _spec(seeds, genome=None, **evolve) -> dict:
    return {
        "name": "tiny-nsga2",
        "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}],
        "genome": genome or {"kind": "route", "repeats": 2},
        "evolve": {
            "algorithm": "nsga2",
            "budget": 16,
            "seed": 3,
            "log_every": 4,
            "checkpoint_every_steps": 1,
            "nsga2": {"popsize": 4},
            **evolve,
        },
        "evaluate": GROUPED,
    }


@pytest.fixture(scope="module")
def front_run(seeds, tmp_path_factory):
    root = tmp_path_factory.mktemp("nsga2")
    start_runs(write_yaml(root / "spec.yaml", _spec(seeds)), root / "run", progress=False)
    return root / "run"


def _dominates(a, b) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def test_the_run_ends_with_a_pareto_front(front_run):
    pareto = json.loads((front_run / "pareto.json").read_text())
    assert pareto["objectives"] == ["group_0", "group_1"]
    points = [list(row["objectives"].values()) for row in pareto["front"]]
    assert len(points) >= 2
    assert not any(_dominates(p, q) for p in points for q in points if p is not q)
    assert [row["index"] for row in pareto["front"]] == list(range(len(points)))
    assert [p[0] for p in points] == sorted((p[0] for p in points), reverse=True)
    archive = load_archive(front_run)
    assert [m["lineage"]["id"] for m in archive["members"]] == [row["id"] for row in pareto["front"]]
    for member, point in zip(archive["members"], points):
        scores = np.asarray(member["scores"])
        assert point == pytest.approx([scores[:3].mean(), scores[3:].mean()], abs=0)  # group means, maximized
    assert (front_run / "pareto.png").stat().st_size > 1000
    best = max(pareto["front"], key=lambda row: (row["mean"], -row["id"]))
    assert RouteRecipe.load(front_run / "model" / "route.json").genome == list(
        np.asarray(archive["members"][best["index"]]["genome"])
    )


def test_every_front_member_exports_by_index(front_run, tmp_path, cli):
    pareto = json.loads((front_run / "pareto.json").read_text())
    k = len(pareto["front"]) - 1
    code, out, err = cli("export", front_run, tmp_path / "member", "--front", str(k))
    assert code == 0, err
    archive = load_archive(front_run)
    assert RouteRecipe.load(tmp_path / "member" / "route.json").genome == list(
        np.asarray(archive["members"][k]["genome"])
    )
    card = json.loads((tmp_path / "member" / "card.json").read_text())
    assert card["model_name"] == f"tiny-nsga2-front{k}"
    assert [row["name"] for row in card["details"]["score_rows"]][0] == f"tiny-nsga2-front{k}"
    code, _, err = cli("export", front_run, tmp_path / "member", "--front", str(k))
    assert code == 2 and "already exists" in err


def test_bad_front_exports_fail_with_one_line(front_run, tmp_path, cli, seeds):
    code, _, err = cli("export", front_run, tmp_path / "out", "--front", "99")
    assert code == 2 and "--front 99: the front of" in err and len(err.strip().splitlines()) == 1, err
    dfs = _spec(seeds, algorithm="evomerge_dfs", nsga2=None)
    del dfs["evolve"]["nsga2"]
    dfs["evolve"]["budget"] = 2
    start_runs(write_yaml(tmp_path / "dfs.yaml", dfs), tmp_path / "dfs", progress=False)
    code, _, err = cli("export", tmp_path / "dfs", tmp_path / "out", "--front", "0")
    assert code == 2 and "has no pareto.json" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_method_genomes_evolve_with_nsga2(seeds, tmp_path):
    genome = {"kind": "method", "method": "linear", "parameters": ["weight"]}
    start_runs(
        write_yaml(tmp_path / "spec.yaml", _spec(seeds, genome=genome, budget=8)),
        tmp_path / "run",
        progress=False,
    )
    text = (tmp_path / "run" / "model" / "merge_config.yaml").read_text()
    assert "evolved by hf-m2n2 nsga2 (NSGA-II over linear" in text
    first = json.loads((tmp_path / "run" / "lineage.jsonl").read_text().splitlines()[0])
    assert first["origin"] == "nsga2"


def test_nsga2_needs_two_objectives(seeds, tmp_path, cli):
    spec = _spec(seeds)
    spec["evaluate"] = LIKELIHOOD_EVALUATE
    code, _, err = cli("evolve", write_yaml(tmp_path / "spec.yaml", spec), "--out", tmp_path / "out")
    assert code == 2 and "nsga2 needs per-example group ids" in err and len(err.strip().splitlines()) == 1, (
        err
    )
    assert not (tmp_path / "out").exists()


def test_sigkill_then_resume_equals_an_uninterrupted_run(seeds, tmp_path, cli):
    slow = {**GROUPED, "kwargs": {"sequences": [[1, *range(10 + i, 40 + i), 2] for i in range(40)]}}
    path = write_yaml(tmp_path / "spec.yaml", {**_spec(seeds, budget=20), "evaluate": slow})
    killed = tmp_path / "killed"
    at_kill = sigkill_evolve(path, killed, min_passes=6, timeout=120, fresh_interpreter=False)
    assert 6 <= at_kill < 20
    assert cli("evolve", "--resume", killed, "-q")[0] == 0
    assert cli("evolve", path, "--out", tmp_path / "straight", "-q")[0] == 0
    straight = tmp_path / "straight"
    for name in (
        "history.jsonl",
        "lineage.jsonl",
        "pareto.json",
        "model/model.safetensors",
        "model/route.json",
    ):
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
