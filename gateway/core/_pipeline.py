"""The inbound path (normalize → dedup → offload binaries → publish → await ack) and the
context object each channel gets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ._bus import Bus, MessageTooLarge
from ._channel import (
    ChannelContext,
    ChannelState,
    Conversation,
    Endpoint,
    KeyValue,
    PublishResult,
)
from ._errors import BusUnavailable, PayloadTooLarge, RequestError
from ._failpoints import failpoint
from ._metrics import Metrics
from ._services import BusServices
from ._survey import Surveys
from ._websocket import Authorize, WebSocketHandler, WebSocketLimits
from ._schema import (
    AudioPart,
    DeliveryState,
    DeliveryStatus,
    ErrorInfo,
    FilePart,
    ImagePart,
    Message,
    ObjectRef,
    Participant,
    Part,
    QuietHours,
    VideoPart,
    encode,
    message_decoder,
)

if TYPE_CHECKING:
    from ._http import HttpServer

_MEDIA = (ImagePart, FilePart, AudioPart, VideoPart)
_SAFE_KEY = re.compile(r"^[-_=a-zA-Z0-9]{1,200}$")


def _token(*parts: str, n: int = 26) -> str:
    h = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).digest()
    # base32 turns each 5 bytes into 8 characters: encode only the bytes the first n
    # characters come from (the same string, at half the cost of the pure-Python encoder).
    return base64.b32encode(h[: -(-n // 8) * 5]).decode("ascii").lower()[:n]


def message_id(channel: str, provider_id: str) -> str:
    """The gateway id of a provider message: the same for every retry of it, in every
    gateway process (so it can be the JetStream ``Nats-Msg-Id``)."""
    return _token(channel, provider_id)


def conversation_key(channel: str, native: str) -> str:
    """Opaque, stable conversation key: ``<channel>.<hash of the native thread key>``. It
    carries no personal data (an openid or phone number never appears in it)."""
    return f"{channel}.{_token(channel, native)}"


_QUOTED = re.compile(r"'[^']*'")


def _checked(message: Message) -> bytes:
    """The message's JSON, if the gateway's own decoder takes it back; else
    :class:`RequestError` (400) naming the field and the problem, never the value.

    A provider would otherwise hear "accepted" for a message every consumer rejects (a
    WeChat location of ``nan`` encodes as ``null``, which ``float`` refuses). Decoding
    costs about 1.7 µs for a 1.4 KB message (0.3 % of the inbound path), 1 ms per MB."""
    try:
        data = encode(message)
    except UnicodeEncodeError:
        raise RequestError("invalid message: a text field is not valid Unicode (lone surrogate)") from None
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise RequestError(f"invalid message: a field JSON cannot carry ({type(exc).__name__})") from None
    try:
        message_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise RequestError(f"invalid message: {_QUOTED.sub('a value', str(exc))}") from None
    return data


def _timeout_error(exc: BaseException) -> BusUnavailable:
    return BusUnavailable(f"bus did not acknowledge: {type(exc).__name__}")


class Inbound:
    """Publishes inbound messages: exactly one bus message per provider message id, for as
    long as ``dedup_ttl``, across processes and restarts. ``enrich`` is applied to each
    message before it is published (the ``enrich_message`` hooks)."""

    def __init__(self, services: BusServices, *, enrich: Callable[[Message], Message], metrics: Metrics,
                 surveys: Surveys | None = None, on_customer_wrote: Callable[[Message], None] | None = None):
        self.services = services
        self.bus = services.bus
        self.enrich = enrich
        self.metrics = metrics
        self.surveys = surveys
        """Attaches the answer to a pending survey (a ChoicePart) before publishing."""
        self.on_customer_wrote = on_customer_wrote
        """Called after a new customer message reached the bus (reminders: cancel on reply)."""
        self._inflight: dict[str, asyncio.Future[PublishResult]] = {}
        self._timeout = services.publish_timeout
        self._inline_limit = services.bus.cfg.inline_limit

    async def publish(self, message: Message, route: dict[str, Any] | None, interaction: bool = True) -> PublishResult:
        key = f"{message.channel}.{message.id}" if message.provider_id else None
        if key is not None:
            # A retry that arrives while the first copy is still being published waits for it.
            pending = self._inflight.get(key)
            if pending is not None:
                first = await asyncio.shield(pending)
                self._count_duplicate(message)
                return msgspec.structs.replace(first, duplicate=True)
            fut: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
            self._inflight[key] = fut
            try:
                result = await self._publish(message, route, key, interaction)
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()  # retrieved: no "never retrieved" warning when nobody waited
                raise
            else:
                fut.set_result(result)
                return result
            finally:
                del self._inflight[key]
        return await self._publish(message, route, None, interaction)

    def _count_duplicate(self, message: Message) -> None:
        self.metrics.inbound_duplicates.labels(message.channel_type, message.channel).inc()

    async def _publish(self, message: Message, route: dict[str, Any] | None, key: str | None,
                       interaction: bool = True) -> PublishResult:
        js = self.bus.require()
        t0 = time.perf_counter()
        s = self.bus.subjects
        dedup = self.bus.kv[s.kv_dedup]
        try:
            # One deadline for the whole path (asyncio.timeout costs no task, unlike
            # wait_for); KV writes are plain JetStream publishes pipelined with the
            # message itself, each awaited only for its own ack.
            async with asyncio.timeout(self._timeout):
                if key is not None:
                    try:
                        entry = await dedup.get(key)
                    except nats.js.errors.KeyNotFoundError:
                        pass
                    else:
                        self._count_duplicate(message)
                        seq = int(entry.value) if entry.value and entry.value.isdigit() else None
                        return PublishResult(id=message.id, duplicate=True, sequence=seq)
                message = self.enrich(message)
                message, survey = await self.surveys.attach(message) if self.surveys else (message, False)
                message = await self._offload(message)
                data = _checked(message)
                # Refused here if too large (payload and headers): nats-server would close
                # the connection.
                ack_fut = await self.services.send_message(message, data)
                conv = Conversation(key=message.conversation, channel_type=message.channel_type, channel=message.channel,
                                    route=route or {}, last_inbound_at=message.received_at if interaction else None,
                                    last_message_id=message.id)
                conv_fut = await self.services.send_conversation(conv, keep_route=route is None, keep_time=not interaction)
                ack: api.PubAck = await ack_fut
                await conv_fut
                failpoint("inbound.after_ack")
                if survey and self.surveys is not None:
                    await self.surveys.answered(message)
                if key is not None:
                    await (await js.publish_async(s.kv(s.kv_dedup, key), str(ack.seq).encode()))
        except MessageTooLarge as exc:
            # The client-side guard refused a write (the check above makes this rare).
            raise PayloadTooLarge(f"a write of {exc.size} bytes exceeds the bus limit of {exc.limit} bytes") from exc
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, ConnectionError) as exc:
            raise _timeout_error(exc) from exc
        elapsed = time.perf_counter() - t0
        self.metrics.publish_latency.labels(message.channel_type).observe(elapsed)
        if ack.duplicate:
            self._count_duplicate(message)
        else:
            self.metrics.inbound.labels(message.channel_type, message.channel).inc()
            if interaction and self.on_customer_wrote is not None:
                self.on_customer_wrote(message)  # cancel on reply, in the background
        return PublishResult(id=message.id, duplicate=bool(ack.duplicate), sequence=ack.seq)

    async def _offload(self, message: Message) -> Message:
        limit = self._inline_limit
        if not any(isinstance(p, _MEDIA) and p.data is not None and len(p.data) > limit for p in message.parts):
            return message
        parts: list[Part] = []
        for p in message.parts:
            if isinstance(p, _MEDIA) and p.data is not None and len(p.data) > limit:
                ref = await self.services.put_blob(p.data, content_type=p.content_type)
                p = msgspec.structs.replace(p, data=None, ref=ref, size=len(p.data))
            parts.append(p)
        return msgspec.structs.replace(message, parts=parts)


class _State(KeyValue):
    def __init__(self, bus: Bus, channel: str):
        self.bus = bus
        self.channel = channel

    def _key(self, key: str) -> str:
        return f"{self.channel}.{key}" if _SAFE_KEY.match(key) else f"{self.channel}.h-{_token(key, n=40)}"

    def _kv(self) -> Any:
        self.bus.require()
        return self.bus.kv[self.bus.subjects.kv_state]

    async def get(self, key: str) -> bytes | None:
        try:
            return (await self._kv().get(self._key(key))).value
        except nats.js.errors.KeyNotFoundError:
            return None

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        if ttl is None:
            await self._kv().put(self._key(key), value)
            return
        # A per-message TTL (the bucket's stream allows them): nats-py's put() has none.
        self._kv()  # the bus must be up
        s = self.bus.subjects
        await self.bus.js.publish(s.kv(s.kv_state, self._key(key)), value, msg_ttl=max(1.0, ttl))

    async def delete(self, key: str) -> None:
        try:
            await self._kv().delete(self._key(key))
        except nats.js.errors.KeyNotFoundError:
            pass

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        try:
            await self._kv().create(self._key(key), value, msg_ttl=None if ttl is None else max(1.0, ttl))
            return True
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as exc:
            if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or getattr(exc, "err_code", None) == 10071:
                return False
            raise

    async def get_revision(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self._kv().get(self._key(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value or b"", entry.revision

    async def update(self, key: str, value: bytes, revision: int, *, ttl: float | None = None) -> bool:
        try:
            if ttl is None:
                await self._kv().update(self._key(key), value, last=revision)
            else:
                # nats-py's update() takes no TTL: the same compare-and-set, by hand.
                self._kv()  # the bus must be up
                s = self.bus.subjects
                await self.bus.js.publish(s.kv(s.kv_state, self._key(key)), value, msg_ttl=max(1.0, ttl),
                                             headers={"Nats-Expected-Last-Subject-Sequence": str(revision)})
            return True
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as exc:
            if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or getattr(exc, "err_code", None) == 10071:
                return False
            raise


class Context(ChannelContext):
    """The core's implementation of :class:`ChannelContext`: the bus services, the inbound
    publisher and the HTTP server, narrowed to one channel."""

    def __init__(self, name: str, channel_type: str, config: Any, log: Any, *, services: BusServices,
                 inbound: Inbound, http: HttpServer, metrics: Metrics, quiet_hours: QuietHours | None = None):
        self.quiet_hours = quiet_hours
        self.name = name
        self.channel_type = channel_type
        self.config = config
        self.log = log
        self.services = services
        self.inbound = inbound
        self.http = http
        self.metrics = metrics
        self.state = _State(services.bus, name)
        self.health: ChannelState = "starting"
        self.health_detail: str | None = None

    def conversation_key(self, native: str) -> str:
        return conversation_key(self.name, native)

    def message(
        self,
        *,
        conversation: str,
        sender: Participant,
        parts: Sequence[Part] = (),
        provider_id: str | None = None,
        **fields: Any,
    ) -> Message:
        mid = message_id(self.name, provider_id) if provider_id else uuid.uuid4().hex
        return Message(
            id=mid,
            channel_type=self.channel_type,
            channel=self.name,
            provider_id=provider_id,
            conversation=self.conversation_key(conversation),
            sender=sender,
            received_at=fields.pop("received_at", None) or datetime.now(timezone.utc),
            parts=list(parts),
            **fields,
        )

    async def publish(self, message: Message, *, route: dict[str, Any] | None = None,
                      interaction: bool = True) -> PublishResult:
        if message.channel != self.name or message.channel_type != self.channel_type:
            raise ValueError(f"message belongs to channel {message.channel!r}, not {self.name!r}")
        return await self.inbound.publish(message, route, interaction)

    def add_route(self, path: str, endpoint: Endpoint, methods: Sequence[str] = ("POST",), *,
                  max_body: int | None = None, own_limit: bool = False) -> str:
        return self.http.add_route(self, path, endpoint, methods, max_body, own_limit)

    def add_websocket(self, path: str, handler: WebSocketHandler, *, authorize: Authorize | None = None,
                      allowed_origins: Sequence[str] | None = None, max_connections: int = 100,
                      max_message_size: int = 1 << 20, ping_interval: float | None = 20.0,
                      ping_timeout: float | None = 20.0, idle_timeout: float | None = 300.0,
                      send_queue: int = 64, send_timeout: float = 5.0) -> str:
        if isinstance(allowed_origins, str):  # a lone string would become a set of characters
            raise TypeError("add_websocket: allowed_origins must be a list of origins, not a string")
        limits = WebSocketLimits(
            max_connections=max_connections, max_message_size=max_message_size, ping_interval=ping_interval,
            ping_timeout=ping_timeout, idle_timeout=idle_timeout, send_queue=send_queue, send_timeout=send_timeout,
            allowed_origins=None if allowed_origins is None else frozenset(allowed_origins))
        return self.http.add_websocket(self, path, handler, authorize, limits)

    async def report_status(
        self,
        outbound_id: str,
        state: DeliveryState,
        *,
        conversation: str = "",
        provider_id: str | None = None,
        error: ErrorInfo | None = None,
    ) -> None:
        status = DeliveryStatus(outbound_id=outbound_id, conversation=conversation, channel_type=self.channel_type,
                                channel=self.name, state=state, at=datetime.now(timezone.utc),
                                provider_id=provider_id, error=error)
        await self.services.publish_status(status)

    async def put_blob(self, data: bytes, *, content_type: str | None = None) -> ObjectRef:
        return await self.services.put_blob(data, content_type=content_type)

    async def get_blob(self, ref: ObjectRef) -> bytes:
        return await self.services.get_blob(ref)

    async def get_conversation(self, key: str) -> Conversation | None:
        return await self.services.get_conversation(key)

    def count(self, event: str, amount: int = 1) -> None:
        self.metrics.channel_events.labels(self.channel_type, self.name, event).inc(amount)

    def set_state(self, state: ChannelState, detail: str | None = None) -> None:
        self.health = state
        self.health_detail = detail
        self.metrics.channel_up.labels(self.channel_type, self.name).set(1 if state == "running" else 0)
