"""A client of AgentGym's WebShop env-server HTTP protocol (`agentenv-webshop`), robust to the server's known traits.

Routes: `POST /create` -> env id; `POST /reset {env_idx, session_id}` -> `[observation, null]`; `POST /step {env_idx,
action}` -> `{state, reward, done, info}`; `GET /observation`, `/available_actions`, `/instruction_text` with
`?env_idx=`. What the real server does that a client must live with (read in its source):
- no `/close` route (AgentGym's own client calls one and fails): envs are never closed, only reused;
- env ids are random and, past 8000 envs, handed out again round-robin: a new id that equals one this client holds is
  refused and another created (two slots sharing one env would corrupt both episodes);
- every `/create` loads a whole shop (about a GB): create one env per concurrent slot, once, and `/reset` it;
- it answers 503 under load, to GETs as well as POSTs: every request is retried, with a growing wait;
- a request it cannot serve for a reason of its own (an env id it forgot after a restart) answers 500.

`/step` is the one request that changes an env: it is sent again only where the server cannot have applied it
(refused, 503). A `/step` whose answer never came (a time-out, a dropped connection, a gateway's 502/504) may have
been applied: sending it again could apply it twice (a second `click[Buy Now]` lands on the done page and earns 0),
so it raises `StepLost` and the caller rebuilds the env's page instead (reset, then the episode's actions again).

What cannot be retried away is an `InfrastructureError` (the run checkpoints and stops; `--resume` continues), never
a score. A 500 on `/step` while the server otherwise answers and still knows the env is the action's doing (a
candidate failure), told apart by `ActionRejected`; one for an env the server no longer knows is `EnvLost`.
"""

# Hand-written over httpx: the PyPI `agentenv` is an empty placeholder and AgentGym's client pulls deepspeed/trl/wandb.

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from hf_m2n2.errors import InfrastructureError

RETRY_STATUSES = frozenset({500, 502, 503, 504})
# answers to a request that may have been applied all the same (a gateway that lost the server's answer)
_UNSURE_STATUSES = frozenset({502, 504})
# transport errors raised before the request left: the server cannot have applied it
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_CREATE_ATTEMPTS = (
    16  # distinct ids wanted before concluding the server hands out only ones this client holds
)


class ActionRejected(RuntimeError):
    """The server answered 500 to a `/step` although it answers otherwise: the action broke the env's page."""


class ServerUnavailable(InfrastructureError):
    """The server gave no valid answer to a request after every retry.

    Attributes:
        status: the last HTTP status it answered (None: no answer at all).
    """

    def __init__(self, service: str, message: str, status: int | None = None):
        super().__init__(service, message)
        self.status = status


class StepLost(ServerUnavailable):
    """A `/step` got no answer although the server may have applied it: it is not sent again as such.

    The caller rebuilds the env's page (reset and the episode's actions again) and then sends it; left unhandled,
    the run stops as for any outage.
    """


class EnvLost(ServerUnavailable):
    """The server answers, but not for this env any more (500 to its `/observation`: restarted, or it dropped it).

    Attributes:
        env: the env id it forgot.
    """

    def __init__(self, service: str, message: str, env: int):
        super().__init__(service, message, 500)
        self.env = env


class ServerReplyError(InfrastructureError):
    """The server answered something that is not the protocol's reply (not JSON, a wrong shape)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to insist before calling the server down.

    Attributes:
        timeout: seconds per request (the real server can take seconds per search under load).
        retries: attempts after the first one.
        wait: seconds before the first retry; doubled after each, at most `max_wait`.
        max_wait: the longest single wait.
    """

    timeout: float = 120.0
    retries: int = 5
    wait: float = 1.0
    max_wait: float = 16.0

    def waits(self):
        """The waits between attempts, in order."""
        wait = self.wait
        for _ in range(self.retries):
            yield wait
            wait = min(wait * 2, self.max_wait)


class WebshopClient:
    """The protocol's requests, each retried on connection errors, timeouts and 5xx answers.

    Args:
        server: the server's base URL, e.g. `http://127.0.0.1:36001`.
        policy: timeouts and retries.

    Raises (from every request):
        InfrastructureError: the server did not give a valid answer after every retry.

    Example:
        >>> client = WebshopClient("http://127.0.0.1:36001")  # doctest: +SKIP
        >>> env = client.create()  # doctest: +SKIP
        >>> client.reset(env, 0)  # doctest: +SKIP
        'WebShop [SEP] Instruction: [SEP] i need ... [SEP] Search'
    """

    def __init__(self, server: str, policy: RetryPolicy | None = None):
        self.server = server.rstrip("/")
        self.policy = policy or RetryPolicy()
        self._http = httpx.Client(base_url=self.server, timeout=self.policy.timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ the routes

    def ping(self) -> bool:
        """Whether `GET /` answers at all (one attempt, no retry): tells a dead server from a rejected action."""
        try:
            return self._http.get("/", timeout=min(self.policy.timeout, 10.0)).status_code == 200
        except httpx.HTTPError:
            return False

    def knows(self, env: int) -> bool:
        """Whether the server shows env `env`'s page (`GET /observation`, one attempt): False for an env it forgot."""
        try:
            return self._http.get("/observation", params={"env_idx": env}).status_code == 200
        except httpx.HTTPError:
            return False

    def create(self) -> int:
        """A new env id (`POST /create`)."""
        return _as_int(self._request("POST", "/create"), "/create")

    def create_distinct(self, count: int, held: set[int] | None = None) -> list[int]:
        """`count` env ids, none equal to another or to one in `held` (ids are random and reused past 8000 envs).

        Raises:
            InfrastructureError: the server keeps handing out ids already held.
        """
        taken = set(held or ())
        ids: list[int] = []
        misses = 0
        while len(ids) < count:
            env = self.create()
            if env in taken:
                misses += 1
                if misses >= _CREATE_ATTEMPTS:
                    raise InfrastructureError(
                        f"{self.server}/create",
                        f"the server handed out env ids already in use {misses} times (its env table is full)",
                    )
                continue
            taken.add(env)
            ids.append(env)
        return ids

    def reset(self, env: int, session: int) -> str:
        """Start `session` on env `env`; returns the first observation (`GET /observation`, as AgentGym reads it)."""
        reply = self._request("POST", "/reset", json={"env_idx": env, "session_id": session})
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], str):
            raise ServerReplyError(
                f"{self.server}/reset", f"expected [observation, null], got {_short(reply)}"
            )
        return self.observation(env)

    def step(self, env: int, action: str) -> tuple[str, float, bool]:
        """One action; returns (state, reward, done).

        Raises:
            ActionRejected: the server answered 500 to this action after every retry, but answers `GET /` and still
                knows the env.
            EnvLost: the same, for an env the server no longer knows.
            StepLost: no answer came, and the server may have applied the action.
        """
        try:
            reply = self._request("POST", "/step", json={"env_idx": env, "action": action}, idempotent=False)
        except StepLost:
            raise
        except ServerUnavailable as exc:
            if exc.status == 500 and self.ping():
                if not self.knows(env):
                    raise EnvLost(
                        f"{self.server}/step", f"the server no longer knows env {env}", env
                    ) from exc
                raise ActionRejected(f"the server could not apply {action!r}") from exc
            raise
        if not isinstance(reply, dict) or not {"state", "reward", "done"} <= reply.keys():
            raise ServerReplyError(
                f"{self.server}/step", f"expected {{state, reward, done}}, got {_short(reply)}"
            )
        state, reward, done = reply["state"], reply["reward"], reply["done"]
        if not isinstance(state, str) or not isinstance(reward, (int, float)) or not isinstance(done, bool):
            raise ServerReplyError(f"{self.server}/step", f"malformed reply {_short(reply)}")
        return state, float(reward), done

    def observation(self, env: int) -> str:
        """The env's current page as text (`GET /observation`).

        Raises:
            EnvLost: the server answers `GET /` but 500 to this env's page after every retry.
        """
        try:
            reply = self._request("GET", "/observation", params={"env_idx": env})
        except ServerUnavailable as exc:
            if exc.status == 500 and self.ping():
                raise EnvLost(
                    f"{self.server}/observation", f"the server no longer knows env {env}", env
                ) from exc
            raise
        if not isinstance(reply, str):
            raise ServerReplyError(f"{self.server}/observation", f"expected a string, got {_short(reply)}")
        return reply

    def available_actions(self, env: int) -> dict[str, Any]:
        """`{"has_search_bar": bool, "clickables": [...]}` of the env's current page."""
        reply = self._request("GET", "/available_actions", params={"env_idx": env})
        if not isinstance(reply, dict) or "clickables" not in reply:
            raise ServerReplyError(f"{self.server}/available_actions", f"malformed reply {_short(reply)}")
        return reply

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any) -> Any:
        """The JSON of a 200 answer, retrying what the server may recover from; InfrastructureError otherwise.

        A request that is not `idempotent` is sent again only where the server cannot have applied it; StepLost
        where it may have.
        """
        url = f"{self.server}{path}"
        waits = self.policy.waits()
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:  # refused, reset, timed out, protocol garbage
                problem, status = f"{type(exc).__name__}: {exc}".strip().rstrip(":"), None
                if not idempotent and not isinstance(exc, _NOT_SENT):
                    raise StepLost(url, f"no answer ({problem}); the server may have applied it") from None
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise ServerReplyError(url, f"not JSON: {_short(response.text)}") from None
                problem, status = (
                    f"HTTP {response.status_code}: {_short(response.text)}",
                    response.status_code,
                )
                if status not in RETRY_STATUSES:
                    raise ServerUnavailable(url, problem, status)
                if not idempotent and status in _UNSURE_STATUSES:
                    raise StepLost(url, f"{problem}; the server may have applied it", status)
            wait = next(waits, None)
            if wait is None:
                raise ServerUnavailable(
                    url, f"no answer after {self.policy.retries + 1} attempts ({problem})", status
                )
            time.sleep(wait)


def _as_int(value: Any, route: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServerReplyError(route, f"expected an env id (an integer), got {_short(value)}")
    return value


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
