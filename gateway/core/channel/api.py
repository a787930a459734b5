"""What a channel plugin implements (:class:`Channel`) and what the core gives it
(:class:`ChannelContext`). A plugin never imports NATS: everything bus-related goes
through the context."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar

import msgspec
from typing_extensions import TypeVar as DefaultTypeVar

from ..schema import (
    AudioPart,
    DeliveryState,
    ErrorInfo,
    FilePart,
    ImagePart,
    Message,
    ObjectRef,
    Outbound,
    Participant,
    Part,
    QuietHours,
    VideoPart,
)

from ..http.server import Endpoint as _HttpEndpoint

if TYPE_CHECKING:
    from ..config import Config
    from ..http.websocket import Authorize, WebSocketHandler

S = TypeVar("S", bound=msgspec.Struct)
C = DefaultTypeVar("C", default=Any)
"""The channel's config type: ``class Fax(Channel[FaxConfig])`` makes ``self.ctx.config`` a
``FaxConfig`` to the type checker. A bare ``Channel`` keeps it ``Any``."""
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}

ChannelState = Literal["starting", "running", "degraded", "stopped", "failed"]


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """What ``deliver`` returns: the provider accepted the outbound."""

    provider_id: str | None = None
    """The provider's id for what it accepted (SMTP Message-ID, WeChat msgid, Twilio Sid)."""
    meta: dict[str, Any] = {}


class Conversation(msgspec.Struct, kw_only=True):
    """What the gateway keeps per conversation (KV bucket ``<prefix>_conversations``):
    everything the channel needs to answer in it, written on every inbound message."""

    key: str
    channel_type: str
    channel: str
    route: dict[str, Any] = {}
    """Channel-defined addressing: email thread ids, WeChat openid, QQ group + msg id ..."""
    last_inbound_at: datetime | None = None
    """Time of the customer's last message (WeChat's 48-hour window is counted from it)."""
    last_message_id: str | None = None


class PublishResult(msgspec.Struct, frozen=True, kw_only=True):
    """Outcome of :meth:`ChannelContext.publish`."""

    id: str
    duplicate: bool
    """True when this provider id had been published before: nothing new is on the bus."""
    sequence: int | None = None
    """Stream sequence of the message (of the first copy for a duplicate, when known)."""


class Reach(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`Channel.reach` answers: can the channel still send into a conversation at
    a given time, and how. Reminders and backends use it to choose a fallback early (at
    scheduling) instead of failing at the due time."""

    ok: bool
    """Free content (text, media) can be sent at that time."""
    code: str | None = None
    """Why not, when ``ok`` is False: ``outside_window`` (WeChat's 48 hours, the QQ bot's
    passive-reply window), ``opted_out`` (SMS STOP), ``no_route`` (nothing stored to
    answer with), or a channel's own code. The same code as the permanent
    :class:`DeliveryError` ``deliver`` would raise."""
    detail: str | None = None
    """A sentence for people (no personal data)."""
    until: datetime | None = None
    """When free sending stops being possible (the window's end), if the channel knows."""
    template: bool = False
    """A provider template (``Outbound.template``) can still be sent when free content
    cannot (WeChat template messages, SMS templates)."""


MediaPart = ImagePart | FilePart | AudioPart | VideoPart
"""A part whose content is bytes (inline or in the object store)."""

Endpoint = _HttpEndpoint
"""A route handler: a Starlette ``Request`` in, a ``Response`` out."""


class KeyValue(abc.ABC):
    """A small persistent key-value store for a channel's own state (checkpoints, thread
    maps, tokens), shared by every gateway process. Keys are free-form strings."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value, or None."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Store ``value``; with ``ttl`` (seconds, at least 1) it disappears after that
        long (thread maps, caches: personal data is not kept forever)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Forget ``key`` (no error if absent)."""

    @abc.abstractmethod
    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` does not exist; True if it was stored. ``ttl`` as
        in :meth:`put`."""

    @abc.abstractmethod
    async def get_revision(self, key: str) -> tuple[bytes, int] | None:
        """The value and its revision (for :meth:`update`), or None."""

    @abc.abstractmethod
    async def update(self, key: str, value: bytes, revision: int, *, ttl: float | None = None) -> bool:
        """Compare-and-set: store ``value`` only if ``key`` is still at ``revision``; True
        if it was stored. With :meth:`create` this builds leases and single-flight locks
        shared by every gateway process. ``ttl`` as in :meth:`put` (a record several
        processes append to, like a bounded history, keeps its retention)."""

    async def get_record(self, key: str, record_type: type[S]) -> S | None:
        """The msgspec Struct stored at ``key`` (by :meth:`put_record`), or None when
        absent or no longer decodable as ``record_type`` (a record written by an older
        shape is treated as missing, not as a crash)."""
        raw = await self.get(key)
        if raw is None:
            return None
        decoder = _decoders.get(record_type)
        if decoder is None:
            decoder = _decoders[record_type] = msgspec.json.Decoder(record_type)
        try:
            return decoder.decode(raw)  # type: ignore[no-any-return]
        except msgspec.DecodeError:
            return None

    async def put_record(self, key: str, record: msgspec.Struct, *, ttl: float | None = None) -> None:
        """Store a msgspec Struct at ``key`` (JSON), with :meth:`put`'s ``ttl``."""
        await self.put(key, msgspec.json.encode(record), ttl=ttl)


class Logger(Protocol):
    """What ``ctx.log`` is: a structlog logger bound to the channel. ``event`` is a short
    fixed text; the keyword fields become the log line's keys (keys naming secrets or
    personal data are masked, addresses and phone numbers in values scrubbed)."""

    def debug(self, event: str, /, **fields: Any) -> Any:
        """Log at debug level."""

    def info(self, event: str, /, **fields: Any) -> Any:
        """Log at info level."""

    def warning(self, event: str, /, **fields: Any) -> Any:
        """Log at warning level."""

    def error(self, event: str, /, **fields: Any) -> Any:
        """Log at error level."""

    def exception(self, event: str, /, **fields: Any) -> Any:
        """Log at error level with the exception being handled."""

    def bind(self, **fields: Any) -> Logger:
        """A logger that adds ``fields`` to every line."""


class ChannelContext(abc.ABC, Generic[C]):
    """The core's side of a channel: the only way a plugin reaches the bus, HTTP and
    storage. One context per configured channel instance."""

    name: str
    """The instance name (``[channels.<name>]``)."""
    channel_type: str
    config: C
    """The channel's own config section, converted to the plugin's ``config_type``."""
    log: Logger
    """A structlog logger bound to this channel; secrets and personal data are redacted."""
    state: KeyValue
    """Persistent state of this channel instance."""
    quiet_hours: QuietHours | None = None
    """The channel's ``quiet_hours`` (a key every channel section has): the customers' rest
    hours, which callback reminders respect and a channel that must not send at night
    (SMS) reads with :func:`quiet_until`. None when not configured."""

    @abc.abstractmethod
    def message(
        self,
        *,
        conversation: str,
        sender: Participant,
        parts: Sequence[Part] = (),
        provider_id: str | None = None,
        **fields: Any,
    ) -> Message:
        """Build a :class:`Message` for this channel. ``conversation`` is the channel's
        natural thread key (openid, root Message-ID, phone-number pair); the core turns it
        into an opaque stable key. ``provider_id`` must be the provider's own id so a
        retry is recognized."""

    @abc.abstractmethod
    def conversation_key(self, native: str) -> str:
        """The opaque conversation key for a channel-natural thread key."""

    @abc.abstractmethod
    async def publish(self, message: Message, *, route: dict[str, Any] | None = None,
                      interaction: bool = True) -> PublishResult:
        """Publish an inbound message and wait for the bus to acknowledge it. Only after
        this returns may the channel tell its provider the message was accepted.
        ``route`` is stored as the conversation's addressing for replies (None keeps the
        stored one). ``interaction=False`` leaves the conversation's ``last_inbound_at``
        alone, for events the provider does not count as the customer writing (a WeChat
        location report). Raises :class:`BusUnavailable` when the bus does not acknowledge."""

    @abc.abstractmethod
    def add_route(self, path: str, endpoint: Endpoint, methods: Sequence[str] = ("POST",), *,
                  max_body: int | None = None, own_limit: bool = False) -> str:
        """Serve ``endpoint`` at ``/channels/<name><path>`` on the shared HTTP server;
        returns the full path. A :class:`RequestError` raised by the endpoint becomes its
        HTTP status with a short reason; :class:`BusUnavailable` becomes 503. ``max_body``
        lowers ``[http] max_body`` for this route: a larger body is answered 413 (counted,
        logged, naming the limit) before the endpoint runs or while it reads. With
        ``own_limit=True`` it replaces ``[http] max_body`` for this route, higher or lower:
        for an upload route whose files are larger than any webhook's body."""

    @abc.abstractmethod
    async def report_status(
        self,
        outbound_id: str,
        state: DeliveryState,
        *,
        conversation: str = "",
        provider_id: str | None = None,
        error: ErrorInfo | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Publish a status event for an outbound that a provider reported after it was
        sent: a receipt (``delivered``, ``read``), a delay the provider still retries
        (``failed``, ``error.permanent`` false) or a final non-delivery (``dead``: a bounce,
        an undelivered receipt). ``meta`` becomes the status's ``meta`` (e.g. the segments
        an SMS provider billed). Raises ``ValueError`` for ``failed`` with a permanent
        error (that is ``dead``)."""

    @abc.abstractmethod
    async def put_blob(self, data: bytes, *, content_type: str | None = None) -> ObjectRef:
        """Store binary content in the object store (content-addressed). It is kept for
        ``[bus] blob_max_age`` after its last store."""

    @abc.abstractmethod
    async def get_blob(self, ref: ObjectRef) -> bytes:
        """Read binary content back."""

    @abc.abstractmethod
    async def get_conversation(self, key: str) -> Conversation | None:
        """The stored conversation, or None."""

    @abc.abstractmethod
    def set_state(self, state: ChannelState, detail: str | None = None) -> None:
        """Report the channel's health (shown by ``/healthz``)."""

    @abc.abstractmethod
    def add_websocket(self, path: str, handler: WebSocketHandler, *, authorize: Authorize | None = None,
                      allowed_origins: Sequence[str] | None = None, max_connections: int = 100,
                      max_message_size: int = 1 << 20, ping_interval: float | None = 20.0,
                      ping_timeout: float | None = 20.0, idle_timeout: float | None = 300.0,
                      send_queue: int = 64, send_timeout: float = 5.0) -> str:
        """Accept WebSockets at ``/channels/<name><path>`` on the shared HTTP server; returns
        the full path. ``handler(conn)`` runs for each accepted :class:`WebSocketConnection`.

        Before the upgrade, ``allowed_origins`` (exact ``Origin`` values; None accepts any)
        and ``authorize(handshake)`` judge it: ``authorize`` returns an identity (kept as
        ``conn.identity``) or raises :class:`RequestError` (``status=401``/``403``), which is
        answered as that HTTP status, counted and logged without headers or query. Beyond
        ``max_connections`` open sockets of this route the answer is 503.

        An accepted socket is bounded: a message over ``max_message_size`` bytes closes it
        with 1009; it is pinged every ``ping_interval`` seconds and cut if no pong comes within
        ``ping_timeout``; with no message from the peer for ``idle_timeout`` it is closed
        (1000). ``conn.send`` waits while ``send_queue`` messages are waiting to be written,
        and after ``send_timeout`` closes the connection as a slow consumer (1008). When the
        channel or the gateway stops, sockets are closed with 1001."""

    def count(self, event: str, amount: int = 1) -> None:
        """Count something the channel noticed and dropped or did on its own (a group
        message a filter dropped, a replayed event): Prometheus
        ``gateway_channel_events_total{channel_type,channel,event}``. ``event`` is a
        short fixed name, never a value a sender wrote. The default does nothing."""

    async def part_bytes(self, part: MediaPart) -> bytes:
        """A media part's content: inline ``data``, or read from the object store by
        ``ref``. Raises a permanent :class:`DeliveryError` (``unsupported_content``) for
        a part with neither (one that has only a ``url`` or a provider's media id)."""
        if part.data is not None:
            return part.data
        if part.ref is not None:
            return await self.get_blob(part.ref)
        from ..errors import DeliveryError

        raise DeliveryError(f"{part.type} part has no data or object reference", permanent=True,
                            code="unsupported_content")


class Channel(abc.ABC, Generic[C]):
    """A channel type. Subclass it, set ``channel_type`` and ``config_type``, and return the
    class from the ``register_channel_types`` hook. The core creates one instance per
    configured channel and drives it: ``start`` → traffic → ``stop``.

    Parameterize it with the config type, ``class FaxChannel(Channel[FaxConfig])``, and
    ``self.ctx.config`` is a ``FaxConfig`` to the type checker (``Any`` for a bare
    ``Channel``)."""

    channel_type: ClassVar[str]
    """The ``type = "..."`` value in the config that selects this class. (It was called
    ``type``, which shadowed the builtin in every subclass body and made ``config_type``'s
    annotation invalid to a type checker; a subclass that still sets ``type`` works, and
    ``cls.type`` is still set for code that reads it.)"""
    config_type: ClassVar[type[msgspec.Struct] | None] = None
    """A msgspec Struct (``forbid_unknown_fields=True`` recommended) for the channel's own
    keys; None if it takes none."""
    supported_parts: frozenset[str] = frozenset({"text"})
    """Part types ``deliver`` can carry; an outbound with others fails permanently. Read
    from the instance, so a channel may set its own from its config (the mock does)."""
    rate_limit: ClassVar[float | None] = None
    """Default outbound rate (messages per second) the provider allows; config may lower it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        old = cls.__dict__.get("type")
        if isinstance(old, str) and "channel_type" not in cls.__dict__:
            cls.channel_type = old
        elif "channel_type" in cls.__dict__:
            setattr(cls, "type", cls.channel_type)  # readers of the old name

    def __init__(self, ctx: ChannelContext[C]) -> None:
        self.ctx = ctx

    @classmethod
    def config_warnings(cls, options: Any, config: Config) -> list[str]:
        """What ``gateway check-config`` should warn about in one channel section that is
        valid on its own but works against another setting (limits that contradict each
        other): one sentence each, naming the keys. ``options`` is the ``config_type``
        instance, ``config`` the whole validated configuration. The default: nothing."""
        return []

    async def start(self) -> None:
        """Begin receiving (connect, register HTTP routes, start pollers). Raise to fail."""

    async def stop(self) -> None:
        """Stop receiving and release resources; in-flight work should finish."""

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        """Send ``outbound`` through the provider, in ``conversation``. Return only once the
        provider accepted it; raise :class:`DeliveryError` (``permanent`` or not) otherwise."""
        from ..errors import DeliveryError

        raise DeliveryError(f"channel type {self.channel_type!r} cannot send", permanent=True)

    def delivers_here(self) -> bool:
        """Can ``deliver`` work in this process now? With several gateway processes, one
        delivers a channel at a time; a process whose channel answers False hands the
        channel to one whose channel answers True, if a live one does (a channel whose
        provider connection reached another process: a QQ reverse WebSocket). If none
        does, the channel is delivered anyway and its failures are reported as usual.
        Must be cheap: it is asked every few seconds. The default: True."""
        return True

    async def reach(self, conversation: Conversation, at: datetime) -> Reach:
        """Can ``deliver`` send free content into ``conversation`` at time ``at`` (UTC,
        possibly in the future), and if not, why and is a template still possible?

        Must be cheap and must not call the provider: it reads the stored conversation
        (``last_inbound_at``, ``route``) and the channel's own state (an opt-out list). The
        default answers ``Reach(ok=True)``; a channel with a reply window or an opt-out
        overrides it."""
        return Reach(ok=True)
