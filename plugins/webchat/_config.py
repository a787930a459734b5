"""The keys of a ``type = "webchat"`` channel section."""

from __future__ import annotations

from typing import Annotated

import msgspec

from gateway import Duration, QuietHours, check_quiet_hours

_Positive = Annotated[int, msgspec.Meta(ge=1)]
_ORIGIN = msgspec.Meta(pattern=r"^https?://[^/\s]+$",
                       description="an origin: scheme://host[:port], no path (https://www.example.com)")

DEFAULT_UPLOAD_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"]


class OfflineHours(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>.offline_hours]``: when the desk is not staffed, in its own time
    zone (``start`` after ``end`` wraps midnight). The widget then shows ``offline_notice``;
    messages are still taken and kept."""

    start: str = "18:00"
    end: str = "09:00"
    tz: str = "Asia/Shanghai"

    def __post_init__(self) -> None:
        try:
            check_quiet_hours(self.quiet())
        except ValueError as exc:  # name the keys as they are spelled here
            raise ValueError(str(exc).replace("quiet hours ", "offline_hours.")) from None

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
    title: str = "Chat with us"
    """The widget's header."""
    welcome: str = "Hello! How can we help?"
    """Shown at the top of a new conversation (empty: nothing)."""
    offline_notice: str = "We are offline right now. Leave a message and we will answer here or by email."
    """Shown while the desk is offline (see ``offline_hours``)."""
    offline_hours: OfflineHours | None = None
    """When the desk is offline; absent: always online."""
    prechat: bool = True
    """Ask for a name (required) and an email or phone (optional) before the first message."""
    demo: bool = True
    """Serve the demo page at ``/channels/<name>/demo``."""
    history_size: Annotated[int, msgspec.Meta(ge=1, le=500)] = 100
    """Messages kept per conversation (both ways); the oldest go first."""
    history_ttl: Duration = "30d"
    """A conversation's history is forgotten this long after its last message."""
    max_message_chars: Annotated[int, msgspec.Meta(ge=1, le=20000)] = 4000
    """Longest text a visitor may send (longer: refused with an error in the widget)."""
    max_upload_size: Annotated[int, msgspec.Meta(ge=1024)] = 5 * 1024 * 1024
    """Largest image a visitor may upload, in bytes (larger: 413)."""
    upload_types: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_UPLOAD_TYPES))
    """Image types a visitor may upload; the bytes must match the type (checked by their
    signature, not only the header). Empty: no uploads."""
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
    max_connections: _Positive = 1000
    """Open widget sockets at most (per gateway process)."""
    sync_interval: Duration = "2s"
    """How often a gateway process looks for replies another process delivered to the
    conversations of its open widgets (one state read per such conversation); ``"0s"``: a
    single gateway process, no need."""
    idle_timeout: Duration = "10m"
    """A widget socket with no message for this long is closed. The widget reconnects at
    once if its chat box is open on a visible page, else when the visitor opens it or comes
    back to the page."""

    def __post_init__(self) -> None:
        # Browsers write an origin with the host in lower case and without a default port.
        self.allowed_origins = [_origin(o) for o in self.allowed_origins]
        unchecked = [t for t in self.upload_types if t not in DEFAULT_UPLOAD_TYPES]
        if unchecked:
            raise ValueError(f"upload_types: {', '.join(unchecked)} cannot be checked against the file's bytes; "
                             f"accepted: {', '.join(DEFAULT_UPLOAD_TYPES)}")


def _origin(origin: str) -> str:
    scheme, _, host = origin.lower().partition("://")
    name, colon, port = host.rpartition(":")
    if colon and port == {"http": "80", "https": "443"}[scheme]:
        host = name
    return f"{scheme}://{host}"
