"""Every hook a gateway plugin can implement. Plugins register with the entry-point group
``gateway.plugins`` and mark implementations with :data:`gateway.hookimpl`.

pluggy is synchronous: hooks return objects; nothing here returns a coroutine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .channel.api import Channel
    from .schema import Message

hookspec = pluggy.HookspecMarker("gateway")
hookimpl = pluggy.HookimplMarker("gateway")


@hookspec
def register_channel_types() -> list[type[Channel]]:
    """Return the :class:`~gateway.Channel` subclasses this plugin provides.

    Called once at start-up. Each class's ``channel_type`` must be unique across all loaded
    plugins; a clash is a start-up error naming both plugins.
    """


@hookspec
def enrich_message(message: Message, channel: str) -> Message | None:
    """Inspect or amend an inbound message before it is published.

    Called for every new (not duplicate) inbound message, in every plugin that
    implements it, after the channel built it and before dedup-checked publishing.
    Return a replacement (use ``msgspec.structs.replace``) or None to keep it. Must be
    fast and must not block: it runs on the inbound hot path. An exception is logged and
    the message is published unchanged.
    """
