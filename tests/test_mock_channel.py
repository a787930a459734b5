"""The mock channel (the README's demo) keeps a bounded record of its deliveries, so a demo
left running does not grow (issue 9.7)."""

from __future__ import annotations

from gateway import Outbound, TextPart
from gateway.wire import encode
from gateway.testing import post_inbound


async def test_mock_channel_keeps_only_the_latest_deliveries(gateway_factory, bus):
    gw = await gateway_factory({"demo": {"type": "mock", "keep": 3}})
    assert (await post_inbound(gw.http.port, "demo", text="hi", sender="alice")).status_code == 200
    conv = gw.channels["demo"].ctx.conversation_key("alice")
    js = bus.jetstream()
    for i in range(5):
        await js.publish("gw.out.mock.demo", encode(Outbound(id=f"k-{i}", conversation=conv, parts=[TextPart(text="x")])),
                         headers={"Nats-Msg-Id": f"k-{i}"})
    mock = gw.channels["demo"].channel
    kept = await mock.wait_for_deliveries(5)
    assert mock.delivered_count == 5
    assert [o.id for o, _ in kept] == ["k-2", "k-3", "k-4"] == [o.id for o, _ in mock.deliveries]


def test_the_default_bound_is_a_thousand():
    from gateway.testing import MockConfig

    assert MockConfig().keep == 1000
