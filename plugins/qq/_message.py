"""The OneBot v11 message model: segments in both wire forms (an array of
``{"type", "data"}`` objects, and a CQ-code string with CQ escaping), and their mapping
to the gateway's parts and back. Pure functions, no I/O.

CQ escaping (OneBot v11 ``message/string.md``): in text ``&`` ``[`` ``]`` become
``&amp;`` ``&#91;`` ``&#93;``; inside a CQ code's parameter values ``,`` becomes
``&#44;`` as well. So a customer who types ``[CQ:at,qq=all]`` arrives as
``&#91;CQ:at,qq=all&#93;`` and stays text; only an unescaped ``[CQ:...]`` is a segment."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from gateway import (
    AudioPart,
    EventPart,
    FilePart,
    ImagePart,
    Part,
    TextPart,
    UnknownPart,
    VideoPart,
)

__all__ = ["Segment", "Inbound", "cq_escape", "cq_unescape", "parse_cq", "to_cq", "parse_message", "to_parts",
           "plain_text"]


class Segment(msgspec.Struct, frozen=True):
    """One OneBot message segment. ``data`` values are strings in the CQ form and may be
    numbers or other JSON in the array form; they are kept as sent."""

    type: str
    data: dict[str, Any] = {}


_UNESCAPE = {"&amp;": "&", "&#91;": "[", "&#93;": "]", "&#44;": ","}
_UNESCAPE_RE = re.compile(r"&(?:amp|#91|#93|#44);")
# A CQ code: ``[CQ:`` name, then ``,key=value`` parameters, then ``]``. Values cannot hold
# an unescaped ``[`` ``]`` or ``,``; anything that does not match exactly is text.
_CQ_RE = re.compile(r"\[CQ:([A-Za-z0-9_.\-]+)((?:,[^,=\[\]]+(?:=[^,\[\]]*)?)*)\]")


def cq_escape(text: str, *, param: bool = False) -> str:
    """Escape text (``param``: a parameter value, which escapes ``,`` too)."""
    text = text.replace("&", "&amp;").replace("[", "&#91;").replace("]", "&#93;")
    return text.replace(",", "&#44;") if param else text


def cq_unescape(text: str) -> str:
    """Undo :func:`cq_escape` in one pass (``&amp;#91;`` is the text ``&#91;``)."""
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPE[m.group(0)], text)


def parse_cq(message: str) -> list[Segment]:
    """Segments of a CQ-code string; text between codes becomes ``text`` segments."""
    out: list[Segment] = []
    pos = 0
    for m in _CQ_RE.finditer(message):
        if m.start() > pos:
            out.append(Segment("text", {"text": cq_unescape(message[pos:m.start()])}))
        data: dict[str, Any] = {}
        for item in m.group(2).split(",")[1:]:
            key, _, value = item.partition("=")
            data[key] = cq_unescape(value)
        out.append(Segment(m.group(1), data))
        pos = m.end()
    if pos < len(message):
        out.append(Segment("text", {"text": cq_unescape(message[pos:])}))
    return out


def _str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return msgspec.json.encode(value).decode()


def to_cq(segments: list[Segment]) -> str:
    """The CQ-code string of segments (the inverse of :func:`parse_cq`)."""
    out = []
    for seg in segments:
        if seg.type == "text":
            out.append(cq_escape(_str(seg.data.get("text", ""))))
        else:
            params = "".join(f",{k}={cq_escape(_str(v), param=True)}" for k, v in seg.data.items())
            out.append(f"[CQ:{seg.type}{params}]")
    return "".join(out)


class MessageError(ValueError):
    """A ``message`` field that is neither a string nor an array of segments."""


def parse_message(message: Any) -> list[Segment]:
    """Segments of an event's ``message`` in either form (a string, an array of segment
    objects, or one segment object, as OneBot v11 allows)."""
    if isinstance(message, str):
        return parse_cq(message)
    if isinstance(message, dict):
        message = [message]
    if not isinstance(message, list):
        raise MessageError("message is neither a string nor an array of segments")
    out = []
    for item in message:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise MessageError("a message segment is not an object with a type")
        data = item.get("data")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise MessageError("a message segment's data is not an object")
        out.append(Segment(item["type"], data))
    return out


class Inbound(msgspec.Struct, kw_only=True):
    """What a message's segments mean to the gateway."""

    parts: list[Part]
    reply_to: str | None = None
    """The OneBot message id the customer quoted (a ``reply`` segment)."""
    at_bot: bool = False
    """The bot was @mentioned."""
    at_all: bool = False
    """Someone @mentioned everyone."""
    mentions: list[str] = []
    """QQ numbers @mentioned (the bot's own included), in order."""


def _media(seg: Segment) -> dict[str, Any]:
    d = seg.data
    url = d.get("url")
    fields: dict[str, Any] = {"url": url if isinstance(url, str) and url else None}
    file = d.get("file_id") or d.get("file")
    if isinstance(file, (str, int)) and not isinstance(file, bool) and str(file):
        fields["media_id"] = str(file)
    name = d.get("name") or d.get("file_name")
    if isinstance(name, str) and name:
        fields["filename"] = name
    size = d.get("file_size") or d.get("size")
    # Not a bool (an int to Python, refused as a size by the bus's decoders).
    if (isinstance(size, int) and not isinstance(size, bool) and size >= 0) or \
            (isinstance(size, str) and size.isascii() and size.isdigit()):
        fields["size"] = int(size)
    return fields


def to_parts(segments: list[Segment], self_id: str = "") -> Inbound:
    """Map segments to gateway parts. Adjacent text is joined; ``at`` and ``face`` become
    ``event`` parts in place (``at``: key = QQ number or ``all``, ``data.target`` =
    ``bot``/``user``/``all``); media become media parts with the implementation's
    ``url`` and ``file``; ``reply`` becomes :attr:`Inbound.reply_to`; ``forward`` an
    ``event`` part; any other segment an ``unknown`` part with its raw type and data."""
    parts: list[Part] = []
    result = Inbound(parts=parts)
    for seg in segments:
        d = seg.data
        if seg.type == "text":
            text = _str(d.get("text", ""))
            if parts and isinstance(parts[-1], TextPart):
                parts[-1] = TextPart(text=parts[-1].text + text)
            elif text:
                parts.append(TextPart(text=text))
        elif seg.type == "at":
            qq = _str(d.get("qq", ""))
            target = "all" if qq == "all" else "bot" if self_id and qq == self_id else "user"
            data = {"target": target}
            if isinstance(d.get("name"), str) and d["name"]:
                data["name"] = d["name"]
            parts.append(EventPart(event="at", key=qq, data=data))
            result.at_all |= target == "all"
            result.at_bot |= target == "bot"
            if target != "all":
                result.mentions = [*result.mentions, qq]
        elif seg.type == "face":
            parts.append(EventPart(event="face", key=_str(d.get("id", ""))))
        elif seg.type == "reply":
            result.reply_to = _str(d.get("id", "")) or None
        elif seg.type == "image":
            parts.append(ImagePart(**_media(seg)))
        elif seg.type == "record":
            parts.append(AudioPart(**_media(seg)))
        elif seg.type == "video":
            parts.append(VideoPart(**_media(seg)))
        elif seg.type == "file":
            parts.append(FilePart(**_media(seg)))
        elif seg.type == "forward":
            parts.append(EventPart(event="forward", key=_str(d.get("id", ""))))
        else:
            parts.append(UnknownPart(raw={"type": seg.type, "data": d}))
    return result


def plain_text(segments: list[Segment]) -> str:
    """The text of the message (what a keyword filter reads), without codes."""
    return "".join(_str(s.data.get("text", "")) for s in segments if s.type == "text")
