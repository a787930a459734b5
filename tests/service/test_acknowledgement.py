"""The automatic acknowledgement outside service hours: once per conversation and closed
period, never to automatic messages, never beside a backend's own reply, through the normal
delivery path; and the "desk opened" event saying who waited (a real bus, real seconds)."""

from __future__ import annotations

from datetime import timedelta

from gateway import Outbound, Participant, TextPart
from gateway.client import Client
from gateway.testing import post_inbound, stream_messages, wait_until
from gateway.wire import status_decoder

from .helpers import closures, opened_events, seconds_from_now

SERVICE = {"calendar": "desk", "ack_delay": "1s", "answer_within": "2d", "language": "en"}


def acks(gw, conv: str | None = None) -> list:
    return [o for o, _ in gw.channels["demo"].channel.deliveries
            if o.id.startswith("desk-ack-") and (conv is None or o.conversation == conv)]


async def test_acknowledged_once_per_closed_period_never_to_automatic_messages_nor_beside_a_reply(
        gateway_factory, nats_server, tmp_path):
    t0 = seconds_from_now(0)
    opens_first = t0 + timedelta(seconds=7)
    closes_again = opens_first + timedelta(seconds=3)
    opens_again = closes_again + timedelta(seconds=6)
    path = closures(tmp_path / "closures.toml", (t0 - timedelta(hours=1), opens_first), (closes_again, opens_again))
    gw = await gateway_factory({"demo": {"type": "mock", "service": SERVICE}},
                               calendars={"desk": {"tz": "Asia/Shanghai", "hours": "24h", "closures": path}})
    ctx = gw.channels["demo"].ctx
    alice, bob, carol = (ctx.conversation_key(n) for n in ("alice", "bob", "carol"))

    # Closed: alice writes twice, bob writes and a backend (a bot) answers him at once,
    # carol's mailbox sends an auto-reply.
    assert (await post_inbound(gw.http.port, "demo", text="hello?", sender="alice")).status_code == 200
    r = await post_inbound(gw.http.port, "demo", text="my order", sender="bob")
    async with Client(nats_server.url) as client:
        await client.send(Outbound(id="bot-1", conversation=bob, parts=[TextPart(text="bot here")],
                                   in_reply_to=r.json()["id"]),
                          channel_type="mock", channel="demo")
    auto = ctx.message(conversation="carol", sender=Participant(id="carol"), parts=[TextPart(text="Out of office")],
                       auto=True)
    await ctx.publish(auto, route={"thread": "carol", "to": "carol"})
    assert (await post_inbound(gw.http.port, "demo", text="anyone?", sender="alice")).status_code == 200

    await wait_until(lambda: len(acks(gw, alice)) == 1, timeout=10)
    [ack] = acks(gw, alice)
    assert ack.auto and ack.kind == "notice"
    text = ack.parts[0].text
    assert "opens " + (opens_first + timedelta(hours=8)).strftime("%Y-%m-%d %H:%M") in text and "2 days" in text

    # The desk opens: one event, counting alice and bob (not the auto-reply), since alice's first.
    await wait_until(lambda: _opened(nats_server.url, 1), timeout=15)
    [ev] = await opened_events(nats_server.url)
    assert ev.calendar == "desk" and ev.waiting == 2 and ev.channels == ["demo"]
    assert ev.opened_at == opens_first
    assert ev.closed_since is not None and ev.closed_since <= t0 - timedelta(hours=1) + timedelta(seconds=1)
    assert acks(gw, alice) == [ack] and acks(gw, bob) == [] and acks(gw, carol) == []

    # The ack went through the normal path: accepted, then sent, under its id.
    states = [status_decoder.decode(m.data).state for m in await stream_messages(nats_server.url, "GW_STATUS")
              if status_decoder.decode(m.data).outbound_id == ack.id]
    assert states[:2] == ["accepted", "sent"]

    # Open: nothing is acknowledged.
    assert (await post_inbound(gw.http.port, "demo", text="still there?", sender="dave")).status_code == 200
    # Closed again: a new period, a new acknowledgement for alice.
    await wait_until(lambda: seconds_from_now(0) >= closes_again, timeout=10)
    assert (await post_inbound(gw.http.port, "demo", text="again", sender="alice")).status_code == 200
    await wait_until(lambda: len(acks(gw, alice)) == 2, timeout=10)
    assert acks(gw, alice)[1].id != ack.id
    await wait_until(lambda: _opened(nats_server.url, 2), timeout=15)
    assert acks(gw, ctx.conversation_key("dave")) == []


async def _opened(url: str, n: int) -> bool:
    return len(await opened_events(url)) >= n
