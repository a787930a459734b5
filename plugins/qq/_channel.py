"""The ``qq`` channel: one channel type, two transports chosen per channel in the config
(a OneBot v11 implementation, or the official QQ bot platform's webhook)."""

from __future__ import annotations

from datetime import datetime

from gateway import Channel, ChannelContext, Conversation, DeliveryError, Outbound, Reach, Receipt

from ._config import QQConfig
from ._onebot import OneBot
from ._official import Official


class QQChannel(Channel):
    """QQ groups and private chats: ``[channels.<name>.onebot]`` (reverse WebSocket at
    ``/channels/<name>/onebot``) or ``[channels.<name>.official]`` (webhook at
    ``/channels/<name>/webhook``)."""

    channel_type = "qq"
    config_type = QQConfig
    supported_parts = frozenset({"text", "image", "audio", "video", "file", "event", "unknown"})
    rate_limit = 5.0

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        cfg: QQConfig = ctx.config
        self.onebot = OneBot(ctx, cfg.onebot) if cfg.onebot is not None else None
        self.official = Official(ctx, cfg.official) if cfg.official is not None else None

    async def start(self) -> None:
        if self.onebot is not None:
            await self.onebot.start()
        if self.official is not None:
            await self.official.start()

    async def stop(self) -> None:
        if self.onebot is not None:
            await self.onebot.stop()
        if self.official is not None:
            await self.official.stop()

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        transport = conversation.route.get("transport")
        if transport == "onebot" and self.onebot is not None:
            return await self.onebot.deliver(outbound, conversation)
        if transport == "official" and self.official is not None:
            return await self.official.deliver(outbound, conversation)
        raise DeliveryError("conversation was not opened by this channel's transport", permanent=True,
                            code="no_route")

    def delivers_here(self) -> bool:
        """With a OneBot reverse WebSocket, only the process the implementation connected
        to can send: that one should deliver the channel."""
        return self.onebot is None or self.onebot.connected_here()

    async def reach(self, conversation: Conversation, at: datetime) -> Reach:
        """OneBot accounts can write into a conversation at any time; the official bot
        only within its passive-reply window and reply count."""
        transport = conversation.route.get("transport")
        if transport == "official" and self.official is not None:
            return await self.official.reach(conversation, at)
        if transport == "onebot" and self.onebot is not None:
            return Reach(ok=True)
        return Reach(ok=False, code="no_route", detail="conversation was not opened by this channel's transport")
