"""Reminders on JetStream message schedules, against a real nats-server and gateway:
firing on time as a follow-up outbound, statuses, move, cancel, idempotency."""

from __future__ import annotations

from gateway.client import ReminderStore
from gateway.testing import post_inbound, wait_for_status

from .helpers import reminder, soon, wait_reminder_state


async def start(gateway_factory, **sections):
    gw = await gateway_factory({"demo": {"type": "mock"}}, **sections)
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
