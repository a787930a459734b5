"""``MockChannel``: a real channel plugin (type ``mock``) for tests, demos and benchmarks.

It receives through a webhook (``POST /channels/<name>/inbound`` with a small JSON body) or
:meth:`MockChannel.inject`, and records every delivery instead of sending it anywhere.
Failures can be scripted to exercise retries and dead letters."""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

# The example channel imports what any plugin may: the public API.
from .. import (
    Channel,
    Conversation,
    DeliveryError,
    Duration,
    Outbound,
    Participant,
    PublishResult,
    Receipt,
    RequestError,
    TextPart,
    body_problem,
    hookimpl,
    seconds,
)
from ..wire import encode


class MockConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Keys of a ``type = "mock"`` channel."""

    record_file: str = ""
    """Append every delivery as a JSON line to this file (fsynced), for tests that kill
    the gateway process."""
    deliver_delay: Duration = "0s"
    """Pretend the provider takes this long to accept."""
    supported_parts: list[str] = msgspec.field(default_factory=lambda: ["text", "html", "image", "file", "link"])


class _Inbound(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    sender: str = "customer"
    id: str | None = None
    thread: str | None = None
    name: str | None = None


_inbound_decoder = msgspec.json.Decoder(_Inbound)


@dataclass
class _Failure:
    permanent: bool
    message: str
    retry_after: float | None


class MockChannel(Channel):
    """Records deliveries; ``fail_next`` scripts failures; ``inject`` fakes a customer."""

    channel_type = "mock"
    config_type = MockConfig
    supported_parts = frozenset({"text", "html", "image", "file", "link"})

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.deliveries: list[tuple[Outbound, Conversation]] = []
        self.delivered = asyncio.Condition()
        self._failures: deque[_Failure] = deque()
        cfg: MockConfig = ctx.config
        self.supported_parts = frozenset(cfg.supported_parts)
        self._delay = seconds(cfg.deliver_delay)

    async def start(self) -> None:
        self.ctx.add_route("/inbound", self._webhook, methods=["POST"])

    async def _webhook(self, request: Request) -> Response:
        try:
            body = _inbound_decoder.decode(await request.body())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RequestError(f"invalid JSON: {body_problem(exc)}") from None
        result = await self.inject(body.text, sender=body.sender, provider_id=body.id, thread=body.thread, name=body.name)
        return Response(json.dumps({"id": result.id, "duplicate": result.duplicate}), media_type="application/json")

    async def inject(self, text: str, *, sender: str = "customer", provider_id: str | None = None,
                     thread: str | None = None, name: str | None = None) -> PublishResult:
        """Publish a customer message as if it arrived on this channel."""
        thread = thread or sender
        msg = self.ctx.message(conversation=thread, sender=Participant(id=sender, name=name),
                               parts=[TextPart(text=text)], provider_id=provider_id)
        return await self.ctx.publish(msg, route={"thread": thread, "to": sender})

    def fail_next(self, count: int = 1, *, permanent: bool = False, message: str = "scripted failure",
                  retry_after: float | None = None) -> None:
        """Make the next ``count`` deliveries fail."""
        for _ in range(count):
            self._failures.append(_Failure(permanent, message, retry_after))

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._failures:
            f = self._failures.popleft()
            raise DeliveryError(f.message, permanent=f.permanent, code="mock", retry_after=f.retry_after)
        cfg: MockConfig = self.ctx.config
        if cfg.record_file:
            line = encode({"outbound": outbound, "route": conversation.route}) + b"\n"
            fd = os.open(cfg.record_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        async with self.delivered:
            self.deliveries.append((outbound, conversation))
            self.delivered.notify_all()
        return Receipt(provider_id=f"mock-{len(self.deliveries)}")

    async def wait_for_deliveries(self, count: int, timeout: float = 10.0) -> list[tuple[Outbound, Conversation]]:
        """Wait until at least ``count`` deliveries were recorded."""
        async with self.delivered:
            await asyncio.wait_for(self.delivered.wait_for(lambda: len(self.deliveries) >= count), timeout)
        return list(self.deliveries)


@hookimpl
def register_channel_types() -> list[type[Channel]]:
    return [MockChannel]
