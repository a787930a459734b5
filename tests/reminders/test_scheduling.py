"""Reminders on JetStream message schedules, against a real nats-server and gateway:
firing on time as a follow-up outbound, statuses, move, cancel, idempotency."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from gateway import QuietHours
from gateway.client import ReminderStore
from gateway.testing import make_config, post_inbound, stream_messages, wait_for_status
from gateway.wire import encode

from .helpers import quiet_around_now, reminder, reminder_statuses, soon, wait_reminder_state


async def start(gateway_factory, channels=None, **sections):
    gw = await gateway_factory(channels or {"demo": {"type": "mock"}}, **sections)
    r = await post_inbound(gw.http.port, "demo", text="hello", sender="alice")
    assert r.status_code == 200
    return gw, gw.channels["demo"].ctx.conversation_key("alice")


def store_of(bus):
    from gateway import Subjects

    return ReminderStore(bus, bus.jetstream(), Subjects("gw"))


async def test_reminder_fires_at_its_due_time_as_a_followup_outbound_delivered_once(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    due = soon(1.5)
    await store_of(bus).schedule(reminder("r1", conv, due=due))
    sts = await wait_reminder_state(nats_server.url, "r1", "scheduled")
    assert sts[0].due_at == due
    await wait_for_status(nats_server.url, "out-r1", "sent")
    mock = gw.channels["demo"].channel
    [(out, _)] = [d for d in mock.deliveries if d[0].id == "out-r1"]
    assert out.kind == "followup"
    sts = await wait_reminder_state(nats_server.url, "r1", "fired")
    assert [s.state for s in sts] == ["scheduled", "fired"]
    assert sts[1].outbound_id == "out-r1" and sts[1].at >= due


async def test_publishing_the_same_reminder_again_moves_it_and_it_fires_once(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    store = store_of(bus)
    await store.schedule(reminder("r2", conv, due=soon(30)))
    later = soon(1.5)
    await store.schedule(reminder("r2", conv, due=later))  # the backend publishes it again: moved
    await wait_reminder_state(nats_server.url, "r2", "fired")
    await wait_for_status(nats_server.url, "out-r2", "sent")
    sts = await reminder_statuses(nats_server.url, "r2")
    assert [s.state for s in sts] == ["scheduled", "scheduled", "fired"] and sts[1].due_at == later
    assert len(await stream_messages(nats_server.url, "GW_SCHED", "gw.sched.at." + conv + ".r2")) == 0


async def test_move_reports_rescheduled_with_the_reason_and_fires_at_the_new_time(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    store = store_of(bus)
    await store.schedule(reminder("r3", conv, due=soon(3600)))
    await wait_reminder_state(nats_server.url, "r3", "scheduled")
    new_due = soon(1.5)
    moved = await store.move("r3", new_due, reason="customer asked for a call today")
    assert moved is not None and moved.due_at == new_due
    sts = await wait_reminder_state(nats_server.url, "r3", "rescheduled")
    assert sts[-1].reason == "customer asked for a call today" and sts[-1].due_at == new_due
    sts = await wait_reminder_state(nats_server.url, "r3", "fired")
    assert sts[-1].at >= new_due
    assert await store.move("r3", soon(60)) is None  # fired: nothing pending to move


async def test_cancel_purges_the_schedule_reports_cancelled_and_nothing_is_sent(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    store = store_of(bus)
    due = soon(1.5)
    await store.schedule(reminder("r4", conv, due=due))
    # A witness due just after it: once the witness fired, r4 would have fired too.
    await store.schedule(reminder("r4-witness", conv, due=due + timedelta(seconds=0.5)))
    await wait_reminder_state(nats_server.url, "r4", "scheduled")
    cancelled = await store.cancel("r4", reason="ticket reopened")
    assert cancelled is not None and cancelled.id == "r4"
    assert await store.cancel("r4") is None  # nothing pending any more
    sts = await wait_reminder_state(nats_server.url, "r4", "cancelled")
    assert sts[-1].reason == "ticket reopened"
    await wait_reminder_state(nats_server.url, "r4-witness", "fired")
    assert [s.state for s in await reminder_statuses(nats_server.url, "r4")] == ["scheduled", "cancelled"]
    assert not [d for d in gw.channels["demo"].channel.deliveries if d[0].id == "out-r4"]


async def test_customer_in_shanghai_quiet_hours_moves_the_reminder_to_the_end_of_them(gateway_factory, nats_server, bus):
    start_, end = quiet_around_now("Asia/Shanghai")
    gw = await gateway_factory({"demo": {"type": "mock", "quiet_hours": {"start": start_, "end": end,
                                                                         "tz": "Asia/Shanghai"}}})
    await post_inbound(gw.http.port, "demo", text="hello", sender="alice")
    conv = gw.channels["demo"].ctx.conversation_key("alice")
    due = soon(1)
    await store_of(bus).schedule(reminder("r5", conv, due=due))
    sts = await wait_reminder_state(nats_server.url, "r5", "rescheduled")
    assert [s.state for s in sts] == ["scheduled", "rescheduled"]
    moved = sts[1].due_at
    assert sts[1].reason == "quiet_hours" and moved.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%H:%M") == end
    assert timedelta(minutes=58) < moved - due <= timedelta(minutes=61)
    pending = await store_of(bus).get("r5")
    assert pending is not None and pending[0].due_at == moved


async def test_reminder_quiet_hours_in_new_york_override_the_channels(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)  # the channel has no quiet hours
    start_, end = quiet_around_now("America/New_York")
    await store_of(bus).schedule(reminder("r6", conv, due=soon(1),
                                          quiet_hours=QuietHours(start=start_, end=end, tz="America/New_York")))
    sts = await wait_reminder_state(nats_server.url, "r6", "rescheduled")
    assert sts[-1].due_at.astimezone(ZoneInfo("America/New_York")).strftime("%H:%M") == end


async def test_quiet_hours_across_the_dst_change_end_at_the_local_wall_time(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    # New York springs forward on 2027-03-14 at 02:00; 00:00 EST is 05:00 UTC.
    due = datetime(2027, 3, 14, 5, 0, tzinfo=timezone.utc)
    await store_of(bus).schedule(reminder("r7", conv, due=due,
                                          quiet_hours=QuietHours(start="22:00", end="08:00", tz="America/New_York")))
    sts = await wait_reminder_state(nats_server.url, "r7", "rescheduled")
    assert sts[-1].due_at == datetime(2027, 3, 14, 12, 0, tzinfo=timezone.utc)  # 08:00 EDT, not 13:00 UTC


async def test_quiet_hours_are_checked_again_when_it_fires(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    await store_of(bus).schedule(reminder("r8", conv, due=soon(2)))
    await wait_reminder_state(nats_server.url, "r8", "scheduled")
    start_, end = quiet_around_now("Asia/Shanghai")
    # The operator configures quiet hours meanwhile (a reload).
    assert await gw.reload(make_config(nats_server.url, {"demo": {"type": "mock", "quiet_hours": {
        "start": start_, "end": end, "tz": "Asia/Shanghai"}}}))
    sts = await wait_reminder_state(nats_server.url, "r8", "rescheduled")
    assert sts[-1].reason == "quiet_hours"
    assert sts[-1].due_at.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%H:%M") == end
    assert "fired" not in [s.state for s in sts]
    assert not [d for d in gw.channels["demo"].channel.deliveries if d[0].id == "out-r8"]


async def test_a_reminder_past_its_deadline_expires_instead_of_being_sent(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    # Due in quiet hours whose end is after the deadline: expired at scheduling, early.
    start_, end = quiet_around_now("Asia/Shanghai")
    due = soon(1)
    await store_of(bus).schedule(reminder("r9", conv, due=due, deadline=due + timedelta(minutes=5),
                                          quiet_hours=QuietHours(start=start_, end=end, tz="Asia/Shanghai")))
    sts = await wait_reminder_state(nats_server.url, "r9", "expired")
    assert sts[-1].error.code == "deadline"
    assert await store_of(bus).get("r9") is None


async def test_an_invalid_schedule_fails_with_a_reason_and_is_removed(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    r = reminder("r10", conv, due=soon(600))
    # Published on a subject that does not name its id (a backend's mistake).
    await bus.jetstream().publish(f"gw.sched.at.{conv}.other", encode(r), headers={
        "Nats-Schedule": "@at 2099-01-01T00:00:00Z", "Nats-Schedule-Target": "gw.sched.fire.mock.demo"})
    sts = await wait_reminder_state(nats_server.url, "r10", "failed")
    assert sts[-1].error.code == "invalid_reminder"
    assert len(await stream_messages(nats_server.url, "GW_SCHED", f"gw.sched.at.{conv}.other")) == 0


async def test_the_customers_own_quiet_hours_apply_unless_the_reminder_has_its_own(gateway_factory, nats_server, bus):
    start_, end = quiet_around_now("Asia/Shanghai")
    gw = await gateway_factory({"demo": {"type": "mock", "quiet_hours": {"start": start_, "end": end,
                                                                         "tz": "Asia/Shanghai"}}})
    await post_inbound(gw.http.port, "demo", text="hello", sender="alice")
    conv = gw.channels["demo"].ctx.conversation_key("alice")
    ny_start, ny_end = quiet_around_now("America/New_York")
    store = store_of(bus)
    # Alice lives in New York: her rest hours replace the channel's (Shanghai) ones.
    await store.set_conversation_quiet_hours(conv, QuietHours(start=ny_start, end=ny_end, tz="America/New_York"))
    await store.schedule(reminder("q1", conv, due=soon(1)))
    sts = await wait_reminder_state(nats_server.url, "q1", "rescheduled")
    assert sts[-1].due_at.astimezone(ZoneInfo("America/New_York")).strftime("%H:%M") == ny_end
    # A reminder with its own (empty) quiet hours is not moved.
    await store.schedule(reminder("q2", conv, due=soon(600), quiet_hours=QuietHours(start="00:00", end="00:00")))
    sts = await wait_reminder_state(nats_server.url, "q2", "scheduled")
    assert [s.state for s in sts] == ["scheduled"]
    # Removed: the channel's apply again.
    await store.set_conversation_quiet_hours(conv, None)
    await store.schedule(reminder("q3", conv, due=soon(1)))
    sts = await wait_reminder_state(nats_server.url, "q3", "rescheduled")
    assert sts[-1].due_at.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%H:%M") == end
