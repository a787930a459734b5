"""The service desk: the automatic acknowledgement outside service hours, the "desk opened"
event and SLA timers, coupled to the rest of the gateway only through the bus.

It reads with durable consumers of its own: customer messages (``<PREFIX>_IN``), delivery
statuses (``<PREFIX>_STATUS``), backends' marks and its own fired timers (``<PREFIX>_DESK``);
it writes outbounds on ``<prefix>.out.…`` (the normal delivery path, with its statuses),
events on ``<prefix>.sla.…`` and ``<prefix>.desk.opened.…``, and one record per conversation
in the state bucket (``desk.conv.<conversation>``, compare-and-set).

Every timer is a JetStream message schedule (like reminders) on
``<prefix>.desk.at.<kind>.<key>`` with its ``@at``; the server fires it into
``<prefix>.desk.fire.<kind>``, where the consumer ``<prefix>_desk_fire`` takes it. Stopping a
timer is a purge of its subject; the record is checked again when it fires, so a purge lost
in a crash is harmless. A kill -9 of the gateway or of nats-server loses no timer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ..bus.contract import EXPECTED_LAST_SEQUENCE, JSON, SCHEMA_TASK, outbound_headers, rfc3339
from ..bus.state import desk_key, state_records
from ..failpoints import failpoint
from ..retry import cancel_and_wait
from ..schema import (
    ConversationMark,
    DeskOpened,
    EventPart,
    FollowupStatus,
    Task,
    reminder_status_decoder,
    Message,
    Outbound,
    SlaEvent,
    TextPart,
    encode,
    mark_decoder,
    message_decoder,
    status_decoder,
)
from .calendar import Calendar

if TYPE_CHECKING:
    from ..bus.services import BusServices
    from ..channel.api import Channel
    from ..config import ChannelConfig, ChannelServiceConfig, ServiceConfig

SCHEMA_MARK = "conversation-mark/1"
SCHEMA_SLA = "sla-event/1"
SCHEMA_OPENED = "desk-opened/1"
SCHEMA_FOLLOWUP = "followup-status/1"
_FINAL = ("answered", "failed", "expired", "cancelled", "missed")
ACK_PREFIX = "desk-ack-"
"""Outbound ids of acknowledgements: their statuses are not a reply of the desk."""

_FETCH_WAIT = 0.2
Rule = Literal["first_response", "next_response", "resolution"]
FollowupState = Literal["due", "scheduled", "sent", "answered", "failed", "expired", "cancelled", "missed"]


class Followup(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The follow-up promise of the latest ``resolved`` mark."""

    resolved_at: datetime
    due_by: datetime
    state: FollowupState = "due"
    reminder_id: str | None = None
    outbound_id: str | None = None
    sent_at: datetime | None = None
    task_id: str | None = None


class DeskRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the desk keeps per conversation (``desk.conv.<conversation>`` in the state bucket)."""

    channel_type: str = ""
    channel: str = ""
    waiting_since: datetime | None = None
    """The oldest customer message not answered yet (the response timer's start)."""
    answered: int = 0
    """Replies sent so far (0: the next answer is the first response)."""
    last_reply_at: datetime | None = None
    """The latest ``sent`` of a reply."""
    reply_seen_at: datetime | None = None
    """The latest ``accepted`` or ``sent`` of a reply (a reply on its way suppresses the
    acknowledgement)."""
    acked_period: datetime | None = None
    """The opening of the closed period the conversation was acknowledged in."""
    complaint_at: datetime | None = None
    resolved_at: datetime | None = None
    followup: Followup | None = None


class DeskTimer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of a timer's schedule (internal to the gateway, not part of the contract)."""

    kind: Literal["ack", "sla", "open", "followup"]
    conversation: str = ""
    channel_type: str = ""
    channel: str = ""
    started_at: datetime | None = None
    due_at: datetime | None = None
    rule: Rule | None = None
    stage: Literal["warning", "breach"] | None = None
    message_id: str | None = None
    opens_at: datetime | None = None
    calendar: str = ""


class OpenCount(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``desk.open.<calendar>``: who is waiting for the next opening."""

    opens_at: datetime
    waiting: int = 0
    waiting_since: datetime | None = None
    channels: list[str] = []


_record_decoder = msgspec.json.Decoder(DeskRecord)
_timer_decoder = msgspec.json.Decoder(DeskTimer)
_open_decoder = msgspec.json.Decoder(OpenCount)


class DeskSubjects:
    """Subjects, stream and consumers of the service desk for one prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        up = prefix.upper().replace("-", "_")
        self.stream = f"{up}_DESK"
        self.consumer_in = f"{prefix}_desk_in"
        self.consumer_status = f"{prefix}_desk_status"
        self.consumer_mark = f"{prefix}_desk_mark"
        self.consumer_fire = f"{prefix}_desk_fire"
        self.consumer_sched = f"{prefix}_desk_reminders"

    def timer(self, kind: str, key: str) -> str:
        return f"{self.prefix}.desk.at.{kind}.{key}"

    def fire(self, kind: str) -> str:
        return f"{self.prefix}.desk.fire.{kind}"

    def mark(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.desk.mark.{channel_type}.{channel}"

    def opened(self, calendar: str) -> str:
        return f"{self.prefix}.desk.opened.{calendar}"

    def sla(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.sla.{channel_type}.{channel}"

    def followup(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.desk.followup.{channel_type}.{channel}"


def stream_config(ds: DeskSubjects, replicas: int, duplicate_window: float) -> api.StreamConfig:
    """``<PREFIX>_DESK``: timers (schedules), their fired copies, marks and events. No
    ``max_age``: timers wait as long as they must; everything else carries a ``Nats-TTL``."""
    return api.StreamConfig(name=ds.stream, subjects=[f"{ds.prefix}.desk.>", f"{ds.prefix}.sla.>"],
                            retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE, num_replicas=replicas,
                            allow_msg_schedules=True, allow_msg_ttl=True, duplicate_window=duplicate_window,
                            description="service desk: timers, conversation marks, SLA and desk-opened events")


def render_duration(secs: float, language: str) -> str:
    """``86400`` → ``1 天`` / ``1 day``; hours below two days, minutes below two hours."""
    if secs >= 2 * 86400 or (secs >= 86400 and secs % 86400 == 0):
        n, zh, en = secs / 86400, "天", "day"
    elif secs >= 7200 or (secs >= 3600 and secs % 3600 == 0):
        n, zh, en = secs / 3600, "小时", "hour"
    else:
        n, zh, en = max(1.0, secs / 60), "分钟", "minute"
    num = f"{n:.0f}" if abs(n - round(n)) < 0.05 else f"{n:.1f}"
    if language == "zh":
        return f"{num} {zh}"
    return f"{num} {en}{'' if num == '1' else 's'}"


def render_ack(template: str, opens_at: datetime | None, calendar: Calendar, expected: float, language: str) -> str:
    """The acknowledgement's text: ``{opens}`` in the calendar's zone, ``{expected}``."""
    if opens_at is None:
        opens = "（暂无开放时间）" if language == "zh" else "(no opening scheduled)"
    else:
        local = opens_at.astimezone(calendar.tz)
        opens = local.strftime("%Y-%m-%d %H:%M") + (f" ({calendar.tz_name})" if language == "en" else "")
    return template.replace("{opens}", opens).replace("{expected}", render_duration(expected, language))


def automatic(message: Message) -> bool:
    """Never acknowledged, never timed: automatic mail and bots (``auto``), and messages that
    carry only events (a subscription, a notice of the platform)."""
    return message.auto or (bool(message.parts) and all(isinstance(p, EventPart) for p in message.parts))


class ServiceDesk:
    """The gateway's service desk (one per process; processes share the durable consumers)."""

    def __init__(self, services: BusServices, cfg: Callable[[], ServiceConfig], *,
                 channel_configs: Callable[[], Mapping[str, ChannelConfig]],
                 calendars: Callable[[], Mapping[str, Calendar]],
                 channel: Callable[[str], Channel | None], log: Any,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.services = services
        self.bus = services.bus
        self.cfg = cfg
        self.channel_configs = channel_configs
        self.calendars = calendars
        self.channel = channel
        self.clock = clock
        self.log = log.bind(component="desk")
        self.ds = DeskSubjects(self.bus.subjects.prefix)
        self.records = state_records(self.bus)
        self._tasks: list[asyncio.Task[None]] = []
        self._generation = 0
        self._warned_years: set[int] = set()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Create the stream and the four durable consumers and start their loops; called
        again on every new bus connection."""
        await self._cancel_loops()
        js = self.bus.require(during_setup=True)
        c = self.bus.cfg
        sc = stream_config(self.ds, c.replicas, c.duplicate_window)
        try:
            await js.add_stream(sc)
        except nats.js.errors.BadRequestError:
            await js.update_stream(sc)
        s = self.bus.subjects
        ack_wait = self.cfg().ack_wait
        # New consumers start with what arrives from now on: a desk switched on later does
        # not time the whole history of the inbound stream.
        loops: list[tuple[str, str, str, Callable[[Any], Awaitable[None]], api.DeliverPolicy]] = [
            (self.ds.consumer_in, s.stream_in, f"{s.prefix}.in.>", self._on_inbound, api.DeliverPolicy.NEW),
            (self.ds.consumer_status, s.stream_status, f"{s.prefix}.status.>", self._on_status, api.DeliverPolicy.NEW),
            (self.ds.consumer_mark, self.ds.stream, f"{s.prefix}.desk.mark.>", self._on_mark, api.DeliverPolicy.ALL),
            (self.ds.consumer_fire, self.ds.stream, f"{s.prefix}.desk.fire.>", self._on_fire, api.DeliverPolicy.ALL),
        ]
        # Follow-ups are reminders: their statuses are read from the reminders' stream, and
        # what needs a human goes to their task stream (both laid out by the bus, which the
        # process asks to when a channel has service rules even without reminders).
        loops.append((self.ds.consumer_sched, s.stream_sched, f"{s.prefix}.sched.status.>", self._on_reminder_status,
                      api.DeliverPolicy.NEW))
        tasks = []
        for durable, stream, subject, handler, policy in loops:
            cc = api.ConsumerConfig(durable_name=durable, filter_subject=subject, deliver_policy=policy,
                                    ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=-1,
                                    max_ack_pending=1000)
            psub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=cc)
            tasks.append(asyncio.create_task(self._loop(psub, handler), name=f"desk-{durable}"))
        self._tasks = tasks
        self.log.info("service desk started", stream=self.ds.stream)

    async def stop(self) -> None:
        """Stop the loops (messages in hand are redelivered after ``ack_wait``)."""
        await self._cancel_loops()

    async def _cancel_loops(self) -> None:
        self._generation += 1
        for t in self._tasks:
            await cancel_and_wait(t)
        self._tasks = []

    async def _loop(self, psub: Any, handler: Callable[[Any], Awaitable[None]]) -> None:
        generation = self._generation
        while generation == self._generation:
            try:
                msgs = await psub.fetch(batch=64, timeout=_FETCH_WAIT)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                (self.log.warning if self.bus.connected else self.log.debug)("desk fetch failed",
                                                                                error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
                continue
            # In order, one at a time: a conversation's message, its reply's status and its
            # timers are decided in the order the streams hold them.
            for msg in msgs:
                try:
                    await handler(msg)
                    await msg.ack()
                except asyncio.CancelledError:
                    raise
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self.log.error("undecodable message skipped by the desk", subject=msg.subject, error=str(exc))
                    await msg.term()
                except Exception as exc:
                    self.log.error("desk processing failed; left for redelivery", subject=msg.subject,
                                   error=f"{type(exc).__name__}: {exc}")

    # --- records ---------------------------------------------------------------------

    async def _change(self, conversation: str, change: Callable[[DeskRecord], bool]) -> DeskRecord:
        """Apply ``change`` to the conversation's record by compare-and-set (``change``
        returns False when nothing is to be written); returns the record."""
        key = desk_key(f"conv.{conversation}")
        while True:
            found = await self.records.get_revision(key)
            rec = _record_decoder.decode(found[0]) if found and found[0] else DeskRecord()
            if not change(rec):
                return rec
            data = msgspec.json.encode(rec)
            if found is None:
                if await self.records.create(key, data):
                    return rec
            elif await self.records.update(key, data, found[1]):
                return rec

    async def record(self, conversation: str) -> DeskRecord | None:
        """The desk's record of ``conversation``, or None."""
        data = await self.records.get(desk_key(f"conv.{conversation}"))
        return _record_decoder.decode(data) if data else None

    def _service(self, channel: str) -> tuple[ChannelServiceConfig, Calendar] | None:
        ccfg = self.channel_configs().get(channel)
        if ccfg is None or ccfg.service is None:
            return None
        cal = self.calendars().get(ccfg.service.calendar)
        return (ccfg.service, cal) if cal is not None else None

    def _note_unknown_years(self, cal: Calendar) -> None:
        years = cal.holidays.unknown_years - self._warned_years if cal.holidays is not None else set()
        if years:
            self._warned_years |= years
            self.log.warning("holiday calendar does not know these years: only the weekly hours apply",
                             calendar=cal.name, source=cal.holidays.name if cal.holidays else None, years=sorted(years))

    # --- timers ----------------------------------------------------------------------

    async def _schedule(self, subject: str, timer: DeskTimer, at: datetime) -> None:
        js = self.bus.require()
        await js.publish(subject, encode(timer), headers={
            "Nats-Schedule": f"@at {rfc3339(at)}", "Nats-Schedule-Target": self.ds.fire(timer.kind),
            "Nats-Schedule-TTL": f"{int(self.bus.cfg.status_max_age)}s", "Content-Type": JSON})

    async def _purge(self, subject: str) -> None:
        req = msgspec.json.encode({"filter": subject})
        assert self.bus.nc is not None
        await self.bus.nc.request(f"$JS.API.STREAM.PURGE.{self.ds.stream}", req, timeout=5)

    async def _start_sla(self, conversation: str, channel_type: str, channel: str, rule: Rule, started: datetime,
                         svc: ChannelServiceConfig, cal: Calendar) -> None:
        limit = {"first_response": svc.first_response, "next_response": svc.next_response,
                 "resolution": svc.resolution}[rule]
        if limit is None:
            return
        if svc.business_hours:
            due = cal.add_business(started, limit)
            warn = cal.add_business(started, limit * svc.warn_at)
            self._note_unknown_years(cal)
            if due is None or warn is None:
                self.log.warning("SLA timer not started: the calendar has no open time ahead", calendar=cal.name)
                return
        else:
            due = started + timedelta(seconds=limit)
            warn = started + timedelta(seconds=limit * svc.warn_at)
        kind_key = "resolution" if rule == "resolution" else "response"
        timer = DeskTimer(kind="sla", conversation=conversation, channel_type=channel_type, channel=channel,
                          started_at=started, due_at=due, rule=rule, stage="warning")
        await self._schedule(self.ds.timer(f"sla-{kind_key}", conversation), timer, warn)

    # --- inbound ---------------------------------------------------------------------

    async def _on_inbound(self, msg: Any) -> None:
        if self.cfg().enabled is False:
            return
        m = message_decoder.decode(msg.data)
        found = self._service(m.channel)
        if found is None or automatic(m):
            return
        svc, cal = found
        at = m.received_at
        opens_at: datetime | None = None
        closed = not cal.is_open(at)
        if closed:
            opens_at = cal.next_open(at)
        self._note_unknown_years(cal)
        start_rule: list[Rule] = []
        first_in_period = [False]
        replied = [False]

        answered: list[Followup] = []

        def change(rec: DeskRecord) -> bool:
            start_rule.clear()
            answered.clear()
            first_in_period[0] = replied[0] = False
            rec.channel_type, rec.channel = m.channel_type, m.channel
            fu = rec.followup
            if fu is not None and fu.state == "sent" and fu.sent_at is not None and at > fu.sent_at:
                fu.state = "answered"
                answered.append(fu)
            # Counted for the desk's opening whether or not a reply is already known: the
            # desk and status consumers run side by side, and the count must not depend on
            # which of them read first.
            if closed and opens_at is not None and rec.acked_period != opens_at:
                rec.acked_period = opens_at
                first_in_period[0] = True
            if rec.reply_seen_at is not None and rec.reply_seen_at >= at:
                replied[0] = True  # answered already (the reply's status was read first)
                return True
            if rec.waiting_since is None or rec.waiting_since > at:
                if rec.waiting_since is None:
                    start_rule.append("first_response" if rec.answered == 0 else "next_response")
                rec.waiting_since = at
            return True

        await self._change(m.conversation, change)
        for fu in answered:
            await self._followup_event(m.conversation, m.channel_type, m.channel, fu)
        for rule in start_rule:
            await self._start_sla(m.conversation, m.channel_type, m.channel, rule, at, svc, cal)
        if first_in_period[0] and opens_at is not None:
            await self._count_waiting(cal, opens_at, at, m.channel)
            if svc.acknowledge and not replied[0]:
                timer = DeskTimer(kind="ack", conversation=m.conversation, channel_type=m.channel_type,
                                  channel=m.channel, message_id=m.id, started_at=at, opens_at=opens_at)
                await self._schedule(self.ds.timer("ack", m.conversation), timer,
                                     max(at + timedelta(seconds=svc.ack_delay), self.clock()))

    async def _count_waiting(self, cal: Calendar, opens_at: datetime, at: datetime, channel: str) -> None:
        key = desk_key(f"open.{cal.name}")
        while True:
            found = await self.records.get_revision(key)
            cur = _open_decoder.decode(found[0]) if found and found[0] else None
            new_period = cur is None or cur.opens_at != opens_at
            if new_period:
                cur = OpenCount(opens_at=opens_at)
            assert cur is not None
            cur.waiting += 1
            cur.waiting_since = at if cur.waiting_since is None else min(cur.waiting_since, at)
            if channel not in cur.channels:
                cur.channels = sorted([*cur.channels, channel])
            data = msgspec.json.encode(cur)
            ok = await self.records.create(key, data) if found is None else \
                await self.records.update(key, data, found[1])
            if ok:
                break
        if new_period:
            await self._schedule(self.ds.timer("open", cal.name), DeskTimer(kind="open", calendar=cal.name,
                                                                             opens_at=opens_at), opens_at)

    # --- statuses --------------------------------------------------------------------

    async def _on_status(self, msg: Any) -> None:
        st = status_decoder.decode(msg.data)
        if st.state not in ("accepted", "sent", "dead") or st.outbound_id.startswith(ACK_PREFIX):
            return
        if self._service(st.channel) is None:
            return
        stop = [False]
        changed: list[Followup] = []

        def change(rec: DeskRecord) -> bool:
            stop[0] = False
            changed.clear()
            fu = rec.followup
            if fu is not None and fu.outbound_id == st.outbound_id and fu.state not in _FINAL:
                if st.state == "sent" and fu.state != "sent":
                    fu.state, fu.sent_at = "sent", st.at
                    changed.append(fu)
                elif st.state == "dead":
                    fu.state = "failed"
                    changed.append(fu)
            if st.state == "dead":
                return bool(changed)
            if rec.reply_seen_at is None or rec.reply_seen_at < st.at:
                rec.reply_seen_at = st.at
            if st.state == "sent":
                rec.last_reply_at = st.at if rec.last_reply_at is None else max(rec.last_reply_at, st.at)
                if rec.waiting_since is not None and rec.waiting_since <= st.at:
                    rec.waiting_since = None
                    rec.answered += 1
                    stop[0] = True
            return True

        await self._change(st.conversation, change)
        for fu in changed:
            await self._followup_event(st.conversation, st.channel_type, st.channel, fu,
                                       reason=st.error.code if st.error is not None else None)
        if stop[0]:
            await self._purge(self.ds.timer("sla-response", st.conversation))

    # --- marks -----------------------------------------------------------------------

    async def _on_mark(self, msg: Any) -> None:
        mark = mark_decoder.decode(msg.data)
        at = mark.at or msg.metadata.timestamp or self.clock()
        channel = mark.conversation.split(".", 1)[0]
        ccfg = self.channel_configs().get(channel)
        found = self._service(channel)
        start = [False]
        followups: list[Followup] = []
        within = found[0].followup_within if found is not None else None

        def change(rec: DeskRecord) -> bool:
            start[0] = False
            followups.clear()
            if ccfg is not None:
                rec.channel_type, rec.channel = ccfg.type, channel
            fu = rec.followup
            if mark.action == "resolved" and within is not None and (fu is None or fu.resolved_at != at):
                if fu is not None and fu.state in ("due", "scheduled"):
                    fu.state = "cancelled"  # a new resolution replaces the promise not kept yet
                    followups.append(msgspec.structs.replace(fu))
                rec.followup = Followup(resolved_at=at, due_by=at + timedelta(seconds=within))
                followups.append(rec.followup)
            elif mark.action == "reopened" and fu is not None and fu.state in ("due", "scheduled"):
                fu.state = "cancelled"
                followups.append(fu)
            if mark.action == "complaint":
                if rec.complaint_at is None or rec.resolved_at is not None:
                    rec.complaint_at, rec.resolved_at = at, None
                    start[0] = True
            elif mark.action == "resolved":
                rec.resolved_at = at
            elif mark.action == "reopened" and rec.resolved_at is not None:
                rec.resolved_at = None
                if rec.complaint_at is not None:
                    rec.complaint_at = at
                    start[0] = True
            return True

        await self._change(mark.conversation, change)
        for fu in followups:
            if ccfg is None:
                break
            await self._followup_event(mark.conversation, ccfg.type, channel, fu,
                                       reason="reopened" if mark.action == "reopened" else None)
            if fu.state == "due":
                await self._schedule(self.ds.timer("followup", mark.conversation),
                                     DeskTimer(kind="followup", conversation=mark.conversation, channel_type=ccfg.type,
                                               channel=channel, started_at=fu.resolved_at, due_at=fu.due_by),
                                     fu.due_by)
            elif mark.action == "reopened":
                await self._purge(self.ds.timer("followup", mark.conversation))
        if mark.action == "resolved":
            await self._purge(self.ds.timer("sla-resolution", mark.conversation))
        elif start[0] and found is not None and ccfg is not None:
            await self._start_sla(mark.conversation, ccfg.type, channel, "resolution", at, *found)

    # --- fired timers ----------------------------------------------------------------

    async def _on_fire(self, msg: Any) -> None:
        timer = _timer_decoder.decode(msg.data)
        if timer.kind == "ack":
            await self._fire_ack(timer)
        elif timer.kind == "sla":
            await self._fire_sla(timer)
        elif timer.kind == "open":
            await self._fire_open(timer)
        elif timer.kind == "followup":
            await self._fire_followup(timer)

    async def _fire_ack(self, timer: DeskTimer) -> None:
        found = self._service(timer.channel)
        rec = await self.record(timer.conversation)
        if found is None or rec is None or timer.started_at is None:
            return
        svc, cal = found
        if not svc.acknowledge:
            return
        if rec.reply_seen_at is not None and rec.reply_seen_at >= timer.started_at:
            self.log.info("acknowledgement not sent: a reply is on its way", conversation=timer.conversation)
            return
        if cal.is_open(self.clock()):
            return  # the desk opened meanwhile: people answer now
        conv = await self.services.get_conversation(timer.conversation)
        channel = self.channel(timer.channel)
        if conv is None:
            return
        if channel is not None:
            reach = await channel.reach(conv, self.clock())
            if not reach.ok:
                self.log.info("acknowledgement not sent: the channel cannot reach the conversation now",
                              conversation=timer.conversation, code=reach.code)
                return
        template = self.cfg().templates.get(svc.language) or self.cfg().templates.get("en", "")
        text = render_ack(template, timer.opens_at, cal, svc.answer_within, svc.language)
        stamp = rfc3339(timer.opens_at).replace(":", "").replace(".", "") if timer.opens_at else "none"
        out = Outbound(id=f"{ACK_PREFIX}{timer.conversation.split('.', 1)[1]}-{stamp}", conversation=timer.conversation,
                       parts=[TextPart(text=text)], kind="notice", auto=True, in_reply_to=timer.message_id,
                       created_at=self.clock())
        js = self.bus.require()
        await js.publish(self.bus.subjects.outbound(timer.channel_type, timer.channel), encode(out),
                         headers=outbound_headers(out))
        failpoint("desk.after_ack")

    async def _fire_sla(self, timer: DeskTimer) -> None:
        rec = await self.record(timer.conversation)
        if rec is None or timer.started_at is None or timer.due_at is None or timer.rule is None:
            return
        if timer.rule == "resolution":
            live = rec.complaint_at == timer.started_at and rec.resolved_at is None
        else:
            live = rec.waiting_since == timer.started_at
        if not live:
            return
        found = self._service(timer.channel)
        ccfg = self.channel_configs().get(timer.channel)
        svc = found[0] if found is not None else None
        limit = {"first_response": svc.first_response, "next_response": svc.next_response,
                 "resolution": svc.resolution}[timer.rule] if svc is not None else None
        now = self.clock()
        assert timer.stage is not None
        ev = SlaEvent(conversation=timer.conversation, channel_type=timer.channel_type, channel=timer.channel,
                      rule=timer.rule, state=timer.stage, limit=limit.text if limit is not None else "",
                      business_hours=bool(svc and svc.business_hours),
                      started_at=timer.started_at, due_at=timer.due_at, at=now,
                      late=(now - timer.due_at).total_seconds())
        js = self.bus.require()
        ttl = int(self.bus.cfg.status_max_age)
        await js.publish(self.ds.sla(timer.channel_type, timer.channel), encode(ev), headers={
            "Nats-Msg-Id": f"sla:{timer.conversation}:{timer.rule}:{timer.stage}:{rfc3339(timer.started_at)}",
            "Nats-TTL": f"{ttl}s", "Content-Type": JSON, "Gw-Schema": SCHEMA_SLA})
        if timer.stage == "warning" and ccfg is not None:
            key = "resolution" if timer.rule == "resolution" else "response"
            breach = msgspec.structs.replace(timer, stage="breach")
            try:
                # Only if no newer timer replaced this one since it fired.
                await self._schedule_expect_empty(self.ds.timer(f"sla-{key}", timer.conversation), breach,
                                                  max(timer.due_at, now))
            except nats.js.errors.BadRequestError:
                pass

    async def _schedule_expect_empty(self, subject: str, timer: DeskTimer, at: datetime) -> None:
        js = self.bus.require()
        await js.publish(subject, encode(timer), headers={
            "Nats-Schedule": f"@at {rfc3339(at)}", "Nats-Schedule-Target": self.ds.fire(timer.kind),
            "Nats-Schedule-TTL": f"{int(self.bus.cfg.status_max_age)}s", "Content-Type": JSON,
            EXPECTED_LAST_SEQUENCE: "0"})

    async def _fire_open(self, timer: DeskTimer) -> None:
        if timer.opens_at is None:
            return
        cal = self.calendars().get(timer.calendar)
        data = await self.records.get(desk_key(f"open.{timer.calendar}"))
        count = _open_decoder.decode(data) if data else None
        if count is None or count.opens_at != timer.opens_at:
            return
        ev = DeskOpened(calendar=timer.calendar, opened_at=timer.opens_at,
                        closed_since=cal.closed_since(timer.opens_at - timedelta(microseconds=1)) if cal else None,
                        waiting=count.waiting, waiting_since=count.waiting_since, channels=count.channels)
        js = self.bus.require()
        await js.publish(self.ds.opened(timer.calendar), encode(ev), headers={
            "Nats-Msg-Id": f"opened:{timer.calendar}:{rfc3339(timer.opens_at)}",
            "Nats-TTL": f"{int(self.bus.cfg.status_max_age)}s", "Content-Type": JSON,
            "Gw-Schema": SCHEMA_OPENED})

    # --- follow-up (回访) coverage -------------------------------------------------------

    async def _on_reminder_status(self, msg: Any) -> None:
        rs = reminder_status_decoder.decode(msg.data)
        if self._service(rs.channel) is None:
            return
        changed: list[Followup] = []
        mapping: dict[str, FollowupState] = {"scheduled": "scheduled", "rescheduled": "scheduled", "failed": "failed", "expired": "expired",
                   "cancelled": "cancelled"}

        def change(rec: DeskRecord) -> bool:
            changed.clear()
            fu = rec.followup
            # The first reminder of the conversation after the resolution is its follow-up.
            if fu is None or fu.state in _FINAL or rs.at < fu.resolved_at:
                return False
            if fu.reminder_id is not None and fu.reminder_id != rs.reminder_id:
                return False
            fu.reminder_id = rs.reminder_id
            if rs.state == "fired":
                fu.outbound_id = rs.outbound_id
            elif rs.state in mapping and fu.state != "sent":
                fu.state = mapping[rs.state]
            else:
                return False
            changed.append(fu)
            return True

        await self._change(rs.conversation, change)
        for fu in changed:
            if rs.state != "fired":
                await self._followup_event(rs.conversation, rs.channel_type, rs.channel, fu, reason=rs.reason)

    async def _fire_followup(self, timer: DeskTimer) -> None:
        missed: list[Followup] = []

        def change(rec: DeskRecord) -> bool:
            missed.clear()
            fu = rec.followup
            if fu is None or fu.resolved_at != timer.started_at or fu.state not in ("due", "scheduled"):
                return False
            if fu.outbound_id is not None:
                return False  # fired: its delivery decides (a dead one raises the task)
            fu.state = "missed"
            missed.append(fu)
            return True

        await self._change(timer.conversation, change)
        for fu in missed:
            await self._followup_event(timer.conversation, timer.channel_type, timer.channel, fu,
                                       reason="no follow-up sent within the promise")

    async def _followup_event(self, conversation: str, channel_type: str, channel: str, fu: Followup, *,
                              reason: str | None = None) -> None:
        """Publish the follow-up's new state; a failed, expired or missed one first becomes a
        desk task (``<prefix>.task.…``) for a human."""
        js = self.bus.require()
        stamp = rfc3339(fu.resolved_at)
        task_id = None
        if fu.state in ("failed", "expired", "missed"):
            task_id = f"followup-{conversation.split('.', 1)[-1]}-{stamp.replace(':', '').replace('.', '')}"
            note = {"failed": "the follow-up could not be delivered", "expired": "the follow-up expired unsent",
                    "missed": "no follow-up was sent within the promise"}[fu.state]
            task = Task(id=task_id, reminder_id=fu.reminder_id or "", conversation=conversation,
                        channel_type=channel_type, channel=channel, action="followup",
                        note=note + (f" ({reason})" if reason else ""),
                        data={"state": fu.state, "resolved_at": stamp}, due_at=fu.due_by, at=self.clock())
            await js.publish(self.bus.subjects.task(channel_type, channel), encode(task),
                             headers={"Nats-Msg-Id": f"task:{task_id}", "Content-Type": JSON, "Gw-Schema": SCHEMA_TASK})
        ev = FollowupStatus(conversation=conversation, channel_type=channel_type, channel=channel, state=fu.state,
                            resolved_at=fu.resolved_at, due_by=fu.due_by, at=self.clock(), reminder_id=fu.reminder_id,
                            outbound_id=fu.outbound_id, reason=reason, task_id=task_id)
        await js.publish(self.ds.followup(channel_type, channel), encode(ev), headers={
            "Nats-Msg-Id": f"followup:{conversation}:{stamp}:{fu.state}",
            "Nats-TTL": f"{int(self.bus.cfg.status_max_age)}s", "Content-Type": JSON,
            "Gw-Schema": SCHEMA_FOLLOWUP})


async def publish_mark(js: Any, prefix: str, channel_type: str, channel: str, mark: ConversationMark) -> None:
    """Publish a backend's mark (what ``Client.mark`` does; any language can do the same)."""
    await js.publish(DeskSubjects(prefix).mark(channel_type, channel), encode(mark),
                     headers={"Content-Type": JSON, "Gw-Schema": SCHEMA_MARK})
