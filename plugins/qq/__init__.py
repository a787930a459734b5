"""QQ channel: ``type = "qq"``. QQ groups and private chats through a OneBot v11
implementation (reverse WebSocket ``/channels/<name>/onebot``) or the official QQ bot
platform (Ed25519-signed webhook ``/channels/<name>/webhook``). See ``docs/channels/qq.md``."""

from __future__ import annotations

from gateway import Channel, hookimpl

from ._channel import QQChannel
from ._config import GroupRule, OfficialConfig, OneBotConfig, QQConfig

__all__ = ["GroupRule", "OfficialConfig", "OneBotConfig", "QQChannel", "QQConfig", "register_channel_types"]


@hookimpl
def register_channel_types() -> list[type[Channel]]:
    """The ``qq`` channel type."""
    return [QQChannel]
