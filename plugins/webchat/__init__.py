"""Web chat channel: ``type = "webchat"``.

An embeddable chat widget for the desk's own website: the gateway serves the script
(``/channels/<name>/widget.js``), a demo page (``/demo``), the widget's WebSocket (``/ws``)
and image uploads (``/upload``). Visitors are identified by signed tokens; replies are kept
in a bounded per-conversation history on the bus. See ``docs/channels/webchat.md``."""

from __future__ import annotations

from gateway import Channel, hookimpl

from ._channel import INVALID_TOKEN, WebChatChannel
from ._config import OfflineHours, WebChatConfig
from ._store import Entry, issue_token

__all__ = ["INVALID_TOKEN", "Entry", "OfflineHours", "WebChatChannel", "WebChatConfig", "issue_token",
           "register_channel_types"]


@hookimpl
def register_channel_types() -> list[type[Channel]]:
    """The ``webchat`` channel type."""
    return [WebChatChannel]
