"""The synthetic WebShop server against AgentGym's protocol, over real HTTP with httpx (as a client uses it).

Expected error bodies are what the real server's stack (fastapi 0.103.2, pydantic 1.10, uvicorn) answered to the
same requests, recorded once from a FastAPI app with the real server's routes and models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import httpx
import pytest

from hf_m2n2.demo.shop.catalogue import Goal, Product, ShopConfig, build_catalogue
from hf_m2n2.demo.shop.engine import Shop, ShopEnv, parse_action
from hf_m2n2.demo.shop.expert import expert_actions
from hf_m2n2.demo.shop.reward import attribute_matches, get_reward, option_matches, type_reward
from hf_m2n2.demo.shop.server import MAX_ENV_ID, ShopServer, serve
from hf_m2n2.errors import SpecError

SEP = " [SEP] "


@pytest.fixture(scope="session")
def server():
    with serve(ShopConfig(seed=0)) as running:
        yield running


@pytest.fixture
def shop(server):
    """The session's server, its faults cleared after each test."""
    yield server
    server.faults.clear()


@pytest.fixture
def client(shop):
    with httpx.Client(base_url=shop.url, timeout=10) as http:
        yield http


def _env(client: httpx.Client, session_id: int) -> int:
    env_id = client.post("/create").json()
    assert client.post("/reset", json={"env_idx": env_id, "session_id": session_id}).status_code == 200
    return env_id


def _step(client: httpx.Client, env_id: int, action: str) -> dict:
    answer = client.post("/step", json={"env_idx": env_id, "action": action})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _get(client: httpx.Client, route: str, env_id: int):
    answer = client.get(route, params={"env_idx": env_id})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _results_text(instruction: str, products: list[Product], page: int, total: int) -> str:
    texts = ["Instruction:", instruction, "Back to Search", f"Page {page} (Total results: {total})"]
    texts += (["< Prev"] if page > 1 else []) + ["Next >"]
    for product in products:
        texts += [product.asin, product.title, f"${product.price}"]
    return SEP.join(texts)


# ---------------------------------------------------------------- routes and shapes


def test_routes_answer_the_protocols_json_shapes(client, shop):
    assert client.get("/").json() == "ok"
    env_id = client.post("/create").json()
    assert isinstance(env_id, int) and 0 <= env_id <= MAX_ENV_ID
    assert env_id in client.get("/list_envs").json()

    goal = shop.catalogue.goal(5)
    reset = client.post("/reset", json={"env_idx": env_id, "session_id": 5})
    assert reset.headers["content-type"] == "application/json"
    assert reset.json() == [f"WebShop{SEP}Instruction:{SEP}{goal.instruction_text}{SEP}Search", None]
    assert _get(client, "/observation", env_id) == reset.json()[0]
    assert _get(client, "/available_actions", env_id) == {"has_search_bar": True, "clickables": ["search"]}
    assert _get(client, "/instruction_text", env_id) == f"Instruction: {goal.instruction_text}"
    state = _get(client, "/state", env_id)
    assert set(state) == {"url", "html", "instruction_text"}
    assert state["url"] == "http://127.0.0.1:3000/5" and "search_input" in state["html"]

    step = _step(client, env_id, "search[tea]")
    assert set(step) == {"state", "reward", "done", "info"}
    assert step["reward"] == 0.0 and isinstance(step["reward"], float) and step["done"] is False
    assert step["info"] is None
    assert step["state"] == _get(client, "/observation", env_id)
    assert (
        _get(client, "/instruction_text", env_id) == f"Instruction:{goal.instruction_text}"
    )  # as WebShop reads it
    assert _get(client, "/state", env_id)["instruction_text"] == f"Instruction: {goal.instruction_text}"

    assert client.post("/close", json={"env_idx": env_id}).status_code == 404  # the real server has no /close
    assert client.post("/close", json={"env_idx": env_id}).json() == {"detail": "Not Found"}
    wrong = client.get("/step")
    assert (wrong.status_code, wrong.headers["allow"], wrong.json()) == (
        405,
        "POST",
        {"detail": "Method Not Allowed"},
    )


def test_a_whole_episode_from_search_to_buy_now(client, shop):
    """A scripted episode on goal 0 through every page, each observation equal to WebShop's page text."""
    goal = shop.catalogue.goal(0)
    target = shop.catalogue.product(goal.asin)
    assert goal.goal_options and goal.attributes  # seed 0's goal 0 asks for options: the episode clicks them
    env_id = _env(client, 0)

    hits = shop.shop.search(target.title)
    rank = [p.asin for p in hits].index(target.asin)
    per_page = shop.config.results_per_page
    assert _step(client, env_id, f"search[{target.title}]")["state"] == _results_text(
        goal.instruction_text, hits[:per_page], 1, len(hits)
    )
    for page in range(2, rank // per_page + 2):
        observation = _step(client, env_id, "click[Next >]")["state"]
        assert observation == _results_text(
            goal.instruction_text, hits[(page - 1) * per_page :][:per_page], page, len(hits)
        )
    assert target.asin.lower() in _get(client, "/available_actions", env_id)["clickables"]

    item = _step(client, env_id, f"click[{target.asin}]")["state"]
    option_texts = [text for name, values in target.options.items() for text in (name, *values)]
    assert item == SEP.join(
        ["Instruction:", goal.instruction_text, "Back to Search", "< Prev", *option_texts, target.title,
         f"Price: ${target.price}", "Rating: N.A.", "Description", "Features", "Reviews", "Buy Now"]
    )  # fmt: skip
    values = [value for values in target.options.values() for value in values]
    assert _get(client, "/available_actions", env_id) == {
        "has_search_bar": False,
        "clickables": ["back to search", "< prev", "description", "features", "reviews", "buy now", *values],
    }
    for value in goal.goal_options.values():
        assert _step(client, env_id, f"click[{value}]")["state"] == item  # same page, option chosen
    assert _get(client, "/state", env_id)["url"].endswith(f"/{json.dumps(goal.goal_options)}")

    features = _step(client, env_id, "click[Features]")["state"]
    assert features == SEP.join(
        ["Instruction:", goal.instruction_text, "Back to Search", "< Prev", *target.bullet_points]
    )
    _step(client, env_id, "click[< Prev]")
    description = _step(client, env_id, "click[description]")["state"]
    assert description.endswith(f"< Prev{SEP}{target.description}")
    assert _step(client, env_id, "click[< Prev]")["state"] == item  # back on the item, options kept

    bought = _step(client, env_id, "click[Buy Now]")
    assert (bought["reward"], bought["done"]) == (1.0, True)
    options = json.dumps(dict(sorted(goal.goal_options.items())))
    assert f"asin{SEP}{target.asin}{SEP}options{SEP}{options}" in bought["state"]
    assert bought["state"].endswith(f"Your score (min 0.0, max 1.0){SEP}1.0{SEP}Reward Details{SEP}None")
    assert _get(client, "/available_actions", env_id) == {"has_search_bar": False, "clickables": []}
    crashed = client.get("/instruction_text", params={"env_idx": env_id})
    assert (crashed.status_code, crashed.text) == (500, "Internal Server Error")
    assert _get(client, "/state", env_id)["url"].startswith(f"http://127.0.0.1:3000/done/0/{target.asin}/")
    again = _step(client, env_id, "click[Buy Now]")  # nothing left to click: no second reward
    assert (again["reward"], again["done"], again["state"]) == (0.0, False, bought["state"])


def test_back_to_search_and_previous_pages(shop):
    env = ShopEnv(shop.shop)
    start, _ = env.reset(3)
    env.step("search[shirts]")
    results = env.observation
    env.step("click[next >]")
    assert env.step("click[< prev]")[0] == results
    shown = [text.upper() for text in env.available_actions()["clickables"] if text.startswith("b0")]
    product = next(shop.catalogue.product(asin) for asin in shown if shop.catalogue.product(asin).options)
    env.step(f"click[{product.asin}]")
    name, values = next(iter(product.options.items()))
    env.step(f"click[{values[-1]}]")
    assert env.chosen_options == {name: values[-1]}
    assert env.step("click[< prev]")[0] == results and env.chosen_options == {}  # the search is rerun
    assert env.step("click[back to search]")[0] == start
    assert env.available_actions()["has_search_bar"] is True


def test_invalid_actions_leave_the_page_unchanged(shop):
    env = ShopEnv(shop.shop)
    start, _ = env.reset(1)
    for action in ["click[search]", "click[back to search]", "click[B0NOTHERE0]", "search[]", "Search[tea]",
                   "buy", "", "click[]", " search[tea]"]:  # fmt: skip
        assert env.step(action) == (start, 0.0, False, None), action
    env.step("search[lamps]")
    results = env.observation
    for action in ["click[buy now]", "click[< prev]", "click[description]", "click[white]"]:
        assert env.step(action) == (results, 0.0, False, None), action
    assert parse_action("click[[x]]") == ("click[", "x]")  # WebShop's greedy split


def test_search_works_from_any_page_as_in_webshop(shop):
    env = ShopEnv(shop.shop)
    env.reset(2)
    env.step("search[mugs]")
    env.step(f"click[{shop.shop.search('mugs')[0].asin}]")
    assert not env.available_actions()["has_search_bar"]
    observation, reward, done, _ = env.step("search[tea]")
    assert "Page 1 (Total results:" in observation and (reward, done) == (0.0, False)


def test_paging_follows_the_config():
    shop = Shop(ShopConfig(num_products=40, results_per_page=4, max_results=9))
    env = ShopEnv(shop)
    env.reset(0)
    hits = shop.search("black")
    assert len(hits) == 9  # more than 9 products hold "black": the search keeps the best 9
    seen = [env.step("search[black]")[0]] + [env.step("click[next >]")[0] for _ in range(3)]
    for page, observation in enumerate(seen, start=1):
        assert observation == _results_text(env.goal.instruction_text, hits[(page - 1) * 4 :][:4], page, 9)


# ---------------------------------------------------------------- reward


def _product(**fields) -> Product:
    base = dict(
        asin="B000000001", title="Arvo waterproof nylon jacket", query="jackets", category="fashion",
        product_category="Clothing › Men › Jackets", attributes=("waterproof", "zip pockets"),
        bullet_points=("waterproof", "zip pockets"), description="Arvo jacket made of nylon.",
        options={"color": ("black", "navy"), "size": ("large", "x-large")}, price=30.0,
        title_nouns=("arvo", "nylon", "jacket"),
    )  # fmt: skip
    return Product(**{**base, **fields})


def _goal(**fields) -> Goal:
    base = dict(
        asin="B000000001", name="Arvo waterproof nylon jacket", query="jackets", category="fashion",
        product_category="Clothing › Men › Jackets", title_nouns=("arvo", "nylon", "jacket"),
        attributes=("waterproof", "zip pockets"), goal_options={"color": "navy", "size": "x-large"},
        price_upper=40.0, instruction_text="Find me waterproof jackets with zip pockets",
    )  # fmt: skip
    return Goal(**{**base, **fields})


def test_the_exact_product_with_all_options_under_the_price_earns_one(shop):
    for session_id in range(0, len(shop.catalogue.goals), 97):
        goal = shop.catalogue.goal(session_id)
        product = shop.catalogue.product(goal.asin)
        assert get_reward(product, goal, product.price, goal.goal_options).total == 1.0


def test_type_factor():
    goal = _goal()
    assert type_reward(_product(), goal).r_type == 1.0
    # another kind sharing one noun in three (1/3 > 0.2): still 1.0; no query or category match, 1/3: 1.0
    other = _product(
        query="shirts", product_category="Clothing › Women › Shirts", title_nouns=("arvo", "linen", "shirt")
    )
    assert (type_reward(other, goal).r_type, type_reward(other, goal).title_score) == (1.0, 1 / 3)
    # one noun in six (0.1 <= 1/6 <= 0.2) and no query or category match: 0.5
    wide = _goal(title_nouns=("arvo", "nylon", "jacket", "hood", "zip", "pocket"))
    assert (
        type_reward(_product(query="x", product_category="A › B › C", title_nouns=("arvo",)), wide).r_type
        == 0.5
    )
    # query match but under a tenth of the nouns shared: 0.1; none shared: 0.0
    many = _goal(title_nouns=tuple(f"n{i}" for i in range(11)))
    assert type_reward(_product(title_nouns=("n0",)), many).r_type == 0.1
    assert type_reward(_product(title_nouns=("shirt",)), goal).r_type == 0.0
    detail = type_reward(_product(product_category="Clothing › Men › Coats", query="coats"), goal)
    assert (detail.query_match, detail.category_match) == (False, True)


def test_attribute_and_option_matching():
    assert attribute_matches(_product(attributes=("essential oil",)), ["essential oils"]) == 1  # fuzzy
    mentioned = _product(attributes=(), bullet_points=(), description="made with tea tree oil")
    assert attribute_matches(mentioned, ["tea tree", "zip pockets"]) == 1  # substring of the description
    assert option_matches({"color": "navy", "size": "x-large"}, {"color": "navy", "size": "x-large"}) == 2
    assert option_matches({"color": "black"}, {"color": "navy"}) == 0
    # WebShop compares the (name, value) pair: "large" is within "size x-large", not the reverse
    assert option_matches({"size": "large"}, {"size": "x-large"}) == 1
    assert option_matches({"size": "x-large"}, {"size": "large"}) == 0
    assert option_matches({"color": "dark navy"}, {"color": "navy"}) == 0  # normalized to "dark" first


def test_reward_equals_the_formula():
    goal = _goal()  # 2 attributes, 2 options, 1 price
    assert get_reward(_product(), goal, 30.0, {"color": "navy", "size": "x-large"}).total == 1.0
    assert get_reward(_product(), goal, 45.0, {"color": "navy", "size": "x-large"}).total == 4 / 5
    assert get_reward(_product(), goal, 30.0, {"color": "black"}).total == 3 / 5
    half = _product(attributes=("waterproof",), bullet_points=(), query="coats", product_category="A › B › C",
                    title_nouns=("belko", "nylon", "coat", "hood", "zip", "pocket"))  # fmt: skip
    wide = _goal(title_nouns=("arvo", "nylon", "jacket", "hood", "zip", "wool"))  # 3/6 shared: type 1.0
    assert get_reward(half, wide, 30.0, {"color": "navy"}).total == 3 / 5
    few = _goal(
        title_nouns=("arvo", "jacket", "hood", "wool", "lining", "collar")
    )  # 1/6 shared, no query/category
    parts = get_reward(half, few, 30.0, {"color": "navy"})
    assert (parts.r_type, parts.attribute_matches, parts.option_matches, parts.price_match) == (
        0.5,
        1,
        1,
        True,
    )
    assert parts.total == 0.5 * (1 + 1 + 1) / (2 + 2 + 1)


def test_the_server_pays_the_formula_for_a_wrong_option(client, shop):
    session_id = next(
        i for i, goal in enumerate(shop.catalogue.goals)
        if "color" in goal.goal_options and len(shop.catalogue.product(goal.asin).options["color"]) > 1
    )  # fmt: skip
    goal = shop.catalogue.goal(session_id)
    target = shop.catalogue.product(goal.asin)
    wrong = next(color for color in target.options["color"] if color != goal.goal_options["color"])
    env_id = _env(client, session_id)
    hits = shop.shop.search(target.title)
    _step(client, env_id, f"search[{target.title}]")
    for _ in range([p.asin for p in hits].index(target.asin) // shop.config.results_per_page):
        _step(client, env_id, "click[next >]")
    _step(client, env_id, f"click[{target.asin}]")
    for name, value in goal.goal_options.items():
        _step(client, env_id, f"click[{wrong if name == 'color' else value}]")
    asked = len(goal.attributes) + len(goal.goal_options) + 1
    assert _step(client, env_id, "click[buy now]")["reward"] == (asked - 1) / asked


def test_the_expert_earns_full_reward(shop):
    env = ShopEnv(shop.shop)
    for session_id in range(40):
        env.reset(session_id)
        rewards = [env.step(action)[1] for action in expert_actions(shop.shop, env.goal)]
        assert rewards[-1] == 1.0 and env.page.kind == "done"


# ---------------------------------------------------------------- errors


def test_unknown_env_and_session_out_of_range_answer_500(client, shop):
    unknown = next(i for i in range(MAX_ENV_ID) if i not in client.get("/list_envs").json())
    for answer in [
        client.post("/step", json={"env_idx": unknown, "action": "search[tea]"}),
        client.post("/reset", json={"env_idx": unknown, "session_id": 0}),
        client.get("/observation", params={"env_idx": unknown}),
        client.get("/state", params={"env_idx": unknown}),
    ]:
        assert (answer.status_code, answer.text) == (500, "Internal Server Error")
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    env_id = _env(client, 4)
    before = _get(client, "/observation", env_id)
    beyond = client.post("/reset", json={"env_idx": env_id, "session_id": len(shop.catalogue.goals)})
    assert beyond.status_code == 500 and _get(client, "/observation", env_id) == before
    last = client.post("/reset", json={"env_idx": env_id, "session_id": -1}).json()[0]  # Python indexing
    assert shop.catalogue.goals[-1].instruction_text in last


@pytest.mark.parametrize(
    ("route", "request_kwargs", "detail"),
    [
        ("/step", {"json": {"action": ["x"]}}, [
            {"loc": ["body", "env_idx"], "msg": "field required", "type": "value_error.missing"},
            {"loc": ["body", "action"], "msg": "str type expected", "type": "type_error.str"}]),
        ("/step", {"json": {"env_idx": "abc", "action": None}}, [
            {"loc": ["body", "env_idx"], "msg": "value is not a valid integer", "type": "type_error.integer"},
            {"loc": ["body", "action"], "msg": "none is not an allowed value", "type": "type_error.none.not_allowed"}]),
        ("/step", {}, [{"loc": ["body"], "msg": "field required", "type": "value_error.missing"}]),
        ("/step", {"json": [1, 2]}, [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]),
        ("/step", {"content": b"{bad json", "headers": {"content-type": "application/json"}}, [
            {"type": "json_invalid", "loc": ["body", 1], "msg": "JSON decode error", "input": {},
             "ctx": {"error": "Expecting property name enclosed in double quotes"}}]),
        ("/step", {"data": {"env_idx": "1", "action": "x"}}, [
            {"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]),
        ("/reset", {"json": {"env_idx": 1, "session_id": "x"}}, [
            {"loc": ["body", "session_id"], "msg": "value is not a valid integer", "type": "type_error.integer"}]),
        ("/observation", {}, [{"loc": ["query", "env_idx"], "msg": "field required", "type": "value_error.missing"}]),
        ("/state", {"params": {"env_idx": "7.0"}}, [
            {"loc": ["query", "env_idx"], "msg": "value is not a valid integer", "type": "type_error.integer"}]),
    ],
)  # fmt: skip
def test_malformed_requests_answer_fastapis_422(client, route, request_kwargs, detail):
    method = "GET" if route in ("/observation", "/state") else "POST"
    answer = client.request(method, route, **request_kwargs)
    assert (answer.status_code, answer.headers["content-type"]) == (422, "application/json")
    assert answer.json() == {"detail": detail}


def test_values_are_coerced_as_pydantic_1_does(client):
    env_id = _env(client, 0)
    assert client.post("/step", json={"env_idx": str(env_id), "action": 5}).status_code == 200
    assert client.post("/step", json={"env_idx": env_id + 0.9, "action": "x"}).status_code == 200
    assert (
        client.post("/reset", json={"env_idx": env_id, "session_id": 2.5}).json()
        == client.post("/reset", json={"env_idx": env_id, "session_id": 2}).json()
    )


# ---------------------------------------------------------------- env ids, determinism


def test_env_ids_are_random_and_reused_round_robin_past_max_envs():
    config = ShopConfig(seed=7, num_products=24, max_envs=3)
    with serve(config) as first, httpx.Client(base_url=first.url) as http:
        ids = [http.post("/create").json() for _ in range(3)]
        assert len(set(ids)) == 3 and all(0 <= i <= MAX_ENV_ID for i in ids)
        assert max(ids) > 1000  # drawn from the whole range, not counted up from 0
        assert [http.post("/create").json() for _ in range(4)] == [ids[0], ids[1], ids[2], ids[0]]
        assert http.get("/list_envs").json() == ids
    again = ShopServer(config)
    assert [again.create() for _ in range(3)] == ids  # the same seed gives the same ids
    assert ShopServer(ShopConfig(seed=8, num_products=24)).create() not in ids


def test_the_same_seed_gives_the_same_catalogue_and_goals():
    config = ShopConfig(seed=11, num_products=60)
    first, second = build_catalogue(config), build_catalogue(config)
    assert first.to_json() == second.to_json()
    assert first.fingerprint() == second.fingerprint()
    other = build_catalogue(ShopConfig(seed=12, num_products=60))
    assert other.fingerprint() != first.fingerprint()
    assert [g.instruction_text for g in other.goals[:5]] != [g.instruction_text for g in first.goals[:5]]
    for goal in first.goals:  # every goal's target has the asked attributes and options, under the price
        product = first.product(goal.asin)
        assert set(goal.attributes) <= set(product.attributes) and product.price < goal.price_upper
        assert all(value in product.options[name] for name, value in goal.goal_options.items())
        assert goal.instruction_text.startswith("Find me ") and product.query in goal.instruction_text


def test_catalogue_shape_follows_the_config():
    catalogue = build_catalogue(ShopConfig(num_products=50, title_words=2, asin_length=6))
    assert len(catalogue.products) == 50 and len({p.asin for p in catalogue.products}) == 50
    assert all(len(p.asin) == 6 and p.asin.isupper() and p.asin.isalnum() for p in catalogue.products)
    assert all(len(p.title.split()) <= 2 for p in catalogue.products)
    assert any(not p.options for p in catalogue.products) and any(p.options for p in catalogue.products)
    assert len({p.query for p in catalogue.products}) == 12
    with pytest.raises(SpecError, match="shop.num_products"):
        ShopConfig(num_products=0)
    with pytest.raises(SpecError, match="shop.asin_length"):
        ShopConfig(num_products=5000, asin_length=4)


def test_concurrent_clients_on_different_envs(shop):
    """Episodes on several envs at once give what each gives alone."""
    sessions = list(range(6))

    def episode(env_id: int, session_id: int, http: httpx.Client) -> list:
        http.post("/reset", json={"env_idx": env_id, "session_id": session_id})
        goal = shop.catalogue.goal(session_id)
        return [_step(http, env_id, action) for action in expert_actions(shop.shop, goal)]

    with httpx.Client(base_url=shop.url, timeout=10) as http:
        env_ids = [http.post("/create").json() for _ in sessions]
        alone = [episode(e, s, http) for e, s in zip(env_ids, sessions)]
    together: dict[int, list] = {}

    def run(env_id: int, session_id: int) -> None:
        with httpx.Client(base_url=shop.url, timeout=10) as http:
            together[session_id] = episode(env_id, session_id, http)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(env_ids, sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [together[s] for s in sessions] == alone


# ---------------------------------------------------------------- faults


def test_fail_answers_a_status_n_times(client, shop):
    env_id = _env(client, 0)
    shop.faults.fail(503, times=2, route="/step")
    answers = [client.post("/step", json={"env_idx": env_id, "action": "x"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [503, 503, 200]
    assert answers[0].text == "Service Unavailable"
    assert client.get("/").status_code == 200  # another route is not affected
    shop.faults.fail(500, times=1)  # any route; the real server's crash answer
    crash = client.get("/list_envs")
    assert (crash.status_code, crash.text) == (500, "Internal Server Error")
    assert client.get("/list_envs").status_code == 200


def test_drop_delay_down_and_up(client, shop):
    shop.faults.drop(route="/observation")
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/observation", params={"env_idx": 1})
    assert client.get("/").status_code == 200

    shop.faults.delay(0.6, route="/")
    with pytest.raises(httpx.ReadTimeout):
        client.get("/", timeout=0.2)

    shop.faults.down()
    for route in ("/", "/list_envs"):
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(route)
    shop.faults.up()
    assert client.get("/").json() == "ok"

    shop.faults.down(refuse=True)
    with pytest.raises(httpx.ConnectError):
        httpx.get(shop.url + "/")
    shop.faults.up()
    assert httpx.get(shop.url + "/").json() == "ok"


def test_lose_runs_the_route_and_drops_its_answer(client, shop):
    """The work is done, the answer never comes: a client that asks again asks for it twice."""
    env_id = _env(client, 0)
    start = _get(client, "/observation", env_id)
    shop.faults.lose(route="/step")
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/step", json={"env_idx": env_id, "action": "search[tea]"})
    page = _get(client, "/observation", env_id)
    assert page != start and f"{SEP}Back to Search{SEP}" in page  # the search ran
    assert _step(client, env_id, "search[tea]")["state"] == page  # the next one is answered


def test_down_after_k_steps_stops_a_run_in_another_process(shop):
    """A client in a subprocess takes 3 steps, then finds the server down (refused) in the middle of its run."""
    client_code = textwrap.dedent(
        f"""
        import httpx, sys
        url = {shop.url!r}
        env_id = httpx.post(url + "/create").json()
        httpx.post(url + "/reset", json={{"env_idx": env_id, "session_id": 0}})
        for step in range(10):
            try:
                httpx.post(url + "/step", json={{"env_idx": env_id, "action": "search[tea]"}}, timeout=5)
            except httpx.TransportError as exc:
                print(step, type(exc).__name__)
                sys.exit(0)
        print("never down")
        """
    )
    shop.faults.down_after(3, route="/step", refuse=True)
    result = subprocess.run([sys.executable, "-c", client_code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["3", "ConnectError"], result.stderr
    assert shop.faults.is_down
    shop.faults.up()
    assert httpx.get(shop.url + "/").json() == "ok"


# ---------------------------------------------------------------- command line


def test_command_line_prints_the_url_and_serves_until_terminated():
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_m2n2.demo.shop.server", "--port", "0", "--seed", "3", "--products", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        env_id = httpx.post(url + "/create").json()
        observation = httpx.post(url + "/reset", json={"env_idx": env_id, "session_id": 0}).json()[0]
        expected = build_catalogue(ShopConfig(seed=3, num_products=30)).goal(0).instruction_text
        assert observation == f"WebShop{SEP}Instruction:{SEP}{expected}{SEP}Search"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "hf_m2n2.demo.shop.server", "--products", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: shop.num_products: must be at least 1, got 0"
    ]


def test_a_config_file_and_a_command_run_while_serving(tmp_path):
    """`--config shop.json --run CMD`: CMD finds the server in $WEBSHOP_SERVER, the exit code is CMD's, and the
    server is gone once CMD ends; flags override the file's settings."""
    config = ShopConfig(seed=5, num_products=40, results_per_page=2)
    assert ShopConfig.from_json(config.to_json()) == config
    settings = tmp_path / "shop.json"
    settings.write_text(config.to_json())
    client = textwrap.dedent(
        """
        import os, sys, httpx
        url = os.environ["WEBSHOP_SERVER"]
        env_id = httpx.post(url + "/create").json()
        print(url)
        print(httpx.post(url + "/reset", json={"env_idx": env_id, "session_id": 1}).json()[0])
        sys.exit(3)
        """
    )
    command = [sys.executable, "-m", "hf_m2n2.demo.shop.server", "--config", str(settings)]
    done = subprocess.run(
        [*command, "--products", "50", "--run", sys.executable, "-c", client],
        capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    lines = done.stdout.strip().splitlines()
    url, observation = lines[-2:]
    assert lines[0] == f"shop server at {url} ($WEBSHOP_SERVER) while running: {sys.executable} -c "
    expected = (
        build_catalogue(ShopConfig(seed=5, num_products=50, results_per_page=2)).goal(1).instruction_text
    )
    assert observation == f"WebShop{SEP}Instruction:{SEP}{expected}{SEP}Search"
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + "/create", timeout=5)

    settings.write_text('{"num_products": 10, "colour": 3}')
    bad = subprocess.run([*command, "--run", "true"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {settings}: unknown shop setting 'colour' (known: asin_length, goal_attributes, max_envs,"
        " max_results, num_products, results_per_page, seed, title_words)"
    ]
    settings.write_text('{"num_products": 0}')
    bad = subprocess.run([*command, "--run", "true"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {settings}: num_products: must be at least 1, got 0"
    ]
    missing = subprocess.run([*command, "--run"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--run needs a command" in missing.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON (Expecting property name enclosed in double quotes, line 1)"),
        ("[1, 2]", "expected a JSON object of shop settings"),
        ('{"seed": 1.5}', "seed: must be an integer, got 1.5"),
    ],
)
def test_a_shop_config_file_that_is_not_a_config_is_one_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "shop.json"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        ShopConfig.read(path)
    assert str(caught.value) == f"{path}: {message}"
    with pytest.raises(SpecError, match="cannot read it"):
        ShopConfig.read(tmp_path / "missing.json")
