"""Outbound mail: build a correctly threaded MIME reply and submit it with aiosmtplib over
one reused connection."""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import mimetypes
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from typing import Any, cast

import aiosmtplib

from gateway import (
    TIMEOUT,
    UNREACHABLE,
    DeliveryError,
    FilePart,
    HtmlPart,
    ImagePart,
    LinkPart,
    MediaPart,
    Part,
    TextPart,
)

from ._config import DkimConfig, SmtpOutConfig

_POLICY = email.policy.SMTP.clone(max_line_length=998)
_CTRL = re.compile(r"[\r\n\x00]")


def refuse_injection(field: str, value: str | None) -> None:
    """CR, LF or NUL in a header value from the backend would start a new header (or the
    body) in the generated message: refuse the outbound permanently."""
    if value and _CTRL.search(value):
        raise DeliveryError(f"header injection refused: CR/LF in {field}", permanent=True, code="header_injection")


def _address(addr: str, name: str | None, field: str) -> str:
    refuse_injection(field, addr)
    refuse_injection(field + " name", name)
    if not re.fullmatch(r"[^\s<>@,;:\"]+@[^\s<>@,;:\"]+", addr):
        raise DeliveryError(f"invalid {field} address", permanent=True, code="invalid_address")
    return email.utils.formataddr((name or "", addr))


async def build_message(
    *,
    parts: list[Part],
    from_addr: str,
    from_name: str | None,
    to_addr: str,
    to_name: str | None,
    subject: str,
    message_id: str,
    in_reply_to: str | None,
    references: list[str],
    auto: bool,
    part_bytes: Callable[[MediaPart], Awaitable[bytes]],
) -> EmailMessage:
    """A multipart message: plain text and HTML alternatives, inline images (``cid:``) and
    attachments, with threading headers. Raises a permanent :class:`DeliveryError` for
    header injection and unusable content."""
    refuse_injection("subject", subject)
    for ref in [in_reply_to, *references]:
        refuse_injection("references", ref)
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = _address(from_addr, from_name, "from")
    msg["To"] = _address(to_addr, to_name, "to")
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = message_id
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = " ".join(references)
    if auto:
        # RFC 3834 section 5: an automatic answer says so, and so it never gets answered.
        msg["Auto-Submitted"] = "auto-replied"
        msg["X-Auto-Response-Suppress"] = "All"

    texts: list[str] = []
    htmls: list[str] = []
    media: list[tuple[ImagePart | FilePart, bytes]] = []
    for p in parts:
        if isinstance(p, TextPart):
            texts.append(p.text)
        elif isinstance(p, HtmlPart):
            htmls.append(p.html)
        elif isinstance(p, LinkPart):
            texts.append(" ".join(x for x in (p.title, p.url) if x))
        elif isinstance(p, (ImagePart, FilePart)):
            refuse_injection("filename", p.filename)
            media.append((p, await part_bytes(p)))
    text = "\n\n".join(texts)
    if not text and htmls:
        from ._text import html_to_text

        text = html_to_text("\n".join(htmls))
    msg.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable" if not text.isascii() else "7bit")
    inline = [(p, d) for p, d in media if isinstance(p, ImagePart) and p.content_id]
    attached = [(p, d) for p, d in media if not (isinstance(p, ImagePart) and p.content_id)]
    if htmls:
        msg.add_alternative("\n".join(htmls), subtype="html", charset="utf-8")
        if inline:
            # add_alternative made the message multipart: its payload is a list of parts.
            html_part = cast("list[EmailMessage]", msg.get_payload())[-1]
            for p, data in inline:
                maintype, subtype = _ctype(p)
                html_part.add_related(data, maintype=maintype, subtype=subtype, cid=f"<{p.content_id}>",
                                      filename=p.filename, disposition="inline")
    else:
        attached = media
    for p, data in attached:
        maintype, subtype = _ctype(p)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=p.filename or "attachment")
    return msg


def _ctype(p: Any) -> tuple[str, str]:
    ctype = p.content_type or (mimetypes.guess_type(p.filename or "")[0]) or "application/octet-stream"
    if "/" not in ctype or _CTRL.search(ctype):
        ctype = "application/octet-stream"
    maintype, subtype = ctype.split("/", 1)
    return maintype, subtype.split(";")[0].strip() or "octet-stream"


class Sender:
    """One SMTP submission connection, reused between deliveries and re-opened when the
    server dropped it. Sends are serialized on it (SMTP has one transaction at a time)."""

    def __init__(self, cfg: SmtpOutConfig, dkim: DkimConfig | None = None):
        self.cfg = cfg
        self.dkim = dkim
        self._dkim_key: bytes | None = None
        if dkim is not None:
            with open(dkim.private_key_file, "rb") as fh:
                self._dkim_key = fh.read()
        self._client: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()

    def _new_client(self) -> aiosmtplib.SMTP:
        cfg = self.cfg
        ctx = None
        if cfg.security != "none":
            ctx = ssl.create_default_context()
            if not cfg.verify_certs:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        return aiosmtplib.SMTP(
            hostname=cfg.host, port=cfg.port, username=cfg.user or None, password=cfg.password or None,
            use_tls=cfg.security == "ssl", start_tls=cfg.security == "starttls",
            tls_context=ctx, timeout=cfg.timeout, local_hostname=cfg.helo or socket.getfqdn())

    async def send(self, msg: EmailMessage, sender: str, recipients: list[str]) -> None:
        """Submit ``msg``; maps SMTP outcomes to :class:`DeliveryError` (4xx and network
        trouble transient, 5xx permanent)."""
        data = msg.as_bytes(policy=_POLICY)
        if self.dkim is not None and self._dkim_key is not None:
            data = self._sign(data)
        async with self._lock:
            for attempt in (1, 2):
                try:
                    client = await self._connected()
                    await client.sendmail(sender, recipients, data)
                    return
                except aiosmtplib.SMTPServerDisconnected as exc:
                    # A reused connection the server timed out: reconnect once, right away.
                    self._drop()
                    if attempt == 2:
                        # SMTP: no mail is accepted without the final 250, so nothing was sent.
                        raise DeliveryError(f"SMTP server disconnected: {exc}", permanent=False,
                                            code=UNREACHABLE) from exc
                except aiosmtplib.SMTPRecipientsRefused as exc:
                    codes = [r.code for r in exc.recipients]
                    permanent = all(500 <= c < 600 for c in codes)
                    raise DeliveryError(f"recipient refused: {' '.join(str(c) for c in codes)}",
                                        permanent=permanent, code=f"smtp_{codes[0] if codes else 'rcpt'}") from exc
                except aiosmtplib.SMTPAuthenticationError as exc:
                    # Our credentials are wrong: an operator fixes the config, the mail
                    # itself is fine, so keep retrying instead of dead-lettering every reply.
                    self._drop()
                    raise DeliveryError(f"SMTP authentication failed: {exc.code}", permanent=False, code="smtp_auth") from exc
                except aiosmtplib.SMTPResponseException as exc:
                    self._reset_after_error()
                    permanent = 500 <= exc.code < 600
                    raise DeliveryError(f"SMTP {exc.code}: {exc.message[:200]}", permanent=permanent,
                                        code=f"smtp_{exc.code}") from exc
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                    self._drop()
                    # A timeout may come after the data went out (the server may have taken it).
                    raise DeliveryError(f"SMTP connection failed: {type(exc).__name__}: {exc}", permanent=False,
                                        code=TIMEOUT if isinstance(exc, TimeoutError) else UNREACHABLE) from exc

    def _sign(self, data: bytes) -> bytes:
        import dkim  # dkimpy: only needed when signing is configured

        assert self.dkim is not None and self._dkim_key is not None
        sig = dkim.sign(data, self.dkim.selector.encode(), self.dkim.domain.encode(), self._dkim_key,
                        include_headers=[h.encode() for h in self.dkim.headers])
        return sig + data

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._client is None or not self._client.is_connected:
            self._client = self._new_client()
            await self._client.connect()
        return self._client

    def _reset_after_error(self) -> None:
        # After a refused transaction the session is still usable only after RSET; a fresh
        # connection next time is simpler and always correct.
        self._drop()

    def _drop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass
        self._client = None

    async def close(self) -> None:
        """QUIT the connection, if open."""
        async with self._lock:
            if self._client is not None and self._client.is_connected:
                try:
                    await asyncio.wait_for(self._client.quit(), 5)
                except Exception:  # noqa: BLE001
                    pass
            self._drop()
