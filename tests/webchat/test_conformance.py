"""The web chat channel passes the channel conformance suite. Its "provider" is the visitor's
widget: inbound messages are frames on the widget's WebSocket (a retry is the same frame
with the same id on a new socket), and a reply is delivered once it is in the conversation's
history, where a widget reads it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import websockets.exceptions

from gateway import Gateway
from gateway.testing.conformance import ChannelConformance, InboundAnswer

from .conftest import SECRET, Visitor


class Widgets:
    """The visitors of one check: one per conversation, with their tokens, and what their
    widgets were shown."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.forget_next = False
        self.shown: list[str] = []
        """Ids of replies the widgets received."""
        self.tasks: set[asyncio.Task[None]] = set()

    async def listen(self, visitor: Visitor) -> None:
        try:
            while True:
                frame = await visitor.next(timeout=3600)
                if frame["type"] == "message" and frame["message"]["by"] == "agent":
                    self.shown.append(frame["message"]["id"])
        except Exception:  # the socket closed: this widget is gone
            return


class TestWebChatConformance(ChannelConformance[Widgets]):
    channel_type = "webchat"

    @pytest.fixture
    async def provider(self) -> Any:
        widgets = Widgets()
        yield widgets
        for task in widgets.tasks:
            task.cancel()
        await asyncio.gather(*widgets.tasks, return_exceptions=True)

    def channel_config(self, provider: Widgets) -> dict[str, Any]:
        return {"type": "webchat", "secret": SECRET}

    async def send_inbound(self, gw: Gateway, provider: Widgets, provider_id: str, *,
                           attempt: int = 1) -> InboundAnswer:
        token = provider.tokens.get(provider_id)
        visitor = await Visitor.connect(gw.http.port, f"?token={token}" if token else "", channel=self.channel_name)
        if visitor.welcome["type"] != "welcome":
            # 1013: try again later (the bus is down), as the widget does after a backoff.
            outcome = "try_again" if visitor.welcome.get("code") == 1013 else "refused"
            return InboundAnswer(outcome, str(visitor.welcome))
        provider.tokens.setdefault(provider_id, visitor.token)  # a returning visitor is not given a new one
        answer = await visitor.say("hello from the widget", provider_id)
        if answer["type"] == "ack" and provider.forget_next:
            provider.forget_next = False
            await visitor.send({"type": "forget"})
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                while True:  # until the gateway closes the socket (4410: erased)
                    await visitor.next()
            return InboundAnswer("accepted", str(answer))
        if answer["type"] == "ack":
            task = asyncio.create_task(provider.listen(visitor))
            provider.tasks.add(task)
            task.add_done_callback(provider.tasks.discard)
            return InboundAnswer("accepted", str(answer))
        await visitor.close()
        return InboundAnswer("try_again" if answer.get("retry_after") else "refused", str(answer))

    def fail_next_delivery(self, gw: Gateway, provider: Widgets, *, permanent: bool) -> None:
        if not permanent:
            raise NotImplementedError("nothing between the gateway and the widget refuses for now")
        provider.forget_next = True  # the visitor erases the conversation before the reply comes

    def delivered(self, gw: Gateway, provider: Widgets) -> int:
        return len(provider.shown)

    @pytest.mark.xfail(strict=True, reason="a web chat reply has no provider that can refuse it for now: delivery "
                                           "is a write to the channel's state on the same bus (bus outages are the "
                                           "core's outbound tests); see docs/channels/webchat.md")
    async def test_transient_failure_is_retried_then_sent(self, start: Any, provider: Widgets,
                                                          nats_server: Any) -> None:
        await super().test_transient_failure_is_retried_then_sent(start, provider, nats_server)
