"""The core's :class:`ChannelContext`: the bus services, the inbound publisher and the HTTP
server, narrowed to one channel, with the channel's own KV state."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .bus.services import BusServices
from .bus.state import ChannelRecords
from .channel.api import ChannelContext, ChannelState, Conversation, Endpoint, PublishResult
from .http.websocket import Authorize, WebSocketHandler, WebSocketLimits
from .inbound.pipeline import Inbound, conversation_key, message_id
from .metrics import Metrics
from .schema import DeliveryState, DeliveryStatus, ErrorInfo, Message, ObjectRef, Participant, Part, QuietHours

if TYPE_CHECKING:
    from .http.server import HttpServer

class Context(ChannelContext):
    """The core's implementation of :class:`ChannelContext`: the bus services, the inbound
    publisher and the HTTP server, narrowed to one channel."""

    def __init__(self, name: str, channel_type: str, config: Any, log: Any, *, services: BusServices,
                 inbound: Inbound, http: HttpServer, metrics: Metrics, quiet_hours: QuietHours | None = None):
        self.quiet_hours = quiet_hours
        self.name = name
        self.channel_type = channel_type
        self.config = config
        self.log = log
        self.services = services
        self.inbound = inbound
        self.http = http
        self.metrics = metrics
        self.state = ChannelRecords(services.bus, name)
        self.health: ChannelState = "starting"
        self.health_detail: str | None = None

    def conversation_key(self, native: str) -> str:
        return conversation_key(self.name, native)

    def message(
        self,
        *,
        conversation: str,
        sender: Participant,
        parts: Sequence[Part] = (),
        provider_id: str | None = None,
        **fields: Any,
    ) -> Message:
        mid = message_id(self.name, provider_id) if provider_id else uuid.uuid4().hex
        return Message(
            id=mid,
            channel_type=self.channel_type,
            channel=self.name,
            provider_id=provider_id,
            conversation=self.conversation_key(conversation),
            sender=sender,
            received_at=fields.pop("received_at", None) or datetime.now(timezone.utc),
            parts=list(parts),
            **fields,
        )

    async def publish(self, message: Message, *, route: dict[str, Any] | None = None,
                      interaction: bool = True) -> PublishResult:
        if message.channel != self.name or message.channel_type != self.channel_type:
            raise ValueError(f"message belongs to channel {message.channel!r}, not {self.name!r}")
        return await self.inbound.publish(message, route, interaction)

    def add_route(self, path: str, endpoint: Endpoint, methods: Sequence[str] = ("POST",), *,
                  max_body: int | None = None) -> str:
        return self.http.add_route(self, path, endpoint, methods, max_body)

    def add_websocket(self, path: str, handler: WebSocketHandler, *, authorize: Authorize | None = None,
                      allowed_origins: Sequence[str] | None = None, max_connections: int = 100,
                      max_message_size: int = 1 << 20, ping_interval: float | None = 20.0,
                      ping_timeout: float | None = 20.0, idle_timeout: float | None = 300.0,
                      send_queue: int = 64, send_timeout: float = 5.0) -> str:
        if isinstance(allowed_origins, str):  # a lone string would become a set of characters
            raise TypeError("add_websocket: allowed_origins must be a list of origins, not a string")
        limits = WebSocketLimits(
            max_connections=max_connections, max_message_size=max_message_size, ping_interval=ping_interval,
            ping_timeout=ping_timeout, idle_timeout=idle_timeout, send_queue=send_queue, send_timeout=send_timeout,
            allowed_origins=None if allowed_origins is None else frozenset(allowed_origins))
        return self.http.add_websocket(self, path, handler, authorize, limits)

    async def report_status(
        self,
        outbound_id: str,
        state: DeliveryState,
        *,
        conversation: str = "",
        provider_id: str | None = None,
        error: ErrorInfo | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if state == "failed" and error is not None and error.permanent:
            # The bus contract: failed is never final; a provider's final word is dead.
            raise ValueError(f"report_status: a permanent failure of {outbound_id!r} is reported as 'dead', not 'failed'")
        status = DeliveryStatus(outbound_id=outbound_id, conversation=conversation, channel_type=self.channel_type,
                                channel=self.name, state=state, at=datetime.now(timezone.utc),
                                provider_id=provider_id, error=error, meta=dict(meta) if meta else {})
        await self.services.publish_status(status)

    async def put_blob(self, data: bytes, *, content_type: str | None = None) -> ObjectRef:
        return await self.services.put_blob(data, content_type=content_type)

    async def get_blob(self, ref: ObjectRef) -> bytes:
        return await self.services.get_blob(ref)

    async def get_conversation(self, key: str) -> Conversation | None:
        return await self.services.get_conversation(key)

    def count(self, event: str, amount: int = 1) -> None:
        self.metrics.channel_events.labels(self.channel_type, self.name, event).inc(amount)

    def set_state(self, state: ChannelState, detail: str | None = None) -> None:
        self.health = state
        self.health_detail = detail
        self.metrics.channel_up.labels(self.channel_type, self.name).set(1 if state == "running" else 0)
