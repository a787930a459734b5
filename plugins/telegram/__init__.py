"""Telegram channel: ``type = "telegram"``. A bot's private and group chats through the
Bot API (python-telegram-bot): updates by webhook (``/channels/<name>/webhook``, secret
token checked) or long polling, replies with quotes, media and survey buttons. See
``docs/channels/telegram.md``."""

from __future__ import annotations

import os

# python-telegram-bot 22 returns durations (``retry_after``, a voice's ``duration``) as
# int and warns on every read, its own included, until this opt-in to the coming
# ``timedelta``; the channel reads both forms. An explicit setting is left alone.
os.environ.setdefault("PTB_TIMEDELTA", "true")

from gateway import Channel, hookimpl

from ._channel import TelegramChannel
from ._config import TelegramConfig

__all__ = ["TelegramChannel", "TelegramConfig", "register_channel_types"]


@hookimpl
def register_channel_types() -> list[type[Channel]]:
    """The ``telegram`` channel type."""
    return [TelegramChannel]
