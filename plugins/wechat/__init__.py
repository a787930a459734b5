"""WeChat official account (公众号) channel: ``type = "wechat"``.

Inbound through the webhook ``/channels/<name>/webhook`` (plaintext, compatible and safe
mode), outbound through the customer-service message API within 48 hours of the
customer's last interaction and through template messages outside it. See
``docs/channels/wechat.md``."""

from __future__ import annotations

from gateway import Channel, hookimpl

from ._channel import WEBHOOK_PATH, StoredMedia, WeChatChannel
from ._config import WeChatConfig

__all__ = ["WEBHOOK_PATH", "StoredMedia", "WeChatChannel", "WeChatConfig", "register_channel_types"]


@hookimpl
def register_channel_types() -> list[type[Channel]]:
    """The ``wechat`` channel type."""
    return [WeChatChannel]
