"""The Telegram channel passes the channel conformance suite: updates POSTed to the real
webhook with the secret token, replies through the fake Bot API of conftest."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from gateway import Gateway
from gateway.testing.conformance import ChannelConformance, InboundAnswer

from tg_fake import FakeTelegram, message, post_update, tg_config, update


class TestTelegramConformance(ChannelConformance[FakeTelegram]):
    """A retry is Telegram's: the same update (same update_id) POSTed again."""

    channel_type = "telegram"

    @pytest.fixture
    def provider(self, fake_tg: FakeTelegram) -> FakeTelegram:
        return fake_tg

    def channel_config(self, provider: FakeTelegram) -> dict[str, Any]:
        return tg_config(provider)

    async def send_inbound(self, gw: Gateway, provider: FakeTelegram, provider_id: str, *,
                           attempt: int = 1) -> InboundAnswer:
        n = zlib.crc32(provider_id.encode()) % 10**8 + 1
        r = await post_update(gw.http.port, update(n, message=message(n, f"hello {provider_id}")),
                              channel=self.channel_name)
        outcome = "accepted" if r.status_code == 200 else "try_again" if r.status_code >= 500 else "refused"
        return InboundAnswer(outcome, f"{r.status_code} {r.text[:200]}")

    def fail_next_delivery(self, gw: Gateway, provider: FakeTelegram, *, permanent: bool) -> None:
        provider.fail_next("chat_not_found" if permanent else "server")

    def delivered(self, gw: Gateway, provider: FakeTelegram) -> int:
        return len(provider.sent())
