"""A local server speaking AgentGym's WebShop environment protocol (`agentenv-webshop`) over the synthetic shop.

Routes and answers as the real FastAPI server gives them (fastapi 0.103 on pydantic 1, served by uvicorn):

| route | request | answer (JSON) |
| --- | --- | --- |
| `GET /` | | `"ok"` |
| `GET /list_envs` | | `[env ids]`, in creation order |
| `POST /create` | no body | an env id, random in [0, 48950076]; past `max_envs` envs, existing ids round-robin |
| `POST /reset` | `{"env_idx": int, "session_id": int or null}` | `[observation, null]` |
| `POST /step` | `{"env_idx": int, "action": str}` | `{"state": str, "reward": float, "done": bool, "info": null}` |
| `GET /observation?env_idx=` | | the observation (a JSON string) |
| `GET /available_actions?env_idx=` | | `{"has_search_bar": bool, "clickables": [str]}` |
| `GET /instruction_text?env_idx=` | | `"Instruction: ..."` (500 on the done page) |
| `GET /state?env_idx=` | | `{"url": str, "html": str, "instruction_text": str}` |

Errors as FastAPI and uvicorn give them: an unknown env id, a session id out of range, /instruction_text on the
done page: 500, text/plain "Internal Server Error", and the connection closed afterwards (uvicorn closes it after
an exception; here the answer also says `Connection: close`, which uvicorn's does not); a malformed request: 422 with pydantic 1's `{"detail": [{"loc", "msg", "type"}]}` (bad JSON:
FastAPI's `json_invalid` entry); an unknown path: 404 `{"detail": "Not Found"}` (there is no /close); a wrong
method: 405 `{"detail": "Method Not Allowed"}` with `Allow`; a trailing slash: 307 to the path without it. Values
are coerced as pydantic 1 does ("7" and 7.9 are env id 7; a number is a valid action string).

Differences from the real server: env ids come from a seeded generator and are never reused by collision; a
reset without a session id draws its goal uniformly from a seeded generator (WebShop weighs goals); a failed reset
leaves the env as it was; requests to one env are serialized (the real server does not lock).

Fault injection: `server.faults` (see `hf_m2n2.demo.shop.faults`).

Usage:
    with serve(ShopConfig(seed=0)) as shop:   # 127.0.0.1, a free port, a daemon thread
        httpx.post(f"{shop.url}/create").json()
        shop.faults.down_after(5)             # the 6th /step and everything after finds the server down

    python -m hf_m2n2.demo.shop.server --port 8000 --seed 0   # prints the URL, serves until killed
    python -m hf_m2n2.demo.shop.server --config BUILD/shop.json --run hf-m2n2 evolve spec.yaml --out run
        # a free port; the command finds the URL in $WEBSHOP_SERVER; the server stops when it ends
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from hf_m2n2.demo.shop.catalogue import Catalogue, ShopConfig
from hf_m2n2.demo.shop.engine import Shop, ShopEnv
from hf_m2n2.demo.shop.faults import Faults
from hf_m2n2.errors import SpecError

MAX_ENV_ID = 48950076  # the real server draws ids with random.randint(0, 48950076)
_INTERNAL_ERROR = b"Internal Server Error"


class ShopServer:
    """The shop behind AgentGym's WebShop routes, served from a daemon thread.

    Args:
        config: the shop's configuration (default `ShopConfig()`).
        host: the address to listen on.
        port: the port (0: a free one).

    Attributes:
        url: `http://host:port` once started.
        shop: the shared catalogue and search engine; `catalogue` is `shop.catalogue`.
        faults: the fault switches.
        requests: `(method, path with query)` of every request received, in order.
    """

    def __init__(self, config: ShopConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.config = config or ShopConfig()
        self.shop = Shop(self.config)
        self.host, self.port = host, port
        self.url = ""
        self.faults = Faults(on_down=self._went_down, on_up=self._came_up)
        self.requests: list[tuple[str, str]] = []
        self._envs: dict[int, tuple[ShopEnv, threading.Lock]] = {}
        self._ids = random.Random(f"shop-env-ids-{self.config.seed}")
        self._reuse = -1  # the real server's round-robin cursor
        self._lock = threading.Lock()
        self._listen_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._serving = threading.local()  # the connection a handler thread serves (not cut when going down)
        self._routes = self.routes()

    @property
    def catalogue(self) -> Catalogue:
        return self.shop.catalogue

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Listen and serve in a daemon thread; returns the URL."""
        self._listen()
        return self.url

    def stop(self) -> None:
        """Stop serving and close open connections."""
        self._unlisten()

    def __enter__(self) -> ShopServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        with self._listen_lock:
            if self._httpd is not None:
                return
            httpd = _HTTPServer((self.host, self.port), _Handler)
            httpd.shop_server = self  # type: ignore[attr-defined]
            self._httpd = httpd
            self.port = httpd.server_address[1]  # a restart after `down(refuse=True)` keeps the port
            self.url = f"http://{self.host}:{self.port}"
            threading.Thread(
                target=httpd.serve_forever, args=(0.05,), name="shop-server", daemon=True
            ).start()

    def _unlisten(self) -> None:
        """Stop listening at once (new connections are refused), then stop the serving thread and cut open
        connections, except the one the calling handler is answering."""
        with self._listen_lock:
            httpd, self._httpd = self._httpd, None
            if httpd is None:
                return
            with contextlib.suppress(OSError):
                httpd.socket.shutdown(socket.SHUT_RDWR)  # Linux: leaves the listening state now
            httpd.shutdown()
            httpd.server_close()
            with self._lock:
                current = getattr(self._serving, "connection", None)
                connections = [c for c in self._connections if c is not current]
            for connection in connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def _went_down(self, refuse: bool) -> None:
        if refuse:
            self._unlisten()

    def _came_up(self) -> None:
        self._listen()

    # ---------------------------------------------------------------- environments

    def create(self) -> int:
        """Create an env (reset to a random session) and return its id; past `max_envs`, hand out existing ids
        in turn, as the real server does (without resetting them)."""
        with self._lock:
            if len(self._envs) >= self.config.max_envs:
                self._reuse = (self._reuse + 1) % len(self._envs)
                return list(self._envs)[self._reuse]
            env_id = self._ids.randint(0, MAX_ENV_ID)
            while env_id in self._envs:
                env_id = self._ids.randint(0, MAX_ENV_ID)
            env = ShopEnv(self.shop, rng=random.Random(f"shop-env-{self.config.seed}-{env_id}"))
            self._envs[env_id] = (env, threading.Lock())
            return env_id

    def env_ids(self) -> list[int]:
        """The env ids, in creation order."""
        with self._lock:
            return list(self._envs)

    @contextlib.contextmanager
    def env(self, env_id: int) -> Iterator[ShopEnv]:
        """Hold env `env_id` for one request (KeyError when unknown)."""
        with self._lock:
            env, lock = self._envs[env_id]
        with lock:
            yield env

    # ---------------------------------------------------------------- routes: path -> (method, handler(request))

    def _route_step(self, request: _Request) -> Any:
        query = request.body_model(("env_idx", _as_int, True), ("action", _as_str, True))
        with self.env(query["env_idx"]) as env:
            state, reward, done, info = env.step(query["action"])
        return {"state": state, "reward": float(reward), "done": bool(done), "info": info}

    def _route_reset(self, request: _Request) -> Any:
        query = request.body_model(("env_idx", _as_int, True), ("session_id", _as_int, False))
        with self.env(query["env_idx"]) as env:
            observation, _ = env.reset(query["session_id"])
        return [observation, None]

    def _on_env(self, read: Callable[[ShopEnv], Any]) -> Callable[[_Request], Any]:
        def route(request: _Request) -> Any:
            with self.env(request.query_int("env_idx")) as env:
                return read(env)

        return route

    def routes(self) -> dict[str, tuple[str, Callable[[_Request], Any]]]:
        """path -> (method, handler)."""
        return {
            "/": ("GET", lambda request: "ok"),
            "/list_envs": ("GET", lambda request: self.env_ids()),
            "/create": ("POST", lambda request: self.create()),
            "/step": ("POST", self._route_step),
            "/reset": ("POST", self._route_reset),
            "/available_actions": ("GET", self._on_env(lambda env: env.available_actions())),
            "/instruction_text": ("GET", self._on_env(lambda env: env.get_instruction_text())),
            "/observation": ("GET", self._on_env(lambda env: env.observation)),
            "/state": ("GET", self._on_env(lambda env: env.state)),
        }


@contextlib.contextmanager
def serve(
    config: ShopConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[ShopServer]:
    """Serve the shop on `host` (a free port by default) from a daemon thread for the `with` block.

    Args:
        config: the shop's configuration (default `ShopConfig()`).
        host: the address to listen on.
        port: the port (0: a free one).

    Yields:
        The running server (`.url`, `.faults`, `.catalogue`).

    Example:
        >>> import httpx
        >>> with serve(ShopConfig(num_products=24)) as shop:
        ...     httpx.get(shop.url + "/").json()
        'ok'
    """
    server = ShopServer(config, host=host, port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- request validation, as pydantic 1 does it


class _Invalid(Exception):
    """A request FastAPI answers with 422 (`detail`: pydantic 1's error list)."""

    def __init__(self, detail: list[dict]):
        super().__init__(detail)
        self.detail = detail


class _FieldError(Exception):
    def __init__(self, msg: str, kind: str):
        super().__init__(msg)
        self.msg, self.kind = msg, kind


class _BadBody(Exception):
    """A body FastAPI cannot read (400)."""


def _as_int(value: Any) -> int:
    """pydantic 1's int: ints as they are, anything `int()` accepts (numeric strings, floats truncated)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _FieldError("value is not a valid integer", "type_error.integer") from None


def _as_str(value: Any) -> str:
    """pydantic 1's str: strings, and numbers as their `str()`."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    raise _FieldError("str type expected", "type_error.str")


class _Request:
    """One request's parts and FastAPI's readings of them."""

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes):
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.query = dict(parse_qsl(query, keep_blank_values=True))  # a repeated parameter: the last one

    def query_int(self, name: str) -> int:
        if name not in self.query:
            raise _Invalid([_missing(["query", name])])
        try:
            return _as_int(self.query[name])
        except _FieldError as exc:
            raise _Invalid([{"loc": ["query", name], "msg": exc.msg, "type": exc.kind}]) from None

    def _json_body(self) -> Any:
        if not self.body:
            return None
        content_type = self.headers.get("content-type")
        if content_type:
            main = content_type.split(";")[0].strip().lower()
            if not (
                main == "application/json" or (main.startswith("application/") and main.endswith("+json"))
            ):
                return self.body  # not read as JSON: a model cannot be built from raw bytes
        try:
            return json.loads(self.body)
        except json.JSONDecodeError as exc:
            raise _Invalid(
                [{"type": "json_invalid", "loc": ["body", exc.pos], "msg": "JSON decode error", "input": {},
                  "ctx": {"error": exc.msg}}]
            ) from None  # fmt: skip
        except ValueError:  # not UTF-8 / 16 / 32
            raise _BadBody() from None

    def body_model(self, *fields: tuple[str, Callable[[Any], Any], bool]) -> dict[str, Any]:
        """The JSON body as a pydantic 1 model of `(name, coerce, required)` fields (optional ones default to
        None)."""
        body = self._json_body()
        if body is None:
            raise _Invalid([_missing(["body"])])
        try:
            body = dict(body)  # pydantic 1 accepts anything dict() does
        except (TypeError, ValueError):
            raise _Invalid(
                [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
            ) from None
        values, errors = {}, []
        for name, coerce, required in fields:
            if name not in body:
                if required:
                    errors.append(_missing(["body", name]))
                values[name] = None
            elif body[name] is None:
                if required:
                    errors.append(
                        {"loc": ["body", name], "msg": "none is not an allowed value",
                         "type": "type_error.none.not_allowed"}
                    )  # fmt: skip
                values[name] = None
            else:
                try:
                    values[name] = coerce(body[name])
                except _FieldError as exc:
                    errors.append({"loc": ["body", name], "msg": exc.msg, "type": exc.kind})
        if errors:
            raise _Invalid(errors)
        return values


def _missing(loc: list) -> dict:
    return {"loc": loc, "msg": "field required", "type": "value_error.missing"}


def _json_bytes(value: Any) -> bytes:
    """Starlette's JSONResponse encoding."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


# ---------------------------------------------------------------- HTTP


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(
            sys.exc_info()[1], OSError
        ):  # the client went away, or the connection was cut: no report
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes one request; answers carry Content-Length so connections are kept alive (HTTP/1.1)."""

    protocol_version = "HTTP/1.1"
    timeout = 5  # uvicorn's keep-alive timeout: idle connections are closed after 5 s
    server_version = "uvicorn"
    sys_version = ""
    _lose = False  # this request's answer is to be lost (`Faults.lose`)

    @property
    def shop(self) -> ShopServer:
        return self.server.shop_server  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle's algorithm and the client's delayed ACK
        # add ~40 ms to every answer
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.shop._serving.connection = self.connection
        with self.shop._lock:
            self.shop._connections.add(self.connection)

    def finish(self) -> None:
        with self.shop._lock:
            self.shop._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no per-request stderr log
        pass

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _serve(self) -> None:
        split = urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        body = self._read_body()
        with self.shop._lock:
            self.shop.requests.append((self.command, self.path))
        verdict = self.shop.faults.before(split.path)
        self._lose = verdict.lose
        if verdict.drop:
            self._drop()
            return
        if verdict.delay:
            time.sleep(verdict.delay)
        if verdict.status is not None:
            self._injected(verdict.status)
            return
        self._dispatch(_Request(self.command, split.path, split.query, headers, body))

    def _dispatch(self, request: _Request) -> None:
        routes = self.shop._routes
        route = routes.get(request.path)
        if route is None:
            if request.path != "/" and request.path.endswith("/") and request.path.rstrip("/") in routes:
                location = f"http://{self.headers.get('Host', self.shop.url[7:])}{request.path.rstrip('/')}"
                query = urlsplit(self.path).query
                self._send(307, b"", None, {"location": location + (f"?{query}" if query else "")})
                return
            self._send(404, _json_bytes({"detail": "Not Found"}), "application/json")
            return
        method, handler = route
        if request.method != method:
            self._send(
                405, _json_bytes({"detail": "Method Not Allowed"}), "application/json", {"allow": method}
            )
            return
        try:
            result = handler(request)
        except _Invalid as exc:
            self._send(422, _json_bytes({"detail": exc.detail}), "application/json")
        except _BadBody:
            self._send(
                400, _json_bytes({"detail": "There was an error parsing the body"}), "application/json"
            )
        except (
            Exception
        ):  # what the real server's env raises (unknown id, session out of range, no instruction)
            self._crash()
        else:
            last = self.shop.faults.answering(request.path)
            self._send(200, _json_bytes(result), "application/json")
            if last:
                self._drop()  # the server is down now

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _crash(self) -> None:
        """Starlette's 500, then the connection closed, as uvicorn closes it after an exception."""
        # uvicorn says nothing before closing; `Connection: close` keeps a client from racing the close with
        # its next request on this connection (a transport error that would come and go)
        self._send(500, _INTERNAL_ERROR, "text/plain; charset=utf-8", {"connection": "close"})
        self._drop()

    def _injected(self, status: int) -> None:
        if status == 500:
            self._crash()
            return
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        self._send(status, phrase.encode(), "text/plain; charset=utf-8")

    def _drop(self) -> None:
        """Close the connection without (another) answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, body: bytes, content_type: str | None, headers: dict | None = None) -> None:
        if self._lose:  # the route ran; its answer is lost on the way back
            self._drop()
            return
        self.send_response(status)
        if content_type:
            self.send_header("content-type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


# ---------------------------------------------------------------- command line


_CONFIG_FLAGS = {  # command-line flag -> ShopConfig field
    "seed": "seed",
    "products": "num_products",
    "per_page": "results_per_page",
    "max_results": "max_results",
    "title_words": "title_words",
    "goal_attributes": "goal_attributes",
    "asin_length": "asin_length",
    "max_envs": "max_envs",
}


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_m2n2.demo.shop.server`: print the URL on one line and serve until killed, or, with
    `--run CMD ...`, serve while CMD runs (its environment names the server) and return its exit code."""
    defaults = ShopConfig()
    parser = argparse.ArgumentParser(
        prog="python -m hf_m2n2.demo.shop.server",
        description="A local WebShop environment server (AgentGym's protocol) over a synthetic shop.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (default)")
    parser.add_argument(
        "--config", default=None, metavar="FILE",
        help="the shop's settings as a JSON object (e.g. a demo build's shop.json); flags below override them",
    )  # fmt: skip
    for flag, field in _CONFIG_FLAGS.items():
        parser.add_argument(
            f"--{flag.replace('_', '-')}", type=int, default=None, help=f"default {getattr(defaults, field)}"
        )
    parser.add_argument(
        "--down-after-steps", type=int, default=None, metavar="K",
        help="after answering K /step requests, stop listening (connections refused), as a crashed server",
    )  # fmt: skip
    parser.add_argument(
        "--env", default="WEBSHOP_SERVER", metavar="NAME",
        help="with --run: the environment variable that gives CMD the server's URL (default WEBSHOP_SERVER)",
    )  # fmt: skip
    parser.add_argument(
        "--run", nargs=argparse.REMAINDER, default=None, metavar="CMD",
        help="serve while CMD (everything after --run) runs, then stop; exit with CMD's exit code",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.run is not None and not args.run:
        parser.error("--run needs a command")
    try:
        base = ShopConfig.read(args.config) if args.config else defaults
        overrides = {field: getattr(args, flag) for flag, field in _CONFIG_FLAGS.items()}
        config = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ShopServer(config, host=args.host, port=args.port)
    try:
        server.start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.down_after_steps is not None:
        server.faults.down_after(args.down_after_steps, "/step", refuse=True)
    try:
        if args.run is not None:
            return _run_while_serving(args.run, args.env, server.url)
        print(server.url, flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _run_while_serving(command: list[str], variable: str, url: str) -> int:
    """Run `command` with `variable` = the server's URL added to this process's environment; its exit code (2 when
    it cannot start). A Ctrl-C reaches the command too (same process group): wait for it to finish."""
    print(f"shop server at {url} (${variable}) while running: {' '.join(command)}", flush=True)
    try:
        process = subprocess.Popen(command, env={**os.environ, variable: url})
    except OSError as exc:
        print(f"error: cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            continue


if __name__ == "__main__":
    sys.exit(main())
