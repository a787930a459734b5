"""A small async client for helpdesk backends: read inbound messages, reply, follow status.

    async with Client.from_config() as client:   # the bus of ./gateway.toml, or Client(url)
        async for msg in client.inbound(durable="helpdesk"):
            await client.reply(msg, text="We received your message and will reply within 2 days.")

Backends in other languages use the same subjects and JSON (``docs/bus-contract.md``,
``schemas/``); nothing here is needed to speak the protocol.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import nats
import nats.errors
from nats.js import api

from .core.bus.connection import Subjects
from .core.bus.contract import dead_inbound_headers, outbound_headers
from .core.bus.state import channel_of
from .core.errors import GatewayError, ReminderError
from .core.scheduling.rules import in_utc
from .core.scheduling.store import ReminderStore
from .core.scheduling.desk import publish_mark
from .core.schema import (
    ConversationMark,
    DeadLetter,
    DeliveryStatus,
    DeskTask,
    ErrorInfo,
    Fallback,
    Message,
    Outbound,
    Part,
    QuietHours,
    Reminder,
    ReminderStatus,
    Survey,
    Template,
    TextPart,
    encode,
    message_decoder,
    reminder_status_decoder,
    status_decoder,
)

__all__ = ["Client", "ReminderError", "ReminderStore", "Undecodable"]

log = logging.getLogger("gateway.client")


@dataclass
class Undecodable:
    """An inbound message this client could not decode as a :class:`Message` (a producer
    other than the gateway, a newer schema, a bug): never dropped without a trace."""

    subject: str
    sequence: int
    """Its sequence in the inbound stream (``GW_IN``), where it stays until retention ends."""
    data: bytes
    error: str
    """What the decoder said: the field and the problem."""
    headers: dict[str, str] = field(default_factory=dict)


class Client:
    """Connects to the gateway's bus. ``prefix`` must match the gateway's ``[bus] prefix``."""

    def __init__(self, url: str = "nats://127.0.0.1:4222", *, prefix: str = "gw", nc: Any = None, **connect_opts: Any):
        self.url = url
        self.subjects = Subjects(prefix)
        self.nc = nc
        self._own = nc is None
        self._opts = connect_opts
        self.js: Any = nc.jetstream() if nc is not None else None

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **connect_opts: Any) -> Client:
        """A client for the bus the gateway's configuration names, read the way the
        ``gateway`` commands read it: ``path``, else ``$GATEWAY_CONFIG``, else
        ``./gateway.toml`` if it exists, else the defaults; ``${VAR}``s and the
        ``GATEWAY_BUS_URL`` / ``GATEWAY_BUS_PORT`` overrides applied. Uses ``[bus] url`` (or
        the embedded server's ``embedded_host:embedded_port``), ``prefix`` and the
        credentials (``user``/``password``, ``token``, ``creds_file``). Only the settings are
        validated, not the channel sections. Raises :class:`ConfigError` (file, line, key)."""
        from .core.config import find_config, load_settings

        bus = load_settings(find_config(path)).bus
        opts: dict[str, Any] = {}
        if bus.user:
            opts.update(user=bus.user, password=bus.password)
        if bus.token:
            opts["token"] = bus.token
        if bus.creds_file:
            opts["user_credentials"] = bus.creds_file
        url = bus.url or f"nats://{bus.embedded_host}:{bus.embedded_port}"
        return cls(url, prefix=bus.prefix, **{**opts, **connect_opts})

    async def connect(self) -> Client:
        if self.nc is None:
            # A cluster's "nats://a:4222,nats://b:4222" is a list to the NATS client.
            servers = [u.strip() for u in self.url.split(",")] if "," in self.url else self.url
            self.nc = await nats.connect(servers, **self._opts)
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
                      batch: int = 32, ack_wait: float = 60.0,
                      on_undecodable: Callable[[Undecodable], Awaitable[None] | None] | None = None,
                      dead_letter: bool = True) -> AsyncIterator[Message]:
        """Inbound messages through a durable consumer: messages that arrived while the
        backend was offline come first. A message is acked when the loop body that got it
        finishes; if the body raises (or the loop is left), it is not acked and will be
        delivered again.

        A message that does not decode is not yielded and never dropped silently: it is
        logged (logger ``gateway.client``) with its stream sequence, handed to
        ``on_undecodable`` if given, copied as a :class:`DeadLetter` to
        ``<prefix>.dead.<type>.<channel>`` unless ``dead_letter`` is False, and only then
        terminated. If the callback or the copy fails, it is left for redelivery after
        ``ack_wait``. See "Undecodable inbound messages" in ``docs/bus-contract.md``."""
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
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        await self._undecodable(raw, str(exc), on_undecodable, dead_letter, ack_wait)
                        continue
                    try:
                        yield message
                    except BaseException:
                        try:
                            for rest in msgs[i:]:
                                await rest.nak()
                        except nats.errors.ConnectionClosedError:
                            # Left after the client closed (a `break` finalized late): the
                            # server redelivers them after ack_wait instead.
                            pass
                        raise
                    await raw.ack()
        finally:
            try:
                await psub.unsubscribe()
            except Exception:
                pass

    async def _undecodable(self, raw: Any, error: str, callback: Callable[[Undecodable], Any] | None,
                           dead_letter: bool, ack_wait: float) -> None:
        seq = raw.metadata.sequence.stream
        headers = dict(raw.headers or {})
        log.error("undecodable inbound message: dead-lettered and terminated (subject=%s, stream sequence=%d): %s",
                  raw.subject, seq, error)
        bad = Undecodable(subject=raw.subject, sequence=seq, data=raw.data, error=error, headers=headers)
        try:
            if callback is not None:
                r = callback(bad)
                if inspect.isawaitable(r):
                    await r
            if dead_letter:
                await self._dead_letter(bad, raw.metadata.num_delivered)
        except Exception as exc:  # not lost: it comes back after ack_wait
            log.error("undecodable inbound message (stream sequence=%d) not dead-lettered, left for redelivery: %s: %s",
                      seq, type(exc).__name__, exc)
            await raw.nak(delay=ack_wait)
            return
        # Copied first, terminated second (a crash in between copies it twice, never loses it);
        # terminated because it can never be decoded: redelivering it forever helps nobody.
        await raw.term()

    async def _dead_letter(self, bad: Undecodable, attempts: int) -> None:
        parts = bad.subject.split(".")
        ctype, cname = (parts[-2], parts[-1]) if len(parts) >= 4 else ("unknown", "unknown")
        # The bytes travel base64-encoded (4/3 larger): too large ones stay only in GW_IN,
        # which the dead letter names by sequence.
        fits = len(bad.data) * 4 // 3 + 8192 < (self.nc.max_payload if self.nc is not None else 1048576)
        where = f"{self.subjects.stream_in} sequence {bad.sequence}"
        reason = f"undecodable inbound message ({where}): {bad.error}"
        dl = DeadLetter(id=f"in-{bad.sequence}", subject=bad.subject, reason=reason, attempts=attempts,
                        at=datetime.now(timezone.utc), payload=bad.data if fits else None,
                        error=ErrorInfo(message=reason, permanent=True, code="undecodable_inbound"),
                        headers={**{k: v for k, v in bad.headers.items() if not k.startswith("Nats-")},
                                 "Gw-Inbound-Sequence": str(bad.sequence)})
        await self.js.publish(self.subjects.dead(ctype, cname), encode(dl),
                              headers=dead_inbound_headers(self.subjects.stream_in, bad.sequence))

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
        await self.js.publish(self.subjects.outbound(channel_type, channel), encode(outbound),
                              headers=outbound_headers(outbound))
        return outbound.id

    async def _route_of(self, conversation: str) -> tuple[str, str]:
        found = await channel_of(self.js, self.subjects, conversation)
        if found is None:
            raise GatewayError(f"unknown conversation {conversation!r}")
        return found

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

    # --- service desk ----------------------------------------------------------------

    async def mark(self, conversation: str, action: str, *, at: datetime | None = None, by: str | None = None,
                   note: str | None = None) -> None:
        """Mark a conversation ``complaint``, ``resolved`` or ``reopened`` for the service
        desk's SLA timers and follow-up promise (``docs/service-hours.md``)."""
        if action not in ("complaint", "resolved", "reopened"):
            raise ValueError(f"action must be complaint, resolved or reopened, got {action!r}")
        channel_type, channel = await self._route_of(conversation)
        mark = ConversationMark(conversation=conversation, action=action,  # type: ignore[arg-type]
                                at=at or datetime.now(timezone.utc), by=by, note=note)
        await publish_mark(self.js, self.subjects.prefix, channel_type, channel, mark)

    # --- reminders -----------------------------------------------------------------

    @property
    def reminders(self) -> ReminderStore:
        """The reminders on this bus (schedule, get, list, cancel, move): see ``docs/reminders.md``."""
        return ReminderStore(self.nc, self.js, self.subjects)

    async def remind(
        self,
        to: Message | str,
        text: str | None = None,
        *,
        id: str,
        due_at: datetime | None = None,
        after: timedelta | None = None,
        since: datetime | None = None,
        parts: Sequence[Part] = (),
        survey: Survey | bool | None = None,
        cancel_on_reply: bool = True,
        deadline: datetime | None = None,
        quiet_hours: QuietHours | None = None,
        fallback: Fallback | None = None,
        task: DeskTask | None = None,
        template: Template | None = None,
        outbound_id: str | None = None,
        channel_type: str | None = None,
        channel: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Reminder:
        """Schedule a callback (回访) in the conversation of ``to`` and return it.

        The due time is ``due_at``, or ``after`` counted from ``since`` (the event it
        follows, e.g. when the ticket was resolved; default now): ``after=timedelta(days=3),
        since=resolved_at``. ``id`` is yours and makes a retry safe: publishing the same id
        again moves the reminder. ``survey=True`` asks 满意 / 一般 / 不满意 (or pass a
        :class:`Survey`); ``task`` addresses the desk instead of the customer. The gateway
        reports ``scheduled`` (or ``failed`` with the channel's reach code) on
        ``<prefix>.sched.status.<type>.<channel>``.

        Every time is sent in UTC (the returned reminder too), whatever offset you gave.
        :class:`ReminderError` before anything is published when the reminder cannot work:
        an id that is not a subject token, ``due_at`` after ``deadline``, quiet hours with
        an impossible time or an unknown time zone."""
        if due_at is None:
            if after is None:
                raise ValueError("remind: give due_at, or after (with since, default now)")
            due_at = (since or datetime.now(timezone.utc)) + after
        if isinstance(to, Message):
            conversation = to.conversation
            channel_type, channel = channel_type or to.channel_type, channel or to.channel
        else:
            conversation = to
            if channel is None or channel_type is None:
                channel_type, channel = await self._route_of(conversation)
        if survey is True:
            survey = Survey()
        elif survey is False:
            survey = None
        all_parts = ([TextPart(text=text)] if text is not None else []) + list(parts)
        now = datetime.now(timezone.utc)
        outbound = Outbound(id=outbound_id or f"reminder-{id}", conversation=conversation, parts=all_parts,
                            kind="survey" if survey is not None else "followup", template=template, survey=survey,
                            meta=meta or {})
        reminder = Reminder(id=id, conversation=conversation, channel_type=channel_type, channel=channel, due_at=due_at,
                            outbound=outbound, quiet_hours=quiet_hours, deadline=deadline,
                            cancel_on_reply=cancel_on_reply, created_at=now, fallback=fallback, task=task)
        await self.reminders.schedule(reminder)
        return in_utc(reminder)

    async def set_quiet_hours(self, conversation: str, quiet: QuietHours | None) -> None:
        """The customer's own rest hours (``QuietHours(start, end, tz)`` in their time zone)
        for the reminders of ``conversation``: they override the channel's, a reminder's own
        ``quiet_hours`` override them; None removes them."""
        await self.reminders.set_conversation_quiet_hours(conversation, quiet)

    async def cancel_reminder(self, reminder_id: str, reason: str = "backend", *, conversation: str | None = None
                              ) -> bool:
        """Cancel a pending reminder (status ``cancelled`` with ``reason``); False if nothing
        was pending: it fired already, was cancelled, or never existed. Ids are unique per
        conversation: if the id is pending in several, :class:`ReminderError` asks for
        ``conversation`` (nothing is cancelled)."""
        return await self.reminders.cancel(reminder_id, reason=reason, conversation=conversation) is not None

    async def move_reminder(self, reminder_id: str, due_at: datetime, reason: str = "backend", *,
                            conversation: str | None = None, allow_past: bool = False) -> bool:
        """Move a pending reminder (status ``rescheduled`` with ``reason``, after the gateway's
        quiet-hours and reach checks); False if nothing is pending any more.
        :class:`ReminderError` for a time after its deadline, in the past (unless
        ``allow_past``: then it fires now), or an id pending in several conversations
        without ``conversation``."""
        return await self.reminders.move(reminder_id, due_at, reason=reason, conversation=conversation,
                                         allow_past=allow_past) is not None

    async def reminder_statuses(self, *, reminder_id: str | None = None, channel_type: str = "*", channel: str = "*",
                                from_start: bool = False) -> AsyncIterator[ReminderStatus]:
        """Reminder status events (scheduled, rescheduled, cancelled, fired, expired, failed),
        new ones only unless ``from_start``."""
        subject = self.subjects.reminder_status(channel_type, channel)
        policy = api.DeliverPolicy.ALL if from_start else api.DeliverPolicy.NEW
        sub = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=policy,
                                      stream=self.subjects.stream_sched)
        try:
            async for raw in sub.messages:
                try:
                    st = reminder_status_decoder.decode(raw.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if reminder_id is None or st.reminder_id == reminder_id:
                    yield st
        finally:
            await sub.unsubscribe()
