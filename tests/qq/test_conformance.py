"""The QQ channel passes the channel conformance suite through its official-bot transport
(Ed25519-signed callbacks to the real webhook, passive replies to the fake OpenAPI) and
through OneBot HTTP (signed event POSTs, the fake HTTP API). Over a WebSocket OneBot hears
no answer to an event, so the suite's answer checks do not apply there;
tests/qq/test_onebot.py covers those promises."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from gateway import Gateway
from gateway.testing.conformance import ChannelConformance, InboundAnswer

from .conftest import FakeOneBotHTTP, FakeQQBot, callback, group_at, official_config, onebot_config, private_message


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


class TestQQOneBotHTTPConformance(ChannelConformance[FakeOneBotHTTP]):
    """The OneBot transport where the implementation hears an answer: HTTP POST. A retry is
    the same event posted again (OneBot implementations resend after an error answer or a
    reconnect replay)."""

    channel_type = "qq"

    @pytest.fixture
    def provider(self, onebot_http: FakeOneBotHTTP) -> FakeOneBotHTTP:
        """The fake OneBot HTTP API of the QQ tests."""
        return onebot_http

    def channel_config(self, provider: FakeOneBotHTTP) -> dict[str, Any]:
        return onebot_config(transport="http", url=provider.url, secret=provider.secret)

    async def send_inbound(self, gw: Gateway, provider: FakeOneBotHTTP, provider_id: str, *,
                           attempt: int = 1) -> InboundAnswer:
        # OneBot message ids are numbers: derive a stable one from the suite's id.
        message_id = int(hashlib.sha256(provider_id.encode()).hexdigest()[:12], 16)
        r = await provider.post_event(gw.http.port, private_message("你好", message_id=message_id),
                                      channel=self.channel_name)
        outcome = "accepted" if r.status_code == 204 else "try_again" if r.status_code == 503 else "refused"
        return InboundAnswer(outcome, f"{r.status_code} {r.text[:200]}")

    def fail_next_delivery(self, gw: Gateway, provider: FakeOneBotHTTP, *, permanent: bool) -> None:
        # 404: no such action (permanent); 502: the implementation is restarting (transient).
        provider.fail_next(404 if permanent else 502)

    def delivered(self, gw: Gateway, provider: FakeOneBotHTTP) -> int:
        return len(provider.calls)
