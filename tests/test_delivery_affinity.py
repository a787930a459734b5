"""A channel goes to a process that can deliver it (``Channel.delivers_here``): two gateway
processes on one bus (in one event loop) and a mock channel told where it can deliver.
(QQ's reverse WebSocket: tests/qq/test_onebot_processes.py.)"""

from __future__ import annotations

from gateway import Outbound, TextPart
from gateway.client import Client
from gateway.testing import post_inbound, wait_for_status, wait_until

FAST = {"lease": "2s"}  # rounds every 0.5 s


async def _reply(url: str, outbound: Outbound) -> None:
    async with Client(url) as client:
        await client.send(outbound, channel_type="mock", channel="demo")


def _holds(gw, channel: str) -> bool:
    return channel in gw.outbound.terms


async def test_the_channel_goes_to_the_process_that_can_deliver_it(gateway_factory, nats_server):
    first = await gateway_factory({"demo": {"type": "mock"}}, outbound=FAST)
    await wait_until(lambda: _holds(first, "demo"), timeout=10)
    second = await gateway_factory({"demo": {"type": "mock"}}, outbound=FAST)
    assert (await post_inbound(first.http.port, "demo", text="hi", sender="alice")).status_code == 200
    conv = first.channels["demo"].ctx.conversation_key("alice")
    a, b = first.channels["demo"].channel, second.channels["demo"].channel

    a.deliverable = False  # e.g. the provider's socket is connected to the other process
    await wait_until(lambda: _holds(second, "demo") and not _holds(first, "demo"), timeout=15)
    await _reply(nats_server.url, Outbound(id="r-1", conversation=conv, parts=[TextPart(text="1")]))
    await wait_for_status(nats_server.url, "r-1", "sent")
    assert [o.id for o, _ in b.deliveries] == ["r-1"] and a.deliveries == []

    a.deliverable, b.deliverable = True, False  # and back
    await wait_until(lambda: _holds(first, "demo") and not _holds(second, "demo"), timeout=15)
    await _reply(nats_server.url, Outbound(id="r-2", conversation=conv, parts=[TextPart(text="2")]))
    await wait_for_status(nats_server.url, "r-2", "sent")
    assert [o.id for o, _ in a.deliveries] == ["r-2"]

    # Neither can: the channel is still delivered (its failures would be reported as usual).
    a.deliverable = False
    await _reply(nats_server.url, Outbound(id="r-3", conversation=conv, parts=[TextPart(text="3")]))
    await wait_for_status(nats_server.url, "r-3", "sent")
    assert _holds(first, "demo") != _holds(second, "demo")
