"""The math + agent world (`hf_m2n2.demo.math_agent`) and its demo spec, end to end: a reduced build, the CLI's
evolve against the local WebShop-protocol server (report, card and history per part), and an outage mid-run (exit 2
with a checkpoint, then `--resume` ends as the uninterrupted run does, byte for byte)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_m2n2.demo.math_agent import (
    AGENT_CHAT_TEMPLATE,
    PROMPT,
    MathAgentConfig,
    agent_tokenizer,
    build_math_agent,
    imitation_examples,
    session_ranges,
)
from hf_m2n2.demo.shop.catalogue import ShopConfig
from hf_m2n2.demo.shop.engine import Shop, ShopEnv
from hf_m2n2.demo.shop.expert import expert_actions
from hf_m2n2.demo.shop.server import serve
from hf_m2n2.demo.specialists import SpecialistsConfig
from hf_m2n2.evaluate.webshop_dialogue import Conversation

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "math_agent" / "spec.yaml"
TINY_SPECIALISTS = SpecialistsConfig(base_steps=5, finetune_steps=2, fitness_size=4, test_size=4)
REDUCED = MathAgentConfig(
    test_sessions=3, fitness_sessions=3, base_steps=6, add_steps=2, shop_steps=4, agent_tokens=400
)
UNDISTURBED_FILES = ("history.jsonl", "lineage.jsonl", "report.json", "model/model.safetensors")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_math_agent(tmp_path_factory.mktemp("math-agent"), REDUCED, specialists=TINY_SPECIALISTS)


def _spec(world, out_dir: Path, budget: int) -> Path:
    """The demo spec on the reduced world: its paths, sessions and task names, a smaller budget and batch."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["models"] = [{"model": str(world.models["add"])}, {"model": str(world.models["shop"])}]
    spec["evolve"].update(budget=budget, log_every=1)
    math, agent = spec["evaluate"]
    math["include_path"] = str(world.specialists.tasks_dir)
    agent.update(sessions=[world.fitness_sessions], test_sessions=[world.test_sessions], concurrency=3)
    agent["gen_kwargs"] = {"max_new_tokens": 12}
    agent.update(max_rounds=4, retries=2, retry_wait=0.05)
    path = out_dir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_the_demo_spec_names_the_builds_parts():
    """The spec's seeds, task include path and sessions are the ones the default build writes (the tests below run
    the spec itself on a reduced build)."""
    spec = yaml.safe_load(SPEC.read_text())
    fitness, test = session_ranges(MathAgentConfig())
    assert [m["model"] for m in spec["models"]] == ["build/add", "build/shop"]
    math, agent = spec["evaluate"]
    assert math["include_path"] == "build/specialists/tasks"
    assert (agent["sessions"], agent["test_sessions"]) == ([fitness], [test])
    assert (agent["prompt"], agent["chat_template"], agent["server"]) == (
        PROMPT,
        "tokenizer",
        "${WEBSHOP_SERVER}",
    )


def test_the_agent_template_shows_the_prompt_the_current_page_and_the_actions_so_far():
    from hf_m2n2.demo.toy import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = AGENT_CHAT_TEMPLATE
    talk = Conversation(tokenizer, "tokenizer", PROMPT, "first page")
    assert tokenizer.decode(talk.ids) == "Shop.\nfirst page\n> "
    talk.add_reply(tokenizer.encode("search[a b]", add_special_tokens=False) + [tokenizer.eos_token_id])
    talk.add_observation("second page")
    talk.add_reply(tokenizer.encode("click[B0AB]", add_special_tokens=False) + [tokenizer.eos_token_id])
    talk.add_observation("third page")
    assert tokenizer.decode(talk.ids) == "Shop.\nthird page\n> search[a b]\n> click[B0AB]\n> "


def test_the_agent_imitates_the_expert_on_training_sessions_only(world):
    """Each example is what the evaluator shows the agent before a decision, then the expert's action and EOS;
    no example comes from a fitness or test session."""
    tokenizer = agent_tokenizer(world.models["shop"])
    examples = imitation_examples(REDUCED, tokenizer)
    shop = Shop(REDUCED.shop())
    first_training = REDUCED.test_sessions + REDUCED.fitness_sessions
    held_out = {shop.catalogue.goal(s).instruction_text for s in range(first_training)}
    seen = set()
    for ids, start in examples:
        page = tokenizer.decode(ids[:start]).split("\n")[1]
        seen.add(page.split(" [SEP] ")[2])  # the instruction, on every page
        assert ids[-1] == tokenizer.eos_token_id
    assert not seen & held_out and len(seen) > 10

    env = ShopEnv(shop)
    observation, _ = env.reset(first_training)
    actions = expert_actions(shop, env.goal)
    talk = Conversation(tokenizer, "tokenizer", PROMPT, observation)
    for (ids, start), action in zip(examples, actions):
        assert ids[:start] == talk.ids
        assert tokenizer.decode(ids[start:-1]) == action
        talk.add_reply(ids[start:])
        observation, _, done, _ = env.step(action)
        if not done:
            talk.add_observation(observation)


def test_the_build_is_cached_and_writes_the_shop_settings(world, tmp_path):
    lines: list[str] = []
    again = build_math_agent(world.root, REDUCED, specialists=TINY_SPECIALISTS, log=lines.append)
    assert again == world and all(line.split(":")[1].strip().startswith("cached") for line in lines), lines
    assert ShopConfig.read(world.shop_config) == REDUCED.shop()
    built = sorted(p.name for p in (world.root / "specialists").iterdir() if not p.name.startswith("."))
    assert built == ["base", "tasks"]  # the specialists' own seeds are not needed
    for seed in world.models.values():
        assert agent_tokenizer(seed).chat_template == AGENT_CHAT_TEMPLATE
        assert (
            json.loads((seed / "tokenizer_config.json").read_text()).get("chat_template")
            or (seed / "chat_template.jinja").read_text() == AGENT_CHAT_TEMPLATE
        )
    lines.clear()
    other = MathAgentConfig(**{**REDUCED.__dict__, "shop_steps": 5})
    build_math_agent(world.root, other, specialists=TINY_SPECIALISTS, log=lines.append)
    rebuilt = [line.split(":")[0] for line in lines if "built in" in line]
    assert rebuilt == ["shop"], lines
    build_math_agent(world.root, REDUCED, specialists=TINY_SPECIALISTS)  # back, for the tests after this one


def _evolve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hf_m2n2.cli", "evolve", *args, "-q"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )  # fmt: skip


def test_the_demo_runs_through_the_cli_with_the_server_serving_while_it_runs(world, tmp_path):
    """`python -m hf_m2n2.demo.shop.server --config shop.json --run hf-m2n2 evolve ...` (the make target's
    command): report.json, the card and the history show both parts."""
    spec = _spec(world, tmp_path, budget=3)
    done = subprocess.run(
        [
            sys.executable, "-m", "hf_m2n2.demo.shop.server", "--config", str(world.shop_config), "--run",
            sys.executable, "-m", "hf_m2n2.cli", "evolve", str(spec), "--out", str(tmp_path / "run"), "-q",
        ],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("shop server at http://127.0.0.1:")
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    columns = ["specialists_add_test", "webshop", "webshop_success"]
    assert list(report) == ["add", "shop", "math-agent-m2n2"]
    assert all(list(row) == columns for row in report.values())

    # the shop seed's held-out reward is what the evaluator gives that model in-process, against the same shop
    from transformers import AutoTokenizer, LlamaForCausalLM

    from hf_m2n2.evaluate.webshop import WebshopConfig, WebshopEvaluator

    settings = yaml.safe_load(spec.read_text())["evaluate"][1]
    model = LlamaForCausalLM.from_pretrained(world.models["shop"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(world.models["shop"])
    with serve(REDUCED.shop()) as server:
        settings = {k: v for k, v in settings.items() if k != "weight"}
        evaluator = WebshopEvaluator(WebshopConfig(**{**settings, "server": server.url}), model, tokenizer)
        assert report["shop"]["webshop"] == pytest.approx(evaluator.test_score(model), abs=1e-4)

    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history and all(list(record["parts"]) == ["lm_eval", "webshop"] for record in history)
    card = (run / "model" / "README.md").read_text()
    index = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]
    assert [(r["dataset"]["name"], r["metrics"][0]["type"]) for r in index] == [
        ("specialists_add_test", "exact_match"), ("webshop", "reward"), ("webshop_success", "success_rate")
    ]  # fmt: skip
    assert [r["metrics"][0]["value"] for r in index] == [
        pytest.approx(report["math-agent-m2n2"][c], abs=1e-4) for c in columns
    ]


def test_an_outage_stops_the_run_with_a_checkpoint_and_resume_ends_as_an_undisturbed_run(world, tmp_path):
    """The server goes down after some steps: exit 2 with one line, nothing scored 0 for it; the server comes
    back (another port: the spec reads $WEBSHOP_SERVER again on resume) and `--resume` ends byte for byte as a run
    that never saw the outage."""
    spec = _spec(world, tmp_path, budget=4)
    with serve(REDUCED.shop()) as server:
        undisturbed = _evolve(
            str(spec), "--out", str(tmp_path / "undisturbed"), env={"WEBSHOP_SERVER": server.url}
        )
    assert undisturbed.returncode == 0, undisturbed.stderr
    with serve(REDUCED.shop()) as server:
        server.faults.down_after(10, "/reset", refuse=True)  # mid-run: 3 resets per candidate
        broken = _evolve(str(spec), "--out", str(tmp_path / "run"), env={"WEBSHOP_SERVER": server.url})
    assert broken.returncode == 2 and len(broken.stderr.strip().splitlines()) == 1, broken.stderr
    assert re.search(
        r"^error: http://127\.0\.0\.1:\d+/\w+: no answer after 3 attempts .*--resume", broken.stderr
    )
    assert (tmp_path / "run" / "checkpoint.npz").is_file() and not (tmp_path / "run" / "report.json").exists()
    logged = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert 0 < len(logged) < 4  # stopped mid-search, the candidates before the outage kept
    with serve(REDUCED.shop()) as server:
        resumed = _evolve("--resume", str(tmp_path / "run"), env={"WEBSHOP_SERVER": server.url})
    assert resumed.returncode == 0, resumed.stderr
    for name in UNDISTURBED_FILES:
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "undisturbed" / name).read_bytes(), name
    blends = [
        json.loads((tmp_path / d / "model" / "recipe.json").read_text())["blend"]
        for d in ("run", "undisturbed")
    ]
    assert blends[0] == blends[1]


def test_a_bad_build_parameter_is_one_line_and_builds_nothing(tmp_path, capsys):
    from hf_m2n2.demo.math_agent import main

    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "build"), "--param", "depth=3"])
    assert stopped.value.code == 2
    assert "--param 'depth=3': expected NAME=VALUE with NAME one of shop_seed" in capsys.readouterr().err
    assert not (tmp_path / "build").exists()
