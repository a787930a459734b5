"""The inbound path: normalize → dedup → offload binaries → publish → await ack."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ..bus.codes import DUPLICATE_IN_PROCESS
from ..bus.reads import valid_key
from ..bus.state import Dedup
from ..errors import MessageTooLarge
from ..bus.services import BusServices
from ..channel.api import Conversation, PublishResult
from ..channel.shared import stable_id
from ..errors import BusUnavailable, PayloadTooLarge, RequestError
from ..failpoints import failpoint
from ..logs import Throttle
from ..metrics import Metrics
from ..scheduling.survey import Surveys
from ..schema import AudioPart, FilePart, ImagePart, Message, Part, VideoPart, encode, message_decoder

_MEDIA = (ImagePart, FilePart, AudioPart, VideoPart)


def message_id(channel: str, provider_id: str) -> str:
    """The gateway id of a provider message: the same for every retry of it, in every
    gateway process (so it can be the JetStream ``Nats-Msg-Id``)."""
    return stable_id(channel, provider_id)


def conversation_key(channel: str, native: str) -> str:
    """Opaque, stable conversation key: ``<channel>.<hash of the native thread key>``. It
    carries no personal data (an openid or phone number never appears in it)."""
    return f"{channel}.{stable_id(channel, native)}"


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

    def __init__(self, services: BusServices, *, enrich: Callable[[Message], Message], metrics: Metrics, log: Any,
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
        self._dedup = Dedup(services.bus)
        self._writes: set[asyncio.Future[Any]] = set()
        self._rewrites: set[asyncio.Task[None]] = set()
        self._closing = False
        self.log = log
        self._throttle = Throttle(60.0)

    async def publish(self, message: Message, route: dict[str, Any] | None, interaction: bool = True) -> PublishResult:
        key = f"{message.channel}.{message.id}" if message.provider_id else None
        if key is not None and not valid_key(key):
            key = None  # an id a plugin made up that cannot be a key: JetStream's window alone
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

    async def _acked(self, fut: asyncio.Future[api.PubAck], message: Message, data: bytes) -> api.PubAck:
        """The message's ack. While another process stores the same message (a provider's
        retry racing its first attempt, on a clustered stream), ask again: the answer is then
        "duplicate" once that copy is stored, or ours is stored if that one failed. Within
        the caller's deadline."""
        while True:
            try:
                return await fut
            except nats.js.errors.APIError as exc:
                if exc.err_code != DUPLICATE_IN_PROCESS:
                    raise
            await asyncio.sleep(0.02)
            fut = await self.services.send_message(message, data)

    def _count_duplicate(self, message: Message) -> None:
        self.metrics.inbound_duplicates.labels(message.channel_type, message.channel).inc()

    async def _publish(self, message: Message, route: dict[str, Any] | None, key: str | None,
                       interaction: bool = True) -> PublishResult:
        self.bus.require()  # BusUnavailable (503) until the bus is connected
        t0 = time.perf_counter()
        try:
            # One deadline for the whole path (asyncio.timeout costs no task, unlike
            # wait_for). Two round trips: the dedup record and the pending survey are read
            # together; the message and its conversation are written together. The dedup
            # record is written after the ack and not waited for (see _write_dedup).
            async with asyncio.timeout(self._timeout):
                seen = await self._dedup.ask(key) if key is not None else None
                asked = await self.surveys.ask_pending(message.conversation) \
                    if self.surveys is not None and self.surveys.candidate(message) else None
                if seen is not None:
                    entry = await seen
                    if entry is not None:
                        if asked is not None:
                            asked.cancel()
                        self._count_duplicate(message)
                        return PublishResult(id=message.id, duplicate=True, sequence=Dedup.sequence(entry))
                message = self.enrich(message)
                message, survey = await self.surveys.attach(message, asked) if self.surveys else (message, False)
                message = await self._offload(message)
                data = _checked(message)
                # Refused here if too large (payload and headers): nats-server would close
                # the connection.
                ack_fut = await self.services.send_message(message, data)
                conv = Conversation(key=message.conversation, channel_type=message.channel_type, channel=message.channel,
                                    route=route or {}, last_inbound_at=message.received_at if interaction else None,
                                    last_message_id=message.id)
                conv_fut = await self.services.send_conversation(conv, keep_route=route is None, keep_time=not interaction)
                ack: api.PubAck = await self._acked(ack_fut, message, data)
                await conv_fut
                failpoint("inbound.after_ack")
                if survey and self.surveys is not None:
                    await self.surveys.answered(message)
                if key is not None:
                    await self._write_dedup(key, ack.seq)
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

    # --- dedup records written behind the answer ------------------------------------

    async def _write_dedup(self, key: str, seq: int) -> None:
        """Issue the dedup record's write; its ack is not waited for. Until it is stored, a
        provider's retry is caught by JetStream itself (``Nats-Msg-Id`` within
        ``duplicate_window``, minutes; the write takes a millisecond). A crash before it is
        stored is repaired from GW_IN by the dedup restore, like a crash right after the ack
        always was; a write that fails or is not answered within ``publish_timeout`` is
        written again, in the background, until it is stored or the gateway stops."""
        fut = await self._dedup.write(key, seq)
        self._writes.add(fut)
        timer = asyncio.get_running_loop().call_later(self._timeout, fut.cancel)
        fut.add_done_callback(lambda f: self._written(f, timer, key, seq))

    def _written(self, fut: asyncio.Future[Any], timer: asyncio.TimerHandle, key: str, seq: int) -> None:
        self._writes.discard(fut)
        timer.cancel()
        if not fut.cancelled() and fut.exception() is None:
            return
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._rewrite(key, seq))
        self._rewrites.add(task)
        task.add_done_callback(self._rewrites.discard)

    async def _rewrite(self, key: str, seq: int) -> None:
        delay = 0.2
        while True:
            try:
                fut = await self._dedup.write(key, seq)
                async with asyncio.timeout(self._timeout):
                    await fut
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                held = self._throttle.allow("dedup")
                if held is not None:
                    self.log.warning("dedup record not stored yet; writing it again", error=f"{type(exc).__name__}: {exc}",
                                     suppressed=held)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every dedup record written behind an answer is stored (a clean stop
        leaves none to repair), at most ``timeout`` seconds."""
        pending: set[asyncio.Future[Any]] = set(self._writes) | set(self._rewrites)
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self._closing = True
        for task in list(self._rewrites):
            task.cancel()

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
