"""The SMS channel passes the channel conformance suite, with Twilio in front: signed
webhooks to the real route, replies through the fake Messages API of conftest."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from gateway import Gateway
from gateway.testing.conformance import ChannelConformance, InboundAnswer

from .conftest import FakeSms, twilio_config, twilio_inbound, twilio_post


class TestSmsConformance(ChannelConformance[FakeSms]):
    """A retry is Twilio's: the same form, signed again, posted again."""

    channel_type = "sms"

    @pytest.fixture
    def provider(self, fake_sms: FakeSms) -> FakeSms:
        return fake_sms

    def channel_config(self, provider: FakeSms) -> dict[str, Any]:
        return twilio_config(provider)

    async def send_inbound(self, gw: Gateway, provider: FakeSms, provider_id: str, *,
                           attempt: int = 1) -> InboundAnswer:
        sid = "SM" + hashlib.sha256(provider_id.encode()).hexdigest()[:32]
        r = await twilio_post(gw.http.port, "inbound", twilio_inbound(sid=sid, body="hello"),
                              channel=self.channel_name)
        outcome = "accepted" if r.status_code == 200 else "try_again" if r.status_code == 503 else "refused"
        return InboundAnswer(outcome, f"{r.status_code} {r.text[:200]}")

    def fail_next_delivery(self, gw: Gateway, provider: FakeSms, *, permanent: bool) -> None:
        # 21211 (invalid To) is permanent; 503 is Twilio being unavailable.
        provider.fail_next("twilio", 400 if permanent else 503, 21211 if permanent else None)

    def delivered(self, gw: Gateway, provider: FakeSms) -> int:
        return len(provider.twilio)
