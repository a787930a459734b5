"""Structured logging (structlog) that never writes secrets or personal data.

Redaction is by key name: values of keys that name a secret (password, token, key ...) or
personal data (phone, email, text, body, address, openid ...) are replaced by ``***``
before rendering, in every logger of the process, plugins included. Credentials are masked
by value as well (:func:`mask_secrets`): the ``user:password@`` or ``token@`` of any URL
and every value registered with :func:`add_secrets`, wherever they appear."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Hashable, MutableMapping
from typing import Any

import structlog

_REDACT = re.compile(
    r"(pass|secret|token|api_?key|aes|cred|auth|signature|cookie|"
    r"phone|mobile|e?mail|address|openid|unionid|sender|recipient|from_|to_|body|text|content|payload|name$)",
    re.I,
)
_KEEP = {"event", "level", "timestamp", "logger", "channel", "channel_type", "plugin", "error", "exc_info", "subject",
         "stream", "status", "path", "method", "url", "id", "outbound_id", "conversation", "state", "attempt"}
REDACTED = "***"
# Personal data that slips into free text (provider error messages, exception texts).
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w.])\+?\d[\d\s().-]{6,}\d(?![\w.])")
# The userinfo of a URL (nats://user:password@host, nats://token@host).
_USERINFO = re.compile(r"(?<=://)[^@/\s,]*@")
# Shorter values are not registered: masking every "abc" would garble the output, and a
# password that short is no secret anyway.
_MIN_SECRET = 4
_secrets: set[str] = set()


def add_secrets(*values: str | None) -> None:
    """Mask these values (a password, a token) in everything logged or printed from now
    on; empty values and values shorter than 4 characters are ignored."""
    for value in values:
        if value and len(value) >= _MIN_SECRET:
            _secrets.add(value)


def url_secrets(urls: str) -> list[str]:
    """The password, or token, in the userinfo of each comma-separated URL."""
    from urllib.parse import unquote, urlsplit

    found = []
    for url in urls.split(","):
        try:
            parts = urlsplit(url.strip())
        except ValueError:
            continue
        secret = parts.password if parts.password is not None else parts.username
        if secret:
            found += [secret, unquote(secret)]
    return found


def mask_secrets(text: str) -> str:
    """``text`` with the credentials of any URL in it replaced by ``***@`` and every value
    given to :func:`add_secrets` by ``***``. The one masking function: the bus logs, the
    ``gateway`` command's output and its error messages all go through it."""
    # Values first: a password with an unencoded "@" would otherwise be cut in two.
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _USERINFO.sub(REDACTED + "@", text)


def scrub(text: str) -> str:
    """Mask e-mail addresses and phone numbers in free text."""
    def phone(m: re.Match[str]) -> str:
        return REDACTED if sum(ch.isdigit() for ch in m.group(0)) >= 8 else m.group(0)

    return _PHONE.sub(phone, _EMAIL.sub(REDACTED, text))


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask values whose key names a secret or personal data, and
    e-mail addresses or phone numbers anywhere in the text that is kept."""
    for key, value in list(event.items()):
        if key not in _KEEP and _REDACT.search(key):
            event[key] = REDACTED
        elif isinstance(value, str):
            # Credentials first: scrub would take "user:pw@host" for an e-mail address
            # and leave the user name.
            event[key] = scrub(mask_secrets(value))
    return event


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after set-up)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(format: str = "console", level: str = "info", stream: Any = None) -> None:
    """Set up structlog for the process: JSON lines or a readable console format."""
    renderer: Any
    if format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # structlog annotates the file as TextIO; it only calls write() and flush(), which
        # _CurrentStderr has.
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any) -> Any:
    """A logger bound to ``bind`` (for example ``channel="support-mail"``)."""
    return structlog.get_logger("gateway").bind(**bind)


class Throttle:
    """At most one log line per ``interval`` seconds for each key; the lines held back are
    counted so the next one can say how many there were."""

    def __init__(self, interval: float):
        self.interval = interval
        self._next: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, key: Hashable) -> int | None:
        """None: stay quiet (the line is counted); otherwise the number of lines held back
        since the last one that was written."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval
        return self._held.pop(key, 0)
