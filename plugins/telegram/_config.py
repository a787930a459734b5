"""The keys of a ``type = "telegram"`` channel section (one bot per section)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from gateway import ConfigValueError, Duration

_TOKEN = msgspec.Meta(pattern=r"^[0-9]{1,20}:[A-Za-z0-9_-]{20,}$",
                      description="the bot token from @BotFather, <bot id>:<secret>")
# Telegram allows 1-256 characters of A-Z a-z 0-9 _ -; fewer than 16 can be guessed.
_SECRET = re.compile(r"^[A-Za-z0-9_-]{16,256}$")


class TelegramConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>]`` keys of a Telegram bot."""

    token: Annotated[str, _TOKEN]
    """The bot token (``123456789:AA...``). Used only in calls to the Bot API, never in a
    URL the gateway serves or logs."""
    mode: Literal["webhook", "polling"] = "webhook"
    """``webhook``: Telegram POSTs updates to ``/channels/<name>/webhook``; ``polling``:
    one gateway process (under a lease) asks with ``getUpdates``."""
    secret_token: str = ""
    """Webhook mode: the ``secret_token`` given to ``setWebhook``; every update must carry
    it in ``X-Telegram-Bot-Api-Secret-Token`` (required in webhook mode)."""
    public_url: str = ""
    """Webhook mode: the gateway's public base URL (``https://gw.example.com``). When set,
    the channel calls ``setWebhook`` with ``<public_url>/channels/<name>/webhook`` and
    ``secret_token`` at start; when empty, register the webhook yourself."""
    api_base: str = "https://api.telegram.org"
    """Where the Bot API is (a local Bot API server, a proxy, a fake in tests): methods are
    called at ``<api_base>/bot<token>/<method>``, files read from ``<api_base>/file/bot<token>/``."""
    api_timeout: Duration = Duration("10s")
    """Timeout of one Bot API call (a timeout is transient and retried)."""
    poll_timeout: Duration = Duration("25s")
    """Polling mode: how long one ``getUpdates`` waits for news (long polling)."""
    lease_ttl: Duration = Duration("30s")
    """Polling mode: the poller's lease; another process takes over this long after the
    poller's process died."""
    username: str = ""
    """The bot's username without ``@``, for recognizing mentions in groups; empty asks
    ``getMe`` at start."""
    group_messages: Literal["mentions", "all", "none"] = "mentions"
    """Which group messages are published: ``mentions`` (those that mention the bot, reply
    to one of its messages or are a command addressed to it), ``all``, or ``none``."""
    edits: bool = True
    """Publish a customer's edit of a message as a new inbound message (``meta.edit_of``)."""
    download_media: bool = True
    """Copy inbound photos, documents, voice, audio and video into the object store."""
    max_media_size: Annotated[int, msgspec.Meta(ge=1)] = 20 * 1024 * 1024
    """Larger inbound files are not copied (the part keeps Telegram's ``file_id``). The
    Bot API serves files up to 20 MB."""
    max_body: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    """Largest webhook body accepted (413 above it)."""
    quote_reply: bool = True
    """Replies quote the customer's message (``reply_parameters``)."""
    survey_buttons: bool = True
    """Survey choices are shown as an inline keyboard; a tap comes back as a ``choice`` part."""
    per_chat_per_second: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Most messages sent into one chat per second."""
    per_group_per_minute: Annotated[int, msgspec.Meta(ge=1)] = 20
    """Most messages sent into one group per minute."""
    per_bot_per_second: Annotated[int, msgspec.Meta(ge=1)] = 30
    """Most messages the bot sends per second in all chats (per gateway process)."""

    def __post_init__(self) -> None:
        if self.mode == "webhook" and not self.secret_token:
            raise ConfigValueError("secret_token", "expected a secret token in webhook mode (Telegram sends it in "
                                                   "every update)")
        if self.secret_token and not _SECRET.match(self.secret_token):
            raise ConfigValueError("secret_token", "expected 16 to 256 characters of A-Z, a-z, 0-9, _ and -")
        if self.public_url and not self.public_url.startswith("https://"):
            raise ConfigValueError("public_url", "expected an https:// URL (Telegram calls webhooks over HTTPS only)")
        if not self.api_base.startswith(("http://", "https://")):
            raise ConfigValueError("api_base", "expected an http:// or https:// URL")
