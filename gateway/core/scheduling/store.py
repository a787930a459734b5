"""Reminders as data on the bus, for the client, the CLI and the gateway: schedule, read,
list, cancel, move (docs/reminders.md). Nothing here runs a loop: the scheduler
(:mod:`.scheduler`) is the gateway's side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ..bus.contract import reminder_status_headers, schedule_headers
from ..bus.state import quiet_key, state_bucket, survey_key
from ..schema import ErrorInfo, QuietHours, Reminder, ReminderStatus, encode, reminder_decoder, reminder_status_decoder
from ..errors import ReminderError
from .rules import CONVERSATION, REMINDER_ID, check_move, check_quiet, check_reminder, in_utc
from .survey import PendingSurvey, pending_survey_decoder

if TYPE_CHECKING:
    from ..bus.connection import Subjects

_quiet_decoder = msgspec.json.Decoder(QuietHours)


class Named(Protocol):
    """What a reminder status names: a :class:`Reminder`, or a survey reported unanswered."""

    @property
    def id(self) -> str: ...
    @property
    def conversation(self) -> str: ...
    @property
    def channel_type(self) -> str: ...
    @property
    def channel(self) -> str: ...


class ReminderStore:
    """Reminders as data on the bus: schedule, read, list, cancel, move. The server decides
    every race: a cancel is a purge (it says whether something was pending), a move
    republishes only if the schedule is still the one read
    (``Nats-Expected-Last-Subject-Sequence``).

    A reminder id is the backend's and unique *per conversation* (it is the last token of
    the schedule's subject). Calls that take an id alone find it in whatever conversation
    holds it; when the same id is pending in several conversations they raise
    :class:`ReminderError` naming them, and the caller passes ``conversation``."""

    def __init__(self, nc: Any, js: Any, subjects: Subjects, *, keep_fired: float = 30 * 86400,
                 status_ttl: float = 30 * 86400):
        self.nc = nc
        self.js = js
        self.subjects = subjects
        self.state = state_bucket(js, subjects)
        """The state bucket, where pending surveys and conversations' quiet hours are kept."""
        self.keep_fired = keep_fired
        self.status_ttl = status_ttl

    def _headers(self, reminder: Reminder, reason: str | None = None, expected_seq: int | None = None) -> dict[str, str]:
        return schedule_headers(reminder, self.subjects.fire(reminder.channel_type, reminder.channel),
                                keep_fired=self.keep_fired, reason=reason, expected_seq=expected_seq)

    async def schedule(self, reminder: Reminder, *, reason: str | None = None, expected_seq: int | None = None) -> int:
        """Publish (or move) a reminder's schedule, its times in UTC; returns its stream
        sequence. :class:`ReminderError` if it is not valid (checked before publishing)."""
        check_reminder(reminder)
        reminder = in_utc(reminder)
        ack = await self.js.publish(self.subjects.schedule(reminder.conversation, reminder.id), encode(reminder),
                                    headers=self._headers(reminder, reason, expected_seq))
        return int(ack.seq)

    async def schedule_async(self, reminder: Reminder) -> asyncio.Future[Any]:
        """Like :meth:`schedule`, pipelined: returns the future of the publish ack (many
        reminders at once, each awaited later)."""
        check_reminder(reminder)
        reminder = in_utc(reminder)
        return await self.js.publish_async(self.subjects.schedule(reminder.conversation, reminder.id), encode(reminder),
                                           headers=self._headers(reminder))

    async def get(self, reminder_id: str, conversation: str | None = None) -> tuple[Reminder, int] | None:
        """The pending reminder and its schedule's sequence, or None. Without
        ``conversation``, :class:`ReminderError` if the id is pending in several."""
        if not REMINDER_ID.match(reminder_id) or (conversation is not None and not CONVERSATION.match(conversation)):
            return None
        filt = self.subjects.schedule(conversation, reminder_id) if conversation else self.subjects.schedule_of(reminder_id)
        info = await self.js.stream_info(self.subjects.stream_sched, subjects_filter=filt)
        found: list[tuple[Reminder, int]] = []
        for subject in sorted(info.state.subjects or {}):
            try:
                m = await self.js.get_last_msg(self.subjects.stream_sched, subject)
            except nats.js.errors.NotFoundError:
                continue
            try:
                found.append((reminder_decoder.decode(m.data), int(m.seq)))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
        if len(found) > 1:
            raise ReminderError(f"reminder id {reminder_id!r} is pending in {len(found)} conversations "
                                f"({', '.join(r.conversation for r, _ in found)}): name the conversation")
        return found[0] if found else None

    async def pending(self, filter_subject: str | None = None) -> AsyncIterator[tuple[Reminder | None, Any]]:
        """Every pending schedule (decoded, or None if it does not decode) with its raw message."""
        subject = filter_subject or self.subjects.all_schedules
        info = await self.js.stream_info(self.subjects.stream_sched, subjects_filter=subject)
        total = len(info.state.subjects or {})
        if not total:
            return
        sub = await self.js.subscribe(subject, ordered_consumer=True, stream=self.subjects.stream_sched,
                                      deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        try:
            seen = 0
            while seen < total:
                try:
                    m = await sub.next_msg(timeout=5)
                except nats.errors.TimeoutError:
                    return
                seen += 1
                try:
                    yield reminder_decoder.decode(m.data), m
                except (msgspec.DecodeError, msgspec.ValidationError):
                    yield None, m
                if m.metadata.num_pending == 0:
                    return
        finally:
            await sub.unsubscribe()

    async def history(self, reminder_id: str, conversation: str | None = None) -> list[ReminderStatus]:
        """The statuses still kept (``bus.status_max_age``) of ``reminder_id``, oldest first:
        what became of a reminder that is no longer pending (fired, failed, expired ...)."""
        subject = f"{self.subjects.prefix}.sched.status.>"
        info = await self.js.stream_info(self.subjects.stream_sched, subjects_filter=subject)
        total = sum((info.state.subjects or {}).values())
        out: list[ReminderStatus] = []
        if not total:
            return out
        sub = await self.js.subscribe(subject, ordered_consumer=True, stream=self.subjects.stream_sched,
                                      deliver_policy=api.DeliverPolicy.ALL)
        try:
            while True:
                try:
                    m = await sub.next_msg(timeout=5)
                except nats.errors.TimeoutError:
                    break
                try:
                    st = reminder_status_decoder.decode(m.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    st = None
                if st is not None and st.reminder_id == reminder_id and conversation in (None, st.conversation):
                    out.append(st)
                if m.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return out

    async def surveys(self) -> list[PendingSurvey]:
        """Surveys sent and still waiting for their answer (KV ``survey.<conversation>`` in
        ``<prefix>_state``), soonest ``until`` first; one past its ``until`` is about to be
        reported ``unanswered``."""
        out: list[PendingSurvey] = []
        for key in sorted(await self.state.keys(survey_key(">"))):
            data = await self.state.read(key)
            if data is None:
                continue
            try:
                out.append(pending_survey_decoder.decode(data))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
        return sorted(out, key=lambda p: p.until)

    async def cancel(self, reminder_id: str, reason: str = "operator", *, conversation: str | None = None
                     ) -> Reminder | None:
        """Cancel a pending reminder and report ``cancelled``; None if nothing was pending
        (it fired already, was cancelled, or never existed)."""
        found = await self.get(reminder_id, conversation)
        if found is None:
            return None
        reminder, seq = found
        if not await self.purge(reminder):
            return None
        await self.status(reminder, "cancelled", seq, reason=reason)
        return reminder

    async def purge(self, reminder: Reminder) -> bool:
        """Remove the schedule; True if one was there (the server's answer, so of a cancel
        racing the firing exactly one side wins)."""
        return await self.purge_subject(self.subjects.schedule(reminder.conversation, reminder.id)) > 0

    async def purge_subject(self, subject: str) -> int:
        """Purge one subject of the stream; how many messages were removed."""
        req = msgspec.json.encode({"filter": subject})
        resp = await self.nc.request(f"$JS.API.STREAM.PURGE.{self.subjects.stream_sched}", req, timeout=5)
        return int(msgspec.json.decode(resp.data).get("purged", 0))

    async def move(self, reminder_id: str, due_at: datetime, reason: str = "operator", *,
                   conversation: str | None = None, allow_past: bool = False) -> Reminder | None:
        """Move a pending reminder to ``due_at``; None if nothing is pending any more. The
        gateway re-checks quiet hours and reach and reports ``rescheduled``.
        :class:`ReminderError` if ``due_at`` is after the reminder's deadline, or in the past
        (it would fire at once) unless ``allow_past``."""
        found = await self.get(reminder_id, conversation)
        if found is None:
            return None
        reminder, seq = found
        check_move(reminder, due_at, datetime.now(timezone.utc), allow_past=allow_past)
        moved = in_utc(msgspec.structs.replace(reminder, due_at=due_at))
        try:
            await self.schedule(moved, reason=reason, expected_seq=seq)
        except nats.js.errors.BadRequestError:
            return None  # it fired or changed between the read and the move
        return moved

    async def set_conversation_quiet_hours(self, conversation: str, quiet: QuietHours | None) -> None:
        """The customer's own rest hours (their time zone), for every reminder of the
        conversation that does not carry its own; None removes them (the channel's apply)."""
        if not CONVERSATION.match(conversation):
            raise ReminderError("not a gateway conversation key (<channel>.<key>)")
        if quiet is not None:
            check_quiet(quiet)
            await self.state.write(quiet_key(conversation), encode(quiet))
        else:
            await self.state.delete(quiet_key(conversation))

    async def conversation_quiet_hours(self, conversation: str) -> QuietHours | None:
        """The customer's own rest hours set for ``conversation``, or None."""
        data = await self.state.read(quiet_key(conversation))
        if data is None:
            return None
        try:
            return _quiet_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def status(self, reminder: Named, state: Any, seq: int, *, due_at: datetime | None = None,
                     reason: str | None = None, outbound_id: str | None = None, fallback: str | None = None,
                     error: ErrorInfo | None = None) -> None:
        """Publish a :class:`ReminderStatus` (times in UTC), named by ``seq``, the stream
        sequence of the message that caused it (a repeat after a crash is dropped)."""
        st = ReminderStatus(reminder_id=reminder.id, conversation=reminder.conversation,
                            channel_type=reminder.channel_type, channel=reminder.channel, state=state,
                            at=datetime.now(timezone.utc), due_at=due_at.astimezone(timezone.utc) if due_at else None,
                            reason=reason, outbound_id=outbound_id, fallback=fallback, error=error)
        await self.js.publish(self.subjects.reminder_status(reminder.channel_type, reminder.channel), encode(st),
                              headers=reminder_status_headers(st, seq, self.status_ttl))
