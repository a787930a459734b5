"""One TOML file configures the gateway. Every problem is reported at once, each with the
file, line, key path, what was expected and what was found; unknown keys are errors;
``${VAR}`` (or ``${VAR:-default}``) is taken from the environment."""

from __future__ import annotations

import os
import re
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union, get_args, get_origin

import msgspec

from .errors import ConfigError, ConfigValueError
from .schema import QuietHours

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

# The namespaces of the core's records in the shared state bucket (keys built in
# bus/state.py). A channel's records live under its name, so no channel may be named so.
CORE_NAMESPACES: dict[str, str] = {
    "core": "process liveness markers and delivery leases",
    "survey": "the pending survey of a conversation",
    "quiet": "a conversation's quiet hours for reminders",
    "desk": "a conversation's service-desk record (acknowledgement, SLA timers) and waiting counts",
}
_SECRET = re.compile(r"(pass|secret|token|key|cred|auth|sid|aes)", re.I)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Duration(float):
    """A duration key of the configuration: ``"30s"`` in the file, a number of seconds
    (30.0) in the code, converted once when the file is loaded. ``text`` keeps what was
    written, and ``str()`` (an f-string) gives it back, so messages name the value as the
    user wrote it; arithmetic gives plain floats. ``Duration("1.5h")``; ``ms``, ``s``,
    ``m``, ``h`` and ``d`` are the units."""

    __slots__ = ("text",)
    EXPECTED = "a duration such as 500ms, 30s, 5m, 2h, 7d"
    """What a duration key expects, as configuration errors say it."""
    text: str

    def __new__(cls, text: str) -> Duration:
        m = _DURATION.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(f"not a duration: {text!r}")
        self = super().__new__(cls, float(m.group(1)) * _UNITS[m.group(2)])
        self.text = text
        return self

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Duration({self.text!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Duration, (self.text,))


def seconds(duration: Duration | str | float) -> float:
    """A duration in seconds, as a plain float: a :class:`Duration` (a config value) is
    one already, a string is read like a config value (``"7d"`` → 604800.0), a number is
    taken as seconds. Raises ValueError for anything else."""
    if isinstance(duration, str):
        return float(Duration(duration))
    if isinstance(duration, (int, float)) and not isinstance(duration, bool):
        return float(duration)
    raise ValueError(f"not a duration: {duration!r}")


# msgspec's names for what TOML gives, as its own "Expected `str`, got `int`" says them.
_TOML_TYPES = {bool: "bool", int: "int", float: "float", str: "str", dict: "object", list: "array"}


def _decode(tp: Any, value: Any) -> Any:
    """msgspec's ``dec_hook`` for the configuration's own types: a :class:`Duration` from
    its text. The ValueError becomes msgspec's ValidationError, located by msgspec."""
    if tp is Duration:
        if not isinstance(value, str):
            raise ValueError(f"Expected `str`, got `{_TOML_TYPES.get(type(value), type(value).__name__)}`")
        try:
            return Duration(value)
        except ValueError:
            raise ValueError(f"Expected {Duration.EXPECTED}, got `str`") from None
    raise NotImplementedError(tp)


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class BusConfig(_Section):
    """``[bus]``: where the NATS JetStream bus is and how it is laid out."""

    url: str = ""
    """``nats://host:port`` (``tls://``, ``ws://``, ``wss://``; comma-separated for a
    cluster); empty: start an embedded nats-server. ``GATEWAY_BUS_URL`` overrides it."""
    prefix: Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]+$")] = "gw"
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""
    data_dir: str = "./data/nats"
    """JetStream storage of the embedded server."""
    embedded_host: str = "127.0.0.1"
    embedded_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 4222
    """0 picks a free port. ``GATEWAY_BUS_PORT`` (or ``gateway run --bus-port``) overrides it."""
    connect_timeout: Duration = Duration("5s")
    publish_timeout: Duration = Duration("5s")
    dedup_ttl: Duration = Duration("7d")
    """How long a provider message id is remembered: a retry within it is not published again."""
    duplicate_window: Duration = Duration("2m")
    """JetStream's own Nats-Msg-Id window on the inbound and outbound streams."""
    inbound_max_age: Duration = Duration("90d")
    status_max_age: Duration = Duration("30d")
    dead_max_age: Duration = Duration("90d")
    blob_max_age: Duration = Duration("90d")
    """Binary content (attachments, media, raw e-mails) in the object store is kept this long."""
    inline_limit: Annotated[int, msgspec.Meta(ge=0)] = 16384
    """Binary parts larger than this go to the object store."""
    max_message_size: Annotated[int, msgspec.Meta(ge=1024)] = 1048576


class HttpConfig(_Section):
    """``[http]``: the one HTTP server shared by webhook channels, /healthz and /metrics."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    """``GATEWAY_HTTP_PORT`` (or ``gateway run --port``) overrides it."""
    max_body: Annotated[int, msgspec.Meta(ge=1024)] = 1048576
    """Largest request body in bytes (a channel may set a lower limit for its routes)."""
    header_timeout: Duration = Duration("10s")
    """A request's line and headers must arrive within this (counted from the connection's
    opening, or from the first byte of a later request on a kept-alive connection);
    otherwise 408 and the connection is closed."""
    body_timeout: Duration = Duration("30s")
    """A request's whole body must arrive within this after its headers; otherwise 408 and
    the connection is closed."""
    keep_alive_timeout: Duration = Duration("5s")
    """An idle kept-alive connection is closed after this."""
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 512
    """Open connections at most; one more is answered 503 and closed at once. Keep it well
    below the process's open-file limit (``ulimit -n``), which the bus and the store share."""


class LogConfig(_Section):
    """``[log]``."""

    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class OutboundConfig(_Section):
    """``[outbound]``: delivery of replies from the bus to the channels."""

    enabled: bool = True
    backoff: list[Duration] = msgspec.field(
        default_factory=lambda: [Duration(d) for d in ("1s", "5s", "30s", "2m", "10m", "30m")])
    """Wait before attempt 2, 3, ...; the last value repeats. Jitter of ±20% is added."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 8
    ack_wait: Duration = Duration("60s")
    """How long one delivery attempt may take before the bus redelivers it."""
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 64
    """Deliveries in progress at once per channel, unless the channel sets its own; the
    process takes up to 16 times this many messages off the bus."""
    receipt_ttl: Duration = Duration("7d")
    """How long a provider receipt is kept to prevent a second send after a crash."""
    lease: Duration = Duration("10s")
    """How long a channel's delivery stays with a process that stopped renewing it (a
    crash): the longest pause of a channel's outbounds when its process dies."""


class RemindersConfig(_Section):
    """``[reminders]``: callback reminders (JetStream message schedules) and surveys."""

    enabled: bool = True
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    """Reminders processed at once (scheduling checks and firings) per process."""
    keep_fired: Duration = Duration("30d")
    """How long a fired reminder's copy stays in the stream if no gateway takes it (the
    gateway removes it once processed)."""
    ack_wait: Duration = Duration("30s")


_PERIOD = Annotated[str, msgspec.Meta(
    pattern=r"^(24h|([01][0-9]|2[0-3]):[0-5][0-9]-(([01][0-9]|2[0-3]):[0-5][0-9]|24:00))$",
    description="a period as HH:MM-HH:MM (22:00-06:00 runs past midnight) or 24h")]
WEEKDAY_KEYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_PERIOD_RE = re.compile(r"^(24h|([01][0-9]|2[0-3]):[0-5][0-9]-(([01][0-9]|2[0-3]):[0-5][0-9]|24:00))$")


class ClosureConfig(_Section):
    """One ``[[closed]]`` entry of a closures file: the desk is closed from ``from`` to
    ``to`` (local wall times, ``2026-12-24T12:00``; a date alone is its midnight)."""

    start: str = msgspec.field(name="from")
    end: str = msgspec.field(name="to")
    note: str = ""


class OpeningConfig(_Section):
    """One ``[[open]]`` entry: on ``date`` the desk keeps ``hours`` instead of the weekly
    ones (an extra opening, short hours; ``[]``: closed that day)."""

    date: str
    hours: list[_PERIOD]
    note: str = ""


class ClosuresFile(_Section):
    """The desk's own closures and openings (a TOML file named by a calendar's ``closures``)."""

    closed: list[ClosureConfig] = msgspec.field(default_factory=list)
    open: list[OpeningConfig] = msgspec.field(default_factory=list)


class CalendarConfig(_Section):
    """``[calendars.<name>]``: a desk's service hours, shared by the channels that name it."""

    tz: str = "Asia/Shanghai"
    """An IANA time zone: the periods are wall-clock times there."""
    hours: str | dict[str, list[str]] = "24h"
    """``"24h"``, or a table ``{mon-fri = ["09:00-12:00", "13:00-18:00"], sat = ["22:00-02:00"]}``;
    a weekday not named is closed."""
    holidays: str | None = None
    """``"CN"``: mainland China's holidays and 调休 working days (chinesecalendar); another
    ISO country code (``"US"``, ``"DE-BY"`` with a subdivision): the ``holidays`` package."""
    workday: Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"] = "mon"
    """The weekday whose hours an extra working day (调休) keeps."""
    closures: str | None = None
    """A TOML file of the desk's own ``[[closed]]`` and ``[[open]]`` entries (relative to
    the configuration file); read again on reload."""
    loaded: ClosuresFile | None = None
    """Filled from ``closures`` when the configuration is loaded (not a key of the file)."""


class ServiceConfig(_Section):
    """``[service]``: service hours, the automatic acknowledgement and SLA timers."""

    enabled: bool = True
    templates: dict[str, str] = msgspec.field(default_factory=lambda: {
        "zh": "您好，您的消息已收到。我们的服务时间外暂时无人值守，客服将于 {opens} 上班后处理，预计 {expected} 内答复。",
        "en": "Hello, we received your message. Our desk is closed now; it opens {opens} and you can "
              "expect an answer within {expected}.",
    })
    """The acknowledgement per language; ``{opens}`` (the local opening time) and
    ``{expected}`` (the channel's ``answer_within``) are filled in."""
    ack_wait: Duration = Duration("30s")
    """How long an unacknowledged timer or control message waits before it is given again."""


class GatewaySettings(_Section):
    """Everything but ``[channels.*]``."""

    bus: BusConfig = msgspec.field(default_factory=BusConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    outbound: OutboundConfig = msgspec.field(default_factory=OutboundConfig)
    reminders: RemindersConfig = msgspec.field(default_factory=RemindersConfig)
    calendars: dict[str, CalendarConfig] = msgspec.field(default_factory=dict)
    service: ServiceConfig = msgspec.field(default_factory=ServiceConfig)


class ChannelServiceConfig(_Section):
    """``service = {calendar = "desk", ...}`` in a channel: its service hours, the
    acknowledgement outside them and its SLA rules."""

    calendar: str
    """A ``[calendars.<name>]``."""
    acknowledge: bool = True
    """Answer automatically, once per closed period and conversation, outside service hours."""
    language: Literal["zh", "en"] = "zh"
    ack_delay: Duration = Duration("30s")
    """Wait this long after the customer's message: a backend's own reply (a bot) within it
    suppresses the acknowledgement."""
    answer_within: Duration = Duration("1d")
    """The expected handling time the acknowledgement promises (``{expected}``)."""
    first_response: Duration | None = None
    """SLA: the first reply to a conversation within this."""
    next_response: Duration | None = None
    """SLA: every later customer message answered within this."""
    resolution: Duration | None = None
    """SLA: a conversation marked complaint resolved within this."""
    business_hours: bool = False
    """SLA durations count only the calendar's open time (``8h`` = one 8-hour day)."""
    warn_at: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.8
    """A warning when this fraction of an SLA's time has passed."""
    followup_within: Duration | None = None
    """A conversation marked resolved needs a follow-up (回访) sent within this (wall time);
    a follow-up that fails, expires or is missing becomes a desk task."""


class ChannelCommon(_Section):
    """Keys every ``[channels.<name>]`` section has, besides the plugin's own."""

    type: str
    enabled: bool = True
    required: bool = True
    """False: a failure to start is logged and the gateway runs without this channel."""
    rate_limit: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Outbound messages per second (default: what the channel type declares)."""
    backoff: list[Duration] | None = None
    """Per-channel override of ``[outbound] backoff``."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] | None = None
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    """Deliveries in progress at once on this channel (default: ``[outbound] concurrency``)."""
    quiet_hours: QuietHours | None = None
    """``quiet_hours = {start = "21:00", end = "09:00", tz = "Asia/Shanghai"}``: the
    customers' rest hours on this channel, for reminders (a reminder or the conversation
    may override) and for channels that must not send at night (SMS: ``ctx.quiet_hours``)."""
    service: ChannelServiceConfig | None = None
    """Service hours, acknowledgement and SLA rules (``[calendars]``, docs/service-hours.md)."""


_COMMON_KEYS = {f.encode_name for f in msgspec.structs.fields(ChannelCommon)}


@dataclass
class ChannelConfig:
    """One configured channel instance."""

    name: str
    type: str
    enabled: bool
    required: bool
    rate_limit: float | None
    backoff: list[Duration] | None
    max_attempts: int | None
    options: Any
    """The plugin's ``config_type`` instance (None if the type takes no keys)."""
    concurrency: int | None = None
    quiet_hours: QuietHours | None = None
    service: ChannelServiceConfig | None = None


@dataclass
class Config:
    """A validated configuration."""

    settings: GatewaySettings
    channels: dict[str, ChannelConfig] = field(default_factory=dict)
    source: str = "<defaults>"
    warnings: list[str] = field(default_factory=list)
    """What is valid but will not work fully (a holiday calendar that does not know a year
    yet): ``gateway check-config`` prints it, ``gateway run`` logs it."""
    from_env: frozenset[tuple[str, ...]] = frozenset()
    """Key paths (``("bus", "url")``) whose value came from the environment (``${VAR}`` or
    a ``GATEWAY_*`` override): such values are never printed."""

    @property
    def bus(self) -> BusConfig:
        return self.settings.bus

    @property
    def http(self) -> HttpConfig:
        return self.settings.http

    @property
    def log(self) -> LogConfig:
        return self.settings.log

    @property
    def outbound(self) -> OutboundConfig:
        return self.settings.outbound

    @property
    def reminders(self) -> RemindersConfig:
        return self.settings.reminders


# --- loading ------------------------------------------------------------------------


class _Locator:
    """Finds the line of a key path in TOML text (tomllib gives no positions)."""

    def __init__(self, text: str):
        self.keys: dict[tuple[str, ...], int] = {}
        arrays: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[["):  # an array of tables: each entry is its own index
                inner = line.split("#")[0].strip().strip("[]").strip()
                name = tuple(_split_key(inner))
                index = arrays.get(name, 0)
                arrays[name] = index + 1
                self.keys.setdefault(name, lineno)
                table = name + (str(index),)
                self.keys.setdefault(table, lineno)
            elif line.startswith("["):
                inner = line.strip("[]").split("#")[0].strip().rstrip("]")
                table = tuple(_split_key(inner))
                self.keys.setdefault(table, lineno)
            elif "=" in line:
                key = line.split("=", 1)[0].strip()
                self.keys.setdefault(table + tuple(_split_key(key)), lineno)

    def line(self, path: tuple[str, ...]) -> int | None:
        while path:
            if path in self.keys:
                return self.keys[path]
            path = path[:-1]
        return None


def _split_key(key: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', key)]


class _Problems:
    def __init__(self, source: str, locator: _Locator | None):
        self.source = source
        self.locator = locator
        self.items: list[str] = []
        self.from_env: set[tuple[str, ...]] = set()
        self._keys: set[tuple[str, ...]] = set()

    def add(self, path: tuple[str, ...], what: str) -> None:
        """One problem per key: the first said (a type error) is the one a check that
        reads the same key again (a calendar's periods) would repeat."""
        if path in self._keys:
            return
        self._keys.add(path)
        line = self.locator.line(path) if self.locator else None
        where = f"{self.source}:{line}" if line else self.source
        key = ".".join(path) if path else "(top level)"
        self.items.append(f"{where}: {key}: {what}")

    def shown(self, path: tuple[str, ...], value: Any) -> str:
        """The found value, unless it is a secret or came from the environment."""
        if path in self.from_env or any(_SECRET.search(p) for p in path[-1:]):
            return "(value hidden)"
        text = repr(value) if not isinstance(value, str) else '"' + value.replace('"', '\\"') + '"'
        return text if len(text) <= 60 else text[:57] + "..."


def _resolve_env(value: Any, path: tuple[str, ...], env: Mapping[str, str], problems: _Problems) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_env(v, path + (k,), env, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_env(v, path + (str(i),), env, problems) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        problems.from_env.add(path)

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.add(path, f"environment variable {name} is not set")
            return ""

        return _VAR.sub(sub, value)
    return value


def _found_type(value: Any) -> str:
    names: dict[type, str] = {dict: "table", list: "array"}
    return names.get(type(value), type(value).__name__)


_INVALID: Any = object()
"""What :func:`_check` returns for a value whose problems it reported."""


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _check(value: Any, tp: Any, path: tuple[str, ...], problems: _Problems) -> Any:
    """``value`` converted to ``tp`` (a Struct or a field's type) by msgspec, or ``_INVALID``
    once every problem in it is reported at its own key path. msgspec judges each value and
    runs each Struct's ``__post_init__``; the walk over tables, arrays and dicts is ours
    because msgspec stops at the first problem, names no dict key (``$.groups[...]``) and
    suggests nothing for a misspelled key."""
    tp = _member(tp, value)
    if _is_struct(tp):
        if not isinstance(value, dict):
            problems.add(path, f"expected a table, got {_found_type(value)}")
            return _INVALID
        fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
        ok = True
        for key in value:
            if key not in fields:
                hint = _closest(key, fields)
                problems.add(path + (key,), "unknown key" + (f" (did you mean {hint!r}?)" if hint else "")
                             + f"; expected one of: {', '.join(sorted(fields))}")
                ok = False
        for name, f in fields.items():
            if name in value:
                ok = _check(value[name], f.type, path + (name,), problems) is not _INVALID and ok
            elif f.required:
                problems.add(path + (name,), f"missing required key ({_describe(f.type)})")
                ok = False
    else:
        bare = get_args(tp)[0] if get_origin(tp) is Annotated else tp
        items: list[tuple[str, Any]] = []
        if get_origin(bare) is list and isinstance(value, list):
            items = [(str(i), v) for i, v in enumerate(value)]
        elif get_origin(bare) is dict and isinstance(value, dict):
            items = [(str(k), v) for k, v in value.items()]
        item_type = get_args(bare)[-1] if items else None
        ok = all([_check(v, item_type, path + (k,), problems) is not _INVALID for k, v in items])
    return _convert(value, tp, path, problems) if ok else _INVALID


def _member(tp: Any, value: Any) -> Any:
    """Of a union, the member a table or an array is checked against (``smtp: SmtpInConfig |
    None`` is a table, whatever was written); else ``tp`` itself."""
    if value is None or get_origin(tp) not in (Union, types.UnionType):
        return tp
    members = [a for a in get_args(tp) if a is not type(None)]
    if len(members) == 1 and _is_struct(members[0]):
        return members[0]
    kind = dict if isinstance(value, dict) else list if isinstance(value, list) else None
    fits = [m for m in members if kind is not None and (get_origin(m) is kind or (kind is dict and _is_struct(m)))]
    return fits[0] if len(fits) == 1 else tp


def _convert(value: Any, tp: Any, path: tuple[str, ...], problems: _Problems) -> Any:
    """msgspec's verdict on ``value``, whose items :func:`_check` found valid: a problem is
    then the value itself (the error has no path of its own) or, for a Struct, its own
    ``__post_init__`` check."""
    try:
        return msgspec.convert(value, tp, dec_hook=_decode)
    except msgspec.ValidationError as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigValueError):
            # What was found is shown when it is a value (not a table), unless the check said it.
            at, found = path + cause.key, _lookup(value, cause.key)
            scalar = found is not _INVALID and not isinstance(found, (dict, list))
            shown = f", got {problems.shown(at, found)}" if scalar and ", got " not in cause.expected else ""
            problems.add(at, cause.expected + shown)
        elif _is_struct(tp):  # a plugin's own check that raised a plain ValueError
            problems.add(path, str(cause or exc).replace("`", ""))
        else:
            msg, _, inside = str(exc).replace("`", "").partition(" - at $")
            msg = msg[:1].lower() + msg[1:]
            if inside:  # below a type the walk does not enter (a tuple): msgspec says where
                problems.add(path, f"{msg} (in {inside})")
                return _INVALID
            if "matching regex" in msg or not msg.startswith("expected"):
                msg = f"expected {_describe(tp)}, got {_found_type(value)}"
            problems.add(path, f"{msg}{' ' if ', got ' in msg else ', got '}{problems.shown(path, value)}")
        return _INVALID


def _lookup(value: Any, key: tuple[str, ...]) -> Any:
    for k in key:
        if isinstance(value, dict) and k in value:
            value = value[k]
        elif isinstance(value, list) and k.isdigit() and int(k) < len(value):
            value = value[int(k)]
        else:
            return _INVALID
    return value


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        for m in meta:
            if isinstance(m, msgspec.Meta) and m.description:
                return m.description
        return _describe(base)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is Union:
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        return "array of " + _describe(get_args(tp)[0])
    if tp is type(None):
        return "none"
    if tp is Duration:
        return Duration.EXPECTED
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _closest(key: str, options: Mapping[str, Any]) -> str | None:
    import difflib

    hits = difflib.get_close_matches(key, list(options), n=1, cutoff=0.75)
    return hits[0] if hits else None


_BUS_SCHEMES = ("nats", "tls", "ws", "wss")
_BUS_URL_EXPECTED = "expected nats://, tls://, ws:// or wss:// URLs with a host (comma-separated for a cluster)"
_PORT_EXPECTED = "expected a port number from 0 to 65535"

# Environment overrides of single keys, applied after the file (and its ${VAR}s).
_ENV_PORTS = {"GATEWAY_HTTP_PORT": ("http", "port"), "GATEWAY_BUS_PORT": ("bus", "embedded_port")}


def bus_url_problem(url: str) -> str | None:
    """Why ``url`` (a ``[bus] url``) is not something the NATS client can connect to, or
    None. A URL without a scheme is refused even where the client would guess ``nats://``:
    the same words in a file should not mean a host here and garbage there."""
    from urllib.parse import urlsplit

    schemes = set()
    for entry in url.split(","):
        entry = entry.strip()
        try:
            parts = urlsplit(entry)
            port = parts.port
        except ValueError:
            return _BUS_URL_EXPECTED
        if parts.scheme not in _BUS_SCHEMES or not parts.hostname or (port is not None and port == 0):
            return _BUS_URL_EXPECTED
        schemes.add(parts.scheme in ("ws", "wss"))
    if len(schemes) > 1:
        return f"{_BUS_URL_EXPECTED}; WebSocket and other URLs cannot be mixed"
    return None


def _env_port(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() and int(value) <= 65535 else None


def parse_config(
    data: dict[str, Any],
    channel_types: Mapping[str, Any],
    *,
    source: str = "<config>",
    text: str | None = None,
    env: Mapping[str, str] | None = None,
    bus_only: bool = False,
    base_dir: Path | None = None,
) -> Config:
    """Validate already-parsed TOML data. ``channel_types`` maps a type name to its
    :class:`Channel` class (for its ``config_type``). Raises :class:`ConfigError` with
    every problem found.

    ``bus_only`` is for commands that only talk to the bus (``gateway send``, ``tail``,
    ``dlq``, ``reminders``): the channel sections are not validated and their ``${VAR}``
    are not resolved (a channel's secret need not be set to publish a test message);
    ``channels`` then holds each channel's name and ``type`` only (``options`` None)."""
    problems = _Problems(source, _Locator(text) if text is not None else None)
    data = dict(data)
    channels_raw = data.pop("channels", {})
    data = _resolve_env(data, (), os.environ if env is None else env, problems)
    settings: GatewaySettings = _check(data, GatewaySettings, (), problems)
    warnings: list[str] = []
    calendars_raw = data.get("calendars")
    calendar_names = set(calendars_raw) if isinstance(calendars_raw, dict) else set()
    closures: dict[str, ClosuresFile] = {}
    if isinstance(calendars_raw, dict):
        for cname, craw in calendars_raw.items():
            if isinstance(craw, dict) and (loaded := _check_calendar(craw, ("calendars", cname), problems, warnings,
                                                                      base_dir)) is not None:
                closures[cname] = loaded
    channels: dict[str, ChannelConfig] = {}
    if not isinstance(channels_raw, dict):
        problems.add(("channels",), f"expected a table of [channels.<name>] sections, got {_found_type(channels_raw)}")
        channels_raw = {}
    if bus_only:
        channels_raw = {name: {k: v for k, v in section.items() if k == "type"} if isinstance(section, dict) else section
                        for name, section in channels_raw.items()}
    else:
        channels_raw = _resolve_env(channels_raw, ("channels",), os.environ if env is None else env, problems)
    for name, section in channels_raw.items():
        path = ("channels", name)
        if not _NAME.match(name):
            problems.add(path, "channel names are lower-case letters, digits, '-' and '_' (they become NATS subject tokens)")
            continue
        if name in CORE_NAMESPACES:
            problems.add(path, f"the channel name {name!r} is reserved (the gateway keeps {CORE_NAMESPACES[name]} "
                               f"under it); reserved: {', '.join(sorted(CORE_NAMESPACES))}")
            continue
        if not isinstance(section, dict):
            problems.add(path, f"expected a table, got {_found_type(section)}")
            continue
        common = {k: v for k, v in section.items() if k in _COMMON_KEYS}
        own = {k: v for k, v in section.items() if k not in _COMMON_KEYS}
        ctype = common.get("type")
        if not isinstance(ctype, str):
            problems.add(path + ("type",), "missing required key (the channel type, see `gateway plugins`)")
            continue
        if bus_only:
            channels[name] = ChannelConfig(name, ctype, True, True, None, None, None, None)
            continue
        if ctype not in channel_types:
            known = ", ".join(sorted(channel_types)) or "none loaded"
            problems.add(path + ("type",), f"unknown channel type {ctype!r}; loaded types: {known}")
            continue
        c = _check(common, ChannelCommon, path, problems)
        cls = getattr(channel_types[ctype], "cls", channel_types[ctype])  # a ChannelTypeInfo or a class
        config_type = getattr(cls, "config_type", None)
        if config_type is not None:
            options = _check(own, config_type, path, problems)
        else:
            options = _INVALID if own else None
            for key in own:
                problems.add(path + (key,), f"unknown key; channel type {ctype!r} takes no keys of its own")
        if c is _INVALID or options is _INVALID:
            continue
        quiet = c.quiet_hours.problems() if c.quiet_hours is not None else {}
        for key, problem in quiet.items():
            problems.add(path + ("quiet_hours", key), problem.replace("must be", "expected", 1))
        if quiet:
            continue
        if c.service is not None and c.service.calendar not in calendar_names:
            problems.add(path + ("service", "calendar"), f"no [calendars.{c.service.calendar}]; defined: "
                                                           f"{', '.join(sorted(calendar_names)) or 'none'}")
            continue
        channels[name] = ChannelConfig(name, ctype, c.enabled, c.required, c.rate_limit, c.backoff, c.max_attempts, options,
                                       c.concurrency, c.quiet_hours, c.service)
    environ = os.environ if env is None else env
    from_env = set(problems.from_env)
    # An override is checked like the key it replaces and named by its variable; its
    # value is never shown (it came from the environment).
    bus_url = environ.get("GATEWAY_BUS_URL")
    if bus_url:
        from_env.add(("bus", "url"))
        if (why := bus_url_problem(bus_url)) is not None:
            problems.items.append(f"{source}: $GATEWAY_BUS_URL: {why}, got (value hidden)")
    else:
        file_url = data.get("bus", {}).get("url") if isinstance(data.get("bus"), dict) else None
        if isinstance(file_url, str) and file_url and (why := bus_url_problem(file_url)) is not None:
            problems.add(("bus", "url"), f"{why}, got {problems.shown(('bus', 'url'), file_url)}")
    ports: dict[tuple[str, str], int] = {}
    for var, key in _ENV_PORTS.items():
        raw = environ.get(var)
        if raw is None or raw == "":
            continue
        port = _env_port(raw.strip())
        if port is None:
            problems.items.append(f"{source}: ${var}: {_PORT_EXPECTED}, got (value hidden)")
        else:
            ports[key] = port
            from_env.add(key)
    if problems.items:
        raise ConfigError(problems.items)
    for cname, loaded in closures.items():
        settings.calendars[cname].loaded = loaded
    if bus_url:
        settings.bus.url = bus_url
    # "nats://a, nats://b" is a fine list to write; the client splits on the commas alone.
    settings.bus.url = ",".join(u.strip() for u in settings.bus.url.split(",")) if settings.bus.url else ""
    if ("http", "port") in ports:
        settings.http.port = ports[("http", "port")]
    if ("bus", "embedded_port") in ports:
        settings.bus.embedded_port = ports[("bus", "embedded_port")]
    return Config(settings=settings, channels=channels, source=source, from_env=frozenset(from_env),
                  warnings=warnings)


def _zone_exists(tz: str) -> bool:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _check_calendar(raw: dict[str, Any], path: tuple[str, ...], problems: _Problems, warnings: list[str],
                    base_dir: Path | None) -> ClosuresFile | None:
    """What the types cannot say about a calendar: the zone exists, a period does not end
    where it starts, weekday ranges do not overlap, the holiday source is known (and which
    years it cannot answer), the closures file reads. Returns the closures, loaded."""
    tz = raw.get("tz", "Asia/Shanghai")
    if isinstance(tz, str) and not _zone_exists(tz):
        problems.add(path + ("tz",), f"expected an IANA time zone such as Asia/Shanghai, got {tz!r}")
    hours = raw.get("hours", "24h")
    if isinstance(hours, str) and hours != "24h":
        problems.add(path + ("hours",), f'expected "24h" or a table of weekdays, got {problems.shown(path, hours)}')
    elif isinstance(hours, dict):
        seen: dict[str, str] = {}
        for key, periods in hours.items():
            days = weekday_range(key)
            if not days:
                problems.add(path + ("hours", key), "expected a weekday (mon, tue, wed, thu, fri, sat, sun) or a range "
                                                    "of them (mon-fri) as the key")
            for day in days:
                if day in seen:
                    problems.add(path + ("hours", key), f"{day} is given twice (by {seen[day]!r} and {key!r})")
                seen[day] = key
            if not isinstance(periods, list):
                problems.add(path + ("hours", key), f"expected an array of periods such as [\"09:00-18:00\"], got "
                                                    f"{_found_type(periods)}")
                continue
            for i, p in enumerate(periods):
                problems_in = _period_problem(p)
                if problems_in:
                    problems.add(path + ("hours", key, str(i)), problems_in)
    spec = raw.get("holidays")
    if isinstance(spec, str):
        _check_holidays(spec, path + ("holidays",), problems, warnings)
    if "loaded" in raw:
        problems.add(path + ("loaded",), "unknown key; expected one of: closures, holidays, hours, tz, workday")
        return None
    closures = raw.get("closures")
    if not isinstance(closures, str):
        return None
    cpath = Path(closures) if base_dir is None or Path(closures).is_absolute() else base_dir / closures
    return _load_closures(cpath, path + ("closures",), problems)


def _period_problem(p: Any) -> str | None:
    if not isinstance(p, str) or not _PERIOD_RE.match(p):
        return (f"expected a period as HH:MM-HH:MM (22:00-06:00 runs past midnight) or 24h, got "
                f"{p!r}")
    if p != "24h" and p.split("-")[0] == p.split("-")[1]:
        return f"a period must not start and end at the same time, got {p!r} (use 24h for all day)"
    return None


def weekday_range(key: str) -> list[str]:
    """``"mon-fri"`` → mon … fri; ``"fri-mon"`` wraps; an unknown name → []."""
    a, _, b = key.partition("-")
    if a not in WEEKDAY_KEYS or (b and b not in WEEKDAY_KEYS):
        return []
    i, j = WEEKDAY_KEYS.index(a), WEEKDAY_KEYS.index(b or a)
    return [WEEKDAY_KEYS[(i + k) % 7] for k in range((j - i) % 7 + 1)]


def _check_holidays(spec: str, path: tuple[str, ...], problems: _Problems, warnings: list[str]) -> None:
    from datetime import date, datetime, timezone

    if spec.upper() == "CN":
        import chinese_calendar

        this_year = datetime.now(timezone.utc).year
        missing = []
        for year in (this_year, this_year + 1):
            try:
                chinese_calendar.is_holiday(date(year, 1, 1))
            except NotImplementedError:
                missing.append(year)
        if missing:
            line = problems.locator.line(path) if problems.locator else None
            where = f"{problems.source}:{line}" if line else problems.source
            version = getattr(chinese_calendar, "__version__", "installed")
            warnings.append(f"{where}: {'.'.join(path)}: chinesecalendar {version} does not know "
                            f"{' and '.join(map(str, missing))}: public holidays and 调休 working days of "
                            f"{'those years' if len(missing) > 1 else 'that year'} are not applied (the weekly hours "
                            f"are) until the package is upgraded")
        return
    import holidays as holidays_pkg

    country, _, subdiv = spec.partition("-")
    supported = holidays_pkg.list_supported_countries()
    if country not in supported:
        problems.add(path, f'expected "CN" or a country code the holidays package knows (US, DE, JP, ...), got {spec!r}')
    elif subdiv and subdiv not in supported[country]:
        problems.add(path, f"{country} has no subdivision {subdiv!r}; known: {', '.join(supported[country][:12])}"
                           + (" ..." if len(supported[country]) > 12 else ""))


def _load_closures(cpath: Path, path: tuple[str, ...], problems: _Problems) -> ClosuresFile | None:
    from datetime import date, datetime

    try:
        text = cpath.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.add(path, f"cannot read the closures file {cpath}: {exc.__class__.__name__}: {exc}")
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.add(path, f"{cpath}: invalid TOML: {exc}")
        return None
    own = _Problems(str(cpath), _Locator(text))
    loaded = _check(data, ClosuresFile, (), own)

    def when(value: Any, at: tuple[str, ...]) -> None:
        try:
            datetime.fromisoformat(value) if "T" in str(value) else date.fromisoformat(str(value))
        except ValueError:
            own.add(at, f"expected a local date or date-time such as 2026-12-24 or 2026-12-24T12:00, got {value!r}")

    for i, c in enumerate(data.get("closed", []) if isinstance(data.get("closed"), list) else []):
        if isinstance(c, dict):
            for k in ("from", "to"):
                if isinstance(c.get(k), str):
                    when(c[k], ("closed", str(i), k))
    for i, o in enumerate(data.get("open", []) if isinstance(data.get("open"), list) else []):
        if isinstance(o, dict) and isinstance(o.get("date"), str):
            try:
                date.fromisoformat(o["date"])
            except ValueError:
                own.add(("open", str(i), "date"), f"expected a date such as 2026-12-27, got {o['date']!r}")
    problems.items.extend(own.items)
    return None if own.items else loaded


DEFAULT_CONFIG = "gateway.toml"


def find_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The configuration file every command and client reads: ``path`` if given, else
    ``$GATEWAY_CONFIG``, else ``./gateway.toml`` if it exists, else None (defaults)."""
    if path:
        return str(path)
    configured = (os.environ if env is None else env).get("GATEWAY_CONFIG")
    if configured:
        return configured
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None


def load_settings(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Like :func:`load_config` for a program that needs the settings only (a backend
    needs ``[bus]``): the ``[channels.*]`` sections are not validated, so channel types
    installed only where the gateway runs are no error."""
    return _load(path, None, env)


def load_config(path: str | os.PathLike[str] | None, channel_types: Mapping[str, Any],
                env: Mapping[str, str] | None = None, *, bus_only: bool = False) -> Config:
    """Read and validate a TOML file; None means built-in defaults and no channels.
    ``bus_only``: see :func:`parse_config`."""
    return _load(path, channel_types, env, bus_only=bus_only)


def _load(path: str | os.PathLike[str] | None, channel_types: Mapping[str, Any] | None,
          env: Mapping[str, str] | None, *, bus_only: bool = False) -> Config:
    if path is None:
        return parse_config({}, channel_types or {}, env=env, bus_only=bus_only)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read: {exc}"]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: invalid TOML: {exc}"]) from exc
    if channel_types is None:
        data.pop("channels", None)
    return parse_config(data, channel_types or {}, source=str(path), text=text, env=env, bus_only=bus_only,
                        base_dir=p.parent)
