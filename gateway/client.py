"""A small async client for helpdesk backends: read inbound messages, reply, follow status.

    async with Client("nats://127.0.0.1:4222") as client:
        async for msg in client.inbound(durable="helpdesk"):
            await client.reply(msg, text="We received your message and will reply within 2 days.")

Backends in other languages use the same subjects and JSON (``docs/bus-contract.md``,
``schemas/``); nothing here is needed to speak the protocol.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.js import api

from .core._bus import Subjects
from .core._errors import GatewayError
from .core._schema import (
    DeliveryStatus,
    Message,
    Outbound,
    Part,
    Template,
    TextPart,
    encode,
    message_decoder,
    status_decoder,
)

__all__ = ["Client"]


class Client:
    """Connects to the gateway's bus. ``prefix`` must match the gateway's ``[bus] prefix``."""

    def __init__(self, url: str = "nats://127.0.0.1:4222", *, prefix: str = "gw", nc: Any = None, **connect_opts: Any):
        self.url = url
        self.subjects = Subjects(prefix)
        self.nc = nc
        self._own = nc is None
        self._opts = connect_opts
        self.js: Any = nc.jetstream() if nc is not None else None

    async def connect(self) -> Client:
        if self.nc is None:
            self.nc = await nats.connect(self.url, **self._opts)
            self.js = self.nc.jetstream()
        return self

    async def close(self) -> None:
        if self.nc is not None and self._own:
            await self.nc.close()
        self.nc = None

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- inbound -------------------------------------------------------------------

    async def inbound(self, *, durable: str = "backend", channel_type: str = "*", channel: str = "*",
                      batch: int = 32, ack_wait: float = 60.0) -> AsyncIterator[Message]:
        """Inbound messages through a durable consumer: messages that arrived while the
        backend was offline come first. A message is acked when the loop body that got it
        finishes; if the body raises (or the loop is left), it is not acked and will be
        delivered again."""
        subject = self.subjects.inbound(channel_type, channel)
        config = api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait,
                                    filter_subject=subject, max_deliver=-1)
        psub = await self.js.pull_subscribe(subject, durable=durable, stream=self.subjects.stream_in, config=config)
        try:
            while True:
                try:
                    msgs = await psub.fetch(batch=batch, timeout=1)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                for i, raw in enumerate(msgs):
                    try:
                        message = message_decoder.decode(raw.data)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        await raw.term()  # can never be decoded: do not redeliver forever
                        continue
                    try:
                        yield message
                    except BaseException:
                        for rest in msgs[i:]:
                            await rest.nak()
                        raise
                    await raw.ack()
        finally:
            try:
                await psub.unsubscribe()
            except Exception:
                pass

    # --- outbound ------------------------------------------------------------------

    async def reply(
        self,
        to: Message | str,
        text: str | None = None,
        *,
        parts: Sequence[Part] = (),
        channel_type: str | None = None,
        channel: str | None = None,
        id: str | None = None,
        subject: str | None = None,
        auto: bool = False,
        template: Template | None = None,
        kind: str = "reply",
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Publish a reply in the conversation of ``to`` (an inbound :class:`Message` or a
        conversation key) and return its outbound id. Give ``id`` to make a retry of
        your own safe: the same id is delivered once."""
        if isinstance(to, Message):
            conversation, in_reply_to = to.conversation, to.id
            channel_type, channel = channel_type or to.channel_type, channel or to.channel
        else:
            conversation, in_reply_to = to, None
            if channel is None or channel_type is None:
                channel_type, channel = await self._route_of(conversation)
        all_parts = ([TextPart(text=text)] if text is not None else []) + list(parts)
        outbound = Outbound(id=id or uuid.uuid4().hex, conversation=conversation, parts=all_parts,
                            kind=kind, in_reply_to=in_reply_to, subject=subject, auto=auto,  # type: ignore[arg-type]
                            template=template, created_at=datetime.now(timezone.utc), meta=meta or {})
        return await self.send(outbound, channel_type=channel_type, channel=channel)

    async def send(self, outbound: Outbound, *, channel_type: str, channel: str) -> str:
        """Publish a prepared :class:`Outbound`."""
        await self.js.publish(self.subjects.outbound(channel_type, channel), encode(outbound), headers={
            "Nats-Msg-Id": outbound.id, "Content-Type": "application/json", "Gw-Schema": "outbound/1"})
        return outbound.id

    async def _route_of(self, conversation: str) -> tuple[str, str]:
        kv = await self.js.key_value(self.subjects.kv_conversations)
        try:
            entry = await kv.get(conversation)
        except nats.js.errors.KeyNotFoundError:
            raise GatewayError(f"unknown conversation {conversation!r}") from None
        data = msgspec.json.decode(entry.value)
        return data["channel_type"], data["channel"]

    # --- status --------------------------------------------------------------------

    async def status(self, *, outbound_id: str | None = None, channel_type: str = "*", channel: str = "*",
                     from_start: bool = False) -> AsyncIterator[DeliveryStatus]:
        """Status events (accepted, sent, failed, dead, delivered, read), new ones only
        unless ``from_start``; filtered to one outbound if ``outbound_id`` is given."""
        subject = self.subjects.status(channel_type, channel)
        policy = api.DeliverPolicy.ALL if from_start else api.DeliverPolicy.NEW
        sub = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=policy, stream=self.subjects.stream_status)
        try:
            async for raw in sub.messages:
                try:
                    st = status_decoder.decode(raw.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if outbound_id is None or st.outbound_id == outbound_id:
                    yield st
        finally:
            await sub.unsubscribe()
