"""The email channel passes the channel conformance suite: mail arrives over a real SMTP
session on the channel's listener, replies go to the aiosmtpd sink of conftest."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest

from gateway import Gateway
from gateway.testing.conformance import ChannelConformance, InboundAnswer


@dataclass
class Submission:
    """The fake provider side of email: the submission server replies go to (conftest's
    ``SmtpSink``) and the SMTP client other mail servers deliver with (``send_mail``)."""

    sink: Any
    send_mail: Callable[..., Awaitable[tuple[int, str]]]


class TestEmailConformance(ChannelConformance[Submission]):
    """A retry is a sending MTA's: the same message in a new SMTP session."""

    channel_type = "email"

    @pytest.fixture
    def provider(self, smtp_sink: Any, send_mail: Any) -> Submission:
        """The submission sink and SMTP client of the email tests."""
        return Submission(smtp_sink, send_mail)

    def channel_config(self, provider: Submission) -> dict[str, Any]:
        return {"type": "email", "address": "support@acme.test", "smtp": {"port": 0, "domains": ["acme.test"]},
                "send": {"host": "127.0.0.1", "port": provider.sink.port, "security": "none", "timeout": "5s"}}

    async def send_inbound(self, gw: Gateway, provider: Submission, provider_id: str, *,
                           attempt: int = 1) -> InboundAnswer:
        m = EmailMessage()
        m["From"] = "Alice <alice@customer.test>"
        m["To"] = "support@acme.test"
        m["Subject"] = "conformance"
        m["Date"] = "Mon, 06 Jan 2025 10:00:00 +0800"
        m["Message-ID"] = f"<{provider_id}@customer.test>"
        m.set_content("Hello")
        code, text = await provider.send_mail(gw.channels[self.channel_name].channel.smtp_port, m.as_bytes())
        outcome = "accepted" if code == 250 else "try_again" if 400 <= code < 500 else "refused"
        return InboundAnswer(outcome, f"{code} {text}")

    def fail_next_delivery(self, gw: Gateway, provider: Submission, *, permanent: bool) -> None:
        provider.sink.next_replies.append("550 5.1.1 no such user" if permanent else "451 4.3.0 try again later")

    def delivered(self, gw: Gateway, provider: Submission) -> int:
        return len(provider.sink.messages)
