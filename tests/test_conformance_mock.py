"""The mock channel passes the channel conformance suite (its "provider" is the channel's
own scripted failures; the suite's other parts are real: nats-server, HTTP listener)."""

from __future__ import annotations

from typing import Any

import httpx

from gateway import Gateway
from gateway.testing import MockChannel, post_inbound
from gateway.testing.conformance import ChannelConformance, InboundAnswer


class TestMockConformance(ChannelConformance[None]):
    """``type = "mock"``: inbound is its JSON webhook, the provider id its ``id`` field."""

    channel_type = "mock"
    doc = "docs/configuration.md"

    async def start_provider(self) -> None:
        return None

    async def stop_provider(self, provider: None) -> None:
        return None

    def channel_config(self, provider: None) -> dict[str, Any]:
        return {"type": "mock"}

    async def send_inbound(self, gw: Gateway, provider: None, provider_id: str, *, attempt: int = 1) -> InboundAnswer:
        r = await post_inbound(gw.http.port, self.channel_name, text="hello", sender="alice", id=provider_id)
        return _answer(r)

    def fail_next_delivery(self, gw: Gateway, provider: None, *, permanent: bool) -> None:
        self._mock(gw).fail_next(permanent=permanent)

    def delivered(self, gw: Gateway, provider: None) -> int:
        return self._mock(gw).delivered_count

    def _mock(self, gw: Gateway) -> MockChannel:
        channel = gw.channels[self.channel_name].channel
        assert isinstance(channel, MockChannel)
        return channel


def _answer(r: httpx.Response) -> InboundAnswer:
    outcome = "accepted" if r.status_code == 200 else "try_again" if r.status_code == 503 else "refused"
    return InboundAnswer(outcome, f"{r.status_code} {r.text[:200]}")
