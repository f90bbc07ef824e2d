"""What the Hub client prints through us: the token masked everywhere, retries said once.

A proxy, a mirror or a wrong `HF_ENDPOINT` may echo the `Authorization` header in an error message, and
huggingface_hub passes the server's message on verbatim; at `-v`, HTTP libraries log what they send. The token
is whatever huggingface_hub would send (`huggingface_hub.get_token()`: `HF_TOKEN`, the login cache, ...), in any
form, so that exact string is masked, plus anything shaped like a Hub token (`hf_...`).

huggingface_hub's backoff logs two warnings per retry (five retries: ~23 s) through its own handler, which the
root handler repeats when the library's logger propagates. The CLI keeps one handler (the root's) and says once
which host is being retried and how to skip it.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

MASK = "<token>"
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9_]{8,}")
_secrets: set[str] = set()
_looked_up = False


def add_secret(token: str | None) -> None:
    """Mask `token` too (a token passed explicitly rather than found by huggingface_hub)."""
    if token and len(token) >= 4:  # masking a 1-3 character string would garble every message
        _secrets.add(token)


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


def mask_secrets(text: str) -> str:
    """`text` with the Hub token (exact value) and `hf_...`-shaped strings replaced by `<token>`."""
    for secret in sorted(_known_secrets(), key=len, reverse=True):
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
