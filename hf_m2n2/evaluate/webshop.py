"""WebShop fitness: a live causal LM shops through AgentGym's WebShop env server, one reward per session.

`evaluate: {kind: webshop, ...}` plays each listed session (a WebShop goal: "i need a ..., price lower than ...")
as AgentGym plays it (`hf_m2n2.evaluate.webshop_dialogue`: its instruction turn, "Ok.", then observation / action
turns; Llama-2 `[INST]` template or the tokenizer's own) against a server that speaks AgentGym's protocol
(`hf_m2n2.evaluate.webshop_client`). A session's score is its final reward in [0, 1] (WebShop pays it on
`click[Buy Now]`; a session that never buys scores 0); the held-out report gives the mean reward and the success
rate (the share of sessions with reward 1) beside it.

Example spec section (a user-run AgentGym server; AgentEval's test ids held out):

```yaml
evaluate:
  kind: webshop
  server: http://127.0.0.1:36001
  sessions: ["2000-2199"]          # ids or inclusive ranges (AgentGym's WebShop training range is past the test ids)
  test_sessions: [0, 1, 2, "5-9"]
  max_rounds: 10                   # AgentGym's evaluation; AgentEvol explored with 6
  concurrency: 8                   # envs created once and reset per session; that many sessions generate together
```

Scores are continuous: M2N2's default per-example capacity for a spec with a webshop part is `max` (the best
archive member's reward), the same as `one` on pass/fail parts.

How a session ends: `done` (a purchase), `max_rounds` actions, or a conversation of `max_length` tokens (checked
before each generation, as AgentGym does). Sessions run in batches: every active session's next action is generated
in one left-padded batch on the live model, one env per concurrent slot, and a slot takes the next session as soon
as its own ends. Greedy decoding unless `gen_kwargs` says otherwise (AgentGym's evaluation is greedy).

Failures: a reply with no valid action is answered `Invalid Action.` (reward 0, the episode goes on); a server that
cannot apply an action (500 while it answers otherwise and still knows the env) ends that session with reward 0. An
env the server forgot (restarted) or a step whose answer was lost (it may have been applied: sending it again could
apply it twice) is rebuilt: reset, the session's actions sent again and their pages checked, then the step sent
again. A server that stops answering raises `InfrastructureError` after the retries: the run checkpoints and stops,
never scoring the candidate 0. Against the local test server rewards are deterministic; against AgentGym's they
need not be (it draws a range-priced product's price per env without a seed).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from hf_m2n2.errors import HfM2n2Error, InfrastructureError, SpecError, first_line
from hf_m2n2.evaluate.base import EvaluatorConfig, Report
from hf_m2n2.evaluate.webshop_client import (
    ActionRejected,
    EnvLost,
    RetryPolicy,
    ServerUnavailable,
    StepLost,
    WebshopClient,
)
from hf_m2n2.evaluate.webshop_dialogue import (
    INVALID_ACTION,
    TEMPLATES,
    WEBSHOP_PROMPT,
    Conversation,
    check_template,
    parse_action,
)

REWARD = "reward"
SUCCESS = "success_rate"
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
HF_PREFIX = "hf://"


class WebshopConfig(EvaluatorConfig):
    """The `evaluate: {kind: webshop, ...}` section.

    Attributes:
        kind: always `webshop`.
        server: the env server's base URL (AgentGym's `agentenv-webshop`, or any server of the same routes);
            `${NAME}` reads an environment variable when the run starts or resumes.
        sessions: the fitness sessions (WebShop goal ids), in score order: integers, inclusive ranges `"A-B"`, or
            session files (a .json list of ids or of AgentEval items, or `hf://datasets/ORG/NAME@REV/FILE`).
        test_sessions: the held-out sessions for the report (None: the report scores the fitness sessions).
        max_rounds: actions per session at most (AgentGym's evaluation: 10).
        max_length: tokens per conversation at most (AgentGym's generation `max_length`: 4096).
        gen_kwargs: generation settings (`max_new_tokens`, `do_sample`, `temperature`, ...); greedy by default.
        concurrency: envs created on the server, once, and sessions generated together.
        prompt: the instruction turn (default: AgentGym's WebShop ReAct prompt, verbatim).
        chat_template: `llama2` (AgentGym's `[INST]` template) or `tokenizer` (the tokenizer's chat template).
        name: the report's name for this part (`NAME` mean reward, `NAME_success` success rate).
        timeout: seconds per HTTP request.
        retries: retries of a request that failed (connection, timeout, 5xx) before the run stops.
        retry_wait: seconds before the first retry (doubling after each, at most 16).
        seed: torch seed before each candidate's sessions (matters with sampling only).

    Example:
        >>> config = WebshopConfig(kind="webshop", server="http://127.0.0.1:1", sessions=[0, "3-5"])
        >>> config.session_ids()
        [0, 3, 4, 5]
    """

    kind: Literal["webshop"]
    server: str
    sessions: list[int | str] = Field(min_length=1)
    test_sessions: list[int | str] | None = None
    max_rounds: int = Field(10, ge=1)
    max_length: int = Field(4096, ge=2)
    gen_kwargs: dict[str, Any] | None = None
    concurrency: int = Field(8, ge=1)
    prompt: str | None = None
    chat_template: str = "llama2"
    name: str = Field("webshop", min_length=1)
    timeout: float = Field(120.0, gt=0)
    retries: int = Field(5, ge=0)
    retry_wait: float = Field(1.0, ge=0)
    seed: int = 0

    @field_validator("server")
    @classmethod
    def _server(cls, value: str) -> str:
        if "$" not in value:
            check_url(value)
        return value.rstrip("/")

    def server_url(self) -> str:
        """`server` with environment variables (`${NAME}`) expanded: read when the evaluator is built, so that a
        resumed run can find a server restarted at another address (the run keeps its spec as written).

        Raises:
            ValueError: a variable is not set, or the result is not an http(s) URL.
        """
        url = os.path.expandvars(self.server)
        missing = re.findall(r"\$\{?(\w+)", url)
        if missing:
            raise ValueError(f"environment variable {missing[0]} is not set")
        return check_url(url).rstrip("/")

    @field_validator("sessions", "test_sessions")
    @classmethod
    def _sessions(cls, value: list[int | str] | None) -> list[int | str] | None:
        if value is None:
            return None
        ids = expand_sessions([v for v in value if not (isinstance(v, str) and is_session_file(v.strip()))])
        if not value:
            raise ValueError("no sessions")
        check_distinct(ids)
        return value

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value not in TEMPLATES:
            raise ValueError(f"unknown chat template {value!r} (known: {', '.join(TEMPLATES)})")
        return value

    def session_ids(self, base_dir: Any = None) -> list[int]:
        """The fitness session ids, in order (session files read, relative to `base_dir`)."""
        return expand_sessions(self.sessions, base_dir)

    def test_session_ids(self, base_dir: Any = None) -> list[int] | None:
        """The held-out session ids (None without `test_sessions`)."""
        return None if self.test_sessions is None else expand_sessions(self.test_sessions, base_dir)

    def default_capacity(self) -> str:
        return "max"

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(timeout=self.timeout, retries=self.retries, wait=self.retry_wait)


def check_url(url: str) -> str:
    """`url` when it is an http(s) URL; ValueError otherwise."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"expected an http(s) URL like http://127.0.0.1:36001, got {url!r}")
    return url


def check_distinct(ids: list[int]) -> None:
    """ValueError naming the first ids listed twice (a session scored twice would count twice in the fitness)."""
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"session ids listed twice: {', '.join(map(str, repeated[:5]))}")


def expand_sessions(items: Sequence[int | str], base_dir: Any = None) -> list[int]:
    """Session ids from integers, inclusive `"A-B"` ranges and session files, in order.

    A session file is a JSON list of ids or of AgentEval items (`{"item_id": "webshop_5238"}`), given as a path
    (relative to `base_dir`) or as `hf://datasets/ORG/NAME@REVISION/FILE` (read through huggingface_hub's cache).

    Raises:
        ValueError: a negative id, a malformed or descending range, a file that is not such a list.

    Example:
        >>> expand_sessions([3, "0-2"])
        [3, 0, 1, 2]
    """
    ids: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"session id {item!r} is not an integer")
        if isinstance(item, int):
            if item < 0:
                raise ValueError(f"session id {item} is negative")
            ids.append(item)
            continue
        text = str(item).strip()
        if is_session_file(text):
            ids.extend(_read_session_file(text, base_dir))
            continue
        if text.isdigit():
            ids.append(int(text))
            continue
        match = _RANGE.match(text)
        if match is None:
            raise ValueError(f"session {item!r} is neither an id, a range like '0-199' nor a .json file")
        first, last = int(match.group(1)), int(match.group(2))
        if last < first:
            raise ValueError(f"session range {item!r} runs backwards")
        ids.extend(range(first, last + 1))
    return ids


def is_session_file(text: str) -> bool:
    """Whether a `sessions` entry names a file of session ids (a .json path or an hf:// dataset file)."""
    return text.startswith(HF_PREFIX) or text.lower().endswith(".json")


def _read_session_file(ref: str, base_dir: Any) -> list[int]:
    path = _fetch_session_file(ref) if ref.startswith(HF_PREFIX) else Path(base_dir or ".") / ref
    try:
        items = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{ref}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ref}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{ref}: expected a non-empty JSON list of session ids or AgentEval items")
    ids = []
    for i, entry in enumerate(items):
        raw = entry.get("item_id") if isinstance(entry, dict) else entry
        if isinstance(raw, str):
            raw = raw.rsplit("_", 1)[-1]
            raw = int(raw) if raw.isdigit() else None
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ValueError(
                f"{ref}: item {i} is not a session id (an integer or an item_id like 'webshop_12')"
            )
        ids.append(raw)
    return ids


def _fetch_session_file(ref: str) -> Path:
    """`hf://datasets/ORG/NAME@REVISION/FILE` through huggingface_hub (its cache; HF_HUB_OFFLINE respected)."""
    from huggingface_hub import hf_hub_download

    match = re.match(r"^hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?/(.+)$", ref)
    if match is None:
        raise ValueError(f"{ref}: expected hf://datasets/ORG/NAME@REVISION/FILE")
    repo, revision, filename = match.groups()
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision))
    except Exception as exc:  # offline without the file cached, a missing repo or file: one line
        raise ValueError(f"{ref}: cannot download it ({type(exc).__name__}: {first_line(exc)})") from None


@dataclass
class Episode:
    """One session played: its final reward, and how it went.

    Attributes:
        session: the session id.
        reward: the final reward (the purchase's; 0 without one).
        rounds: the actions taken.
        invalid: replies answered `Invalid Action.`.
        ended: `done`, `max_rounds`, `max_length` or `server_error`.
        actions: the actions sent to the server, in order.
        pages: the first page, then the page each action led to (what replaying the actions must show again).
    """

    session: int
    conversation: Conversation
    reward: float = 0.0
    rounds: int = 0
    invalid: int = 0
    ended: str | None = None
    actions: list[str] = field(default_factory=list)
    pages: list[str] = field(default_factory=list)


class WebshopEvaluator:
    """Plays WebShop sessions with a live causal LM against an env server; one reward per session.

    Built once per run: it checks that the server answers, creates `concurrency` envs (distinct ids) and checks that
    the server has the highest session id of each split; then each call plays the sessions on the model's current
    weights.

    Args:
        config: the validated section.
        model: the resident causal LM (weights change in place between calls).
        tokenizer: its tokenizer.
        prefix: the section's YAML path, for errors.

    Raises:
        SpecError: the tokenizer has no chat template for `chat_template: tokenizer`; a session the server lacks.
        HfM2n2Error: the server does not answer, or does not speak the protocol.

    Example:
        >>> evaluator = WebshopEvaluator(config, model, tokenizer)  # doctest: +SKIP
        >>> evaluator.scores(model)  # doctest: +SKIP
        array([1.  , 0.5 , 0.  , ...])
    """

    def __init__(
        self,
        config: WebshopConfig,
        model: Any,
        tokenizer: Any,
        *,
        base_dir: Any = None,
        prefix: str = "evaluate",
    ):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self._prefix = prefix
        self._fitness = _resolved(config.sessions, base_dir, f"{prefix}.sessions")
        self._test = (
            None
            if config.test_sessions is None
            else _resolved(config.test_sessions, base_dir, f"{prefix}.test_sessions")
        )
        shared = sorted(set(self._fitness) & set(self._test or ()))
        if shared:
            raise SpecError(
                f"{prefix}.test_sessions",
                f"held-out sessions repeat fitness ones ({', '.join(map(str, shared[:5]))})",
            )
        try:
            check_template(config.chat_template, tokenizer)
        except ValueError as exc:
            raise SpecError(f"{prefix}.chat_template", str(exc)) from None
        try:
            self._settings = generation_settings(config.gen_kwargs)
        except ValueError as exc:
            raise SpecError(f"{prefix}.gen_kwargs", str(exc)) from None
        self.prompt = config.prompt if config.prompt is not None else WEBSHOP_PROMPT
        try:
            self.server = config.server_url()
        except ValueError as exc:
            raise SpecError(f"{prefix}.server", str(exc)) from None
        self.client = WebshopClient(self.server, config.retry_policy())
        self.envs = self._open_envs()
        self.last_episodes: list[Episode] = []

    # ------------------------------------------------------------------ the evaluator protocol

    def scores(self, model: Any = None) -> np.ndarray:
        """The final reward of each fitness session, in `sessions` order."""
        return self._rewards(self._fitness, model)

    def test_score(self, model: Any = None) -> float | None:
        """The mean reward of the held-out sessions (None without `test_sessions`)."""
        if self._test is None:
            return None
        return float(self._rewards(self._test, model).mean())

    def example_groups(self) -> np.ndarray:
        """One group: every session is a shopping task."""
        return np.zeros(len(self._fitness), dtype=np.int64)

    def report(self, model: Any = None) -> Report:
        """Mean reward and success rate (reward == 1) of the held-out sessions (the fitness ones without)."""
        rewards = self._rewards(self._test if self._test is not None else self._fitness, model)
        name = self.config.name
        return Report(
            {name: float(rewards.mean()), f"{name}_success": success_rate(rewards)},
            REWARD,
            metrics={name: REWARD, f"{name}_success": SUCCESS},
        )

    def describe(self) -> dict[str, Any]:
        """How it scores, for the lineage card (the card's "How it was scored" section)."""
        c = self.config
        return {
            "metric": REWARD,
            "summary": f"A WebShop session's score (`{REWARD}`) is its final reward in [0, 1] (paid on Buy Now; 0 "
            "without a purchase), the session played as AgentGym plays it against a WebShop env server; "
            f"`{c.name}_success` is the share of sessions with reward 1.",
            "generation": {
                "server": c.server,  # as written (`${NAME}` unexpanded): an expanded address may be private
                "sessions": len(self._fitness),
                "held-out sessions": len(self._test) if self._test is not None else "none (fitness sessions)",
                "chat_template": c.chat_template,
                "prompt": "AgentGym's WebShop prompt"
                if c.prompt is None
                else f"custom ({len(c.prompt)} characters)",
                "max_rounds": c.max_rounds,
                "max_length": c.max_length,
                "gen_kwargs": json.dumps(c.gen_kwargs or {}, sort_keys=True),
            },
        }

    # ------------------------------------------------------------------ sessions

    def play(self, sessions: Sequence[int], model: Any = None) -> list[Episode]:
        """Play `sessions` on the model's current weights; the episodes in `sessions` order.

        Raises:
            InfrastructureError: the server stopped answering (after the retries).
        """
        import torch

        model = self.model if model is None else model
        pending = deque(enumerate(sessions))
        slots: list[tuple[int, Episode] | None] = [None] * len(self.envs)
        done: dict[int, Episode] = {}
        with ThreadPoolExecutor(max_workers=len(self.envs)) as pool, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            while True:
                free = [i for i, s in enumerate(slots) if s is None and pending]
                starts = [(i, pending.popleft()) for i in free[: len(pending)]]
                for (slot, (order, session)), observation in zip(
                    starts, pool.map(lambda item: self._reset(item[0], item[1][1]), starts)
                ):
                    slots[slot] = (
                        order,
                        Episode(session, self._conversation(observation), pages=[observation]),
                    )
                active = [i for i, s in enumerate(slots) if s is not None]
                if not active:
                    break
                for i in active:  # AgentGym stops a conversation that reached max_length before generating
                    order, episode = slots[i]
                    if len(episode.conversation.ids) >= self.config.max_length:
                        episode.ended = "max_length"
                        done[order], slots[i] = episode, None
                active = [i for i in active if slots[i] is not None]
                if not active:
                    continue
                replies = self._generate(model, [slots[i][1].conversation.ids for i in active])
                texts = [slots[i][1].conversation.add_reply(r) for i, r in zip(active, replies)]
                results = list(
                    pool.map(lambda item: self._act(item[0], slots[item[0]][1], item[1]), zip(active, texts))
                )
                for i, result in zip(active, results):
                    order, episode = slots[i]
                    self._record(episode, *result)
                    if episode.ended is not None:
                        done[order], slots[i] = episode, None
        self.last_episodes = [done[i] for i in range(len(sessions))]
        return self.last_episodes

    def _rewards(self, sessions: Sequence[int], model: Any) -> np.ndarray:
        return np.array([e.reward for e in self.play(sessions, model)], dtype=np.float64)

    def _conversation(self, observation: str) -> Conversation:
        return Conversation(self.tokenizer, self.config.chat_template, self.prompt, observation)

    def _act(self, slot: int, episode: Episode, text: str) -> tuple[str | None, str, float, str | None]:
        """Send one reply's action: (the action, None when answered `Invalid Action.`; the next state; the reward;
        why the episode ended, None while it goes on). An env lost on the way is rebuilt (`_rebuild`) and the
        action sent again, at most `retries` times."""
        action = parse_action(text)
        waits = self.client.policy.waits()
        while True:
            try:
                if action is None:
                    return None, INVALID_ACTION + self.client.observation(self.envs[slot]), 0.0, None
                state, reward, done = self.client.step(self.envs[slot], action)
                return action, state, reward, "done" if done else None
            except ActionRejected:
                return action, "", 0.0, "server_error"
            except (StepLost, EnvLost) as exc:
                lost = exc
            while True:  # rebuild until it holds (a rebuild can be lost too), then send the action again
                wait = next(waits, None)
                if wait is None:
                    raise lost
                time.sleep(wait)
                try:
                    self._rebuild(slot, episode, forgotten=isinstance(lost, EnvLost))
                    break
                except (StepLost, EnvLost) as exc:
                    lost = exc

    def _rebuild(self, slot: int, episode: Episode, forgotten: bool) -> None:
        """Bring a slot's env back to the page the agent last saw: a new env when the server `forgot` the old one,
        reset to the session, the episode's actions sent again, each page checked against the one seen.

        Raises:
            InfrastructureError: a page differs from the one seen (the server does not replay the session).
        """
        if forgotten:
            self.envs[slot] = self.client.create_distinct(1, set(self.envs))[0]
        if self._reset(slot, episode.session) != episode.pages[0]:
            raise InfrastructureError(
                f"{self.server}/reset", f"session {episode.session} starts on another page than it did"
            )
        for number, (action, seen) in enumerate(zip(episode.actions, episode.pages[1:]), start=1):
            try:
                state, _, done = self.client.step(self.envs[slot], action)
            except ActionRejected:
                state, done = None, False
            if state != seen or done:
                raise InfrastructureError(
                    f"{self.server}/step",
                    f"session {episode.session} does not replay as played (action {number}: {action!r})",
                )

    def _record(
        self, episode: Episode, action: str | None, state: str, reward: float, ended: str | None
    ) -> None:
        episode.rounds += 1
        if action is None:
            episode.invalid += 1
        else:
            episode.actions.append(action)
            episode.pages.append(state)
        episode.reward = reward
        if ended is not None:
            episode.ended = ended
            return
        episode.conversation.add_observation(state)
        if episode.rounds >= self.config.max_rounds:
            episode.ended = "max_rounds"

    def _reset(self, slot: int, session: int) -> str:
        """Start a session on a slot's env; an env the server forgot (500 while it answers otherwise) is replaced
        once."""
        try:
            return self.client.reset(self.envs[slot], session)
        except ServerUnavailable as exc:
            if exc.status != 500 or not self.client.ping():
                raise
        self.envs[slot] = self.client.create_distinct(1, set(self.envs))[0]
        return self.client.reset(self.envs[slot], session)

    def _generate(self, model: Any, prompts: list[list[int]]) -> list[list[int]]:
        """Each prompt's continuation (up to and including EOS), one left-padded batch, each within max_length."""
        import torch
        from transformers import GenerationConfig

        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        budgets = [self.config.max_length - len(p) for p in prompts]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        settings = dict(self._settings)
        settings["max_new_tokens"] = min(settings.get("max_new_tokens") or max(budgets), max(budgets))
        config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, **settings)
        device = next(model.parameters()).device
        # AgentGym's GenerationConfig replaces the model's (transformers 4); transformers 5 would fill the settings
        # left unset from the model's own generation_config (e.g. a chat model's repetition_penalty): hide it
        own = getattr(model, "generation_config", None)
        if own is not None:
            model.generation_config = GenerationConfig()
        try:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
                )
        finally:
            if own is not None:
                model.generation_config = own
        replies = []
        for row, budget in enumerate(budgets):
            new = out[row, width:].tolist()[:budget]
            if eos in new:
                new = new[: new.index(eos) + 1]
            replies.append(new)
        return replies

    def _open_envs(self) -> list[int]:
        """Check the server, create the envs, check that it has each split's highest session."""
        c, prefix = self.config, self._prefix
        if not self.client.ping():
            raise HfM2n2Error(
                f"{prefix}.server: {c.server} does not answer (is the WebShop env server running?)"
            )
        wanted = min(c.concurrency, max(len(self._fitness), len(self._test or ())))
        try:
            envs = self.client.create_distinct(wanted)
            for field_name, ids in (("sessions", self._fitness), ("test_sessions", self._test)):
                if ids:
                    self._check_session(envs[0], max(ids), f"{prefix}.{field_name}")
        except InfrastructureError as exc:
            raise HfM2n2Error(
                f"{prefix}.server: {c.server} does not speak the WebShop protocol: {exc}"
            ) from None
        return envs

    def _check_session(self, env: int, session: int, path: str) -> None:
        try:
            self.client.reset(env, session)
        except ServerUnavailable as exc:
            if exc.status == 500 and self.client.ping():
                raise SpecError(path, f"the server has no session {session}") from None
            raise


# generation settings the evaluator owns: a reply ends at the tokenizer's EOS, within `max_length`, one per session
_OWNED_SETTINGS = {
    "eos_token_id": "'eos_token_id' is the tokenizer's (a reply ends at its EOS, as AgentGym's do)",
    "pad_token_id": "'pad_token_id' is the tokenizer's (the batch is left-padded with it)",
    "max_length": "'max_length' counts the whole conversation here: set evaluate.max_length",
    "num_return_sequences": "the evaluator takes one reply per session (num_return_sequences: 1)",
    "return_dict_in_generate": "the evaluator takes one reply per session as token ids (return_dict_in_generate)",
}


def generation_settings(gen_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """`gen_kwargs` over greedy decoding, checked now: a setting generate refuses would otherwise fail every
    candidate (each scored 0, the run going on), and one it does not know would be ignored.

    Raises:
        ValueError: an unknown setting, one the evaluator owns, or a value transformers rejects.

    Example:
        >>> generation_settings({"max_new_tokens": 128})
        {'do_sample': False, 'max_new_tokens': 128}
    """
    from transformers import GenerationConfig

    settings = {"do_sample": False, **(gen_kwargs or {})}
    known = GenerationConfig().to_dict()
    for key, value in settings.items():
        if key in _OWNED_SETTINGS and value not in (None, 1 if key == "num_return_sequences" else False):
            raise ValueError(_OWNED_SETTINGS[key])
        if key not in known:
            raise ValueError(
                f"unknown generation setting {key!r} (not a field of transformers' GenerationConfig)"
            )
    limit = settings.get("max_new_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_new_tokens must be a positive integer, got {limit!r}")
    temperature = settings.get("temperature")
    positive = not isinstance(temperature, bool) and isinstance(temperature, (int, float)) and temperature > 0
    if settings["do_sample"] and temperature is not None and not positive:
        raise ValueError(f"temperature must be a positive number when sampling, got {temperature!r}")
    try:
        GenerationConfig(**settings).validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(first_line(exc)) from None
    return settings


def _resolved(items: Sequence[int | str], base_dir: Any, path: str) -> list[int]:
    try:
        ids = expand_sessions(items, base_dir)
        check_distinct(ids)
    except ValueError as exc:
        raise SpecError(path, str(exc)) from None
    return ids


def success_rate(rewards: np.ndarray) -> float:
    """The share of sessions with reward 1 (AgentGym's expression for it fails on more than one session)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return float(np.mean(rewards == 1.0)) if rewards.size else 0.0


def build_webshop_evaluator(config: WebshopConfig, context: Any) -> WebshopEvaluator:
    """The registry's factory: the live causal LM and the reference seed's tokenizer."""
    if context.model is None:
        raise SpecError(context.prefix, "the webshop evaluator scores a causal LM (a spec with models:)")
    return WebshopEvaluator(
        config, context.model, context.tokenizer(), base_dir=context.spec_dir, prefix=context.prefix
    )


__all__ = [
    "Episode",
    "WebshopConfig",
    "WebshopEvaluator",
    "build_webshop_evaluator",
    "expand_sessions",
    "generation_settings",
    "success_rate",
]
