"""The bus services of one gateway process: statuses, receipts, conversations, blobs,
inbound messages and dead letters, each published with the contract's headers
(``_contract``) from this one place.

The inbound pipeline, the outbound dispatcher and every channel's context are handed this
object; none of them reaches back into the ``Gateway`` that built it."""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import datetime, timezone
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from .connection import Bus, wire_size
from .reads import Entry, valid_key
from ..channel.api import Conversation, Receipt
from .contract import PAYLOAD_HEADER, dead_letter_headers, message_headers, status_headers
from ..errors import BusUnavailable
from ..schema import DeadLetter, DeliveryStatus, Message, ObjectRef, encode
from ..channel.shared import stable_id

conversation_decoder = msgspec.json.Decoder(Conversation)
receipt_decoder = msgspec.json.Decoder(Receipt)


class BusServices:
    """What the pipeline, the dispatcher and channel contexts write to and read from the bus,
    over one supervised :class:`Bus` (its settings are the bus's ``[bus]`` section).

    Methods named ``send_*`` are pipelined: they return the future of the JetStream ack,
    to be awaited later (:meth:`await_ack`), so that several writes share a round trip."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.subjects = bus.subjects
        self.publish_timeout = bus.cfg.publish_timeout
        self._blob_max_age = bus.cfg.blob_max_age

    async def await_ack(self, fut: asyncio.Future[Any]) -> Any:
        """Wait for a pipelined publish's ack, within ``publish_timeout``."""
        try:
            async with asyncio.timeout(self.publish_timeout):
                return await fut
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise BusUnavailable(f"not acknowledged: {type(exc).__name__}") from exc

    # --- inbound messages ------------------------------------------------------------

    async def send_message(self, message: Message, data: bytes) -> asyncio.Future[api.PubAck]:
        """Publish an inbound message (``data``, its encoded form) on its subject with the
        contract headers. Raises :class:`PayloadTooLarge` when payload and headers exceed
        what the bus takes: above it, nats-server would close the connection."""
        headers = message_headers(message)
        self.bus.check_size("message", data, headers)
        return await self.bus.js.publish_async(self.subjects.inbound(message.channel_type, message.channel), data,
                                               headers=headers)

    # --- statuses --------------------------------------------------------------------

    async def publish_status(self, status: DeliveryStatus) -> None:
        """Publish a status event and wait for its JetStream ack."""
        await self.await_ack(await self.send_status(status))

    async def send_status(self, status: DeliveryStatus) -> asyncio.Future[api.PubAck]:
        """Publish a status event; returns the future of its ack."""
        js = self.bus.require()
        subject = self.subjects.status(status.channel_type, status.channel)
        headers = status_headers(status)
        data = encode(status)
        if status.error is not None and wire_size(data, headers) > self.bus.max_payload:
            # A provider's error text has no length limit; a status that does not fit would
            # be refused (and, unchecked, make the server close the connection). Shorten it.
            keep = max(0, self.bus.max_payload - (len(data) - len(status.error.message)) - 4096) // 4
            error = msgspec.structs.replace(status.error, message=status.error.message[:keep] + " [truncated]")
            data = encode(msgspec.structs.replace(status, error=error))
        try:
            return await js.publish_async(subject, data, headers=headers)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise BusUnavailable(f"status not sent: {type(exc).__name__}") from exc

    # --- conversations ---------------------------------------------------------------

    async def get_conversation(self, key: str) -> Conversation | None:
        """The stored conversation ``key``, or None (unknown, or not a conversation)."""
        return _conversation(await self._read(await self.send_get_conversation(key)))

    async def send_get_conversation(self, key: str) -> asyncio.Future[Entry | None]:
        """Ask for the stored conversation ``key``; the future of its entry (see
        :meth:`get_conversation_and_receipt`)."""
        s = self.subjects
        if not valid_key(key):
            return _none()
        return await self.bus.reads.send(s.kv_stream(s.kv_conversations), s.kv(s.kv_conversations, key))

    async def get_conversation_and_receipt(self, key: str, outbound_id: str) -> tuple[Conversation | None, Receipt | None]:
        """Both reads of a delivery in one round trip: the conversation ``key`` and the
        receipt of ``outbound_id`` (None for what is not stored). The receipt decides
        whether to send again, so the receipts stream's leader answers it (a replica that is
        catching up could answer "none" for a receipt that is stored)."""
        s = self.subjects
        conv = await self.send_get_conversation(key)
        receipt = await self.bus.reads.send(s.kv_stream(s.kv_receipts), s.kv(s.kv_receipts, _receipt_key(outbound_id)),
                                            leader=True)
        return _conversation(await self._read(conv)), _receipt(await self._read(receipt))

    async def _read(self, fut: asyncio.Future[Entry | None]) -> Entry | None:
        try:
            async with asyncio.timeout(self.publish_timeout):
                return await fut
        except TimeoutError as exc:
            raise BusUnavailable("bus did not answer a read") from exc

    async def send_conversation(self, conv: Conversation, *, keep_route: bool,
                                keep_time: bool) -> asyncio.Future[api.PubAck]:
        """Write a conversation; returns the future of its ack. ``keep_route`` and
        ``keep_time`` keep the stored route and last inbound time (only then is the stored
        entry read first)."""
        if keep_route or keep_time:
            old = await self.get_conversation(conv.key)
            if old is not None:
                if keep_route:
                    conv.route = old.route
                if keep_time:
                    conv.last_inbound_at = old.last_inbound_at
        return await self.bus.js.publish_async(self.subjects.kv(self.subjects.kv_conversations, conv.key), encode(conv))

    # --- receipts --------------------------------------------------------------------

    async def get_receipt(self, outbound_id: str) -> Receipt | None:
        """The receipt stored for an outbound the provider accepted, or None."""
        s = self.subjects
        return _receipt(await self._read(await self.bus.reads.send(
            s.kv_stream(s.kv_receipts), s.kv(s.kv_receipts, _receipt_key(outbound_id)), leader=True)))

    async def send_receipt(self, outbound_id: str, receipt: Receipt) -> asyncio.Future[api.PubAck]:
        """Issue the receipt's KV write; returns the future of its ack."""
        try:
            return await self.bus.js.publish_async(self.subjects.kv(self.subjects.kv_receipts, _receipt_key(outbound_id)),
                                                   encode(receipt))
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise BusUnavailable(f"receipt not stored: {exc}") from exc

    # --- dead letters ----------------------------------------------------------------

    async def publish_dead_letter(self, dl: DeadLetter, *, channel_type: str, channel: str, out_seq: int,
                                  raw: bytes) -> DeadLetter:
        """Publish a dead letter for the outbound at ``out_seq`` of the outbound stream, whose
        bytes were ``raw``; returns what was published. One that does not fit on the bus
        keeps ``raw`` in the object store and names it instead."""
        js = self.bus.require()
        headers = dead_letter_headers(dl.id, out_seq)
        data = encode(dl)
        if wire_size(data, headers) > self.bus.max_payload:
            # The outbound fitted on the bus, its dead letter does not (an outbound near the
            # limit plus the envelope, or undecodable bytes that base64 makes 4/3 larger).
            # Keep the original bytes in the object store and name them, so nothing is lost
            # and the publish cannot be refused.
            ref = await self.put_blob(raw, content_type="application/json")
            dl = msgspec.structs.replace(
                dl, outbound=None, payload=None, reason=dl.reason[:4096],
                error=None if dl.error is None else msgspec.structs.replace(dl.error, message=dl.error.message[:4096]),
                headers={**dl.headers, PAYLOAD_HEADER: f"{ref.bucket}/{ref.name}"})
            data = encode(dl)
        await js.publish(self.subjects.dead(channel_type, channel), data, headers=headers)
        return dl

    # --- blobs -----------------------------------------------------------------------

    async def put_blob(self, data: bytes, *, content_type: str | None = None) -> ObjectRef:
        """Store ``data`` in the object store under its SHA-256 (stored once while fresh)."""
        self.bus.require()
        digest = hashlib.sha256(data).hexdigest()
        store = self.bus.objects
        try:
            info = await store.get_info(digest)
            fresh = info.mtime and (datetime.now(timezone.utc) - _parse_time(info.mtime)).total_seconds() \
                < self._blob_max_age / 2
            if info is not None and not info.deleted and fresh:
                # Stored recently: skip the upload. An old copy is stored again so that
                # retention counts from this new reference, not the first one.
                return ObjectRef(bucket=self.subjects.object_store, name=digest, size=len(data), sha256=digest)
        except nats.js.errors.ObjectNotFoundError:
            pass
        # Chunks of nats-py's default 128 KiB would exceed a server whose max_payload is
        # smaller (the guard would refuse them): keep every chunk well inside it.
        chunk = min(128 * 1024, max(1024, self.bus.max_payload - 4096))
        meta = api.ObjectMeta(name=digest, description=content_type,
                              options=api.ObjectMetaOptions(max_chunk_size=chunk))
        await store.put(digest, data, meta=meta)
        return ObjectRef(bucket=self.subjects.object_store, name=digest, size=len(data), sha256=digest)

    async def get_blob(self, ref: ObjectRef) -> bytes:
        """The bytes of a stored blob (of this gateway's object store or another bucket)."""
        self.bus.require()
        store = self.bus.objects if ref.bucket == self.subjects.object_store else await self.bus.js.object_store(ref.bucket)
        result = await store.get(ref.name)
        return result.data or b""


def _conversation(entry: Entry | None) -> Conversation | None:
    if entry is None:
        return None
    try:
        return conversation_decoder.decode(entry.value)
    except msgspec.DecodeError:
        return None


def _receipt(entry: Entry | None) -> Receipt | None:
    if entry is None:
        return None
    try:
        return receipt_decoder.decode(entry.value)
    except msgspec.DecodeError:
        return Receipt()  # stored, so sent: an unreadable receipt must not send it again


def _none() -> asyncio.Future[Entry | None]:
    fut: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut


def _receipt_key(outbound_id: str) -> str:
    return "r-" + stable_id("outbound", outbound_id, n=40)


_NANOS = re.compile(r"(\.\d{6})\d+")


def _parse_time(value: str) -> datetime:
    # nats-server writes RFC 3339 with nanoseconds; Python takes at most microseconds.
    return datetime.fromisoformat(_NANOS.sub(r"\1", value.replace("Z", "+00:00")))
