"""The gateway's side of callback reminders (回访): two durable consumers on the
``<PREFIX>_SCHED`` stream (nats-server 2.12+ message schedules, ADR-51; the contract is
docs/reminders.md, the subjects and streams are the bus's own, :class:`Subjects`).

The stream ``<PREFIX>_SCHED`` holds one *schedule* per reminder on
``<prefix>.sched.at.<conversation>.<id>``. Publishing on the same subject again replaces
it, purging the subject cancels it, and at the due time the server itself copies the body
to ``<prefix>.sched.fire.<type>.<channel>`` and removes the schedule. Nothing here keeps a
timer: the stream is the only record of what is pending, so a kill -9 of the gateway or of
nats-server loses nothing (both resume from the stream and the durable consumers).

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
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ..bus.contract import outbound_headers, task_headers
from ..failpoints import failpoint
from ..retry import cancel_and_wait
from ..schema import ErrorInfo, Message, QuietHours, Reminder, Task, encode, reminder_decoder
from .rules import (
    CONVERSATION,
    ReminderError,
    Unsendable,
    check_header,
    check_reminder,
    choose_fallback,
    next_allowed,
    past_deadline,
)
from .store import ReminderStore
from .survey import REMINDER_ID_META, PendingSurvey, Surveys, pending_survey_decoder

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..bus.services import BusServices
    from ..channel.api import Channel, Conversation
    from ..config import ChannelConfig, RemindersConfig

# How long one fetch waits for its batch to fill. nats-py's fetch returns a pull request's
# messages only when the batch is full or the request expires, so this bounds how late a
# reminder that fires while a fetch is waiting is taken (a second, 1 s, made them wait up
# to a second and cut the rate to a few hundred a second).
_FETCH_WAIT = 0.05


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
        self.subjects = services.bus.subjects
        self.surveys = Surveys(services.bus, log=log)
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
        """Create the consumers (the streams are the bus's layout) and start both loops;
        called again on every new bus connection (the old subscriptions died with it)."""
        await self._cancel_loops()
        bus = self.bus
        c = self.bus.cfg
        js = bus.require(during_setup=True)
        s = self.subjects
        self.store = ReminderStore(bus.nc, js, bus.subjects, keep_fired=self.cfg.keep_fired,
                                   status_ttl=c.status_max_age)
        ack_wait = self.cfg.ack_wait
        loops = []
        # The early checks are read without acks: on nats-server 2.15.1 an ack of a consumer
        # on schedule messages cost 0.4 to 1.3 ms of server CPU each (0.02 ms unacked),
        # which capped scheduling at a few hundred a second. Nothing depends on them: the
        # firing repeats every check, so a crash costs at most the `scheduled` status of
        # the schedules in flight. The firings are acked (each must be processed).
        for durable, subject, handler, acked in (
                (s.reminders_new_consumer, s.all_schedules, self._on_schedule, False),
                (s.reminders_consumer, s.all_fired, self._on_fired, True),
                (s.surveys_consumer, s.all_unanswered, self._on_unanswered, True)):
            cc = api.ConsumerConfig(durable_name=durable, filter_subject=subject, deliver_policy=api.DeliverPolicy.ALL,
                                    **(dict(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=-1,
                                            max_ack_pending=max(1000, self.cfg.concurrency * 8))
                                       if acked else dict(ack_policy=api.AckPolicy.NONE)))
            psub = await js.pull_subscribe(subject, durable=durable, stream=s.stream_sched, config=cc)
            loops.append(asyncio.create_task(self._loop(psub, handler, acked), name=f"reminders-{durable}"))
        self._tasks = loops
        self.log.info("reminders started", stream=s.stream_sched)

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
                t = asyncio.create_task(self._survey_one(msg) if handler == self._on_unanswered
                                        else self._one(msg, handler, acked))
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

    async def _survey_one(self, msg: Any) -> None:
        try:
            try:
                record = pending_survey_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.log.error("undecodable survey watch removed", subject=msg.subject, error=str(exc))
            else:
                await self._on_unanswered(msg, record)
            await msg.ack()
            asyncio.get_running_loop().call_soon(self._spawn_delete, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # left unacked: redelivered after ack_wait
            self.log.error("survey expiry failed; left for redelivery", subject=msg.subject,
                           error=f"{type(exc).__name__}: {exc}")
        finally:
            self._places.release()

    async def _on_unanswered(self, msg: Any, record: PendingSurvey) -> None:
        """A survey's ``answer_within`` has passed: if it is still waiting, it ends
        ``unanswered`` (a status naming the reminder that sent it, or the outbound)."""
        if not await self.surveys.expire(record):
            return  # answered (or replaced by a later survey) in time
        assert self.store is not None
        await self.store.status(_SurveyOf(record), "unanswered", msg.metadata.sequence.stream,
                                outbound_id=record.outbound_id, reason="no_answer")

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
            await self.bus.js.delete_msg(self.subjects.stream_sched, msg.metadata.sequence.stream)
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
        return ccfg.quiet_hours if ccfg is not None else None

    async def _reach(self, reminder: Reminder, at: datetime, conversation: Conversation | None = None
                     ) -> tuple[str | None, Conversation | None]:
        """``None`` when the reminder can be sent as is at ``at``, ``"template"`` or
        ``"conversation"`` for the fallback to use; raises :class:`Unsendable` otherwise.
        Returns the conversation too (None for a desk task or an unknown channel here)."""
        if reminder.task is not None:
            return None, None
        if conversation is None:
            conversation = await self.services.get_conversation(reminder.conversation)
        ccfg = self.channel_configs().get(reminder.channel)
        if ccfg is None or ccfg.type != reminder.channel_type:
            raise Unsendable("unknown_channel", f"no channel {reminder.channel!r} of type {reminder.channel_type!r}")
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
        return choose_fallback(reminder, code, detail, template), conversation

    async def _on_schedule(self, msg: Any, reminder: Reminder) -> None:
        """A schedule was published: check it early."""
        store = self.store
        assert store is not None
        seq = msg.metadata.sequence.stream
        headers = msg.headers or {}
        reason = headers.get("Gw-Reason")
        subject_ok = msg.subject == self.subjects.schedule(reminder.conversation, reminder.id)
        try:
            if not subject_ok:
                check_reminder(reminder)  # names what is wrong with the id or conversation
                raise ReminderError("schedule published on a subject that is not <prefix>.sched.at.<conversation>.<id>")
            check_reminder(reminder)
            check_header(reminder, headers.get("Nats-Schedule"))
        except ReminderError as exc:
            await store.purge_subject(msg.subject)
            await store.status(reminder, "failed", seq, reason="invalid",
                               error=ErrorInfo(message=str(exc), permanent=True, code="invalid_reminder"))
            raise _Skip from None
        due = reminder.due_at
        try:
            moved = next_allowed(await self.quiet_hours(reminder), due)
        except Unsendable as exc:
            await self._fail_pending(reminder, seq, exc)
            raise _Skip from None
        if moved is not None and moved != due:
            if past_deadline(reminder, moved):
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
        except Unsendable as exc:
            await self._fail_pending(reminder, seq, exc)
            raise _Skip from None
        await store.status(reminder, "rescheduled" if reason else "scheduled", seq, due_at=due, reason=reason,
                           fallback=fallback)

    async def _fail_pending(self, reminder: Reminder, seq: int, exc: Unsendable) -> None:
        """A pending schedule that can never be sent: removed, and ``failed`` with the code."""
        assert self.store is not None
        if await self.store.purge(reminder):
            await self.store.status(reminder, "failed", seq, reason=exc.code,
                                    error=ErrorInfo(message=exc.detail or exc.code, permanent=True, code=exc.code))

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
        if past_deadline(reminder, now):
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
        try:
            moved = next_allowed(await self.quiet_hours(reminder), now)
        except Unsendable as exc:
            await store.status(reminder, "failed", seq, reason=exc.code,
                               error=ErrorInfo(message=exc.detail or exc.code, permanent=True, code=exc.code))
            return
        if moved is not None:
            if past_deadline(reminder, moved):
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
        except Unsendable as exc:
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
                t = asyncio.ensure_future(nc.publish(f"$JS.API.STREAM.MSG.DELETE.{self.subjects.stream_sched}", req))
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
            await js.publish(s.task(reminder.channel_type, reminder.channel), encode(task), headers=task_headers(task))
            return task.id
        kind = out.kind if out.kind in ("followup", "survey") else ("survey" if out.survey is not None else "followup")
        ctype, cname = reminder.channel_type, reminder.channel
        changes: dict[str, Any] = {"kind": kind}
        if out.survey is not None and REMINDER_ID_META not in out.meta:
            changes["meta"] = {**out.meta, REMINDER_ID_META: reminder.id}  # its unanswered status names it
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
        if store is None or not CONVERSATION.match(conversation):
            return
        info = await store.js.stream_info(self.subjects.stream_sched, subjects_filter=self.subjects.schedules_of_conversation(conversation))
        for subject in (info.state.subjects or {}):
            try:
                m = await store.js.get_last_msg(self.subjects.stream_sched, subject)
                reminder = reminder_decoder.decode(m.data)
            except (nats.js.errors.NotFoundError, msgspec.DecodeError, msgspec.ValidationError):
                continue
            created = reminder.created_at or m.time
            if not reminder.cancel_on_reply or created is None or created >= at:
                continue
            if await store.purge(reminder):
                await store.status(reminder, "cancelled", int(m.seq), reason="reply")


class _SurveyOf:
    """A survey seen as the reminder it reports on (what :meth:`ReminderStore.status` reads):
    the reminder that sent it, else the survey's outbound id."""

    def __init__(self, record: PendingSurvey):
        self.id = record.reminder_id or record.outbound_id
        self.conversation = record.conversation
        self.channel_type = record.channel_type
        self.channel = record.channel
