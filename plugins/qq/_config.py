"""The keys of a ``type = "qq"`` channel section: one transport per channel, either a
OneBot v11 implementation (``[channels.<name>.onebot]``) or the official QQ bot
platform's webhook (``[channels.<name>.official]``)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gateway import ConfigValueError, Duration

Filter = Literal["all", "mention", "keyword"]


class GroupRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>.onebot.groups.<group_id>]``: this group's own filter."""

    filter: Filter = "all"
    """``all`` publishes every message; ``mention`` only those that @mention the bot;
    ``keyword`` those that @mention the bot or start with one of ``keywords``."""
    keywords: list[str] = []
    """Prefixes that let a message through the ``keyword`` filter (after leading spaces)."""
    enabled: bool = True
    """False ignores the group entirely (counted as ``group_disabled``)."""


class OneBotConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>.onebot]``: a OneBot v11 implementation (NapCat, Lagrange.OneBot,
    LLOneBot ...) logged in to a QQ account."""

    transport: Literal["reverse_ws", "forward_ws", "http"] = "reverse_ws"
    """``reverse_ws``: the implementation connects to ``/channels/<name>/onebot``;
    ``forward_ws``: the gateway connects to the implementation's WebSocket server at
    ``url``; ``http``: events are POSTed to ``/channels/<name>/onebot`` (signed with
    ``secret``) and replies go to the implementation's HTTP API at ``url``."""
    url: str = ""
    """``forward_ws``: the implementation's WebSocket server (``ws://host:port/``);
    ``http``: its HTTP API (``http://host:port``)."""
    access_token: str = ""
    """The implementation's ``access_token``: required as ``Authorization: Bearer <token>``
    (or ``?access_token=``) on a reverse handshake, sent by the gateway on a forward socket
    and HTTP API calls. Empty on ``reverse_ws`` accepts loopback clients only."""
    secret: str = ""
    """``http``: the implementation's ``secret``; every POSTed event must carry
    ``X-Signature: sha1=<HMAC-SHA1 of the body>`` (required with ``http``)."""
    self_ids: list[str] = []
    """QQ numbers of bot accounts allowed to connect (``X-Self-ID``); empty allows any."""
    api_timeout: Duration = Duration("10s")
    """How long an API call over the socket waits for its answer (matched by ``echo``)."""
    heartbeat_timeout: Duration = Duration("0s")
    """The channel is ``degraded`` when a connected bot sent no heartbeat for this long;
    ``0s`` uses three times the ``interval`` the heartbeats announce (at least 15 s)."""
    filter: Filter = "all"
    """The filter of groups without their own rule in ``groups``."""
    keywords: list[str] = []
    """The keyword prefixes of groups without their own rule."""
    groups: dict[str, GroupRule] = {}
    """Per-group rules, keyed by group number."""
    allow_at_all: bool = False
    """Whether an outbound may @mention everyone (an ``at`` part with key ``all``). Without
    it such an outbound fails permanently (``at_all_refused``)."""
    quote_reply: bool = True
    """Group replies quote the customer's message (a ``reply`` segment)."""
    mention_sender: bool = False
    """Group replies @mention the customer they answer."""
    group_interval: Duration = Duration("1s")
    """At least this long between two messages the gateway sends into one group (per
    process), so the account is not flagged for flooding."""
    max_message_size: Annotated[int, msgspec.Meta(ge=4096)] = 4 * 1024 * 1024
    """Largest WebSocket message accepted from the implementation (events with inline
    base64 media can be large)."""
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 16
    """Most sockets open at once (one per bot account is normal)."""


    def __post_init__(self) -> None:
        for group in self.groups:
            if not group.isdigit():
                raise ConfigValueError(("groups", group), "expected a group number as the key")
        if self.transport == "http" and not self.secret:
            raise ConfigValueError("secret", "expected the implementation's secret with transport http (it signs "
                                             "the events)")
        if self.transport == "http" and not self.url.startswith(("http://", "https://")):
            raise ConfigValueError("url", "expected the implementation's HTTP API (http:// or https://) with "
                                          "transport http")
        if self.transport == "forward_ws" and not self.url.startswith(("ws://", "wss://")):
            raise ConfigValueError("url", "expected the implementation's ws:// or wss:// server with transport "
                                          "forward_ws")


class OfficialConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>.official]``: a bot of the QQ open platform (QQ开放平台) whose
    callback URL is ``/channels/<name>/webhook``."""

    app_id: Annotated[str, msgspec.Meta(min_length=1)]
    """The bot's AppID."""
    secret: Annotated[str, msgspec.Meta(min_length=1)]
    """The bot's AppSecret: signs callbacks (Ed25519 key derived from it) and gets the
    access token."""
    api_base: str = "https://api.sgroup.qq.com"
    """The OpenAPI (a proxy, or a local fake in tests)."""
    token_url: str = "https://bots.qq.com/app/getAppAccessToken"
    """Where the access token is got."""
    api_timeout: Duration = Duration("10s")
    """HTTP timeout of API calls (the platform recommends at least 5 s)."""
    token_refresh_margin: Duration = Duration("2m")
    """Refresh the token this long before it expires."""
    timestamp_tolerance: Duration = Duration("5m")
    """A callback whose ``X-Signature-Timestamp`` differs from our clock by more is refused;
    ``0s`` checks only its form."""
    group_reply_window: Duration = Duration("5m")
    """How long after a group message the platform accepts replies to it."""
    group_reply_limit: Annotated[int, msgspec.Meta(ge=1)] = 5
    """How many replies one group message may get."""
    c2c_reply_window: Duration = Duration("60m")
    """How long after a private (C2C) message the platform accepts replies to it."""
    c2c_reply_limit: Annotated[int, msgspec.Meta(ge=1)] = 5
    """How many replies one private message may get."""
    max_body: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    """Largest callback body accepted; larger ones get 413."""
    proactive_per_month: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Proactive messages (no message to answer) per user or group per calendar month,
    sent when the reply window is closed. The platform published 4 and stopped offering
    them on 2025-04-21: 0 (none) unless your bot still has them."""


class QQConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>]`` keys of ``type = "qq"``: exactly one of the two sections."""

    onebot: OneBotConfig | None = None
    official: OfficialConfig | None = None

    def __post_init__(self) -> None:
        if (self.onebot is None) == (self.official is None):
            raise ConfigValueError("", "expected exactly one of [onebot] or [official], got "
                                       + ("neither" if self.onebot is None else "both"))
