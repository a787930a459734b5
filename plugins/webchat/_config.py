"""The keys of a ``type = "webchat"`` channel section."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gateway import Config, ConfigValueError, Duration, QuietHours

_Positive = Annotated[int, msgspec.Meta(ge=1)]
_COLOR = msgspec.Meta(pattern=r"^#[0-9A-Fa-f]{3}([0-9A-Fa-f]{3})?$", description="a colour: #rgb or #rrggbb")
_URL = msgspec.Meta(pattern=r"^(https?://\S+)?$", description="an http:// or https:// URL")
_ORIGIN = msgspec.Meta(pattern=r"^https?://[^/\s]+$",
                       description="an origin: scheme://host[:port], no path (https://www.example.com)")

IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"]
CHECKED_TYPES = [*IMAGE_TYPES, "application/pdf"]
"""The upload types whose bytes can be checked against the type they claim."""
DEFAULT_UPLOAD_TYPES = list(CHECKED_TYPES)
LANGUAGES = ("en", "zh-CN")
"""Languages of the widget's own strings table (static/widget.js)."""
STRING_KEYS = frozenset({
    "title", "welcome", "offline", "launcher", "open", "close", "delete", "delete_confirm", "delete_user",
    "name", "email", "phone", "start", "placeholder", "send", "attach", "emoji", "sending", "sent", "read",
    "failed", "online", "away", "connecting", "unavailable", "unavailable_detail", "too_long", "too_large",
    "bad_type", "not_connected", "rate_limited", "typing", "today", "yesterday", "new_message", "image",
    "image_unavailable", "download", "retry_later", "sign_in_failed", "agent", "error", "bad_name", "bad_email",
    "bad_phone", "survey_closed"})
"""The keys of the widget's strings table: what ``strings`` may override."""


class OfflineHours(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>.offline_hours]``: when the desk is not staffed, in its own time
    zone (``start`` after ``end`` wraps midnight). The widget then shows ``offline_notice``;
    messages are still taken and kept."""

    start: str = "18:00"
    end: str = "09:00"
    tz: str = "Asia/Shanghai"

    def __post_init__(self) -> None:
        for key, problem in self.quiet().problems().items():  # the first: one problem per section
            raise ConfigValueError(key, problem.replace("must be", "expected", 1))

    def quiet(self) -> QuietHours:
        """The same window as the toolkit's quiet hours (``quiet_until`` reads it)."""
        return QuietHours(start=self.start, end=self.end, tz=self.tz)


class WebChatConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>]`` keys of a web chat widget (``type = "webchat"``)."""

    secret: str = ""
    """Signs the visitor tokens (HMAC-SHA256). Empty: a random secret is generated on the
    first start and kept in the channel's state on the bus, shared by every gateway process.
    Changing it signs every visitor out (they start a new conversation)."""
    user_secret: str = ""
    """Shared with your site's server, which signs the id of a logged-in user with it
    (hex HMAC-SHA256 of the user id) so the customer keeps one conversation across devices.
    Empty: signed user ids, and the tokens given to them before, are refused (anonymous
    visitors only)."""
    allowed_origins: list[Annotated[str, _ORIGIN]] = []
    """Sites that may embed the widget (exact origins): the WebSocket ``Origin`` check and
    CORS of uploads and media. The gateway's own origin (the demo page) is always allowed."""
    title: str | None = None
    """The widget's header; absent: "Chat with us" in the visitor's language."""
    welcome: str | None = None
    """Shown at the top of a new conversation; absent: a greeting in the visitor's language;
    empty: nothing."""
    offline_notice: str | None = None
    """Shown while the desk is offline (see ``offline_hours``); absent: a notice in the
    visitor's language."""
    color: Annotated[str, _COLOR] = "#1f6feb"
    """The widget's main colour (launcher, header, the visitor's bubbles)."""
    position: Literal["right", "left"] = "right"
    """Which bottom corner of the page the launcher sits in."""
    launcher_icon: Annotated[str, _URL] = ""
    """A picture for the launcher button (an http(s) URL, shown 28 px high); empty: a
    speech bubble."""
    language: Literal["", "en", "zh-CN"] = ""
    """The widget's language; empty: the page's ``lang`` (or the script tag's ``data-lang``),
    else the browser's, else English."""
    strings: dict[str, dict[str, str]] = {}
    """Your own words for the widget's strings, per language (``[channels.web.strings.zh-CN]``
    ``send = "发送"``); the keys are listed in docs/channels/webchat.md."""
    sound: bool = False
    """A short tone when a reply arrives while the chat box is closed or the page hidden."""
    offline_hours: OfflineHours | None = None
    """When the desk is offline; absent: always online."""
    prechat: bool = True
    """Ask for a name (required) and an email or phone (optional) before the first message."""
    demo: bool = True
    """Serve the demo page at ``/channels/<name>/demo``."""
    history_size: Annotated[int, msgspec.Meta(ge=1, le=500)] = 100
    """Messages kept per conversation (both ways); the oldest go first."""
    history_ttl: Duration = Duration("30d")
    """A conversation's history is forgotten this long after its last message."""
    max_message_chars: Annotated[int, msgspec.Meta(ge=1, le=20000)] = 4000
    """Longest text a visitor may send (longer: refused with an error in the widget)."""
    max_upload_size: Annotated[int, msgspec.Meta(ge=1024, le=100 * 1024 * 1024)] = 5 * 1024 * 1024
    """Largest file a visitor may upload, in bytes (larger: 413). This is the upload
    route's own limit: ``[http] max_body`` (webhooks) does not apply to it."""
    upload_types: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_UPLOAD_TYPES))
    """File types a visitor may upload (images are shown, a PDF is a download); the bytes
    must match the type (checked by their signature, not only the header). Empty: no uploads."""
    messages_per_minute: _Positive = 20
    """Messages (text, choices, uploads, profile changes) one visitor may send per minute,
    in bursts of a quarter of that; more are refused with ``rate_limited`` and a wait."""
    messages_per_address_minute: _Positive = 200
    """The same, for all visitors of one address (IP) together, in bursts of a quarter of
    that: a new visitor costs only a handshake, so this is what bounds one machine."""
    connections_per_minute: _Positive = 120
    """WebSocket handshakes one address (IP) may open per minute, in bursts of a third of
    that (more: 429). Visitors behind one office NAT share an address: keep it generous."""
    sockets_per_address: _Positive = 50
    """Open widget sockets of one address at most (per gateway process; more: 429), so one
    machine cannot take all of ``max_connections``."""
    trust_forwarded: bool = False
    """Take the visitor's address from ``X-Forwarded-For``: its last entry, the address your
    own reverse proxy saw (behind such a proxy only: anyone can send that header)."""
    max_connections: _Positive = 400
    """Open widget sockets at most (per gateway process); below ``[http] max_connections``
    (512), which also counts them, so that webhooks keep some room."""
    sync_interval: Duration = Duration("2s")
    """How often a gateway process looks for replies another process delivered to the
    conversations of its open widgets (one state read per such conversation); ``"0s"``: a
    single gateway process, no need."""
    idle_timeout: Duration = Duration("10m")
    """A widget socket with no message for this long is closed. The widget reconnects at
    once if its chat box is open on a visible page, else when the visitor opens it or comes
    back to the page."""

    def __post_init__(self) -> None:
        # Browsers write an origin with the host in lower case and without a default port.
        self.allowed_origins = [_origin(o) for o in self.allowed_origins]
        for i, t in enumerate(self.upload_types):
            if t not in CHECKED_TYPES:
                raise ConfigValueError(("upload_types", str(i)), f"expected a type whose bytes can be checked, one of "
                                                                 f"{', '.join(CHECKED_TYPES)}")
        for language, table in self.strings.items():
            if language not in LANGUAGES:
                raise ConfigValueError(("strings", language), f"unknown language; the widget speaks "
                                                              f"{', '.join(LANGUAGES)}")
            unknown = sorted(set(table) - STRING_KEYS)
            if unknown:
                raise ConfigValueError(("strings", language), f"unknown key(s) {', '.join(unknown)}; "
                                                              f"expected one of: {', '.join(sorted(STRING_KEYS))}")


def _origin(origin: str) -> str:
    scheme, _, host = origin.lower().partition("://")
    name, colon, port = host.rpartition(":")
    if colon and port == {"http": "80", "https": "443"}[scheme]:
        host = name
    return f"{scheme}://{host}"


# A phone on a poor mobile connection uploads at about 2 Mbit/s.
_SLOW_UPLOAD = 2_000_000 / 8


def limit_warnings(cfg: WebChatConfig, config: Config) -> list[str]:
    """Limits of the section that contradict each other or the gateway's (what
    ``gateway check-config`` warns about)."""
    warnings: list[str] = []
    http = config.http
    if not http.enabled:
        warnings.append("[http] enabled = false: the widget, its socket and uploads are not served")
    # A text of max_message_chars characters, 4 UTF-8 bytes each, plus the message's envelope.
    largest = cfg.max_message_chars * 4 + 4096
    if largest > config.bus.max_message_size:
        warnings.append(f"max_message_chars ({cfg.max_message_chars}) allows messages of up to {largest} bytes, above "
                        f"[bus] max_message_size ({config.bus.max_message_size}): the bus would refuse them")
    upload = cfg.max_upload_size / _SLOW_UPLOAD
    if cfg.upload_types and upload > http.body_timeout:
        warnings.append(f"max_upload_size ({cfg.max_upload_size} bytes) takes {upload:.0f} s to upload at 2 Mbit/s, "
                        f"longer than [http] body_timeout ({http.body_timeout}): such uploads would end in 408")
    if cfg.messages_per_address_minute < cfg.messages_per_minute:
        warnings.append(f"messages_per_address_minute ({cfg.messages_per_address_minute}) is below "
                        f"messages_per_minute ({cfg.messages_per_minute}): one visitor never reaches their own limit")
    if cfg.sockets_per_address > cfg.max_connections:
        warnings.append(f"sockets_per_address ({cfg.sockets_per_address}) is above max_connections "
                        f"({cfg.max_connections}): one address can take every socket")
    if cfg.max_connections > http.max_connections:
        warnings.append(f"max_connections ({cfg.max_connections}) is above [http] max_connections "
                        f"({http.max_connections}): the server refuses sockets before this limit is reached")
    return warnings
