"""The QQ channel passes the channel conformance suite through its official-bot transport:
Ed25519-signed callbacks to the real webhook, passive replies to the fake OpenAPI. (The
OneBot transport has no provider-visible answer to an event, so the suite's HTTP
answer checks do not apply to it; tests/qq/test_onebot.py covers its promises.)"""

from __future__ import annotations

from typing import Any

import pytest

from gateway import Gateway
from gateway.testing.conformance import ChannelConformance, InboundAnswer

from .conftest import FakeQQBot, callback, group_at, official_config


class TestQQConformance(ChannelConformance[FakeQQBot]):
    """A retry is the platform's: the same message pushed again in a new envelope, signed anew."""

    channel_type = "qq"

    @pytest.fixture
    def provider(self, fake_qqbot: FakeQQBot) -> FakeQQBot:
        """The fake QQ bot OpenAPI of the QQ tests."""
        return fake_qqbot

    def channel_config(self, provider: FakeQQBot) -> dict[str, Any]:
        return official_config(provider)

    async def send_inbound(self, gw: Gateway, provider: FakeQQBot, provider_id: str, *,
                           attempt: int = 1) -> InboundAnswer:
        r = await callback(gw.http.port, group_at(msg_id=provider_id), channel=self.channel_name)
        outcome = "accepted" if r.status_code == 200 else "try_again" if r.status_code == 503 else "refused"
        return InboundAnswer(outcome, f"{r.status_code} {r.text[:200]}")

    def fail_next_delivery(self, gw: Gateway, provider: FakeQQBot, *, permanent: bool) -> None:
        # 50006 (empty message) is permanent, 11242 ("retry once helps") transient.
        provider.fail_next(50006 if permanent else 11242)

    def delivered(self, gw: Gateway, provider: FakeQQBot) -> int:
        return len(provider.messages)
