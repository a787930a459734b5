"""One exception tree: callers catch ours, library exceptions are mapped at the boundary.

Every error the gateway raises on purpose is defined here and derives from
:class:`GatewayError`. Where callers may already catch a library's or the builtin's class
for the same thing, the error derives from that too (:class:`ReminderError` is a
``ValueError``, :class:`MessageTooLarge` nats-py's ``MaxPayloadError``)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import msgspec
import nats.errors


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid. ``problems`` lists each one as
    ``file: key.path: expected ..., got ...``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ConfigValueError(ConfigError, ValueError):
    """Raised by a configuration Struct's ``__post_init__`` for what its types cannot say
    (a key that another key makes required, a region code): the loader reports it like a
    type error, at the key's own path and line, with what was found added (hidden when
    secret): ``gw.toml:7: channels.sms.default_region: expected an ISO 3166 alpha-2 region
    such as CN or US, got "XX"``. ``key`` is a field of the Struct, or a path below it
    (``"strings.fr"``), or ``""`` for the section as a whole; ``expected`` says what would
    do, without the value. A ``ValueError``, so msgspec reports it where the Struct is."""

    def __init__(self, key: str | tuple[str, ...], expected: str):
        self.key: tuple[str, ...] = tuple(key.split(".")) if isinstance(key, str) and key else tuple(key)
        self.expected = expected
        super().__init__([f"{'.'.join(self.key) or '(section)'}: {expected}"])


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

    @classmethod
    def from_decode(cls, what: str, exc: msgspec.DecodeError) -> RequestError:
        """A 400 for a body msgspec refused, ``"<what>: <problem>"``: the problem names the
        field and what is wrong with it but never repeats what the sender wrote (msgspec
        quotes unknown key names, enum values and dict keys; those are left out).
        ``raise RequestError.from_decode("not a fax event", exc) from None``."""
        return cls(f"{what}: {_body_problem(exc)}")


class SignatureError(RequestError):
    """A webhook's signature or timestamp did not verify."""

    status = 403


class PayloadTooLarge(RequestError):
    """A request or message exceeds a configured size limit."""

    status = 413


class DeliveryError(GatewayError):
    """``Channel.deliver`` failed. ``permanent`` says whether retrying can help; ``code``
    is the reason on the bus (``error.code`` of the status and the dead letter);
    ``retry_after`` (seconds) passes on a provider's Retry-After; ``provider_code`` is the
    provider's own error code as it gave it (WeChat's ``errcode``, OneBot's ``retcode``),
    for code that handles one provider's refusals."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        code: str | None = None,
        retry_after: float | None = None,
        provider_code: int | str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.code = code
        self.retry_after = retry_after
        self.provider_code = provider_code


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


class WebSocketClosed(GatewayError):
    """The connection is closed (or closing): nothing more can be sent on it."""

    def __init__(self, code: int | None, reason: str = ""):
        super().__init__(f"websocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class ReminderError(GatewayError, ValueError):
    """A reminder that cannot be scheduled as given (an id or conversation that is not a
    subject token, a due time after its deadline ...). Also a ``ValueError``, which it
    was before it joined this tree."""


class MessageTooLarge(GatewayError, nats.errors.MaxPayloadError):
    """A publish was refused before it reached the socket: payload plus headers exceed the
    server's ``max_payload``. (Also nats-py's own error for the same thing, so code that
    handles that handles this.)"""

    def __init__(self, size: int, limit: int):
        super().__init__()
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return f"nats: message of {self.size} bytes (payload and headers) exceeds the server's max_payload {self.limit}"


_OWN_PATH = re.compile(r"\$(\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*")


def _body_problem(exc: msgspec.DecodeError) -> str:
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
