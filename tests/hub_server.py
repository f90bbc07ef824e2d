"""A local server speaking the subset of the Hugging Face Hub HTTP API that huggingface_hub and transformers use.

Hand-written because no package emulates the Hub's write API (create repo, preupload, commit, branches, PRs).

Covers: `HfApi.create_repo`, `upload_folder` / `upload_file` / `create_commit` (regular files only: preupload
answers `uploadMode: "regular"`, so contents travel base64-encoded in the commit and neither LFS nor Xet is used),
`create_branch`, `create_pull_request` (and commits with `create_pr=True`), `repo_info` / `model_info`,
`list_repo_tree` / `list_repo_files`, `list_repo_refs`, `whoami`, `hf_hub_download`, `snapshot_download`,
`from_pretrained`, `ModelCard.load` / `ModelCard.validate` (`POST /api/validate-yaml`).

Repos live under `root`: a JSON document per repo (refs, commits as path -> blob id maps, discussions) and
content-addressed blobs, so every old commit stays downloadable and a new server on the same root sees them.

Usage in pytest: the `hub` fixture (see `hub_fixture`) starts a fresh server, points huggingface_hub and
transformers at it and yields it; outside pytest, `with HubServer(root) as server, pointed_at(server.url): ...`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

import yaml

# Tokens of the `hub` fixture's server: token -> user name (the namespace it may write to).
TEST_TOKENS = {"hf_test_alice_0000000000000000000": "alice", "hf_test_bob_00000000000000000000": "bob"}

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API_REPO = re.compile(r"^/api/(?P<kind>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)(?P<rest>/.*)?$")
# `refs/pr/N` may arrive unencoded in resolve URLs; huggingface_hub itself sends `refs%2Fpr%2FN`.
_RESOLVE = re.compile(
    r"^/(?:(?P<kind>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>refs/pr/\d+|[^/]+)/(?P<file>.+)$"
)
_SHA = re.compile(r"^[0-9a-f]{40}$")
_CARD_METADATA = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_MODELS_PAGE = "https://hf.co/models"
# What the Hub puts in a new repo's first commit (abridged: the real file lists ~35 LFS patterns).
_GITATTRIBUTES = (
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
)


class HubError(Exception):
    """An error answer: status, `X-Error-Message` and, where the Hub sends one, `X-Error-Code`."""

    def __init__(self, status: int, message: str, code: str | None = None, **body: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class RecordedRequest(NamedTuple):
    """One request as received: method, raw path with query string, headers (names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern
    status: int
    remaining: int | None  # None: every matching request
    error_code: str | None = None
    drop: bool = False


def git_blob_id(content: bytes) -> str:
    """The git blob sha1 of `content`: the Hub's `oid` of a regular file, and huggingface_hub's `_local_oid`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _commit_sha(parent: str | None, files: dict[str, str], message: str, description: str) -> str:
    """Deterministic 40-hex commit id from the parent, the tree (path -> blob id) and the message."""
    payload = json.dumps([parent, sorted(files.items()), message, description]).encode()
    return hashlib.sha1(payload).hexdigest()


def _card_metadata(text: str) -> dict | None:
    """The YAML front matter of a README (None when absent); raises yaml.YAMLError when it does not parse."""
    match = _CARD_METADATA.match(text)
    return yaml.safe_load(match.group(2)) if match else None


class _Store:
    """Repos on disk: `repos/{type}s/{ns}/{name}.json` and content-addressed `blobs/`. Callers hold the lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    def _path(self, kind: str, repo_id: str) -> Path:
        return self.root / "repos" / kind / f"{repo_id}.json"

    def load(self, kind: str, repo_id: str) -> dict | None:
        path = self._path(kind, repo_id)
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, repo: dict) -> None:
        path = self._path(repo["kind"], repo["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo, indent=1))
        os.replace(tmp, path)  # atomic: a failed request never leaves a half-written repo

    def put_blob(self, content: bytes) -> str:
        oid = git_blob_id(content)
        path = self.root / "blobs" / oid
        if not path.exists():
            tmp = path.with_name(f"{oid}.{threading.get_ident()}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def blob_size(self, oid: str) -> int:
        return (self.root / "blobs" / oid).stat().st_size


def _resolve(repo: dict, revision: str) -> str:
    """The commit sha a branch, `refs/pr/N` or full sha names; 404 RevisionNotFound otherwise."""
    if revision in repo["refs"]:
        return repo["refs"][revision]
    if _SHA.match(revision) and revision in repo["commits"]:
        return revision
    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _add_commit(
    repo: dict, parent: str | None, files: dict[str, str], message: str, description: str = ""
) -> str:
    sha = _commit_sha(parent, files, message, description)
    repo["commits"][sha] = {
        "parent": parent,
        "files": files,
        "message": message,
        "description": description,
        "date": _now(),
    }
    return sha


class HubServer:
    """A Hub-protocol HTTP server on 127.0.0.1 for tests; see the module docstring.

    Args:
        root: where repos and blobs are stored.
        tokens: token -> user name. A user writes to its own namespace; private repos are readable by their owner.
        port: 0 picks a free port.

    Attributes:
        url: `http://127.0.0.1:PORT` once started.
        requests: every request received, as `RecordedRequest(method, path, headers)`.
        cache_dir: the client cache the `hub` fixture points huggingface_hub at (None outside it).
    """

    def __init__(self, root: str | os.PathLike[str], tokens: dict[str, str] | None = None, *, port: int = 0):
        self.store = _Store(Path(root))
        self.tokens = dict(tokens or {})
        self.port = port
        self.url = ""
        self.cache_dir: Path | None = None
        self.requests: list[RecordedRequest] = []
        # a careless proxy or mirror: error messages repeat the request's Authorization header
        self.echo_authorization = False
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Serve in a background thread; returns the base URL."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and close kept-alive connections (their handler threads then exit)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._httpd = None

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- test controls

    def fail(
        self, method: str, path_regex: str, status: int, times: int | None = 1, error_code: str | None = None
    ) -> None:
        """Answer the next `times` requests (None: all) whose method and raw path (with query) match with `status`.

        The body is read first, so the connection stays usable. huggingface_hub 2.4 retries 408, 429 and 5xx
        (and dropped connections) up to 5 times, sleeping 1+2+4+8+8 s, on preupload, on upload_folder's commit
        POST and on tree listings (list_repo_files, snapshot_download): a failure there reaches the caller only
        with `times=None` (or >= 6), after ~23 s. Not retried: create_commit's / upload_file's commit POST,
        create_repo, create_branch, repo_info, whoami, and file HEAD/GET of hf_hub_download.
        """
        self._add_fault(_Fault(method.upper(), re.compile(path_regex), status, times, error_code))

    def drop(self, method: str, path_regex: str, times: int | None = 1) -> None:
        """Close the connection of the next `times` matching requests after reading half the body, unanswered.

        The client sees a transport error (httpx2.RemoteProtocolError or ReadError); huggingface_hub retries
        those like 5xx where it retries at all (see `fail`).
        """
        self._add_fault(_Fault(method.upper(), re.compile(path_regex), 0, times, drop=True))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def token_of(self, user: str) -> str:
        """A token of `user` (the first one in `tokens`)."""
        return next(token for token, name in self.tokens.items() if name == user)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha `revision` points to (raises HubError when unknown)."""
        with self.store.lock:
            repo = self._repo(repo_type + "s", repo_id)
            return _resolve(repo, revision)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content of every file at `revision`."""
        with self.store.lock:
            repo = self._repo(repo_type + "s", repo_id)
            tree = repo["commits"][_resolve(repo, revision)]["files"]
        return {path: self.store.blob(oid) for path, oid in tree.items()}

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict]:
        """History of `revision`, oldest first: dicts with sha, parent, message, description, date, files
        (path -> blob id)."""
        with self.store.lock:
            repo = self._repo(repo_type + "s", repo_id)
            sha: str | None = _resolve(repo, revision)
            history = []
            while sha is not None:
                history.append({"sha": sha, **repo["commits"][sha]})
                sha = repo["commits"][sha]["parent"]
        return history[::-1]

    def publish(
        self, repo_id: str, folder: str | os.PathLike[str], token: str, private: bool = False, **upload_kwargs
    ) -> str:
        """Create `repo_id` (if missing) and upload `folder` with the real HfApi; returns the commit sha."""
        from huggingface_hub import HfApi, constants

        api = HfApi(endpoint=self.url, token=token)
        previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, **upload_kwargs).oid
        finally:
            constants.HF_HUB_OFFLINE = previous

    # ---------------------------------------------------------------- internals used by the handler

    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _record(self, request: RecordedRequest) -> _Fault | None:
        """Log the request and consume the first fault it triggers, if any."""
        with self._lock:
            self.requests.append(request)
            for fault in self._faults:
                if fault.method in (request.method, "*") and fault.pattern.search(request.path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _repo(self, kind: str, repo_id: str) -> dict:
        repo = self.store.load(kind, repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo


class _Handler(BaseHTTPRequestHandler):
    """Routes one request; every answer carries Content-Length so connections are kept alive (HTTP/1.1)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60  # idle kept-alive connections end on their own
    body = b""

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the per-request stderr log
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    # ---------------------------------------------------------------- plumbing

    def _serve(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        fault = self.hub._record(RecordedRequest(self.command, self.path, headers))
        if fault is not None and fault.drop:
            self._drop()
            return
        self.body = self._read_body()
        if fault is not None:
            self._error(HubError(fault.status, f"Injected failure ({fault.status})", fault.error_code))
            return
        try:
            self._route()
        except HubError as exc:
            self._error(exc)
        except Exception as exc:  # a server bug: answer it rather than dropping the connection
            self._error(HubError(500, f"{type(exc).__name__}: {exc}"))

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _drop(self) -> None:
        """Read half the body, then close the socket without answering (a network drop mid-upload)."""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length // 2)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))  # a HEAD answer is given the body it leaves out
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, exc: HubError, headers: dict[str, str] | None = None) -> None:
        message = exc.message
        if self.hub.echo_authorization:
            message += f" (request had Authorization: {self.headers.get('Authorization')})"
        # Header values: one line, latin-1 (YAML errors span lines).
        one_line = " ".join(message.split()).encode("latin-1", "replace").decode("latin-1")
        extra = {"X-Error-Message": one_line, **(headers or {})}
        if exc.code:
            extra["X-Error-Code"] = exc.code
        self._json({"error": message, **exc.body}, exc.status, extra)

    def _payload(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc

    def _query(self) -> dict[str, str]:
        query = self.path.partition("?")[2]
        return {key: values[-1] for key, values in parse_qs(query).items()}

    def _route(self) -> None:
        path = self.path.partition("?")[0]
        method = self.command
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml()
        if path == "/api/agent-harnesses" and method == "GET":  # huggingface_hub's user-agent lookup
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if match := _API_REPO.match(path):
            kind, repo_id = match["kind"], f"{unquote(match['ns'])}/{unquote(match['name'])}"
            rest = [unquote(part) for part in (match["rest"] or "").split("/")[1:]]
            return self._repo_api(method, kind, repo_id, rest)
        if (match := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            kind = match["kind"] or "models"
            repo_id = f"{unquote(match['ns'])}/{unquote(match['name'])}"
            return self._resolve_file(kind, repo_id, unquote(match["rev"]), unquote(match["file"]))
        raise HubError(404, f"No route for {method} {path}")

    def _repo_api(self, method: str, kind: str, repo_id: str, rest: list[str]) -> None:
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        routes = {
            ("GET", ""): lambda: self._repo_info(kind, repo_id, "main"),
            ("GET", "revision"): lambda: self._repo_info(kind, repo_id, "/".join(args)),
            ("GET", "tree"): lambda: self._tree(kind, repo_id, args[0], "/".join(args[1:])),
            ("GET", "refs"): lambda: self._refs(kind, repo_id),
            ("POST", "preupload"): lambda: self._preupload(kind, repo_id, "/".join(args)),
            ("POST", "commit"): lambda: self._commit(kind, repo_id, "/".join(args)),
            ("POST", "branch"): lambda: self._create_branch(kind, repo_id, "/".join(args)),
            ("POST", "discussions"): lambda: self._create_discussion(kind, repo_id),
            ("GET", "discussions"): lambda: self._discussion(kind, repo_id, args[0]),
        }
        handler = routes.get((method, action))
        if handler is None or (action in ("revision", "tree", "preupload", "commit", "branch") and not args):
            raise HubError(404, f"No route for {method} {self.path}")
        if action == "discussions" and method == "GET" and not args:
            raise HubError(404, "Listing discussions is not implemented")
        handler()

    # ---------------------------------------------------------------- auth

    def _user(self) -> str | None:
        """The token's user; None without a token; 401 for a token the server does not know."""
        auth = self.headers.get("Authorization") or ""
        token = auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else ""
        if not token:
            return None
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _require_user(self) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return user

    def _readable(self, kind: str, repo_id: str) -> dict:
        """Load a repo the caller may read. Private repos look missing to others, as on the Hub (401 anonymous)."""
        user = self._user()
        repo = self.hub.store.load(kind, repo_id)
        if repo is None or (repo["private"] and user != repo_id.split("/")[0]):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(
        self, kind: str, repo_id: str, revision: str | None = None, create_pr: bool = False
    ) -> dict:
        """Load a repo the caller may push to: the namespace owner, or anyone who can read it for a pull request
        (`create_pr`, or a `refs/pr/N` they opened)."""
        user = self._require_user()
        repo = self._readable(kind, repo_id)
        if user == repo_id.split("/")[0]:
            return repo
        if create_pr or any(
            d["isPullRequest"] and d["author"] == user and revision == f"refs/pr/{d['num']}"
            for d in repo["discussions"]
        ):
            return repo
        raise HubError(403, f"You don't have the rights to write to {repo_id}")

    # ---------------------------------------------------------------- routes without a repo

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user.capitalize(),
                "email": f"{user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self) -> None:
        user = self._require_user()
        payload = self._payload()
        kind = (payload.get("type") or "model") + "s"
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload.get('name')}"
        if kind not in _REPO_TYPES or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise HubError(400, f"Invalid repo: {kind} {repo_id}")
        if namespace != user:
            raise HubError(
                403, f"You don't have the rights to create a {kind[:-1]} under the namespace {namespace}"
            )
        url = f"{self.hub.url}/{'' if kind == 'models' else kind + '/'}{repo_id}"
        with self.hub.store.lock:
            if self.hub.store.load(kind, repo_id) is not None:
                # huggingface_hub's create_repo(exist_ok=True) reads the url from this answer.
                raise HubError(409, f"You already created this {kind[:-1]} repo", url=url)
            repo = {
                "id": repo_id,
                "kind": kind,
                "private": payload.get("visibility") == "private" or bool(payload.get("private")),
                "createdAt": _now(),
                "refs": {},
                "commits": {},
                "discussions": [],
            }
            gitattributes = self.hub.store.put_blob(_GITATTRIBUTES.encode())
            repo["refs"]["main"] = _add_commit(
                repo, None, {".gitattributes": gitattributes}, "initial commit"
            )
            self.hub.store.save(repo)
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self) -> None:
        """Check the card's YAML metadata like the Hub does for the fields hf-m2n2 writes (a subset of its rules).

        Answers JSON `{"errors": [...], "warnings": [...]}` (HfApi reads it), or plain text when asked for
        `text/plain` (ModelCard.validate raises ValueError(response.text) on 400)."""
        content = str(self._payload().get("content", ""))
        errors, warnings = _card_problems(
            content, lambda repo_id: self.hub.store.load("models", repo_id) is not None
        )
        status = 400 if errors else 200
        if self.headers.get("Accept") == "text/plain":
            text = "\n".join(e["message"] for e in errors) or "OK"
            self._send(status, text.encode(), {"Content-Type": "text/plain"})
        else:
            self._json({"errors": errors, "warnings": warnings}, status)

    # ---------------------------------------------------------------- reads

    def _repo_info(self, kind: str, repo_id: str, revision: str) -> None:
        with self.hub.store.lock:
            repo = self._readable(kind, repo_id)
            sha = _resolve(repo, revision)
            commit = repo["commits"][sha]
        files = commit["files"]
        blobs = self._query().get("blobs", "").lower() in ("1", "true")
        siblings = [
            {"rfilename": path, **({"size": self.hub.store.blob_size(oid), "blobId": oid} if blobs else {})}
            for path, oid in sorted(files.items())
        ]
        namespace = repo_id.split("/")[0]
        card = self._card_data(files.get("README.md"))
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": namespace,
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": repo["createdAt"],
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card or {}).get("tags") or []),
            "siblings": siblings,
        }
        if card is not None:
            info["cardData"] = card
            if isinstance(card.get("library_name"), str):
                info["library_name"] = card["library_name"]
        self._json(info)

    def _card_data(self, readme_oid: str | None) -> dict | None:
        if readme_oid is None:
            return None
        with contextlib.suppress(yaml.YAMLError, UnicodeDecodeError):
            data = _card_metadata(self.hub.store.blob(readme_oid).decode())
            return data if isinstance(data, dict) else None
        return None

    def _tree(self, kind: str, repo_id: str, revision: str, prefix: str) -> None:
        with self.hub.store.lock:
            repo = self._readable(kind, repo_id)
            sha = _resolve(repo, revision)
            files = repo["commits"][sha]["files"]
        recursive = self._query().get("recursive", "").lower() in ("1", "true")
        prefix = prefix.strip("/")
        if prefix and not any(path.startswith(prefix + "/") for path in files):
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        self._json(self._tree_entries(files, prefix, recursive))

    def _tree_entries(self, files: dict[str, str], prefix: str, recursive: bool) -> list[dict]:
        """Entries under `prefix`: its direct children, or every file and folder below it when recursive."""
        start = f"{prefix}/" if prefix else ""
        folders: dict[str, list[str]] = {}
        entries = []
        for path, oid in sorted(files.items()):
            if not path.startswith(start):
                continue
            parts = path[len(start) :].split("/")
            for depth in range(1, len(parts)):
                folder = start + "/".join(parts[:depth])
                folders.setdefault(folder, []).append(oid)
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries.append(
                    {"type": "file", "oid": oid, "size": self.hub.store.blob_size(oid), "path": path}
                )
        for folder, oids in folders.items():
            tree_id = hashlib.sha1("".join(sorted(oids)).encode()).hexdigest()
            entries.append({"type": "directory", "oid": tree_id, "size": 0, "path": folder})
        return sorted(entries, key=lambda entry: entry["path"])

    def _refs(self, kind: str, repo_id: str) -> None:
        with self.hub.store.lock:
            repo = self._readable(kind, repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in sorted(repo["refs"].items())
            if not name.startswith("refs/pr/")
        ]
        prs = [
            {"name": name, "ref": name, "targetCommit": sha}
            for name, sha in sorted(repo["refs"].items())
            if name.startswith("refs/pr/")
        ]
        data = {"branches": branches, "converts": [], "tags": []}
        if self._query().get("include_prs"):
            data["pullRequests"] = prs
        self._json(data)

    def _discussion(self, kind: str, repo_id: str, num: str) -> None:
        with self.hub.store.lock:
            repo = self._readable(kind, repo_id)
        found = [d for d in repo["discussions"] if str(d["num"]) == num]
        if not found:
            raise HubError(404, f"Discussion {num} not found")
        d = found[0]
        self._json(
            {
                "num": d["num"],
                "title": d["title"],
                "author": {"name": d["author"]},
                "createdAt": d["createdAt"],
                "status": "draft" if d["isPullRequest"] else "open",
                "repo": {"name": repo_id, "type": _REPO_TYPES[kind]},
                "isPullRequest": d["isPullRequest"],
                "changes": {"base": f"refs/heads/{d['base']}"},
                "filesWithConflicts": [],
                "events": [],
                "diff": "",
            }
        )

    def _resolve_file(self, kind: str, repo_id: str, revision: str, filename: str) -> None:
        with self.hub.store.lock:
            repo = self._readable(kind, repo_id)
            sha = _resolve(repo, revision)
            oid = repo["commits"][sha]["files"].get(filename)
        if oid is None:
            # Sent with the commit so that huggingface_hub caches the miss for this commit, as with the Hub.
            self._error(HubError(404, "Entry not found", "EntryNotFound"), {"X-Repo-Commit": sha})
            return
        content = self.hub.store.blob(oid)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{oid}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
        }
        start, end = self._range(len(content))
        if (start, end) != (0, len(content)):
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
            self._send(206, content[start:end], headers)
        else:
            self._send(200, content, headers)

    def _range(self, size: int) -> tuple[int, int]:
        """The byte span a `Range: bytes=A-[B]` header asks for (resumed downloads); the whole file otherwise."""
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if not match:
            return 0, size
        start = int(match[1])
        end = min(int(match[2]) + 1, size) if match[2] else size
        return min(start, size), end

    # ---------------------------------------------------------------- writes

    def _preupload(self, kind: str, repo_id: str, revision: str) -> None:
        create_pr = self._query().get("create_pr") == "1"
        with self.hub.store.lock:
            repo = self._writable(kind, repo_id, revision, create_pr)
            sha = _resolve(repo, revision)
            current = repo["commits"][sha]["files"]
        files = [
            {
                "path": f["path"],
                # Every file inline in the commit: no LFS batch, no Xet token request.
                "uploadMode": "regular",
                "shouldIgnore": False,
                # The blob id lets huggingface_hub skip unchanged files, as on the Hub.
                "oid": current.get(f["path"]),
            }
            for f in self._payload().get("files", [])
        ]
        self._json({"files": files, "commitOid": sha})

    def _commit(self, kind: str, repo_id: str, revision: str) -> None:
        header, additions, deletions = self._parse_commit()
        create_pr = self._query().get("create_pr") == "1"
        with self.hub.store.lock:
            repo = self._writable(kind, repo_id, revision, create_pr)
            if revision not in repo["refs"]:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = repo["refs"][revision]
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            pr_num = self._open_pull_request(repo, header.get("summary", ""), revision) if create_pr else None
            target = f"refs/pr/{pr_num}" if pr_num else revision
            files = self._apply(repo["commits"][parent]["files"], additions, deletions)
            message = header.get("summary") or "Upload"
            sha = _add_commit(repo, parent, files, message, header.get("description", ""))
            repo["refs"][target] = sha
            self.hub.store.save(repo)
        prefix = self.hub.url if kind == "models" else f"{self.hub.url}/{kind}"
        answer = {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{prefix}/{repo_id}/commit/{sha}",
            "commitMessage": message,
            "hookOutput": "",
        }
        if pr_num:
            answer["pullRequestUrl"] = f"{prefix}/{repo_id}/discussions/{pr_num}"
        self._json(answer)

    def _parse_commit(self) -> tuple[dict, dict[str, bytes], list[tuple[str, bool]]]:
        """Split the NDJSON commit body into its header, added files (path -> bytes) and deletions."""
        header: dict = {}
        additions: dict[str, bytes] = {}
        deletions: list[tuple[str, bool]] = []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise HubError(400, f"Invalid NDJSON line in commit: {exc}") from exc
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                raw = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                additions[_clean_path(value.get("path", ""))] = raw
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((_clean_path(value.get("path", "")), key == "deletedFolder"))
            else:
                raise HubError(
                    400, f"Unsupported commit operation {key!r}: this server only takes regular files"
                )
        return header, additions, deletions

    def _apply(self, files: dict[str, str], additions: dict[str, bytes], deletions: list[tuple[str, bool]]):
        new = dict(files)
        for path, is_folder in deletions:
            doomed = [p for p in new if p.startswith(path.rstrip("/") + "/")] if is_folder else [path]
            if not any(p in new for p in doomed):
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                new.pop(p, None)
        for path, content in additions.items():
            new[path] = self.hub.store.put_blob(content)
        return new

    def _create_branch(self, kind: str, repo_id: str, branch: str) -> None:
        with self.hub.store.lock:
            repo = self._writable(kind, repo_id)
            if branch in repo["refs"] or branch.startswith("refs/"):
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._payload().get("startingPoint") or "main"
            repo["refs"][branch] = _resolve(repo, start)
            self.hub.store.save(repo)
        self._json({})

    def _create_discussion(self, kind: str, repo_id: str) -> None:
        payload = self._payload()
        with self.hub.store.lock:
            repo = self._readable(kind, repo_id)
            if payload.get("pullRequest"):
                num = self._open_pull_request(repo, payload.get("title", ""), "main")
            else:
                num = self._new_discussion(repo, payload.get("title", ""), False, "main")
            self.hub.store.save(repo)
        self._json({"num": num, "url": f"{self.hub.url}/{repo_id}/discussions/{num}"})

    def _open_pull_request(self, repo: dict, title: str, base: str) -> int:
        """A draft PR on `base`: `refs/pr/N` starts at the base's head (the caller saves the repo)."""
        head = _resolve(repo, base)
        num = self._new_discussion(repo, title, True, base)
        repo["refs"][f"refs/pr/{num}"] = head
        return num

    def _new_discussion(self, repo: dict, title: str, is_pr: bool, base: str) -> int:
        num = len(repo["discussions"]) + 1
        repo["discussions"].append(
            {
                "num": num,
                "title": title,
                "author": self._require_user(),
                "createdAt": _now(),
                "isPullRequest": is_pr,
                "base": base,
            }
        )
        return num


def _clean_path(path: str) -> str:
    parts = path.strip("/").split("/")
    if not path or any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return "/".join(parts)


def _card_problems(content: str, model_exists) -> tuple[list[dict], list[dict]]:
    """(errors, warnings) for a card's YAML metadata, each `{"message": ...}`, worded as the Hub words them.

    Modelled on the Hub's checks of the fields model cards commonly carry: types of the simple fields, model
    ids in `base_model` that name existing models (`model_exists(repo_id)`), the allowed `base_model_relation`
    values, and the shape of `model-index`.
    """
    try:
        meta = _card_metadata(content)
    except yaml.YAMLError as exc:
        return [{"message": f"Invalid YAML in metadata: {exc}"}], []
    if not meta:
        return [], [{"message": "empty or missing yaml metadata in repo card"}]
    if not isinstance(meta, dict):
        return [{"message": "metadata must be a YAML mapping"}], []
    errors = [{"message": m} for m in _field_problems(meta) + _base_model_problems(meta, model_exists)]
    errors += [{"message": m} for m in _model_index_problems(meta.get("model-index"))]
    return errors, []


def _field_problems(meta: dict) -> list[str]:
    problems = []
    for key in ("license", "library_name", "pipeline_tag", "license_name"):
        if key in meta and not isinstance(meta[key], str):
            problems.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "language", "metrics"):
        value = meta.get(key)
        if key in meta and not (isinstance(value, str) or _is_str_list(value)):
            problems.append(f'"{key}" must be a string or an array of strings')
    return problems


def _base_model_problems(meta: dict, model_exists) -> list[str]:
    base = meta.get("base_model")
    problems = []
    if "base_model" in meta:
        ids = [base] if isinstance(base, str) else base if _is_str_list(base) else None
        if not ids:
            problems.append('"base_model" is not allowed to be empty')
        for value in ids or []:
            if not (_REPO_ID.fullmatch(value) and model_exists(value)):
                problems.append(
                    f'"base_model" with value "{value}" is not valid. Use a model id from {_MODELS_PAGE}'
                )
    relation = meta.get("base_model_relation")
    if "base_model_relation" in meta and relation not in _BASE_MODEL_RELATIONS:
        allowed = ", ".join(sorted(_BASE_MODEL_RELATIONS))
        problems.append(f'"base_model_relation" must be one of [{allowed}]')
    if "base_model_relation" in meta and "base_model" not in meta:
        problems.append('"base_model_relation" requires "base_model"')
    return problems


def _model_index_problems(index: Any) -> list[str]:
    """The shape `model-index: [{name, results: [{task: {type}, dataset: {name, type}, metrics: [{type,
    value}]}]}]`."""
    if index is None:
        return []
    if not isinstance(index, list):
        return ['"model-index" must be an array']
    problems = []
    for i, entry in enumerate(index):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            problems.append(f'"model-index[{i}].name" is required')
            continue
        for j, result in enumerate(entry.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            task, dataset = result.get("task") or {}, result.get("dataset") or {}
            if not isinstance(task.get("type"), str):
                problems.append(f'"{where}.task.type" is required')
            if not (isinstance(dataset.get("name"), str) and isinstance(dataset.get("type"), str)):
                problems.append(f'"{where}.dataset" needs a name and a type')
            for k, metric in enumerate(result.get("metrics") or []):
                if not isinstance(metric.get("type"), str) or "value" not in metric:
                    problems.append(f'"{where}.metrics[{k}]" needs a type and a value')
    return problems


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# ---------------------------------------------------------------- pointing the clients at a server


def _patches(url: str, cache_dir: str | os.PathLike[str] | None) -> list[tuple[Any, str, Any]]:
    """(object, attribute, value) to point huggingface_hub (and transformers, if imported) at `url`.

    huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE once at import, and its module-level
    functions (`huggingface_hub.upload_folder`, ...) are bound to an HfApi built then; transformers keeps
    one HfApi of its own, built on first use: it is reset so the next use builds one on `url`.
    """
    import sys

    from huggingface_hub import constants, hf_api

    patches: list[tuple[Any, str, Any]] = [
        (constants, "ENDPOINT", url),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_HUB_OFFLINE", False),
        (hf_api.api, "endpoint", url),
    ]
    if cache_dir is not None:
        patches.append((constants, "HF_HUB_CACHE", str(cache_dir)))
    if "transformers.utils.hub" in sys.modules and hasattr(sys.modules["transformers.utils.hub"], "_hf_api"):
        patches.append((sys.modules["transformers.utils.hub"], "_hf_api", None))
    return patches


@contextlib.contextmanager
def pointed_at(url: str, cache_dir: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Within the block, huggingface_hub and transformers talk to `url` (online), caching in `cache_dir` if given.

    In a fresh process, the environment is enough: `HF_ENDPOINT=url`, `HF_HUB_OFFLINE=0` (and `HF_HOME` or
    `HF_HUB_CACHE` for a private cache).
    """
    patches = _patches(url, cache_dir)
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        _reset_transformers_api()


def _reset_transformers_api() -> None:
    """Drop transformers' shared HfApi so that it is rebuilt on the current endpoint at its next use."""
    import sys

    module = sys.modules.get("transformers.utils.hub")
    if module is not None and hasattr(module, "_hf_api"):
        module._hf_api = None


def hub_fixture(tmp_path: Path, monkeypatch) -> Iterator[HubServer]:
    """Body of the `hub` pytest fixture: a fresh server with `TEST_TOKENS` (users alice and bob), clients
    pointed at it (online, cache in `tmp_path/hf_cache`, exposed as `server.cache_dir`); stopped at teardown."""
    server = HubServer(tmp_path / "hub_root", TEST_TOKENS)
    server.start()
    server.cache_dir = tmp_path / "hf_cache"
    for obj, name, value in _patches(server.url, server.cache_dir):
        monkeypatch.setattr(obj, name, value)
    try:
        yield server
    finally:
        server.stop()
        _reset_transformers_api()
