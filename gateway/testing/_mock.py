"""``MockChannel``: a real channel plugin (type ``mock``) for tests, demos and benchmarks.

It receives through a webhook (``POST /channels/<name>/inbound`` with a small JSON body) or
:meth:`MockChannel.inject`, and records deliveries instead of sending them anywhere (the
last ``keep`` in memory, every one in ``record_file`` if set). Failures can be scripted to
exercise retries and dead letters."""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import Response

# The example channel imports what any plugin may: the public API.
from .. import (
    Channel,
    Conversation,
    Deferred,
    DeliveryError,
    Duration,
    Handshake,
    Outbound,
    Participant,
    PublishResult,
    Reach,
    Receipt,
    RequestError,
    TextPart,
    WebSocketConnection,
    hookimpl,
    provider_error,
)
from ..wire import encode


class MockWebSocket(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>.websocket]``: an echo WebSocket at ``/channels/<name>/ws``. The
    text ``flood <count> <size>`` makes it send ``count`` messages of ``size`` bytes."""

    token: str = ""
    """When set, the handshake must carry ``Authorization: Bearer <token>`` (else 401)."""
    allowed_origins: list[str] | None = None
    max_connections: int = 100
    max_message_size: int = 1 << 20
    idle_timeout: Duration = Duration("300s")
    ping_interval: Duration = Duration("20s")
    send_queue: int = 64
    send_timeout: Duration = Duration("5s")


class MockConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Keys of a ``type = "mock"`` channel."""

    record_file: str = ""
    """Append every delivery as a JSON line to this file (fsynced), for tests that kill
    the gateway process."""
    deliver_delay: Duration = Duration("0s")
    """Pretend the provider takes this long to accept."""
    provider_url: str = ""
    """When set, every delivery is also POSTed (the outbound as JSON) to this URL, as to a
    provider's API: a 2xx answer is acceptance (its ``id`` field, if any, the provider id),
    429/5xx a transient failure, any other 4xx a permanent one. A provider fake over HTTP
    for tests and benchmarks that count sends across processes."""
    supported_parts: list[str] = msgspec.field(default_factory=lambda: ["text", "html", "image", "file", "link"])
    keep: Annotated[int, msgspec.Meta(ge=0)] = 1000
    """How many of the latest deliveries stay in memory (``MockChannel.deliveries``). The
    README's demo runs this channel for as long as anyone likes: an unbounded record grew
    by about 1.4 KB per reply (issue 9.7). ``record_file`` keeps them all on disk instead."""
    websocket: MockWebSocket | None = None
    reply_window: Duration | None = None
    """Like WeChat's 48 hours: free content only within this long after the customer's last
    message (``reach`` says ``outside_window``, a template still goes); unset: always."""


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
    until: datetime | None = None
    code: str = "mock"


class MockChannel(Channel):
    """Records deliveries; ``fail_next`` scripts failures; ``inject`` fakes a customer."""

    channel_type = "mock"
    config_type = MockConfig
    supported_parts = frozenset({"text", "html", "image", "file", "link"})

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        cfg: MockConfig = ctx.config
        self._kept: deque[tuple[Outbound, Conversation]] = deque(maxlen=cfg.keep)
        self.delivered_count = 0
        """Deliveries since start, including those no longer kept."""
        self.delivered = asyncio.Condition()
        self._failures: deque[_Failure] = deque()
        self.supported_parts = frozenset(cfg.supported_parts)
        self._delay = cfg.deliver_delay
        self.websocket_sessions = 0
        """WebSocket handler runs so far (a refused handshake never gets one)."""
        self._provider: httpx.AsyncClient | None = None
        self.deliverable = True
        """What :meth:`delivers_here` answers: set it False to make this process hand the
        channel to another one."""

    async def start(self) -> None:
        self.ctx.add_route("/inbound", self._webhook, methods=["POST"])
        ws: MockWebSocket | None = self.ctx.config.websocket
        if ws is not None:
            self.ctx.add_websocket(
                "/ws", self._echo, authorize=self._authorize if ws.token else None,
                allowed_origins=ws.allowed_origins, max_connections=ws.max_connections,
                max_message_size=ws.max_message_size, idle_timeout=ws.idle_timeout,
                ping_interval=ws.ping_interval, send_queue=ws.send_queue, send_timeout=ws.send_timeout)

    async def stop(self) -> None:
        client, self._provider = self._provider, None
        if client is not None:
            await client.aclose()

    async def _post_to_provider(self, url: str, outbound: Outbound) -> str | None:
        if self._provider is None:
            self._provider = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=256))
        try:
            r = await self._provider.post(url, content=encode(outbound), headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            raise DeliveryError(f"provider unreachable: {type(exc).__name__}", permanent=False,
                                code="unreachable") from None
        error = provider_error(r.status_code, r.headers, provider="mock provider")
        if error is not None:
            raise error
        try:
            answer = r.json()
        except ValueError:
            return None
        pid = answer.get("id") if isinstance(answer, dict) else None
        return pid if isinstance(pid, str) else None

    def _authorize(self, handshake: Handshake) -> str:
        if not handshake.bearer_matches(self.ctx.config.websocket.token):
            raise RequestError("missing or wrong bearer token", status=401)
        return handshake.headers.get("x-self-id", "")

    async def _echo(self, conn: WebSocketConnection) -> None:
        self.websocket_sessions += 1
        async for data in conn:
            if isinstance(data, str) and data.startswith("flood "):
                count, size = map(int, data.split()[1:3])
                for _ in range(count):
                    await conn.send("x" * size)
            else:
                await conn.send(data)

    async def _webhook(self, request: Request) -> Response:
        try:
            body = _inbound_decoder.decode(await request.body())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RequestError.from_decode("invalid JSON", exc) from None
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

    def defer_next(self, until: datetime, *, code: str = "quiet_hours", message: str = "scripted deferral") -> None:
        """Make the next delivery answer :class:`Deferred` (not before ``until``)."""
        self._failures.append(_Failure(False, message, None, until, code))

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._failures:
            f = self._failures.popleft()
            if f.until is not None:
                raise Deferred(f.message, until=f.until, code=f.code)
            raise DeliveryError(f.message, permanent=f.permanent, code="mock", retry_after=f.retry_after)
        cfg: MockConfig = self.ctx.config
        provider_id = await self._post_to_provider(cfg.provider_url, outbound) if cfg.provider_url else None
        if cfg.record_file:
            line = encode({"outbound": outbound, "route": conversation.route}) + b"\n"
            fd = os.open(cfg.record_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        async with self.delivered:
            self._kept.append((outbound, conversation))
            self.delivered_count += 1
            self.delivered.notify_all()
        return Receipt(provider_id=provider_id or f"mock-{self.delivered_count}")

    def delivers_here(self) -> bool:
        """What :attr:`deliverable` says (True unless a test sets it False)."""
        return self.deliverable

    async def reach(self, conversation: Conversation, at: datetime) -> Reach:
        window = self.ctx.config.reply_window
        if window is None:
            return Reach(ok=True)
        last = conversation.last_inbound_at
        until = last + timedelta(seconds=window) if last is not None else None
        if until is not None and at < until:
            return Reach(ok=True, until=until)
        return Reach(ok=False, code="outside_window", detail="outside the mock reply window", until=until, template=True)

    @property
    def deliveries(self) -> list[tuple[Outbound, Conversation]]:
        """The latest deliveries (at most ``keep``), oldest first, as a new list."""
        return list(self._kept)

    async def wait_for_deliveries(self, count: int, timeout: float = 10.0) -> list[tuple[Outbound, Conversation]]:
        """Wait until at least ``count`` deliveries were made since start; returns those
        still kept (the last ``keep``)."""
        async with self.delivered:
            await asyncio.wait_for(self.delivered.wait_for(lambda: self.delivered_count >= count), timeout)
        return self.deliveries


@hookimpl
def register_channel_types() -> list[type[Channel]]:
    return [MockChannel]
