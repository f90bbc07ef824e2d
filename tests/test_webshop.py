"""The WebShop evaluator against the project's WebShop-protocol server: episodes as AgentGym plays them, batched
sessions, rewards, and the two kinds of failure (an agent that emits garbage; a server that stops answering).

The agent of most tests is scripted (`ScriptedAgent`: it reads the conversation and answers the shop's expert
action), so that a reward is known in advance; one test runs a real tiny Llama through transformers' generate.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hf_m2n2.demo.shop.catalogue import ShopConfig
from hf_m2n2.demo.shop.engine import Shop, ShopEnv
from hf_m2n2.demo.shop.expert import expert_actions
from hf_m2n2.demo.shop.server import ShopServer, serve
from hf_m2n2.errors import HfM2n2Error, InfrastructureError, SpecError
from hf_m2n2.evaluate.webshop import WebshopConfig, WebshopEvaluator, success_rate
from hf_m2n2.evaluate.webshop_dialogue import INVALID_ACTION, WEBSHOP_PROMPT, parse_action

SHOP = ShopConfig(num_products=60, seed=3)
SESSIONS = list(range(7))


class ScriptedAgent(torch.nn.Module):
    """An agent that plays the shop's expert: it reads the instruction from the conversation, counts its own replies
    so far, and answers the expert's next action as a ReAct reply. `garbage` maps session instructions' indexes to
    the reply numbers answered with text that holds no action; `on_action(session, action)` is called with each
    action answered (a test's hook to inject a fault before the server receives it)."""

    def __init__(self, tokenizer, shop: Shop, garbage: dict[int, set[int]] | None = None, on_action=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.shop, self.garbage = tokenizer, shop, garbage or {}
        self.on_action = on_action or (lambda session, action: None)
        self.by_instruction = {goal.instruction_text: i for i, goal in enumerate(shop.catalogue.goals)}
        self.calls = 0

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls += 1
        eos, pad = generation_config.eos_token_id, generation_config.pad_token_id
        replies = []
        for row, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=False)
            instruction = re.search(r"Instruction: \[SEP\] (.+?) \[SEP\] Search", text).group(1)
            session = self.by_instruction[instruction]
            turn = text.count("</s>") - 1  # replies so far, past "Ok."
            plan = expert_actions(self.shop, self.shop.catalogue.goal(session))
            garbage = self.garbage.get(session, set())
            if turn in garbage:
                reply = "I am not sure what to do."
            else:
                step = turn - sum(1 for g in garbage if g < turn)
                action = plan[min(step, len(plan) - 1)]
                self.on_action(session, action)
                reply = f"Thought:\nI follow the plan.\n\nAction:\n{action}"
            replies.append(self.tokenizer.encode(reply, add_special_tokens=False) + [eos])
        width = max(len(r) for r in replies)
        new = torch.tensor([r + [pad] * (width - len(r)) for r in replies], dtype=torch.long)
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture(scope="module")
def shop_server():
    with serve(SHOP) as server:
        yield server


@pytest.fixture(scope="module")
def shop():
    return Shop(SHOP)


@pytest.fixture(scope="module")
def tokenizer():
    from hf_m2n2.demo.toy import byte_tokenizer

    return byte_tokenizer()


def expert_reward(shop: Shop, session: int) -> float:
    """The reward the expert's actions earn in-process (the engine, no HTTP)."""
    env = ShopEnv(shop)
    env.reset(session)
    reward = 0.0
    for action in expert_actions(shop, shop.catalogue.goal(session)):
        _, reward, done, _ = env.step(action)
        if done:
            break
    return reward


def make(server, tokenizer, agent, **settings) -> WebshopEvaluator:
    config = WebshopConfig(
        kind="webshop",
        server=server.url,
        sessions=settings.pop("sessions", SESSIONS),
        retry_wait=0.01,
        **{"concurrency": 3, "prompt": "Shop.", **settings},
    )
    return WebshopEvaluator(config, agent, tokenizer)


def test_the_expert_agent_earns_the_expert_reward_per_session_in_order(shop_server, shop, tokenizer):
    """Scores are the sessions' final rewards, in `sessions` order, whatever slot played them; 3 envs, 7 sessions."""
    agent = ScriptedAgent(tokenizer, shop)
    evaluator = make(shop_server, tokenizer, agent)
    scores = evaluator.scores(agent)
    expected = np.array([expert_reward(shop, s) for s in SESSIONS])
    np.testing.assert_array_equal(scores, expected)
    assert scores.mean() > 0.5 and (scores == 1.0).any()
    assert [e.session for e in evaluator.last_episodes] == SESSIONS
    assert all(e.ended == "done" for e in evaluator.last_episodes)
    # batched: each round generates for every active session at once (fewer calls than actions)
    assert agent.calls < sum(e.rounds for e in evaluator.last_episodes)
    report = evaluator.report(agent)
    assert report.scores == {
        "webshop": float(expected.mean()),
        "webshop_success": float(np.mean(expected == 1)),
    }
    assert report.metric_of("webshop") == "reward" and report.metric_of("webshop_success") == "success_rate"


def test_the_conversation_is_agentgyms(shop_server, shop, tokenizer):
    """Instruction turn, "Ok.", then observation / reply turns in the Llama-2 template; an unparsable reply is
    answered "Invalid Action." + the current page by the client, reward 0, and the episode goes on."""
    agent = ScriptedAgent(tokenizer, shop, garbage={0: {1}})
    config = WebshopConfig(
        kind="webshop", server=shop_server.url, sessions=[0], retry_wait=0.01, max_length=50_000
    )
    evaluator = WebshopEvaluator(config, agent, tokenizer)
    (episode,) = evaluator.play([0], agent)
    messages = episode.conversation.messages
    assert messages[0] == ("user", WEBSHOP_PROMPT) and messages[1] == ("assistant", "Ok.")
    assert messages[2][1].startswith("WebShop [SEP] Instruction: [SEP] ")
    assert messages[4][0] == "user" and messages[6][1].startswith(INVALID_ACTION)
    assert messages[6][1].removeprefix(INVALID_ACTION) == messages[4][1]  # the page is unchanged
    assert episode.invalid == 1 and episode.reward == expert_reward(shop, 0)
    ids = tokenizer.decode(episode.conversation.ids, skip_special_tokens=False)
    assert ids.startswith(f"<s>[INST] {WEBSHOP_PROMPT} [/INST]Ok.</s><s>[INST] WebShop [SEP]")


def test_rounds_and_length_limits_end_a_session_without_a_purchase(shop_server, shop, tokenizer):
    agent = ScriptedAgent(tokenizer, shop)
    short = make(shop_server, tokenizer, agent, sessions=[0, 1], max_rounds=2)
    assert short.scores(agent).tolist() == [0.0, 0.0]
    assert {e.ended for e in short.last_episodes} == {"max_rounds"} and {
        e.rounds for e in short.last_episodes
    } == {2}
    tight = make(shop_server, tokenizer, agent, sessions=[0], max_length=60)
    assert tight.scores(agent).tolist() == [0.0]
    assert tight.last_episodes[0].ended == "max_length" and tight.last_episodes[0].rounds == 0


def test_a_tiny_llama_that_emits_garbage_scores_low_and_batches_equal_one_at_a_time(shop_server, tokenizer):
    """A real causal LM through transformers' generate (left-padded batches): an untrained one emits no valid
    action; it is a low score, never a crash, and 4 sessions together give the very replies of one at a time."""
    from transformers import LlamaForCausalLM

    from hf_m2n2.demo.toy import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    settings = {"sessions": [0, 1, 2, 3], "max_rounds": 2, "gen_kwargs": {"max_new_tokens": 12}}
    together = make(shop_server, tokenizer, model, concurrency=4, **settings)
    alone = make(shop_server, tokenizer, model, concurrency=1, **settings)
    scores = together.scores(model)
    assert scores.tolist() == [0.0] * 4
    assert [e.conversation.messages for e in together.last_episodes] == [
        e.conversation.messages for e in alone.play([0, 1, 2, 3], model)
    ]


def test_answers_the_server_refuses_under_load_are_retried(shop_server, shop, tokenizer):
    agent = ScriptedAgent(tokenizer, shop)
    evaluator = make(shop_server, tokenizer, agent, sessions=[0, 1, 2])
    clean = evaluator.scores(agent)
    shop_server.faults.fail(503, times=3, route="/step")
    # then one /step dropped and one a gateway's time-out: the env is rebuilt and the action sent again
    shop_server.faults.drop(times=1, route="/step")
    shop_server.faults.fail(504, times=1, route="/step")
    shop_server.faults.fail(503, times=2, route="/observation")
    shop_server.faults.drop(times=1, route="/reset")
    try:
        np.testing.assert_array_equal(evaluator.scores(agent), clean)
    finally:
        shop_server.faults.clear()


def test_a_server_that_stops_answering_is_an_infrastructure_error_not_a_zero(shop_server, shop, tokenizer):
    agent = ScriptedAgent(tokenizer, shop)
    evaluator = make(shop_server, tokenizer, agent, retries=2)
    shop_server.faults.down_after(4, route="/step", refuse=True)
    try:
        with pytest.raises(InfrastructureError, match="/step|/observation|/reset"):
            evaluator.scores(agent)
    finally:
        shop_server.faults.up()
        shop_server.faults.clear()
    np.testing.assert_array_equal(evaluator.scores(agent), [expert_reward(shop, s) for s in SESSIONS])


def test_a_step_whose_answer_is_lost_is_not_sent_twice(shop_server, shop, tokenizer):
    """The server bought, but its answer never came back (a dropped connection, a time-out): sending
    `click[Buy Now]` again would click it on the done page (reward 0, the episode going on). The session's env is
    replayed to where the agent saw it instead, and the purchase earns the expert's reward."""

    def lose_the_purchase(session, action):
        if action == "click[Buy Now]":
            shop_server.faults.lose(times=1, route="/step")

    agent = ScriptedAgent(tokenizer, shop, on_action=lose_the_purchase)
    evaluator = make(shop_server, tokenizer, agent, sessions=[0, 1, 2], concurrency=1)
    try:
        scores = evaluator.scores(agent)
    finally:
        shop_server.faults.clear()
    assert scores.tolist() == [expert_reward(shop, s) for s in [0, 1, 2]]
    assert [e.actions for e in evaluator.last_episodes] == [
        expert_actions(shop, shop.catalogue.goal(s)) for s in [0, 1, 2]
    ]
    shop_server.faults.lose(times=None, route="/step")  # every answer lost: an outage, never a score
    try:
        with pytest.raises(InfrastructureError, match="may have applied it"):
            make(shop_server, tokenizer, agent, sessions=[0], retries=2).scores(agent)
    finally:
        shop_server.faults.clear()


def test_an_env_the_server_forgot_mid_session_is_rebuilt_not_scored_zero(shop, tokenizer):
    """The server restarts in the middle of a session: it answers 500 to a /step of an env it no longer knows.
    That is the server's doing, not the action's: the session goes on, on a new env replayed to where it was."""
    servers = [ShopServer(SHOP)]
    url = servers[0].start()
    port = int(url.rsplit(":", 1)[1])

    def restart(session, action):
        if session == 1 and action == "click[Buy Now]" and len(servers) == 1:
            servers[0].stop()
            servers.append(ShopServer(SHOP, port=port))
            servers[1].start()

    agent = ScriptedAgent(tokenizer, shop, on_action=restart)
    try:
        # one slot: the local server hands out the same env ids after a restart (a seeded generator), so a second
        # slot's rebuild could be given the id the first one held; the real server draws them at random
        evaluator = make(servers[0], tokenizer, agent, sessions=[0, 1, 2], concurrency=1)
        scores = evaluator.scores(agent)
    finally:
        servers[-1].stop()
    assert len(servers) == 2
    assert [e.ended for e in evaluator.last_episodes] == ["done"] * 3
    assert scores.tolist() == [expert_reward(shop, s) for s in [0, 1, 2]]


def test_an_action_the_server_cannot_apply_ends_that_session_only(shop_server, shop, tokenizer):
    """500 to one /step while the server answers otherwise: that session scores 0, the others are played."""
    agent = ScriptedAgent(tokenizer, shop)
    evaluator = make(shop_server, tokenizer, agent, sessions=[0], concurrency=1, retries=1)
    shop_server.faults.fail(500, times=2, route="/step")
    try:
        assert evaluator.scores(agent).tolist() == [0.0]
    finally:
        shop_server.faults.clear()
    assert evaluator.last_episodes[0].ended == "server_error"
    assert evaluator.scores(agent).tolist() == [expert_reward(shop, 0)]


def test_envs_a_restarted_server_forgot_are_created_again(shop, tokenizer):
    agent = ScriptedAgent(tokenizer, shop)
    first = ShopServer(SHOP)
    url = first.start()
    port = int(url.rsplit(":", 1)[1])
    try:
        evaluator = make(first, tokenizer, agent, sessions=[0, 1])
        before = list(evaluator.envs)
    finally:
        first.stop()
    second = ShopServer(SHOP, port=port)  # a restarted server: it knows none of the envs created before
    second.start()
    try:
        assert evaluator.scores(agent).tolist() == [expert_reward(shop, 0), expert_reward(shop, 1)]
        assert evaluator.envs != before
    finally:
        second.stop()


def test_bad_input_is_one_line(shop_server, shop, tokenizer):
    agent = ScriptedAgent(tokenizer, shop)
    with pytest.raises(SpecError, match=r"evaluate\.sessions: the server has no session 999"):
        make(shop_server, tokenizer, agent, sessions=[0, 999])
    with pytest.raises(HfM2n2Error, match=r"evaluate\.server: http://127\.0\.0\.1:9 does not answer"):
        WebshopEvaluator(
            WebshopConfig(kind="webshop", server="http://127.0.0.1:9", sessions=[0], retry_wait=0),
            agent,
            tokenizer,
        )
    with pytest.raises(
        SpecError, match="evaluate.chat_template: chat_template: tokenizer, but the tokenizer has no"
    ):
        make(shop_server, tokenizer, agent, chat_template="tokenizer")
    for bad, message in [
        ({"sessions": []}, "sessions"),
        ({"sessions": ["5-2"]}, "runs backwards"),
        ({"sessions": [0, "0-1"]}, "listed twice"),
        ({"sessions": [0], "test_sessions": [0]}, "repeat fitness"),
        ({"sessions": [0], "chat_template": "chatml"}, "unknown chat template"),
        ({"sessions": [0], "server": "localhost:80"}, "http"),
    ]:
        with pytest.raises(ValueError, match=message):
            config = WebshopConfig(**{"kind": "webshop", "server": shop_server.url, **bad})
            WebshopEvaluator(config, agent, tokenizer)


@pytest.mark.parametrize(
    ("gen_kwargs", "message"),
    [
        ({"max_gen_toks": 64}, "unknown generation setting 'max_gen_toks'"),
        ({"eos_token_id": 5}, "'eos_token_id' is the tokenizer's"),
        ({"max_length": 2048}, "evaluate.max_length"),
        ({"num_return_sequences": 2, "do_sample": True}, "one reply per session"),
        ({"return_dict_in_generate": True}, "one reply per session"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
    ],
)
def test_generation_settings_that_would_fail_every_candidate_are_bad_input(
    shop_server, shop, tokenizer, gen_kwargs, message
):
    """Settings generate would refuse (or misread) fail when the evaluator is built, naming `evaluate.gen_kwargs`:
    raised per candidate instead, every candidate would be a candidate failure (scored 0) and the run go on."""
    agent = ScriptedAgent(tokenizer, shop)
    with pytest.raises(SpecError, match=r"evaluate\.gen_kwargs: .*" + re.escape(message)):
        make(shop_server, tokenizer, agent, sessions=[0], gen_kwargs=gen_kwargs)


def test_sessions_files_and_environment_addresses(tmp_path, shop_server, monkeypatch, tokenizer, shop):
    """A session file in AgentEval's format (`item_id: webshop_N`) or a plain list; `${NAME}` in `server`."""
    import json

    (tmp_path / "agent_eval.json").write_text(
        json.dumps([{"item_id": "webshop_4"}, {"item_id": "webshop_2"}])
    )
    monkeypatch.setenv("SHOP_URL", shop_server.url)
    config = WebshopConfig(
        kind="webshop",
        server="${SHOP_URL}",
        sessions=["0-1"],
        test_sessions=["agent_eval.json"],
        retry_wait=0,
    )
    agent = ScriptedAgent(tokenizer, shop)
    evaluator = WebshopEvaluator(config, agent, tokenizer, base_dir=tmp_path)
    assert evaluator.test_score(agent) == pytest.approx(
        np.mean([expert_reward(shop, 4), expert_reward(shop, 2)])
    )
    monkeypatch.delenv("SHOP_URL")
    with pytest.raises(SpecError, match="evaluate.server: environment variable SHOP_URL is not set"):
        WebshopEvaluator(config, agent, tokenizer, base_dir=tmp_path)


def test_actions_are_read_as_agentgym_reads_them_and_success_is_reward_one():
    assert parse_action("Thought:\nx\n\nAction:\nclick[Buy Now]") == "click[Buy Now]"
    assert parse_action("Action: search[a]\nAction:\n click[b] ") == "click[b]"
    assert parse_action("search[red shirt]") == "search[red shirt]"
    assert parse_action("Action:\nbuy it") is None
    assert success_rate(np.array([1.0, 0.5, 1.0, 0.0])) == 0.5


def _agent_spec(seeds, server: str, **webshop) -> dict:
    return {
        "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}],
        "genome": {"kind": "blend", "block_size": 1024},
        "evolve": {"algorithm": "m2n2", "budget": 3, "seed": 0},
        "evaluate": [
            {
                "kind": "python",
                "callable": "hf_m2n2.demo.tasks.likelihood:token_likelihood",
                "kwargs": {"sequences": [[1, 40, 41, 2]]},
            },
            {
                "kind": "webshop",
                "server": server,
                "sessions": [0, 1],
                "retry_wait": 0,
                "retries": 1,
                **webshop,
            },
        ],
    }


@pytest.fixture(scope="module")
def garbage_server():
    """A server that answers every request 200 with a body that is not the protocol's (not JSON)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    ("server", "webshop", "message"),
    [
        ("http://127.0.0.1:9", {}, r"evaluate\[1\]\.server: http://127\.0\.0\.1:9 does not answer"),
        ("SHOP", {"sessions": [0, 99999]}, r"evaluate\[1\]\.sessions: the server has no session 99999"),
        ("GARBAGE", {}, r"evaluate\[1\]\.server: .* does not speak the WebShop protocol: .*not JSON"),
        (
            "SHOP",
            {"chat_template": "vicuna"},
            r"evaluate\[1\]\.chat_template: .*unknown chat template 'vicuna'",
        ),
        ("SHOP", {"sessions": []}, r"evaluate\[1\]\.sessions"),
    ],
)
def test_bad_input_through_the_cli_is_one_line_and_writes_nothing(
    tmp_path, seeds, write_spec, cli, shop_server, garbage_server, server, webshop, message
):
    url = {"SHOP": shop_server.url, "GARBAGE": garbage_server}.get(server, server)
    spec = write_spec(_agent_spec(seeds, url, **webshop))
    code, _, err = cli("evolve", spec, "--out", tmp_path / "run", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_the_models_own_generation_config_does_not_leak_in(shop_server, tokenizer):
    """As AgentGym's GenerationConfig replaces the model's: a chat model's repetition_penalty or sampling settings in
    its generation_config.json change nothing (transformers 5 would fill unset settings from it)."""
    from transformers import LlamaForCausalLM

    from hf_m2n2.demo.toy import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    settings = {"sessions": [0], "max_rounds": 1, "gen_kwargs": {"max_new_tokens": 16}}
    evaluator = make(shop_server, tokenizer, model, **settings)
    plain = [e.conversation.messages for e in evaluator.play([0], model)]
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    assert [e.conversation.messages for e in evaluator.play([0], model)] == plain
    assert model.generation_config.repetition_penalty == 5.0  # given back as it was
