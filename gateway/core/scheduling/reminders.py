"""Callback reminders (回访) on JetStream message schedules (nats-server 2.12+, ADR-51).

The stream ``<PREFIX>_SCHED`` (``allow_msg_schedules``) holds one *schedule* per reminder
on ``<prefix>.sched.at.<conversation>.<id>``: a :class:`Reminder` with the headers
``Nats-Schedule: @at <due>`` and ``Nats-Schedule-Target: <prefix>.sched.fire.<type>.<channel>``.
Publishing on the same subject again replaces it (the server rolls the subject up), purging
the subject cancels it, and at the due time the server itself copies the body to the
target subject, in the same stream, and removes the schedule. Nothing here keeps a timer:
the stream is the only record of what is pending, so a kill -9 of the gateway or of
nats-server loses nothing (both resume from the stream and the durable consumers).

The gateway reads two durable consumers:

- ``<prefix>_reminders_new`` sees every schedule as it is published: it checks quiet
  hours and the channel's reach *early* (moving the schedule, choosing the fallback or
  failing now), and reports ``scheduled`` / ``rescheduled``.
- ``<prefix>_reminders`` takes each fired copy: deadline, cancel on reply, quiet hours and
  reach are checked again (configuration and the conversation may have changed), then
  the outbound is published on ``<prefix>.out.…`` (the normal delivery path) or the task
  on ``<prefix>.task.…``, ``fired`` is reported, and the copy is acked and removed.

A fired copy that is processed twice (a crash before its ack) publishes the same outbound
id and the same status ids again: JetStream drops the repeats inside its duplicate window
and the delivery receipts prevent a second send after it, so each reminder reaches the
customer once."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ..config import seconds
from ..bus.contract import JSON, outbound_headers
from ..failpoints import failpoint
from .quiet import check_quiet_hours, quiet_until
from ..retry import cancel_and_wait
from ..schema import (
    ErrorInfo,
    Message,
    Outbound,
    QuietHours,
    Reminder,
    ReminderStatus,
    Task,
    encode,
    reminder_decoder,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..bus.connection import Subjects
    from ..channel.api import Channel, Conversation
    from ..config import ChannelConfig, RemindersConfig
    from ..bus.services import BusServices

SCHEMA_REMINDER = "reminder/1"
SCHEMA_REMINDER_STATUS = "reminder-status/1"
SCHEMA_TASK = "task/1"

REMINDER_ID = re.compile(r"^[-_=A-Za-z0-9]{1,128}$")
"""A reminder id is a subject token (it names the reminder's schedule subject)."""
_CONVERSATION = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.[-_=A-Za-z0-9]{1,128}$")


# How long one fetch waits for its batch to fill. nats-py's fetch returns a pull request's
# messages only when the batch is full or the request expires, so this bounds how late a
# reminder that fires while a fetch is waiting is taken (a second, 1 s, made them wait up
# to a second and cut the rate to a few hundred a second).
_FETCH_WAIT = 0.05


_quiet_decoder = msgspec.json.Decoder(QuietHours)


class ReminderError(ValueError):
    """A reminder that cannot be scheduled as given (an id or conversation that is not a
    subject token, a due time after its deadline ...)."""


def rfc3339(at: datetime) -> str:
    """UTC, with microseconds: what ``@at`` takes (``2026-12-01T08:00:00.250000Z``)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ReminderSubjects:
    """Subject and stream names of reminders for one prefix."""

    def __init__(self, subjects: Subjects):
        p = subjects.prefix
        self.prefix = p
        up = p.upper().replace("-", "_")
        self.stream = f"{up}_SCHED"
        self.stream_tasks = f"{up}_TASKS"
        self.consumer_new = f"{p}_reminders_new"
        self.consumer_fire = f"{p}_reminders"
        self.all_schedules = f"{p}.sched.at.>"
        self.all_fired = f"{p}.sched.fire.>"
        self.all_statuses = f"{p}.sched.status.>"

    def schedule(self, conversation: str, reminder_id: str) -> str:
        return f"{self.prefix}.sched.at.{conversation}.{reminder_id}"

    def schedule_of(self, reminder_id: str) -> str:
        """A filter matching the schedule of ``reminder_id`` whatever its conversation."""
        return f"{self.prefix}.sched.at.*.*.{reminder_id}"

    def schedules_of_conversation(self, conversation: str) -> str:
        return f"{self.prefix}.sched.at.{conversation}.*"

    def fire(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.sched.fire.{channel_type}.{channel}"

    def status(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.sched.status.{channel_type}.{channel}"

    def task(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.task.{channel_type}.{channel}"


def check_reminder(reminder: Reminder) -> None:
    """Raise :class:`ReminderError` for what would break its subject or can never fire."""
    if not REMINDER_ID.match(reminder.id):
        raise ReminderError("reminder id must be 1 to 128 characters of A-Z a-z 0-9 - _ = (it is a subject token)")
    if not _CONVERSATION.match(reminder.conversation):
        raise ReminderError("reminder conversation is not a gateway conversation key (<channel>.<key>)")
    if reminder.deadline is not None and reminder.due_at > reminder.deadline:
        raise ReminderError("reminder due_at is after its deadline")


def schedule_headers(rs: ReminderSubjects, reminder: Reminder, *, keep_fired: float, reason: str | None = None,
                     expected_seq: int | None = None) -> dict[str, str]:
    """The headers of a reminder's schedule message (the contract: docs/reminders.md)."""
    h = {
        "Nats-Schedule": f"@at {rfc3339(reminder.due_at)}",
        "Nats-Schedule-Target": rs.fire(reminder.channel_type, reminder.channel),
        "Nats-Schedule-TTL": f"{int(keep_fired)}s",
        "Content-Type": JSON,
        "Gw-Schema": SCHEMA_REMINDER,
    }
    if reason:
        h["Gw-Reason"] = reason
    if expected_seq is not None:
        h["Nats-Expected-Last-Subject-Sequence"] = str(expected_seq)
    return h


def status_headers(status: ReminderStatus, seq: int, ttl: float) -> dict[str, str]:
    """``<reminder id>:<state>:<stream sequence of the message that caused it>``: a repeat
    after a crash is dropped by JetStream within its duplicate window."""
    return {"Nats-Msg-Id": f"{status.reminder_id}:{status.state}:{seq}", "Nats-TTL": f"{int(ttl)}s",
            "Content-Type": JSON, "Gw-Schema": SCHEMA_REMINDER_STATUS}


def stream_configs(rs: ReminderSubjects, replicas: int, duplicate_window: float, tasks_max_age: float
                   ) -> list[api.StreamConfig]:
    return [
        # No max_age: schedules wait as long as they must; fired copies and statuses carry
        # their own TTL (Nats-Schedule-TTL, Nats-TTL).
        api.StreamConfig(name=rs.stream, subjects=[f"{rs.prefix}.sched.>"], retention=api.RetentionPolicy.LIMITS,
                         storage=api.StorageType.FILE, num_replicas=replicas, allow_msg_schedules=True,
                         allow_msg_ttl=True, duplicate_window=duplicate_window,
                         description="reminder schedules, fired reminders and reminder statuses"),
        api.StreamConfig(name=rs.stream_tasks, subjects=[f"{rs.prefix}.task.>"], retention=api.RetentionPolicy.LIMITS,
                         storage=api.StorageType.FILE, num_replicas=replicas, max_age=tasks_max_age,
                         duplicate_window=duplicate_window, description="tasks for the desk (callbacks by phone)"),
    ]


class ReminderStore:
    """Reminders as data on the bus, for the gateway, the client and the CLI: schedule,
    read, list, cancel, move. The server decides every race: a cancel is a purge (it
    says whether something was pending), a move republishes only if the schedule is
    still the one read (``Nats-Expected-Last-Subject-Sequence``)."""

    def __init__(self, nc: Any, js: Any, subjects: Subjects, *, keep_fired: float = 30 * 86400,
                 status_ttl: float = 30 * 86400):
        self.nc = nc
        self.js = js
        self.rs = ReminderSubjects(subjects)
        self.keep_fired = keep_fired
        self.status_ttl = status_ttl

    async def schedule(self, reminder: Reminder, *, reason: str | None = None, expected_seq: int | None = None) -> int:
        """Publish (or move) a reminder's schedule; returns its stream sequence."""
        check_reminder(reminder)
        ack = await self.js.publish(self.rs.schedule(reminder.conversation, reminder.id), encode(reminder),
                                    headers=schedule_headers(self.rs, reminder, keep_fired=self.keep_fired, reason=reason,
                                                             expected_seq=expected_seq))
        return int(ack.seq)

    async def schedule_async(self, reminder: Reminder) -> asyncio.Future[Any]:
        """Like :meth:`schedule`, pipelined: returns the future of the publish ack (many
        reminders at once, each awaited later)."""
        check_reminder(reminder)
        return await self.js.publish_async(self.rs.schedule(reminder.conversation, reminder.id), encode(reminder),
                                           headers=schedule_headers(self.rs, reminder, keep_fired=self.keep_fired))

    async def get(self, reminder_id: str) -> tuple[Reminder, int] | None:
        """The pending reminder and its schedule's sequence, or None."""
        if not REMINDER_ID.match(reminder_id):
            return None
        info = await self.js.stream_info(self.rs.stream, subjects_filter=self.rs.schedule_of(reminder_id))
        for subject in (info.state.subjects or {}):
            try:
                m = await self.js.get_last_msg(self.rs.stream, subject)
            except nats.js.errors.NotFoundError:
                continue
            try:
                return reminder_decoder.decode(m.data), int(m.seq)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
        return None

    async def pending(self, filter_subject: str | None = None) -> AsyncIterator[tuple[Reminder | None, Any]]:
        """Every pending schedule (decoded, or None if it does not decode) with its raw message."""
        subject = filter_subject or self.rs.all_schedules
        info = await self.js.stream_info(self.rs.stream, subjects_filter=subject)
        total = len(info.state.subjects or {})
        if not total:
            return
        sub = await self.js.subscribe(subject, ordered_consumer=True, stream=self.rs.stream,
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

    async def cancel(self, reminder_id: str, reason: str = "operator") -> Reminder | None:
        """Cancel a pending reminder and report ``cancelled``; None if nothing was pending
        (it fired already, was cancelled, or never existed)."""
        found = await self.get(reminder_id)
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
        return await self.purge_subject(self.rs.schedule(reminder.conversation, reminder.id)) > 0

    async def purge_subject(self, subject: str) -> int:
        """Purge one subject of the stream; how many messages were removed."""
        req = msgspec.json.encode({"filter": subject})
        resp = await self.nc.request(f"$JS.API.STREAM.PURGE.{self.rs.stream}", req, timeout=5)
        return int(msgspec.json.decode(resp.data).get("purged", 0))

    async def move(self, reminder_id: str, due_at: datetime, reason: str = "operator") -> Reminder | None:
        """Move a pending reminder to ``due_at``; None if nothing is pending any more. The
        gateway re-checks quiet hours and reach and reports ``rescheduled``."""
        found = await self.get(reminder_id)
        if found is None:
            return None
        reminder, seq = found
        moved = msgspec.structs.replace(reminder, due_at=due_at)
        try:
            await self.schedule(moved, reason=reason, expected_seq=seq)
        except nats.js.errors.BadRequestError:
            return None  # it fired or changed between the read and the move
        return moved

    def _quiet_subject(self, conversation: str) -> str:
        return f"$KV.{self.rs.prefix}_state.quiet.{conversation}"

    async def set_conversation_quiet_hours(self, conversation: str, quiet: QuietHours | None) -> None:
        """The customer's own rest hours (their time zone), for every reminder of the
        conversation that does not carry its own; None removes them (the channel's apply)."""
        if not _CONVERSATION.match(conversation):
            raise ReminderError("not a gateway conversation key (<channel>.<key>)")
        if quiet is not None:
            check_quiet_hours(quiet)
            await self.js.publish(self._quiet_subject(conversation), encode(quiet))
        else:  # a KV delete marker
            await self.js.publish(self._quiet_subject(conversation), b"", headers={"KV-Operation": "DEL"})

    async def conversation_quiet_hours(self, conversation: str) -> QuietHours | None:
        try:
            m = await self.js.get_last_msg(f"KV_{self.rs.prefix}_state", self._quiet_subject(conversation), direct=True)
        except (nats.js.errors.NotFoundError, nats.js.errors.BadRequestError):
            return None
        if not m.data or (m.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            return None
        try:
            return _quiet_decoder.decode(m.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def status(self, reminder: Reminder, state: Any, seq: int, *, due_at: datetime | None = None,
                     reason: str | None = None, outbound_id: str | None = None, fallback: str | None = None,
                     error: ErrorInfo | None = None) -> None:
        st = ReminderStatus(reminder_id=reminder.id, conversation=reminder.conversation,
                            channel_type=reminder.channel_type, channel=reminder.channel, state=state,
                            at=datetime.now(timezone.utc), due_at=due_at, reason=reason, outbound_id=outbound_id,
                            fallback=fallback, error=error)
        await self.js.publish(self.rs.status(reminder.channel_type, reminder.channel), encode(st),
                              headers=status_headers(st, seq, self.status_ttl))


class _Skip(Exception):
    """The message is settled (status emitted or nothing to do): ack it."""


class Reminders:
    """The gateway's side: checks schedules as they arrive and turns fired ones into
    outbounds or tasks. One instance per gateway process; several processes share the
    durable consumers."""

    def __init__(self, services: BusServices, cfg: RemindersConfig, *,
                 channel_configs: Callable[[], Mapping[str, ChannelConfig]], channel: Callable[[str], Channel | None],
                 log: Any):
        self.services = services
        self.bus = services.bus
        self.cfg = cfg
        self.channel_configs = channel_configs
        """The channels' config sections (a getter: a reload replaces them)."""
        self.channel = channel
        """The started channel of that name here, or None (asked for its reach)."""
        self.log = log.bind(component="reminders")
        self.rs = ReminderSubjects(services.bus.subjects)
        self.store: ReminderStore | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._generation = 0
        """Bumped when the loops are stopped: a loop whose cancellation was lost (Python
        3.11's wait_for can swallow a cancel that races a fetch timeout, which with 50 ms
        fetches is frequent) still ends at its next turn instead of hanging stop()."""
        self._running: set[asyncio.Task[None]] = set()
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # id -> (lock, [users])
        self._places = asyncio.Semaphore(self.cfg.concurrency)
        self._replied: dict[str, datetime] = {}
        self._reply_task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Create the streams and consumers and start both loops; called again on every new
        bus connection (the old subscriptions died with the old connection)."""
        await self._cancel_loops()
        bus = self.bus
        c = self.bus.cfg
        js = bus.require(during_setup=True)
        for cfg in stream_configs(self.rs, c.replicas, seconds(c.duplicate_window), seconds(c.status_max_age)):
            try:
                await js.add_stream(cfg)
            except nats.js.errors.BadRequestError:
                await js.update_stream(cfg)
        self.store = ReminderStore(bus.nc, js, bus.subjects, keep_fired=seconds(self.cfg.keep_fired),
                                   status_ttl=seconds(c.status_max_age))
        ack_wait = seconds(self.cfg.ack_wait)
        loops = []
        # The early checks are read without acks: on nats-server 2.15.1 an ack of a consumer
        # on schedule messages cost 0.4 to 1.3 ms of server CPU each (0.02 ms unacked),
        # which capped scheduling at a few hundred a second. Nothing depends on them: the
        # firing repeats every check, so a crash costs at most the `scheduled` status of
        # the schedules in flight. The firings are acked (each must be processed).
        for durable, subject, handler, acked in (
                (self.rs.consumer_new, self.rs.all_schedules, self._on_schedule, False),
                (self.rs.consumer_fire, self.rs.all_fired, self._on_fired, True)):
            cc = api.ConsumerConfig(durable_name=durable, filter_subject=subject, deliver_policy=api.DeliverPolicy.ALL,
                                    **(dict(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=-1,
                                            max_ack_pending=max(1000, self.cfg.concurrency * 8))
                                       if acked else dict(ack_policy=api.AckPolicy.NONE)))
            psub = await js.pull_subscribe(subject, durable=durable, stream=self.rs.stream, config=cc)
            loops.append(asyncio.create_task(self._loop(psub, handler, acked), name=f"reminders-{durable}"))
        self._tasks = loops
        self.log.info("reminders started", stream=self.rs.stream)

    async def stop(self) -> None:
        await self._cancel_loops()
        if self._reply_task is not None:
            await cancel_and_wait(self._reply_task)
        if self._running:
            await asyncio.wait(self._running, timeout=10)

    async def _cancel_loops(self) -> None:
        self._generation += 1
        for t in self._tasks:
            await cancel_and_wait(t)
        self._tasks = []

    async def _loop(self, psub: Any, handler: Any, acked: bool) -> None:
        generation = self._generation
        while generation == self._generation:
            try:
                msgs = await psub.fetch(batch=min(256, self.cfg.concurrency), timeout=_FETCH_WAIT)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                (self.log.warning if self.bus.connected else self.log.debug)("reminder fetch failed",
                                                                                error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                await self._places.acquire()
                t = asyncio.create_task(self._one(msg, handler, acked))
                self._running.add(t)
                t.add_done_callback(self._running.discard)

    async def _one(self, msg: Any, handler: Any, acked: bool = True) -> None:
        # One reminder's messages are handled one at a time (a move right behind its
        # schedule, a cancel racing a firing): a lock per reminder id.
        key = msg.subject.rsplit(".", 1)[-1] if ".sched.at." in msg.subject else None
        lock = None
        reminder: Reminder | None = None
        error: Exception | None = None
        try:
            reminder = reminder_decoder.decode(msg.data)
            key = reminder.id
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            error = exc
        users: list[int] = [0]
        held = False
        try:
            if key is not None:
                lock, users = self._locks.get(key) or self._locks.setdefault(key, (asyncio.Lock(), [0]))
                users[0] += 1
                await lock.acquire()
                held = True
            try:
                if reminder is None:
                    await self._undecodable(msg, error)
                else:
                    await handler(msg, reminder)
            except _Skip:
                pass
            if acked:
                await msg.ack()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if acked:  # left unacked: redelivered after ack_wait
                self.log.error("reminder processing failed; left for redelivery", subject=msg.subject,
                               error=f"{type(exc).__name__}: {exc}")
            else:
                self.log.warning("early check of a reminder failed; it is checked again when it fires",
                                 subject=msg.subject, error=f"{type(exc).__name__}: {exc}")
        finally:
            if lock is not None:
                if held:
                    lock.release()
                users[0] -= 1
                if not users[0] and key is not None:
                    del self._locks[key]  # nobody holds or waits for it
            self._places.release()

    async def _undecodable(self, msg: Any, error: Exception | None) -> None:
        self.log.error("undecodable reminder removed", subject=msg.subject, sequence=msg.metadata.sequence.stream,
                       error=str(error))
        # A schedule that never decodes must not fire into the delivery path either.
        assert self.store is not None
        if ".sched.at." in msg.subject:
            await self.store.purge_subject(msg.subject)
        else:
            await self._delete(msg)

    async def _delete(self, msg: Any) -> None:
        try:
            await self.bus.js.delete_msg(self.rs.stream, msg.metadata.sequence.stream)
        except nats.js.errors.NotFoundError:
            pass

    # --- the rules -------------------------------------------------------------------

    async def quiet_hours(self, reminder: Reminder) -> QuietHours | None:
        """The reminder's own quiet hours, else the conversation's (the customer's, set by a
        backend), else its channel's (read now: a reload applies)."""
        if reminder.quiet_hours is not None:
            return reminder.quiet_hours
        assert self.store is not None
        own = await self.store.conversation_quiet_hours(reminder.conversation)
        if own is not None:
            return own
        ccfg = self.channel_configs().get(reminder.channel)
        q = ccfg.quiet_hours if ccfg is not None else None
        return QuietHours(start=q.start, end=q.end, tz=q.tz) if q is not None else None

    async def _reach(self, reminder: Reminder, at: datetime, conversation: Conversation | None = None
                     ) -> tuple[str | None, Conversation | None]:
        """``None`` when the reminder can be sent as is at ``at``, ``"template"`` or
        ``"conversation"`` for the fallback to use; raises :class:`_Failed` otherwise.
        Returns the conversation too (None for a desk task or an unknown channel here)."""
        if reminder.task is not None:
            return None, None
        if conversation is None:
            conversation = await self.services.get_conversation(reminder.conversation)
        ccfg = self.channel_configs().get(reminder.channel)
        if ccfg is None or ccfg.type != reminder.channel_type:
            raise _Failed("unknown_channel", f"no channel {reminder.channel!r} of type {reminder.channel_type!r}")
        channel = self.channel(reminder.channel)
        if conversation is None:
            code, detail, template = "unknown_conversation", "the conversation is not known to the gateway", False
        elif channel is None:
            return None, conversation  # not running here: delivery decides
        else:
            reach = await channel.reach(conversation, at)
            if reach.ok:
                return None, conversation
            code, detail, template = reach.code or "unreachable", reach.detail or "", reach.template
        fb = reminder.fallback
        has_template = (fb is not None and fb.template is not None) or reminder.outbound.template is not None
        if template and has_template:
            return "template", conversation
        if fb is not None and fb.conversation:
            return "conversation", conversation
        raise _Failed(code, detail)

    async def _on_schedule(self, msg: Any, reminder: Reminder) -> None:
        """A schedule was published: check it early."""
        store = self.store
        assert store is not None
        seq = msg.metadata.sequence.stream
        headers = msg.headers or {}
        reason = headers.get("Gw-Reason")
        subject_ok = msg.subject == self.rs.schedule(reminder.conversation, reminder.id)
        try:
            if not subject_ok:
                check_reminder(reminder)  # names what is wrong with the id or conversation
                raise ReminderError("schedule published on a subject that is not <prefix>.sched.at.<conversation>.<id>")
            check_reminder(reminder)
        except ReminderError as exc:
            await store.purge_subject(msg.subject)
            await store.status(reminder, "failed", seq, reason="invalid",
                               error=ErrorInfo(message=str(exc), permanent=True, code="invalid_reminder"))
            raise _Skip from None
        due = reminder.due_at
        moved = quiet_until(await self.quiet_hours(reminder), due)
        if moved is not None and moved != due:
            if reminder.deadline is not None and moved > reminder.deadline:
                if await store.purge(reminder):
                    await store.status(reminder, "expired", seq, reason="quiet_hours",
                                       error=ErrorInfo(message="the next time outside quiet hours is past the deadline",
                                                       permanent=True, code="deadline"))
                raise _Skip
            await store.status(reminder, "rescheduled" if reason else "scheduled", seq, due_at=due, reason=reason)
            try:
                await store.schedule(msgspec.structs.replace(reminder, due_at=moved), reason="quiet_hours",
                                     expected_seq=seq)
            except nats.js.errors.BadRequestError:
                pass  # fired or replaced meanwhile: the firing re-checks quiet hours
            raise _Skip
        try:
            fallback, _ = await self._reach(reminder, due)
        except _Failed as exc:
            if await store.purge(reminder):
                await store.status(reminder, "failed", seq, reason=exc.code,
                                   error=ErrorInfo(message=exc.detail or exc.code, permanent=True, code=exc.code))
            raise _Skip from None
        await store.status(reminder, "rescheduled" if reason else "scheduled", seq, due_at=due, reason=reason,
                           fallback=fallback)

    async def _on_fired(self, msg: Any, reminder: Reminder) -> None:
        """A schedule fired: check again, then send (or report why not). The copy is
        removed once acked (its TTL would remove it anyway)."""
        await self._fired(msg, reminder)
        # Queued behind the caller's ack (call_soon runs after it was written).
        asyncio.get_running_loop().call_soon(self._spawn_delete, msg)

    async def _fired(self, msg: Any, reminder: Reminder) -> None:
        store = self.store
        assert store is not None
        seq = msg.metadata.sequence.stream
        now = datetime.now(timezone.utc)
        if reminder.deadline is not None and now > reminder.deadline:
            await store.status(reminder, "expired", seq, reason="deadline",
                               error=ErrorInfo(message="fired after its deadline (the gateway was not running?)",
                                               permanent=True, code="deadline"))
            return
        conv = None
        if reminder.cancel_on_reply and reminder.created_at is not None:
            conv = await self.services.get_conversation(reminder.conversation)
            if conv is not None and conv.last_inbound_at is not None and conv.last_inbound_at > reminder.created_at:
                await store.status(reminder, "cancelled", seq, reason="reply")
                return
        # Desk tasks too: the desk must not call the customer in their rest hours either.
        moved = quiet_until(await self.quiet_hours(reminder), now)
        if moved is not None:
            if reminder.deadline is not None and moved > reminder.deadline:
                await store.status(reminder, "expired", seq, reason="quiet_hours",
                                   error=ErrorInfo(message="the next time outside quiet hours is past the deadline",
                                                   permanent=True, code="deadline"))
                return
            try:
                # Only if nothing was scheduled under this id since it fired.
                await store.schedule(msgspec.structs.replace(reminder, due_at=moved), reason="quiet_hours",
                                     expected_seq=0)
            except nats.js.errors.BadRequestError:
                self.log.info("reminder fired in quiet hours but was scheduled again meanwhile", reminder_id=reminder.id)
            return
        try:
            fallback, _ = await self._reach(reminder, now, conv)
        except _Failed as exc:
            await store.status(reminder, "failed", seq, reason=exc.code,
                               error=ErrorInfo(message=exc.detail or exc.code, permanent=True, code=exc.code))
            return
        outbound_id = await self._send(reminder, fallback)
        failpoint("reminders.after_send")
        await store.status(reminder, "fired", seq, due_at=reminder.due_at, outbound_id=outbound_id, fallback=fallback)

    def _spawn_delete(self, msg: Any) -> None:
        # Fire and forget (no reply asked): a copy that stays is removed by its TTL, and a
        # round trip per reminder would cost more than the stream space.
        req = msgspec.json.encode({"seq": msg.metadata.sequence.stream, "no_erase": True})
        try:
            nc = self.bus.nc
            if nc is not None:
                t = asyncio.ensure_future(nc.publish(f"$JS.API.STREAM.MSG.DELETE.{self.rs.stream}", req))
                self._running.add(t)
                t.add_done_callback(self._running.discard)
        except Exception:
            pass

    async def _send(self, reminder: Reminder, fallback: str | None) -> str:
        js = self.bus.require()
        s = self.bus.subjects
        out = reminder.outbound
        if reminder.task is not None:
            t = reminder.task
            task = Task(id=out.id, reminder_id=reminder.id, conversation=reminder.conversation,
                        channel_type=reminder.channel_type, channel=reminder.channel, action=t.action, note=t.note,
                        assignee=t.assignee, data=t.data, due_at=reminder.due_at, at=datetime.now(timezone.utc))
            await js.publish(self.rs.task(reminder.channel_type, reminder.channel), encode(task),
                             headers={"Nats-Msg-Id": f"task:{task.id}", "Content-Type": JSON, "Gw-Schema": SCHEMA_TASK})
            return task.id
        kind = out.kind if out.kind in ("followup", "survey") else ("survey" if out.survey is not None else "followup")
        ctype, cname = reminder.channel_type, reminder.channel
        changes: dict[str, Any] = {"kind": kind}
        if out.created_at is None:
            changes["created_at"] = datetime.now(timezone.utc)
        fb = reminder.fallback
        if fallback == "template" and out.template is None and fb is not None:
            changes["template"] = fb.template
        elif fallback == "conversation" and fb is not None and fb.conversation:
            changes["conversation"] = fb.conversation
            ctype, cname = fb.channel_type or ctype, fb.channel or cname
        out = msgspec.structs.replace(out, **changes)
        await js.publish(s.outbound(ctype, cname), encode(out), headers=outbound_headers(out))
        return out.id

    # --- cancel on reply -------------------------------------------------------------

    def customer_wrote(self, message: Message) -> None:
        """Called by the inbound path after a customer message reached the bus: cancel the
        conversation's reminders marked ``cancel_on_reply`` that were created before it.
        Returns at once (the work is done in the background, coalesced per conversation);
        the firing checks the conversation again, so a crash here loses no cancel."""
        if message.auto or self.store is None:
            return
        prev = self._replied.get(message.conversation)
        if prev is None or message.received_at > prev:
            self._replied[message.conversation] = message.received_at
        if self._reply_task is None or self._reply_task.done():
            self._reply_task = asyncio.create_task(self._cancel_replied(), name="reminders-reply")

    async def _cancel_replied(self) -> None:
        while self._replied:
            conversation, at = self._replied.popitem()
            try:
                await self._cancel_conversation(conversation, at)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("cancel on reply not applied now (the firing checks again)",
                                 error=f"{type(exc).__name__}: {exc}")

    async def _cancel_conversation(self, conversation: str, at: datetime) -> None:
        store = self.store
        if store is None or not _CONVERSATION.match(conversation):
            return
        info = await store.js.stream_info(self.rs.stream, subjects_filter=self.rs.schedules_of_conversation(conversation))
        for subject in (info.state.subjects or {}):
            try:
                m = await store.js.get_last_msg(self.rs.stream, subject)
                reminder = reminder_decoder.decode(m.data)
            except (nats.js.errors.NotFoundError, msgspec.DecodeError, msgspec.ValidationError):
                continue
            created = reminder.created_at or m.time
            if not reminder.cancel_on_reply or created is None or created >= at:
                continue
            if await store.purge(reminder):
                await store.status(reminder, "cancelled", int(m.seq), reason="reply")


class _Failed(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail
