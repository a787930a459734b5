"""The keys of a ``type = "email"`` channel (documented in docs/channels/email.md)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gateway import Duration


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SmtpInConfig(_Section, kw_only=True):
    """``[channels.<name>.smtp]``: the SMTP listener for mail relayed or forwarded to us."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 2525
    """0 picks a free port (tests)."""
    hostname: str = ""
    """Name in the greeting and EHLO answer (default: the machine's FQDN)."""
    domains: list[str] = []
    """Recipient domains accepted; any other recipient gets 550."""
    addresses: list[str] = []
    """Single recipient addresses accepted besides ``domains``."""
    max_size: Annotated[int, msgspec.Meta(ge=1024)] = 26214400
    """Largest message accepted (bytes); above it 552."""
    tls_cert: str = ""
    """PEM certificate file; with ``tls_key`` it enables STARTTLS."""
    tls_key: str = ""
    require_starttls: bool = False
    auth_users: dict[str, str] = {}
    """``{user = "password"}``: enables AUTH PLAIN/LOGIN."""
    auth_required: bool = False
    auth_require_tls: bool = True
    timeout: Duration = Duration("5m")
    """Idle timeout of one SMTP session."""


class ImapConfig(_Section, kw_only=True):
    """``[channels.<name>.imap]``: a mailbox read with IDLE (or polling)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 993
    security: Literal["ssl", "none"] = "ssl"
    """``ssl``: implicit TLS (port 993). ``none``: plain text, for tests and local servers."""
    verify_certs: bool = True
    user: str
    password: str
    mailbox: str = "INBOX"
    idle: bool = True
    """Use IDLE when the server offers it; otherwise poll every ``poll_interval``."""
    poll_interval: Duration = Duration("60s")
    idle_refresh: Duration = Duration("5m")
    """Leave and re-enter IDLE this often (servers drop idle clients after 30 minutes),
    re-checking the mailbox each time."""
    timeout: Duration = Duration("30s")
    """Timeout of one IMAP command."""
    backoff_max: Duration = Duration("60s")
    """Reconnect backoff grows from 1 s up to this."""
    batch: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 25
    """Messages fetched per UID FETCH."""
    start: Literal["all", "new"] = "all"
    """Without a checkpoint: read every message in the mailbox (``all``) or only mail that
    arrives from now on (``new``)."""
    after: Literal["none", "seen", "move"] = "none"
    """After a message is on the bus: leave it, flag it \\Seen, or move it to ``move_to``."""
    move_to: str = ""
    lease_ttl: Duration = Duration("10s")
    """Only one gateway process polls a mailbox; another takes over this long after the
    holder stops renewing."""


class SmtpOutConfig(_Section, kw_only=True):
    """``[channels.<name>.send]``: the submission server replies go through."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 587
    security: Literal["starttls", "ssl", "none"] = "starttls"
    verify_certs: bool = True
    user: str = ""
    password: str = ""
    timeout: Duration = Duration("30s")
    helo: str = ""
    """Name in EHLO (default: the machine's FQDN)."""


class DkimConfig(_Section, kw_only=True):
    """``[channels.<name>.dkim]``: sign outbound mail (RFC 6376) with dkimpy."""

    domain: str
    selector: str
    private_key_file: str
    headers: list[str] = msgspec.field(default_factory=lambda: [
        "From", "To", "Subject", "Date", "Message-ID", "In-Reply-To", "References", "MIME-Version", "Content-Type",
        "Auto-Submitted"])


class EmailConfig(_Section, kw_only=True):
    """Keys of a ``type = "email"`` channel."""

    address: Annotated[str, msgspec.Meta(pattern=r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+$")]
    """Our address: the From of every reply."""
    name: str = ""
    """Display name in From."""
    message_id_domain: str = ""
    """Right-hand side of our Message-IDs (default: the domain of ``address``)."""
    own_addresses: list[str] = []
    """Other addresses of ours: mail from them is marked auto (loop protection)."""
    smtp: SmtpInConfig | None = None
    imap: ImapConfig | None = None
    send: SmtpOutConfig | None = None
    dkim: DkimConfig | None = None
    keep_raw: bool = True
    """Store the original message in the object store (``meta.raw``) for audit."""
    thread_ttl: Duration = Duration("180d")
    """How long the Message-ID → conversation map is kept: a reply to mail older than this
    starts a new conversation (the map holds addresses and subjects: not kept forever)."""
    max_parts: Annotated[int, msgspec.Meta(ge=1)] = 500
    """MIME parts extracted per message; the rest are dropped and ``meta.truncated`` says so."""
    max_nesting: Annotated[int, msgspec.Meta(ge=1, le=200)] = 40
    """Multipart nesting depth followed; deeper subtrees are dropped (``meta.truncated``
    contains ``"nesting"``), and a message with no text above this depth is refused (554).
    A message declaring more than 25 x this many boundaries is refused before parsing."""
    max_text: Annotated[int, msgspec.Meta(ge=1024)] = 262144
    """Characters of text and of HTML kept per message (the raw message keeps all)."""
    fallback_charsets: list[str] = msgspec.field(default_factory=lambda: ["utf-8", "gb18030", "big5", "cp1252"])
    """Tried in order when a body's charset is missing or wrong."""
