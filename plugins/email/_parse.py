"""Raw RFC 5322 bytes → what the gateway publishes: parts, addresses, thread headers,
auto-submission reasons and bounce reports. Pure functions, no I/O: the SMTP listener, the
IMAP poller and the benchmark all call :func:`parse_mail`."""

from __future__ import annotations

import base64
import binascii
import email
import email.message
import email.policy
import email.utils
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast

from gateway import AudioPart, FilePart, HtmlPart, ImagePart, Part, RequestError, TextPart, VideoPart

from ._text import decode_bytes, decode_header_value, html_to_text, split_reply, unescape_8bit


class MailRejected(RequestError):
    """The message cannot be processed at all; ``reason`` goes into the SMTP reply with
    SMTP ``code`` (it is the mail counterpart of an HTTP channel's rejected request)."""

    def __init__(self, reason: str, code: int = 554):
        super().__init__(reason)
        self.code = code


@dataclass
class Limits:
    """Bounds that keep hostile mail from exhausting the parser."""

    max_parts: int = 500
    max_nesting: int = 40
    """Multipart depth followed; deeper subtrees are dropped (``truncated``), and a message
    whose every text lies below it is refused."""
    max_text: int = 262144
    fallback_charsets: tuple[str, ...] = ("utf-8", "gb18030", "big5", "cp1252")


@dataclass
class Bounce:
    """A delivery status notification (RFC 3464) or a bounce we recognised heuristically."""

    original_ids: list[str]
    """Message-IDs of the returned message (ours, if it is a bounce of a reply we sent)."""
    action: str
    """``failed`` or ``delayed`` (RFC 3464 Action)."""
    status: str | None
    """Enhanced status code (RFC 3463), e.g. ``5.1.1``."""
    diagnostic: str | None
    recipient: str | None


@dataclass
class ParsedMail:
    """Everything the channel needs from one message."""

    message_id: str
    message_id_missing: bool
    in_reply_to: list[str]
    references: list[str]
    subject: str | None
    sender: tuple[str, str | None]
    reply_to: tuple[str, str | None] | None
    to: list[tuple[str, str | None]]
    cc: list[tuple[str, str | None]]
    date: datetime | None
    parts: list[Part]
    auto_reason: str | None
    bounce: Bounce | None
    forwarded: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    size: int = 0


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]+")
_ID = re.compile(r"<([^<>\s]{1,900})>")
_BOUNDARY = re.compile(rb"boundary\s*=", re.IGNORECASE)


def extract_ids(value: str | None, limit: int = 100) -> list[str]:
    """Message-IDs in a References / In-Reply-To value, in order, as ``<id>``. Broken
    clients omit the angle brackets: bare tokens with an ``@`` are taken too."""
    if not value:
        return []
    ids = [f"<{m}>" for m in _ID.findall(value)]
    if not ids:
        ids = [f"<{t.strip('<>,;')}>" for t in value.split() if "@" in t and len(t) < 900]
    seen: set[str] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    if len(out) > limit:
        # RFC 5322 3.6.4: keep the root and the most recent ones.
        out = out[:1] + out[-(limit - 1):]
    return out


def _raw_headers(msg: email.message.Message, fallbacks: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        out.setdefault(name.lower(), []).append(unescape_8bit(str(value), fallbacks))
    return out


def _addresses(values: list[str], fallbacks: tuple[str, ...]) -> list[tuple[str, str | None]]:
    out = []
    try:
        pairs = email.utils.getaddresses(values)
    except Exception:  # noqa: BLE001 - a malformed address list is not fatal
        pairs = []
    for name, addr in pairs:
        addr = addr.strip()
        if not addr or "@" not in addr:
            continue
        # Encoded words can smuggle CR/LF into a name; a reply would then be refused as
        # header injection, so they are flattened here.
        dname = _CONTROL.sub(" ", decode_header_value(name, fallbacks)).strip() or None if name else None
        out.append((addr.lower() if addr.isascii() else addr, dname))
    return out


def _param(part: email.message.Message, name: str, header: str, fallbacks: tuple[str, ...]) -> str | None:
    """A MIME parameter decoded whatever way the sender encoded it: RFC 2231 (with any
    charset, GB2312 read as GB18030), RFC 2047 words inside quotes (Outlook, Foxmail), or
    raw 8-bit bytes."""
    raw = None
    for k, v in part.raw_items():
        if k.lower() == header:
            raw = str(v)
            break
    if raw is None:
        return None
    shim = email.message.Message()  # compat32: hands out RFC 2231 parameters undecoded
    shim[header] = re.sub(r"\r?\n[ \t]+", " ", raw)
    try:
        value = shim.get_param(name, header=header)
    except Exception:  # noqa: BLE001
        return None
    if value is None:
        return None
    if isinstance(value, tuple):
        charset, _lang, text = value
        raw_bytes = bytes(text, "raw-unicode-escape") if isinstance(text, str) else bytes(text)
        return decode_bytes(raw_bytes, charset or None, fallbacks)[0]
    return decode_header_value(email.utils.unquote(value), fallbacks)


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        d = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if d is None:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.astimezone(timezone.utc)


def synthetic_message_id(raw: bytes) -> str:
    """A stable Message-ID for mail that has none: the same bytes get the same id, so a
    retried delivery is still recognised."""
    return f"<sha256.{hashlib.sha256(raw).hexdigest()[:40]}@missing-message-id.invalid>"


def _auto_reason(h: dict[str, list[str]], sender: str) -> str | None:
    """Why this message was machine-generated (RFC 3834 section 2 and common practice),
    or None for a human's message."""
    auto = (h.get("auto-submitted") or [""])[0].strip().lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"auto-submitted: {auto.split(';')[0].strip()[:40]}"
    prec = (h.get("precedence") or [""])[0].strip().lower()
    if prec in ("bulk", "junk", "list", "auto_reply"):
        return f"precedence: {prec}"
    local = sender.split("@", 1)[0].lower()
    if local in ("mailer-daemon", "postmaster", "mailerdaemon") or local.startswith(("mailer-daemon", "noreply-dmarc")):
        return "mailer-daemon sender"
    if "x-autoreply" in h or "x-autorespond" in h:
        return "x-autoreply"
    suppress = (h.get("x-auto-response-suppress") or [""])[0].lower()
    if any(w in suppress for w in ("all", "oof", "autoreply")):
        return f"x-auto-response-suppress: {suppress[:40]}"
    if "list-id" in h or "list-unsubscribe" in h:
        return "mailing list"
    if "feedback-id" in h and "x-ses-outgoing" in h:
        return "bulk sender"
    return None


_KINDS: dict[str, type] = {"image": ImagePart, "audio": AudioPart, "video": VideoPart}


def parse_mail(raw: bytes, limits: Limits | None = None, *, envelope_from: str | None = None) -> ParsedMail:
    """Parse one message. Raises :class:`MailRejected` only for mail that cannot be
    processed at all; everything else (bad base64, wrong charsets, broken headers) is
    decoded as well as possible and noted in ``problems``."""
    lim = limits or Limits()
    fb = lim.fallback_charsets
    # The standard parser recurses per nesting level and slows down quadratically with it;
    # count boundary declarations first so a hostile message cannot pin a CPU or blow the
    # stack.
    if len(_BOUNDARY.findall(raw)) > lim.max_nesting * 25:
        raise MailRejected("too many MIME multiparts")
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    except RecursionError:
        raise MailRejected("MIME structure nested too deeply") from None
    h = _raw_headers(msg, fb)
    problems: list[str] = []

    def hval(name: str) -> str | None:
        vals = h.get(name)
        return decode_header_value(vals[0], fb) if vals else None

    mid_ids = extract_ids((h.get("message-id") or [""])[0], 1)
    missing = not mid_ids
    message_id = mid_ids[0] if mid_ids else synthetic_message_id(raw)
    if missing:
        problems.append("no Message-ID")
    senders = _addresses(h.get("from", []), fb) or _addresses(h.get("sender", []), fb)
    if not senders and envelope_from:
        senders = [(envelope_from.lower(), None)]
    if not senders:
        problems.append("no From address")
        senders = [("unknown@invalid", None)]
    sender = senders[0]
    reply_to = (_addresses(h.get("reply-to", []), fb) or cast("list[tuple[str, str | None] | None]", [None]))[0]
    subject = hval("subject")
    if subject is not None:
        subject = _CONTROL.sub(" ", subject)[:998]

    parts, forwarded, truncated, bounce = _body(msg, lim, problems)
    auto = _auto_reason(h, sender[0])
    if envelope_from is not None and envelope_from.strip() in ("", "<>"):
        auto = auto or "null envelope sender"
    if bounce is not None:
        auto = auto or "delivery status notification"

    return ParsedMail(
        message_id=message_id,
        message_id_missing=missing,
        in_reply_to=extract_ids(hval("in-reply-to"), 10),
        references=extract_ids(" ".join(h.get("references", [])), 100),
        subject=subject,
        sender=sender,
        reply_to=reply_to,
        to=_addresses(h.get("to", []), fb)[:100],
        cc=_addresses(h.get("cc", []), fb)[:100],
        date=_date((h.get("date") or cast("list[str | None]", [None]))[0]),
        parts=parts,
        auto_reason=auto,
        bounce=bounce,
        forwarded=forwarded,
        problems=problems[:50],
        truncated=truncated,
        size=len(raw),
    )


def _payload(part: email.message.Message, problems: list[str]) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception as exc:  # noqa: BLE001 - broken transfer encodings
        problems.append(f"undecodable {part.get_content_type()} body: {type(exc).__name__}")
        raw = part.get_payload(decode=False)
        return raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
    broken = [type(d).__name__ for d in part.defects if "Base64" in type(d).__name__ or "Padding" in type(d).__name__]
    if broken:
        problems.append(f"{broken[0]} in {part.get_content_type()}")
        if part.get("content-transfer-encoding", "").strip().lower() == "base64":
            data = _lenient_base64(part.get_payload(decode=False))
    return data if isinstance(data, bytes) else b""


def _lenient_base64(text: object) -> bytes:
    """Decode what can be decoded of broken base64: stray characters dropped, a partial
    last quantum cut off (the standard library hands back the undecoded text instead)."""
    if not isinstance(text, str):
        return b""
    clean = re.sub(r"[^A-Za-z0-9+/]", "", text.split("=", 1)[0])
    clean = clean[: len(clean) - len(clean) % 4]
    try:
        return base64.b64decode(clean)
    except (ValueError, binascii.Error):
        return b""


def _body(msg: email.message.Message, lim: Limits, problems: list[str]) -> tuple[list[Part], list[dict[str, str]], list[str], Bounce | None]:
    fb = lim.fallback_charsets
    plain: list[str] = []
    html: list[str] = []
    media: list[Part] = []
    forwarded: list[dict[str, str]] = []
    truncated: list[str] = []
    bounce: Bounce | None = None
    count = 0
    # Iterative walk with the depth known: no recursion, and we decide per subtree.
    stack: list[tuple[email.message.Message, int, bool]] = [(msg, 0, False)]
    while stack:
        part, depth, in_alternative = stack.pop()
        count += 1
        if count > lim.max_parts:
            if "parts" not in truncated:
                truncated.append("parts")
            continue
        ctype = part.get_content_type()
        maintype = ctype.partition("/")[0]
        if ctype == "multipart/report" and bounce is None:
            bounce = _bounce(part, fb)
        if part.is_multipart():
            if depth >= lim.max_nesting:
                if "nesting" not in truncated:
                    truncated.append("nesting")
                continue
            children = part.get_payload()
            if not isinstance(children, list):
                continue
            if ctype == "message/rfc822":
                inner = children[0] if children else None
                if isinstance(inner, email.message.Message):
                    media.append(_forwarded(part, inner, forwarded, fb))
                continue
            alt = ctype == "multipart/alternative"
            for child in reversed(children):
                if isinstance(child, email.message.Message):
                    stack.append((child, depth + 1, alt))
            continue
        disposition = (part.get_content_disposition() or "").lower()
        filename = _param(part, "filename", "content-disposition", fb) or _param(part, "name", "content-type", fb)
        if filename:
            filename = filename.replace("\x00", "").replace("/", "_").replace("\\", "_")[:255]
        is_attachment = disposition == "attachment" or (filename is not None and disposition != "inline" and maintype != "text")
        if maintype == "text" and not is_attachment and ctype in ("text/plain", "text/html") and not filename:
            data = _payload(part, problems)
            # typeshed allows an RFC 2231 tuple; policy.default's messages decode it to a str.
            text, problem = decode_bytes(data, cast("str | None", part.get_param("charset")), fb)
            if problem:
                problems.append(f"{ctype}: {problem}")
            (html if ctype == "text/html" else plain).append(text)
            continue
        if ctype in ("message/delivery-status", "text/rfc822-headers", "message/disposition-notification") and bounce is not None:
            continue
        data = _payload(part, problems)
        cid = (part.get("content-id") or "").strip().strip("<>") or None
        kind = _KINDS.get(maintype, FilePart)
        media.append(kind(content_type=ctype, filename=filename, size=len(data), data=data,
                          content_id=cid[:250] if cid else None))

    parts: list[Part] = []
    text = "\n\n".join(t for t in plain if t.strip())
    html_text = "\n".join(html)
    if len(text) > lim.max_text:
        text = text[: lim.max_text]
        truncated.append("text")
    if len(html_text) > lim.max_text:
        html_text = html_text[: lim.max_text]
        truncated.append("html")
    if not text.strip() and html_text.strip():
        text = html_to_text(html_text)[: lim.max_text]
    if "nesting" in truncated and not text.strip() and not media:
        # Everything readable was below the depth cut: publishing an empty message would
        # silently lose the customer's text, so the sender is told instead (554).
        raise MailRejected(f"MIME structure nested too deeply: no text above the depth limit of {lim.max_nesting} levels")
    if text or html_text or not media:
        new, quoted, signature = split_reply(text)
        parts.append(TextPart(text=new, quoted=quoted, signature=signature))
    if html_text.strip():
        parts.append(HtmlPart(html=html_text))
    parts.extend(media)
    return parts, forwarded, truncated, bounce


def _forwarded(part: email.message.Message, inner: email.message.Message, forwarded: list[dict[str, str]],
               fb: tuple[str, ...]) -> Part:
    """A message attached to a message (forward as attachment): kept whole as a
    ``message/rfc822`` file so nothing of it is lost; its headers summarised in meta."""
    h = _raw_headers(inner, fb)
    subject = decode_header_value((h.get("subject") or [""])[0], fb)[:200]
    info = {"subject": subject, "from": ", ".join(a for a, _ in _addresses(h.get("from", []), fb))[:200],
            "message_id": (extract_ids((h.get("message-id") or [""])[0], 1) or [""])[0]}
    forwarded.append(info)
    try:
        data = inner.as_bytes(policy=email.policy.SMTP.clone(linesep="\r\n"))
    except Exception:  # noqa: BLE001 - a broken inner message is still attached, as text
        data = str(inner.get_payload()).encode("utf-8", "replace")
    # The sender's own name for the attachment wins; only a nameless part is named after
    # the forwarded subject.
    own = _param(part, "filename", "content-disposition", fb) or _param(part, "name", "content-type", fb)
    if own and own.strip():
        name = re.sub(r"[\\/\x00-\x1f]", "_", own.strip())[:255]
    else:
        name = re.sub(r"[\\/\x00-\x1f]", "_", subject or "forwarded")[:120] + ".eml"
    return FilePart(content_type="message/rfc822", filename=name, size=len(data), data=data)


_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def _bounce(report: email.message.Message, fb: tuple[str, ...]) -> Bounce | None:
    """Read an RFC 3464 report: the per-recipient Action/Status/Diagnostic-Code and the
    Message-ID of the returned message."""
    # typeshed allows an RFC 2231 tuple; policy.default's messages decode it to a str.
    if (cast("str | None", report.get_param("report-type")) or "").lower() != "delivery-status":
        return None
    action, status, diag, rcpt = "failed", None, None, None
    ids: list[str] = []
    # The parts of a multipart payload are messages (typeshed's element type also allows str).
    subs = cast("list[email.message.Message]", report.get_payload() if isinstance(report.get_payload(), list) else [])
    for sub in subs:
        ctype = sub.get_content_type()
        if ctype == "message/delivery-status":
            blocks = sub.get_payload()
            fields = cast("list[email.message.Message]", blocks if isinstance(blocks, list) else [])
            if not fields:
                # Some MTAs send the status as plain text under this type (decoded: bytes).
                text = cast("bytes | None", sub.get_payload(decode=True)) or b""
                fields = [email.message_from_bytes(b, policy=email.policy.default)
                          for b in re.split(rb"\r?\n\r?\n", text) if b.strip()]
            for block in fields[1:] or fields:
                a = (block.get("action") or "").strip().lower()
                if not a:
                    continue
                s = _STATUS.search(block.get("status") or "")
                action, status = a, s.group(1) if s else None
                diag = decode_header_value(str(block.get("diagnostic-code") or ""), fb)[:500] or None
                rcpt = str(block.get("final-recipient") or block.get("original-recipient") or "").split(";")[-1].strip() or None
                if a == "failed":
                    break
        elif ctype in ("message/rfc822", "message/global"):
            inner = sub.get_payload()
            inner = inner[0] if isinstance(inner, list) and inner else None
            if isinstance(inner, email.message.Message):
                ids += extract_ids(str(inner.get("message-id") or ""), 1)
        elif ctype == "text/rfc822-headers":
            text = cast("bytes | None", sub.get_payload(decode=True)) or b""
            m = re.search(rb"^message-id:\s*(<[^>\r\n]+>)", text, re.IGNORECASE | re.MULTILINE)
            if m:
                ids.append(m.group(1).decode("ascii", "replace"))
    return Bounce(original_ids=ids, action=action, status=status, diagnostic=diag, recipient=rcpt)


def meta_addresses(pairs: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """Addresses as they appear in ``meta.to`` / ``meta.cc``."""
    return [{"address": a, **({"name": n} if n else {})} for a, n in pairs]
