"""Text as customers really send it: charset labels that lie, RFC 2047 words in legacy
Chinese and Japanese encodings, HTML-only mail, and replies with the whole thread quoted
below a signature."""

from __future__ import annotations

import codecs
import email.errors
import email.header
import re

from inscriptis import get_text

# Labels whose real content is a superset: GB2312-labelled mail routinely carries GBK and
# GB18030 characters (people's names), Big5 mail carries HKSCS, "latin-1" mail carries
# Windows-1252 quotes. Decoding with the superset loses nothing that the label allowed.
_SUPERSETS = {
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "cp936": "gb18030", "euc-cn": "gb18030",
    "euccn": "gb18030", "gb_2312-80": "gb18030", "x-euc-cn": "gb18030", "chinese": "gb18030", "csgb2312": "gb18030",
    "big5": "big5hkscs", "x-big5": "big5hkscs", "cn-big5": "big5hkscs", "cp950": "big5hkscs",
    "iso-8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252", "us-ascii": "cp1252", "ascii": "cp1252",
    "ks_c_5601-1987": "cp949", "euc-kr": "cp949",
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932",
    "utf8": "utf-8", "unicode-1-1-utf-8": "utf-8",
}
# ISO-2022-JP mail from Windows carries NEC/IBM extensions (circled digits) that the strict
# codec rejects; these supersets are tried in order.
_JIS = ("iso2022_jp", "iso2022_jp_2", "iso2022_jp_ext", "iso2022_jp_3")


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    label = label.strip().strip('"').lower()
    label = _SUPERSETS.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def decode_bytes(data: bytes, label: str | None, fallbacks: list[str] | tuple[str, ...] = ("utf-8", "gb18030", "cp1252")) -> tuple[str, str | None]:
    """Decode ``data`` labelled ``label``; returns (text, problem). Never raises: a wrong
    or missing label falls back to ``fallbacks`` and, last, to replacement characters."""
    codec = _codec(label)
    if data.isascii() and codec is None:
        return data.decode("ascii"), None
    shown = (label or "")[:40]
    labelled: tuple[str, ...] = _JIS if codec == "iso2022_jp" else (codec,) if codec else ()
    if codec not in (None, "utf-8") and not data.isascii():
        # Valid UTF-8 with non-ASCII bytes is almost never text in a legacy charset (GBK
        # and Latin-1 bytes rarely form UTF-8 sequences), while mislabelled UTF-8 is
        # common: trust the bytes over the label.
        try:
            return data.decode("utf-8"), f"labelled {shown} but is utf-8"
        except UnicodeDecodeError:
            pass
    name: str | None  # a codec name; the fallback loop below may find none
    for name in labelled:
        try:
            return data.decode(name), None
        except (UnicodeDecodeError, LookupError):
            continue
    if labelled:
        # A truncated or slightly damaged body in the right charset is better read in that
        # charset with a few replacement characters than as mojibake of another.
        text = data.decode(labelled[-1] if codec == "iso2022_jp" else labelled[0], errors="replace")
        if text.count("\ufffd") <= max(2, len(text) // 200):
            return text, f"invalid {shown} bytes replaced"
    for fb in fallbacks:
        name = _codec(fb)
        if not name or name in labelled:
            continue
        try:
            text = data.decode(name)
        except (UnicodeDecodeError, LookupError):
            continue
        return text, (f"unknown charset {shown!r}, decoded as {name}" if label and codec is None
                      else f"not valid {shown}, decoded as {name}" if label else None)
    return data.decode(codec or "utf-8", errors="replace"), "undecodable bytes replaced"


_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def unescape_8bit(value: str, fallbacks: list[str] | tuple[str, ...] = ("utf-8", "gb18030", "cp1252")) -> str:
    """``value`` with raw 8-bit header bytes (which the email package hands out as lone
    surrogate escapes) decoded as undeclared UTF-8 or a fallback charset. Nothing with a
    lone surrogate may go further: it cannot be encoded as UTF-8, so a KV key, a record or
    the published message built from it would fail on every retry of the mail."""
    if not any("\udc80" <= c <= "\udcff" for c in value):
        return value
    return decode_bytes(value.encode("utf-8", "surrogateescape"), None, fallbacks)[0]


def decode_header_value(raw: str, fallbacks: list[str] | tuple[str, ...] = ("utf-8", "gb18030", "cp1252")) -> str:
    """Decode a raw header value: RFC 2047 encoded words in any charset (GB2312-labelled
    words as GB18030) and raw 8-bit bytes (undeclared UTF-8 or GBK), unfolded."""
    value = unescape_8bit(re.sub(r"\r?\n[ \t]+", " ", raw).strip(), fallbacks)
    if not value:
        return ""
    if "=?" not in value or not _ENCODED_WORD.search(value):
        return value
    try:
        chunks = email.header.decode_header(value)
    except (ValueError, IndexError, AssertionError, UnicodeError, email.errors.HeaderParseError):
        # A damaged encoded word (bad base64) is shown as written, not a reason to refuse the mail.
        return value
    out: list[str] = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            out.append(decode_bytes(chunk, charset, fallbacks)[0])
    return "".join(out)


def html_to_text(html: str) -> str:
    """A plain-text rendering of an HTML body (inscriptis keeps paragraphs, lists and
    table layout, drops script and style)."""
    if not html.strip():
        return ""
    try:
        text = get_text(html)
    except Exception:  # noqa: BLE001 - a hostile document must not stop the message
        text = re.sub(r"<[^>]*>", " ", html)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- quoted replies and signatures -------------------------------------------------

_ATTRIBUTION = re.compile(
    r"^\s*(?:"
    r"On\s.{1,300}\swrote:"                                  # Gmail, Apple Mail, Thunderbird
    r"|Le\s.{1,300}\sa\sécrit\s?:"                           # French
    r"|Am\s.{1,300}\sschrieb\s.{0,200}:"                     # German
    r"|.{0,200}(?:写道|寫道)[：:]"                             # Chinese clients ("在 … 写道：")
    r"|-{2,}\s*(?:Original Message|Forwarded message|原始邮件|原始郵件|转发的邮件|Ursprüngliche Nachricht)\s*-{2,}"
    r")\s*$",
    re.IGNORECASE,
)
_HEADER_BLOCK = re.compile(r"^\s*\*?(?:From|发件人|寄件者|寄件人|De|Von|Van)\s*\*?\s*[:：]", re.IGNORECASE)
_SIGNATURE = re.compile(
    r"^(?:-- ?|--|"
    r"Sent from my .{1,40}|Get Outlook for .{1,40}|发自我的.{1,30}|來自我的.{1,30}|从我的.{1,30}发送"
    r")\s*$",
    re.IGNORECASE,
)


def split_reply(text: str) -> tuple[str, str | None, str | None]:
    """Split a plain-text body into (new text, quoted thread, signature). Conservative: a
    body without a recognisable quote or signature marker is returned whole as new text."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    cut = None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        joined = line if i + 1 >= len(lines) else line + " " + lines[i + 1]
        if _ATTRIBUTION.match(line):
            cut = i
            break
        # "On Mon, 1 Jan 2024 at 10:00, Someone <a@b>\nwrote:" wraps over two lines.
        if _ATTRIBUTION.match(joined) and lines[i + 1].strip().lower().endswith(("wrote:", "写道：", "写道:")):
            cut = i
            break
        # An Outlook header block ("From: … / Sent: … / To: …") after a blank line or
        # after Outlook's rule of underscores.
        if re.fullmatch(r"\s*_{10,}\s*", line) and _looks_like_header_block(lines, i + 1):
            cut = i
            break
        if _HEADER_BLOCK.match(line) and i > 0 and not lines[i - 1].strip() and _looks_like_header_block(lines, i):
            cut = i
            break
        if line.lstrip().startswith(">") and all(not rest.strip() or rest.lstrip().startswith(">") for rest in lines[i:]):
            cut = i
            break
    quoted = None
    if cut is not None:
        quoted = "\n".join(lines[cut:]).strip("\n") or None
        lines = lines[:cut]
    signature = None
    for i, line in enumerate(lines):
        if _SIGNATURE.match(line):
            rest = "\n".join(lines[i:]).strip("\n")
            # A "signature" of most of the message is more likely a false positive.
            if len(lines) - i <= 15:
                signature = rest or None
                lines = lines[:i]
                break
    new = "\n".join(lines).strip()
    return new, quoted, signature


def _looks_like_header_block(lines: list[str], i: int) -> bool:
    if i >= len(lines) or not _HEADER_BLOCK.match(lines[i]):
        return False
    following = " ".join(lines[i:i + 6]).lower()
    return any(k in following for k in ("sent:", "date:", "to:", "subject:", "发送时间", "收件人", "主题", "日期", "寄件日期", "主旨"))
