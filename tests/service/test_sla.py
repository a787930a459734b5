"""SLA timers: a warning at a fraction of the limit and a breach, for the first response
and for complaints' resolution; a reply that is sent stops the response timer, a resolved
mark the resolution timer; the timers are JetStream schedules that survive a kill -9 of
the gateway (and of its embedded nats-server)."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime, timezone

import nats
import pytest

from gateway import Outbound, TextPart
from gateway.client import Client
from gateway.testing import GatewayProcess, post_inbound, stream_messages, wait_until
from gateway.wire import conversation_key

from .helpers import sla_events

CHANNEL = '''
[calendars.desk]
hours = "24h"
[channels.demo]
type = "mock"
service = {calendar = "desk", acknowledge = false, first_response = "6s", resolution = "6s", warn_at = 0.5}
'''


@pytest.fixture
def gateway_process(tmp_path):
    gp = GatewayProcess(tmp_path, CHANNEL, extra='[service]\nack_wait = "2s"\n')
    yield gp
    if gp.proc is not None and gp.proc.poll() is None:
        gp.proc.kill()
        gp.proc.wait()


async def _pending_timers(url: str) -> set[str]:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("GW_DESK", subjects_filter="gw.desk.at.>")
        return set(info.state.subjects or {})
    finally:
        await nc.close()


async def _answered(url: str, conv: str) -> bool:
    msgs = await stream_messages(url, "KV_gw_state", f"$KV.gw_state.desk.conv.{conv}")
    return bool(msgs) and b'"answered":1' in msgs[-1].data


async def test_sla_warning_and_breach_arrive_after_a_kill_9_and_stop_for_replies_and_resolutions(gateway_process):
    gp = gateway_process
    gp.start()
    url = gp.bus_url
    ids = {}
    for who in ("alice", "bob", "carol", "dave"):
        r = await post_inbound(gp.http_port, "demo", text="help", sender=who)
        assert r.status_code == 200
        ids[who] = r.json()["id"]
    alice, bob, carol, dave = (conversation_key("demo", w) for w in ("alice", "bob", "carol", "dave"))
    async with Client(url) as client:
        for who, conv in (("bob", bob), ("carol", carol), ("dave", dave)):
            await client.send(Outbound(id=f"reply-{ids[who]}", conversation=conv, parts=[TextPart(text="on it")],
                                       in_reply_to=ids[who]), channel_type="mock", channel="demo")
        await client.mark(carol, "complaint")
        await client.mark(dave, "complaint")
        await client.mark(dave, "resolved")

    async def settled() -> bool:
        timers = await _pending_timers(url)
        return (f"gw.desk.at.sla-response.{alice}" in timers and f"gw.desk.at.sla-resolution.{carol}" in timers
                and f"gw.desk.at.sla-resolution.{dave}" not in timers
                and all([await _answered(url, c) for c in (bob, carol, dave)]))

    await wait_until(settled, timeout=10)
    killed_at = datetime.now(timezone.utc)
    gp.signal(signal.SIGKILL)
    await asyncio.to_thread(gp.wait)
    gp.start()

    def found(evs, conv, rule, state):
        return [e for e in evs if (e.conversation, e.rule, e.state) == (conv, rule, state)]

    async def all_four() -> bool:
        evs = await sla_events(url)
        return all(found(evs, c, r, s) for c, r in ((alice, "first_response"), (carol, "resolution"))
                   for s in ("warning", "breach"))

    await wait_until(all_four, timeout=30)
    evs = await sla_events(url)
    assert {e.conversation for e in evs} == {alice, carol}  # bob and dave were answered / resolved
    assert len(evs) == 4  # each once
    for e in evs:
        assert e.at > killed_at and e.channel == "demo" and e.channel_type == "mock" and e.limit == "6s"
        assert (e.due_at - e.started_at).total_seconds() == pytest.approx(6, abs=0.01)
    [breach] = found(evs, alice, "first_response", "breach")
    assert breach.late >= 0
    [warning] = found(evs, alice, "first_response", "warning")
    assert warning.late < 0 or warning.at >= warning.due_at  # a warning decided late (after the restart) may be past due
