"""The WeChat channel passes the channel conformance suite: signed callbacks to the real
webhook, replies through the fake WeChat API of conftest (its documented JSON)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest

from gateway import Gateway
from gateway.testing.conformance import ChannelConformance, InboundAnswer

from .conftest import FakeWeChat, channel_config, post, signed_query, text_message, xml


class TestWeChatConformance(ChannelConformance[FakeWeChat]):
    """A retry is WeChat's: the same XML posted again with a fresh timestamp and nonce."""

    channel_type = "wechat"

    @pytest.fixture
    def provider(self, fake_wechat: FakeWeChat) -> FakeWeChat:
        """The fake WeChat API of the WeChat tests."""
        return fake_wechat

    def channel_config(self, provider: FakeWeChat) -> dict[str, Any]:
        return channel_config(provider)

    async def send_inbound(self, gw: Gateway, provider: FakeWeChat, provider_id: str, *,
                           attempt: int = 1) -> InboundAnswer:
        # MsgId is a 64-bit number in WeChat's XML: derive one from the suite's id.
        msg_id = str(int(hashlib.sha256(provider_id.encode()).hexdigest()[:15], 16))
        # A retry repeats the message as first sent, CreateTime included.
        created = self.__dict__.setdefault("_created", {}).setdefault(provider_id, int(time.time()))
        body = xml(text_message("你好", msg_id=msg_id, CreateTime=created))
        r = await post(gw.http.port, body, signed_query(), channel=self.channel_name)
        outcome = "accepted" if r.status_code == 200 else "try_again" if r.status_code == 503 else "refused"
        return InboundAnswer(outcome, f"{r.status_code} {r.text[:200]}")

    def fail_next_delivery(self, gw: Gateway, provider: FakeWeChat, *, permanent: bool) -> None:
        # 40003 (invalid openid) is permanent, -1 (system busy) transient, in WeChat's table.
        provider.fail_next("custom", 40003 if permanent else -1)

    def delivered(self, gw: Gateway, provider: FakeWeChat) -> int:
        return len(provider.custom)
