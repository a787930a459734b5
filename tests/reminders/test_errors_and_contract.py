"""What a reminder that cannot work gets (a clear error at the call, or ``failed`` with a
reason), ids named unambiguously, times in UTC, and the contract as another language
speaks it (raw NATS publishes, no Python client)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from gateway import QuietHours
from gateway.cli import main
from gateway.client import Client, ReminderError
from gateway.testing import post_inbound, stream_messages, wait_until
from gateway.wire import encode

from .helpers import reminder, reminder_statuses, soon, wait_reminder_state
from .test_client_and_cli import _cli_config
from .test_scheduling import start, store_of

SH = timezone(timedelta(hours=8))


@pytest.mark.parametrize("quiet, named", [
    (QuietHours(tz="Mars/Olympus"), "tz must be an IANA time zone"),
    (QuietHours(start="25:00"), "start must be a time of day as HH:MM"),
    (QuietHours(end="9:00"), "end must be a time of day as HH:MM"),
])
async def test_remind_with_unusable_quiet_hours_is_refused_at_the_call_and_nothing_is_scheduled(
        gateway_factory, nats_server, quiet, named):
    gw, conv = await start(gateway_factory)
    async with Client(nats_server.url) as client:
        with pytest.raises(ReminderError, match=named):
            await client.remind(conv, "x", id="bad-quiet", due_at=soon(60), quiet_hours=quiet)
        assert await client.reminders.get("bad-quiet") is None


async def test_quiet_hours_that_break_at_firing_end_in_failed_with_the_reason_and_show_says_so(
        gateway_factory, nats_server, bus, tmp_path, capsys):
    gw, conv = await start(gateway_factory)
    # Another program wrote the customer's quiet hours straight into the KV bucket.
    await bus.jetstream().publish(f"$KV.gw_state.quiet.{conv}", b'{"start":"22:00","end":"08:00","tz":"Mars/Olympus"}')
    await store_of(bus).schedule(reminder("q-bad", conv, due=soon(1)))
    sts = await wait_reminder_state(nats_server.url, "q-bad", "failed")
    assert sts[-1].reason == "invalid_quiet_hours" and "Mars/Olympus" in sts[-1].error.message
    assert await store_of(bus).get("q-bad") is None  # not stuck: nothing pending, nothing redelivered
    capsys.readouterr()
    assert await asyncio.to_thread(main, [*_cli_config(tmp_path, nats_server.url), "show", "q-bad"]) == 1
    err = capsys.readouterr().err
    assert "failed (invalid_quiet_hours)" in err and "Mars/Olympus" in err


async def test_cli_move_past_the_deadline_or_into_the_past_is_a_clear_error_with_exit_2(
        gateway_factory, nats_server, bus, tmp_path, capsys):
    gw, conv = await start(gateway_factory)
    await store_of(bus).schedule(reminder("mv-1", conv, due=soon(3600), deadline=soon(2 * 86400)))
    cli = _cli_config(tmp_path, nats_server.url)
    capsys.readouterr()
    assert await asyncio.to_thread(main, [*cli, "move", "mv-1", "--to", "5d"]) == 2
    err = capsys.readouterr().err
    assert "after its deadline" in err and "Traceback" not in err
    assert await asyncio.to_thread(main, [*cli, "move", "mv-1", "--to", "2020-01-01T00:00:00Z"]) == 2
    err = capsys.readouterr().err
    assert "in the past" in err and "Traceback" not in err
    pending = await store_of(bus).get("mv-1")
    assert pending is not None and pending[0].due_at > datetime.now(timezone.utc)  # untouched
    assert await asyncio.to_thread(main, [*cli, "move", "mv-1", "--now"]) == 0
    await wait_reminder_state(nats_server.url, "mv-1", "fired")


async def test_the_same_id_in_two_conversations_is_never_cancelled_at_random(gateway_factory, nats_server, tmp_path,
                                                                            capsys):
    gw, alice = await start(gateway_factory)
    await post_inbound(gw.http.port, "demo", text="hi", sender="bob")
    bob = gw.channels["demo"].ctx.conversation_key("bob")
    async with Client(nats_server.url) as client:
        await client.remind(alice, "a", id="dup", due_at=soon(3600))
        await client.remind(bob, "b", id="dup", due_at=soon(3600))
        with pytest.raises(ReminderError, match="pending in 2 conversations"):
            await client.cancel_reminder("dup")
        capsys.readouterr()
        assert await asyncio.to_thread(main, [*_cli_config(tmp_path, nats_server.url), "cancel", "dup"]) == 2
        assert "name the conversation" in capsys.readouterr().err
        assert await client.cancel_reminder("dup", conversation=bob) is True
        still = await client.reminders.get("dup")
        assert still is not None and still[0].conversation == alice
    cancelled = [s for s in await reminder_statuses(nats_server.url, "dup") if s.state == "cancelled"]
    assert [s.conversation for s in cancelled] == [bob]


async def test_times_in_reminder_bodies_and_statuses_are_utc_whatever_offset_the_caller_gave(
        gateway_factory, nats_server):
    gw, conv = await start(gateway_factory)
    due = (datetime.now(timezone.utc) + timedelta(hours=1)).astimezone(SH)
    async with Client(nats_server.url) as client:
        r = await client.remind(conv, "x", id="utc-1", due_at=due, deadline=due + timedelta(days=1))
    assert r.due_at == due and r.due_at.utcoffset() == timedelta(0)
    await wait_reminder_state(nats_server.url, "utc-1", "scheduled")
    [schedule] = await stream_messages(nats_server.url, "GW_SCHED", f"gw.sched.at.{conv}.utc-1")
    body = json.loads(schedule.data)
    assert body["due_at"].endswith("Z") and body["deadline"].endswith("Z") and body["created_at"].endswith("Z")
    statuses = [json.loads(m.data) for m in await stream_messages(nats_server.url, "GW_SCHED")
                if m.subject.startswith("gw.sched.status.")]
    [st] = [s for s in statuses if s["reminder_id"] == "utc-1"]
    assert st["due_at"].endswith("Z") and st["at"].endswith("Z")


async def _publish_raw(nc, subject: str, body: bytes, at: str) -> None:
    """As a backend in another language would: the documented headers, by hand."""
    await nc.jetstream().publish(subject, body, headers={
        "Nats-Schedule": f"@at {at}", "Nats-Schedule-Target": "gw.sched.fire.mock.demo",
        "Content-Type": "application/json", "Gw-Schema": "reminder/1"})


async def test_a_body_due_at_that_differs_from_the_schedule_header_is_refused(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    r = reminder("hdr-1", conv, due=soon(3600))
    header_at = (datetime.now(timezone.utc) + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await _publish_raw(bus, f"gw.sched.at.{conv}.hdr-1", encode(r), header_at)
    sts = await wait_reminder_state(nats_server.url, "hdr-1", "failed")
    assert sts[-1].reason == "invalid" and "differs from the Nats-Schedule header" in sts[-1].error.message
    assert await store_of(bus).get("hdr-1") is None
    # A witness due after the header's time: once it fired, hdr-1 would have fired too.
    await store_of(bus).schedule(reminder("hdr-witness", conv, due=soon(3)))
    await wait_reminder_state(nats_server.url, "hdr-witness", "fired")
    assert "fired" not in [s.state for s in await reminder_statuses(nats_server.url, "hdr-1")]


async def test_a_schedule_published_without_ttl_or_msg_id_works_and_a_documented_cancel_reports_cancelled(
        gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    r = reminder("raw-1", conv, due=soon(3600))
    at = r.due_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    await _publish_raw(bus, f"gw.sched.at.{conv}.raw-1", encode(r), at)  # neither Nats-Schedule-TTL nor Nats-Msg-Id
    sts = await wait_reminder_state(nats_server.url, "raw-1", "scheduled")
    [schedule] = await stream_messages(nats_server.url, "GW_SCHED", f"gw.sched.at.{conv}.raw-1")
    # Cancel as docs/reminders.md "Cancelling from another language" says: purge, then the status.
    purge = await bus.request("$JS.API.STREAM.PURGE.GW_SCHED", json.dumps({"filter": f"gw.sched.at.{conv}.raw-1"}).encode())
    assert json.loads(purge.data)["purged"] == 1
    status = {"schema_version": 1, "reminder_id": "raw-1", "conversation": conv, "channel_type": "mock",
              "channel": "demo", "state": "cancelled", "at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
              "due_at": None, "reason": "crm", "outbound_id": None, "fallback": None, "error": None}
    await bus.jetstream().publish("gw.sched.status.mock.demo", json.dumps(status).encode(), headers={
        "Nats-Msg-Id": f"raw-1:cancelled:{schedule.seq}", "Content-Type": "application/json",
        "Gw-Schema": "reminder-status/1"})
    async with Client(nats_server.url) as client:
        async def cancelled() -> bool:
            got = [s async for s in _first(client.reminder_statuses(reminder_id="raw-1", from_start=True), 2)]
            return [s.state for s in got] == ["scheduled", "cancelled"]

        await wait_until(cancelled, 10)
    assert sts[0].state == "scheduled"


async def _first(statuses, n: int):
    """The first ``n`` of an endless status iterator (or fewer after a quiet second)."""
    it = statuses.__aiter__()
    try:
        for _ in range(n):
            try:
                yield await asyncio.wait_for(it.__anext__(), 1)
            except asyncio.TimeoutError:
                return
    finally:
        await it.aclose()
