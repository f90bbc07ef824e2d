"""What the Hub client prints through us: the token masked everywhere, retries said once.

A proxy, a mirror or a wrong `HF_ENDPOINT` may echo the `Authorization` header in an error message, and
huggingface_hub passes the server's message on verbatim; at `-v`, HTTP libraries log what they send. The token
is whatever huggingface_hub would send (`huggingface_hub.get_token()`: `HF_TOKEN`, the login cache, ...), in any
form, so that exact string is masked, plus anything shaped like a Hub token (`hf_` and 30 or more letters and digits:
user tokens are `hf_` + 34). A token passed to one call (a Space visitor's) is masked during that call only
(`masking`): nothing of it stays in the process afterwards.

huggingface_hub's backoff logs two warnings per retry (five retries: ~23 s) through its own handler, which the
root handler repeats when the library's logger propagates. The CLI keeps one handler (the root's) and says once
which host is being retried and how to skip it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from urllib.parse import urlsplit

MASK = "<token>"
# Hub tokens are `hf_` + 34 letters and digits; shorter `hf_...` words are this project's own names (hf_m2n2_runs)
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
_MIN_SECRET = 4  # masking a 1-3 character string would garble every message
_secrets: set[str] = set()
_in_use: Counter[str] = Counter()  # tokens masked for the calls running now (several pushes may share one)
_lock = threading.Lock()
_looked_up = False


def add_secret(token: str | None) -> None:
    """Mask `token` for the life of the process (the token huggingface_hub itself finds)."""
    if token and len(token) >= _MIN_SECRET:
        _secrets.add(token)


@contextlib.contextmanager
def masking(token: str | None) -> Iterator[None]:
    """Mask `token` in what is logged or raised while the block runs, and forget it afterwards (a token passed to
    one call, e.g. a Space visitor's, is not kept for the life of the process).

    Example:
        >>> with masking(token):
        ...     api.upload_folder(...)  # doctest: +SKIP
    """
    if not token or len(token) < _MIN_SECRET:
        yield
        return
    with _lock:
        _in_use[token] += 1
    try:
        yield
    finally:
        with _lock:
            _in_use[token] -= 1
            if _in_use[token] <= 0:
                del _in_use[token]


def _known_secrets() -> set[str]:
    global _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            from huggingface_hub import get_token

            add_secret(get_token())
        except Exception:  # no token source, or an OIDC exchange that fails: nothing to mask then
            pass
    return _secrets


def mask_secrets(text: str, token: str | None = None) -> str:
    """`text` with the Hub token (exact value), `token` if given, the tokens of running `masking` blocks and
    Hub-token-shaped strings replaced by `<token>`.

    Example:
        >>> mask_secrets("401 for hf_" + "a" * 34 + " in /tmp/hf_m2n2_runs")
        '401 for <token> in /tmp/hf_m2n2_runs'
    """
    secrets = set(_known_secrets())  # outside the lock: the lookup may log, and logging masks
    with _lock:
        secrets |= set(_in_use)
    if token and len(token) >= _MIN_SECRET:
        secrets.add(token)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _TOKEN_LIKE.sub(MASK, text)


class SecretFilter(logging.Filter):
    """Masks the token in every record a handler emits (message, arguments and traceback text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = mask_secrets(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_RETRY = re.compile(
    r"^(?:'(?P<error>.*)'|HTTP Error (?P<status>\d+)) thrown while requesting \S+ (?P<url>\S+)"
)


class RetryOnceFilter(logging.Filter):
    """On huggingface_hub's HTTP logger: the first retry warning of a host becomes one line saying what is
    retried and how to skip the Hub; the host's later retry warnings are dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.announced: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(("Retrying in ", "Rate limited.")):
            return False
        match = _RETRY.match(message)
        if match is None:
            return True
        host = urlsplit(match["url"]).netloc or match["url"]
        if host in self.announced:
            return False
        self.announced.add(host)
        why = match["error"] or f"HTTP {match['status']}"
        record.msg = f"{host} failed ({why}); retrying for up to ~25 s (HF_HUB_OFFLINE=1 skips the Hub)"
        record.args = None
        return True


def install(verbose: bool = False) -> None:
    """Route huggingface_hub's log through the root handlers only (no second copy of each line), mask the token
    on every root handler, and, unless `verbose`, say Hub retries once per host."""
    from huggingface_hub.utils import logging as hub_logging

    library = hub_logging.get_logger()  # the `huggingface_hub` logger, with the handler it adds at import
    for handler in list(library.handlers):
        library.removeHandler(handler)
    library.propagate = True
    secret_filter = SecretFilter()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(secret_filter)
    if not verbose:
        http = logging.getLogger("huggingface_hub.utils._http")
        if not any(isinstance(f, RetryOnceFilter) for f in http.filters):
            http.addFilter(RetryOnceFilter())
