"""One exception tree: callers catch ours, library exceptions are mapped at the boundary."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import msgspec


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid. ``problems`` lists each one as
    ``file: key.path: expected ..., got ...``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StartupError(ConfigError):
    """The configuration is valid but cannot be used on this machine right now: a port or
    folder it names is taken (by another ``gateway run``, say). The message is one line
    naming the key and what to do; ``gateway`` exits 2."""

    def __init__(self, message: str):
        super().__init__([message])


class PluginError(GatewayError):
    """A plugin is broken: a bad hook, a duplicate channel type, a failed start."""


class BusUnavailable(GatewayError):
    """The bus did not acknowledge in time: the caller must not report success (an HTTP
    channel answers 503 so the provider retries)."""


class RequestError(GatewayError):
    """A channel rejected an incoming request; ``status`` is the HTTP status to answer
    (400 malformed, 403 bad signature, 413 too large ...). ``reason`` is short and never
    contains the request body."""

    status = 400

    def __init__(self, reason: str, *, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class SignatureError(RequestError):
    """A webhook's signature or timestamp did not verify."""

    status = 403


class PayloadTooLarge(RequestError):
    """A request or message exceeds a configured size limit."""

    status = 413


class DeliveryError(GatewayError):
    """``Channel.deliver`` failed. ``permanent`` says whether retrying can help;
    ``retry_after`` (seconds) passes on a provider's Retry-After."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.code = code
        self.retry_after = retry_after


class Deferred(GatewayError):
    """``Channel.deliver`` may not send now, but will be able to at ``until`` (UTC): the
    customer's quiet hours (SMS), a provider's sending window. Not a failure: the core
    keeps the outbound, reports it (a ``failed`` status with ``error.code`` = ``code``,
    ``permanent`` false and ``next_attempt_at`` = ``until``), tries again then, and does
    not count it against ``max_attempts``."""

    def __init__(self, message: str, *, until: datetime, code: str = "deferred"):
        super().__init__(message)
        self.message = message
        self.until = until if until.tzinfo is not None else until.replace(tzinfo=timezone.utc)
        self.code = code


_OWN_PATH = re.compile(r"\$(\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*")


def body_problem(exc: msgspec.DecodeError) -> str:
    """A reason for a body msgspec refused that names the field and the problem but never
    repeats what the sender wrote: msgspec quotes unknown key names ("unknown field
    `...`"), enum values and dict keys (``$.meta[...]``), so only its messages about
    types and required fields, and paths made of our own field names, are kept."""
    text = str(exc)
    head, sep, tail = text.rpartition(" - at `")
    path = None
    if sep:
        text = head
        candidate = tail.rstrip("`")
        path = candidate if _OWN_PATH.fullmatch(candidate) else None
    if not isinstance(exc, msgspec.ValidationError):
        problem = "malformed"  # msgspec's JSON syntax errors carry only a byte offset
        problem = text if text.startswith(("JSON is malformed", "Input data was truncated")) else problem
    elif text.startswith(("Expected `", "Object missing required field `")):
        problem = text
    elif text.startswith("Object contains unknown field"):
        problem = "unknown field"
    else:
        problem = "invalid value"
    return f"{problem} at {path}" if path else problem
