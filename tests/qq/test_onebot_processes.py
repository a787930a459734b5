"""QQ by OneBot reverse WebSocket with two gateway processes (in one event loop, one bus):
the implementation connects to one of them, and replies go out through that one, whichever
process delivered the channel before."""

from __future__ import annotations

from gateway import Outbound, TextPart
from gateway.client import Client
from gateway.testing import wait_for_status, wait_until

from .conftest import FakeOneBot, onebot_config, private_message, published, ws_url

FAST = {"lease": "2s", "backoff": ["100ms"], "max_attempts": 3}  # ownership rounds every 0.5 s


async def _reply(url: str, outbound: Outbound) -> None:
    async with Client(url) as client:
        await client.send(outbound, channel_type="qq", channel="qq")


def _holds(gw, channel: str) -> bool:
    return channel in gw.outbound.terms


async def test_qq_replies_go_out_through_the_process_the_reverse_websocket_reached(gateway_factory, nats_server):
    qq = onebot_config()
    first = await gateway_factory({"qq": qq}, outbound=FAST)
    await wait_until(lambda: _holds(first, "qq"), timeout=10)
    second = await gateway_factory({"qq": qq}, outbound=FAST)
    bot = FakeOneBot(ws_url(second.http.port))  # the implementation connected to the second
    await bot.connect()
    try:
        await bot.send(private_message("你好"))
        [msg] = await published(nats_server.url, 1)
        await wait_until(lambda: _holds(second, "qq") and not _holds(first, "qq"), timeout=15)
        await _reply(nats_server.url, Outbound(id="r-qq", conversation=msg.conversation,
                                                               parts=[TextPart(text="您好")]))
        await wait_for_status(nats_server.url, "r-qq", "sent")
        assert [c["action"] for c in bot.sends()] == ["send_private_msg"]
    finally:
        await bot.close()
