"""Fault injection for the shop server: make requests fail, vanish, stall, or the whole server go down.

Rules apply to requests of one route (its path, e.g. "/step") or of every route (`route=None`), for the next
`times` matching requests (None: until `clear()`); the first rule a request matches is used (and counted). Being
down overrides every rule. Everything is thread-safe and takes effect for the next request.

- `fail(status, times, route)`: answer `status` without running the route (500 as the real server's crash
  answer, text/plain "Internal Server Error", connection closed; any other status with its reason phrase);
- `drop(times, route)`: read the request, close the connection without an answer;
- `lose(times, route)`: run the route, then close the connection without its answer (the work is done, the answer
  lost on the way back: a client that sends the request again asks for it twice);
- `delay(seconds, times, route)`: wait, then answer normally (client time-outs);
- `down(refuse=False)` / `up()`: every request dropped; with `refuse=True` the server stops listening instead, so
  connections are refused, as for a dead process; `up()` listens again on the same port;
- `down_after(count, route="/step", refuse=False)`: answer `count` more requests of `route` normally, then go
  down (a server that dies in the middle of a run): the server is down before the last answer leaves, so the
  client's next request finds it down (refused, with `refuse=True`: a `ConnectError` for httpx).

Example:
    >>> faults = Faults()
    >>> faults.fail(503, times=2, route="/step")
    >>> [faults.before("/step").status for _ in range(3)]
    [503, 503, None]
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Rule:
    kind: str  # "status" | "drop" | "lose" | "delay"
    route: str | None
    remaining: int | None
    status: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Verdict:
    """What to do with one request: drop it, answer `status`, and/or wait `delay` seconds first; or run it and lose
    the answer."""

    drop: bool = False
    lose: bool = False
    status: int | None = None
    delay: float = 0.0


_ANSWER = Verdict()


class Faults:
    """The fault switches of one server (see the module docstring).

    Args:
        on_down: called with `refuse` when the server goes down (the server stops listening when refuse is True).
        on_up: called when it comes back up.
    """

    def __init__(
        self, on_down: Callable[[bool], None] | None = None, on_up: Callable[[], None] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._down = False
        self._trigger: tuple[str | None, int, bool] | None = None  # route, answers left, refuse
        self._on_down = on_down or (lambda refuse: None)
        self._on_up = on_up or (lambda: None)

    # ---------------------------------------------------------------- switches

    def fail(self, status: int = 500, times: int | None = 1, route: str | None = None) -> None:
        """Answer `status` to the next `times` requests of `route` (None: any route; times None: all)."""
        self._add(_Rule("status", route, times, status=status))

    def drop(self, times: int | None = 1, route: str | None = None) -> None:
        """Close the connection of the next `times` requests of `route` without answering."""
        self._add(_Rule("drop", route, times))

    def lose(self, times: int | None = 1, route: str | None = None) -> None:
        """Run the next `times` requests of `route`, then close their connections without the answers."""
        self._add(_Rule("lose", route, times))

    def delay(self, seconds: float, times: int | None = 1, route: str | None = None) -> None:
        """Wait `seconds` before answering the next `times` requests of `route`."""
        self._add(_Rule("delay", route, times, seconds=seconds))

    def down(self, refuse: bool = False) -> None:
        """Go down: drop every request (refuse=False) or stop listening (refuse=True), until `up()`."""
        with self._lock:
            self._down = True
            self._trigger = None
        self._on_down(refuse)

    def up(self) -> None:
        """Come back up (listening again if down with refuse)."""
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            self._on_up()

    def down_after(self, count: int, route: str | None = "/step", refuse: bool = False) -> None:
        """Answer `count` more requests of `route` (None: any), then go down as `down(refuse)` does."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._lock:
            self._trigger = (route, count, refuse)
        if count == 0:
            self._fire()

    def clear(self) -> None:
        """Remove every rule and trigger, and come back up."""
        with self._lock:
            self._rules.clear()
            self._trigger = None
        self.up()

    @property
    def is_down(self) -> bool:
        """Whether the server is down."""
        with self._lock:
            return self._down

    # ---------------------------------------------------------------- used by the server, per request

    def before(self, route: str) -> Verdict:
        """The verdict for a request of `route`, consuming the rule it matches."""
        with self._lock:
            if self._down:
                return Verdict(drop=True)
            for rule in self._rules:
                if rule.route is None or rule.route == route:
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._rules.remove(rule)
                    if rule.kind == "drop":
                        return Verdict(drop=True)
                    if rule.kind == "lose":
                        return Verdict(lose=True)
                    if rule.kind == "status":
                        return Verdict(status=rule.status)
                    return Verdict(delay=rule.seconds)
        return _ANSWER

    def answering(self, route: str) -> bool:
        """Count a normal answer of `route` against `down_after`, before it is sent; True when it is the last
        one: the server is then down already (so the client cannot reach it again) and the server closes this
        connection after the answer."""
        with self._lock:
            if self._trigger is None or self._trigger[0] not in (None, route):
                return False
            trigger_route, left, refuse = self._trigger
            self._trigger = (trigger_route, left - 1, refuse)
            if left - 1 > 0:
                return False
        self._fire()
        return True

    def _fire(self) -> None:
        with self._lock:
            if self._trigger is None:
                return
            refuse = self._trigger[2]
        self.down(refuse)

    def _add(self, rule: _Rule) -> None:
        if rule.remaining is not None and rule.remaining < 1:
            raise ValueError(f"times must be >= 1 or None, got {rule.remaining}")
        with self._lock:
            self._rules.append(rule)
