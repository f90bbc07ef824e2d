"""The Space's agent fitness: the LLM evolve form's WebShop fields (spec parts, bad values, the same spec as before
when blank, non-public servers refused without the operator's flag) and an M2N2 run scored on the demo tasks and
WebShop sessions together, served on 127.0.0.1 and driven with gradio_client against the local shop server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
pytest.importorskip("lm_eval")
pytest.importorskip("rank_bm25")  # the local shop server's search (the `agent` extra)

import yaml  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from helpers import gradio_table  # noqa: E402

from hf_m2n2 import app as app_module  # noqa: E402
from hf_m2n2.demo.shop.catalogue import ShopConfig  # noqa: E402
from hf_m2n2.demo.shop.server import serve  # noqa: E402
from hf_m2n2.demo.specialists import build_specialists  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

HUB_SEEDS = {"source": app_module.HUB, "hub_ids": "org/a\norg/b", "fitness": app_module.LM_EVAL}
# the spec the form wrote for the default M2N2 run over two Hub models before the agent fitness existed
BEFORE = (
    "name: m2n2-merge\nmodels:\n- model: org/a\n- model: org/b\ngenome:\n  kind: blend\n  block_size: 65536\n"
    "  slerp_scope: global\nevolve:\n  algorithm: m2n2\n  budget: 20\n  seed: 42\n  log_every: 2\n"
    "  checkpoint_every_steps: 1\n  archive_size: 20\nevaluate:\n  kind: lm_eval\n  tasks:\n  - gsm8k\n"
    "  limit: 50\n  metric: exact_match\n  batch_size: 16\n"
)


@pytest.fixture(scope="session")
def specialists(tmp_path_factory):
    """The reduced specialists build of test_specialists.py, at its session path (a cache hit when it ran)."""
    from test_specialists import SMALL

    return build_specialists(tmp_path_factory.getbasetemp() / "specialists-small", SMALL), SMALL


@pytest.fixture(scope="module")
def shop():
    with serve(ShopConfig(num_products=24, seed=0)) as server:
        yield server


@pytest.fixture(scope="module")
def served(specialists, tmp_path_factory):
    """The app as an operator runs it locally next to a WebShop server: local servers allowed."""
    built, config = specialists
    work = tmp_path_factory.mktemp("agent-app-work")
    demo = app_module.build_demo(
        specialists_dir=built.root, specialists_config=config, work_dir=work, allow_local_models=True
    )
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False), work
    demo.close()


def _agent_fields(shop, **more) -> dict:
    return {
        "webshop_server": shop.url,
        "webshop_sessions": "0-1",
        "webshop_test_sessions": "2, 3",
        "webshop_max_rounds": 2,
        "webshop_max_new_tokens": 16,
        **more,
    }


def _newest_spec(work: Path) -> str:
    return max(work.glob("*/spec.yaml"), key=lambda p: p.stat().st_mtime).read_text()


# ---------------------------------------------------------------------- forms (no server)


def test_the_agent_fields_make_a_webshop_part_the_spec_parser_accepts():
    from hf_m2n2.evolve.spec import parse_evolve_spec

    fields = {
        "webshop_server": " http://shop.example:36001/ ",
        "webshop_sessions": "0-19, 25",
        "webshop_test_sessions": "hf://datasets/AgentGym/AgentEval@main/webshop_test.json 30-31",
        "webshop_max_rounds": 6.0,  # gr.Number's value
        "webshop_max_new_tokens": 64,
    }
    agent = app_module.agent_fitness(fields)
    assert agent == {
        "kind": "webshop",
        "server": "http://shop.example:36001/",
        "sessions": ["0-19", 25],
        "test_sessions": ["hf://datasets/AgentGym/AgentEval@main/webshop_test.json", "30-31"],
        "max_rounds": 6,
        "gen_kwargs": {"max_new_tokens": 64},
    }
    lm = app_module.lm_eval_section(["gsm8k"], limit=50)
    spec = parse_evolve_spec(app_module.evolve_spec("m2n2", ["org/a", "org/b"], [lm, agent], budget=20))
    math, shop = spec.evaluate
    assert math.kind == "lm_eval" and math.tasks == ["gsm8k"]
    assert shop.kind == "webshop" and shop.server == "http://shop.example:36001"
    assert shop.session_ids() == [*range(20), 25] and shop.max_rounds == 6
    assert shop.gen_kwargs == {"max_new_tokens": 64}
    assert spec.evolve.capacity == "max"  # continuous rewards: the best member's
    assert app_module.agent_fitness({**fields, "webshop_server": "  "}) is None
    assert app_module.agent_fitness({}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"webshop_server": "localhost:36001"}, r"evaluate\[1\]\.server: expected an http\(s\) URL"),
        ({"webshop_server": "http://x.example/${HF_TOKEN}"}, r"evaluate\[1\]\.server: environment variables"),
        ({"webshop_sessions": " "}, r"evaluate\[1\]\.sessions: give the sessions"),
        ({"webshop_sessions": "0-x"}, r"evaluate\[1\]\.sessions: expected session ids or ranges.*'0-x'"),
        ({"webshop_sessions": "5-2"}, r"evaluate\[1\]\.sessions: session range '5-2' runs backwards"),
        ({"webshop_sessions": "0, 0-1"}, r"evaluate\[1\]\.sessions: session ids listed twice: 0"),
        ({"webshop_test_sessions": "ids.json"}, r"evaluate\[1\]\.test_sessions: expected session ids"),
        ({"webshop_max_rounds": 0}, r"evaluate\[1\]\.max_rounds: "),
        ({"webshop_max_rounds": 2.5}, r"evaluate\[1\]\.max_rounds: expected a whole number"),
        ({"webshop_max_new_tokens": 0}, r"evaluate\[1\]\.gen_kwargs\.max_new_tokens: expected at least 1"),
    ],
)
def test_bad_agent_values_are_one_line_naming_the_field(change, message):
    fields = {"webshop_server": "http://shop.example:36001", "webshop_sessions": "0-19", **change}
    with pytest.raises(gr.Error, match=message) as error:
        app_module.agent_fitness(fields)
    assert "\n" not in error.value.message


# ---------------------------------------------------------------------- the served app


def test_blank_agent_fields_write_the_spec_of_before_and_filled_ones_add_the_part(served, shop):
    """Through /run (the Hub seeds are not cached: the run stops at once, after writing its spec)."""
    client, work = served
    with pytest.raises(AppError, match="org/a: not found locally"):
        client.predict(method="m2n2", **HUB_SEEDS, api_name="/run")
    assert _newest_spec(work) == BEFORE

    with pytest.raises(AppError, match="org/a: not found locally"):
        client.predict(method="m2n2", **HUB_SEEDS, **_agent_fields(shop), api_name="/run")
    spec = yaml.safe_load(_newest_spec(work))
    before = yaml.safe_load(BEFORE)
    assert spec == {**before, "evaluate": [before["evaluate"], spec["evaluate"][1]]}
    assert spec["evaluate"][1] == {
        "kind": "webshop",
        "server": shop.url,
        "sessions": ["0-1"],
        "test_sessions": [2, 3],
        "max_rounds": 2,
        "gen_kwargs": {"max_new_tokens": 16},
    }


def test_a_server_on_this_host_needs_the_operators_flag(shop, tmp_path):
    """A public Space must not send requests to its own host or network for a visitor: refused before any work."""
    work, asked = tmp_path / "work", len(shop.requests)
    demo = app_module.build_demo(specialists_dir=tmp_path / "never-built", work_dir=work)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        with pytest.raises(AppError, match=r"evaluate\[1\]\.server: 127\.0\.0\.1 is this host or a private"):
            Client(url, verbose=False).predict(method="m2n2", **_agent_fields(shop), api_name="/run")
    finally:
        demo.close()
    assert not list(work.iterdir()) and not (tmp_path / "never-built").exists()
    assert len(shop.requests) == asked  # never contacted


def test_m2n2_on_the_demo_tasks_and_webshop_end_to_end(served, shop, specialists):
    client, work = served
    built, _ = specialists
    status, plot, table, card, _ = client.predict(
        method="m2n2", budget=4, **_agent_fields(shop), api_name="/run"
    )
    assert status.startswith("**Done**"), status
    rows = gradio_table(table)
    columns = [*built.test_tasks, "webshop", "webshop_success"]
    assert table["headers"] == ["model", "role", *columns, "mean"]
    assert [(r["model"], r["role"]) for r in rows] == [
        ("add", "seed"),
        ("rev", "seed"),
        ("m2n2-merge", "merged"),
    ]
    [run_dir] = [p.parent for p in work.glob("*/run/report.json")]
    report = json.loads((run_dir / "report.json").read_text())
    for row in rows:
        scores = report[row["model"]]
        assert list(scores) == columns
        assert [row[c] for c in columns] == [round(scores[c], 4) for c in columns]
        assert row["mean"] == round(sum(scores.values()) / len(scores), 4)
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert scores["webshop_success"] in (0.0, 0.5, 1.0)  # two held-out sessions
        assert scores["webshop_success"] <= scores["webshop"]  # a success is a reward of 1
    points = [dict(zip(plot["columns"], r)) for r in plot["data"] if r[1] is not None]
    assert [p["passes"] for p in points if p["series"] == app_module.PLOT_SERIES[0]] == [1, 2, 3, 4]
    # the candidates shopped on the visitor's server: envs created, sessions reset, and each reply answered (the
    # tiny specialists write no valid action: "Invalid Action." and the page again, read from /observation)
    routes = {(method, path.split("?")[0]) for method, path in shop.requests}
    assert {("POST", "/create"), ("POST", "/reset"), ("GET", "/observation")} <= routes
    assert "webshop" in card
