"""WeChat callback fields → gateway parts, provider id and meta."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from gateway import (
    AudioPart,
    EventPart,
    ImagePart,
    LinkPart,
    LocationPart,
    Part,
    TextPart,
    UnknownPart,
    VideoPart,
)

_VOICE_TYPES = {"amr": "audio/amr", "speex": "audio/speex", "mp3": "audio/mpeg"}
# Fields every callback has; they become Message fields, not part data.
_ENVELOPE = {"ToUserName", "FromUserName", "CreateTime", "MsgType", "MsgId", "Event", "EventKey"}


class FieldError(ValueError):
    """A field is missing or unusable; the text names the field, never its value."""


@dataclass
class Inbound:
    """One callback, normalized."""

    openid: str
    account: str
    msg_type: str
    provider_id: str
    parts: list[Part]
    sent_at: datetime | None
    meta: dict[str, Any] = field(default_factory=dict)
    media: list[tuple[str, str]] = field(default_factory=list)
    """(media_id, kind) to copy into the object store in the background."""


def _s(fields: dict[str, str], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _float(fields: dict[str, str], name: str, bound: float | None = None) -> float | None:
    """A finite number (within ``±bound``), or None. ``float()`` also accepts ``nan`` and
    ``inf``, which JSON cannot carry (they would be published as ``null``)."""
    value = _s(fields, name)
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    if number is None or not math.isfinite(number) or (bound is not None and abs(number) > bound):
        return None
    return number


# WeChat's CreateTime is Unix seconds (32-bit). Anything outside [2000, 2100) is not a time
# WeChat sent: a 13-digit value would be milliseconds, 20 digits overflow datetime.
_CREATE_TIME_MIN, _CREATE_TIME_MAX = 946684800, 4102444800


def sent_at(fields: dict[str, str]) -> datetime | None:
    """``CreateTime`` as a UTC time, or None when it is missing or implausible. Not a
    reason to refuse the message: WeChat answers anything but ``success`` by telling the
    customer the account cannot serve them, and the content is what matters; the
    gateway's own ``received_at`` is always there."""
    created = _s(fields, "CreateTime")
    if not created or not created.isdigit() or len(created) > 12:
        return None
    value = int(created)
    if not _CREATE_TIME_MIN <= value < _CREATE_TIME_MAX:
        return None
    return datetime.fromtimestamp(value, timezone.utc)


def provider_id(fields: dict[str, str]) -> str:
    """The id WeChat's retries share: ``MsgId`` for messages; for events (which have
    none) ``FromUserName`` + ``CreateTime`` as WeChat recommends, plus the event name so
    two different events of one second stay apart."""
    msg_id = _s(fields, "MsgId")
    if msg_id:
        return msg_id
    return "event:{}:{}:{}".format(_s(fields, "FromUserName") or "", _s(fields, "CreateTime") or "",
                                   (_s(fields, "Event") or "").lower())


def normalize(fields: dict[str, str]) -> Inbound:
    """Map a decrypted callback to parts. Unknown message types keep every field in an
    :class:`UnknownPart`; unknown events are still :class:`EventPart`\\ s (their fields
    in ``data``). Raises :class:`FieldError` when the sender is missing (ValueError for
    other unusable values)."""
    openid = _s(fields, "FromUserName")
    if not openid:
        raise FieldError("FromUserName missing")
    msg_type = (_s(fields, "MsgType") or "").lower()
    meta: dict[str, Any] = {"msg_type": msg_type}
    sent = sent_at(fields)
    if sent is None and _s(fields, "CreateTime"):
        meta["create_time_invalid"] = True
    parts: list[Part] = []
    media: list[tuple[str, str]] = []
    media_id = _s(fields, "MediaId")
    if msg_type == "text":
        parts.append(TextPart(text=fields.get("Content", "")))
        for extra in ("MsgDataId", "Idx", "bizmsgmenuid"):
            if _s(fields, extra):
                meta[extra.lower()] = _s(fields, extra)
    elif msg_type == "image":
        parts.append(ImagePart(url=_s(fields, "PicUrl"), media_id=media_id))
        if media_id:
            media.append((media_id, "image"))
    elif msg_type == "voice":
        fmt = (_s(fields, "Format") or "").lower()
        recognition = fields.get("Recognition")
        parts.append(AudioPart(media_id=media_id, content_type=_VOICE_TYPES.get(fmt),
                               recognition=recognition if recognition and recognition.strip() else None))
        if fmt:
            meta["format"] = fmt
        if media_id:
            media.append((media_id, "voice"))
    elif msg_type in ("video", "shortvideo"):
        parts.append(VideoPart(media_id=media_id, thumb_media_id=_s(fields, "ThumbMediaId")))
        if media_id:
            media.append((media_id, "video"))
    elif msg_type == "location":
        lat, lng = _float(fields, "Location_X", 90), _float(fields, "Location_Y", 180)
        if lat is None or lng is None:
            # Not a position (missing, not a number, not finite, out of range): kept, as
            # every field, in an unknown part rather than published as a wrong location.
            parts.append(UnknownPart(raw=dict(fields)))
            meta["location_invalid"] = True
        else:
            parts.append(LocationPart(latitude=lat, longitude=lng, label=fields.get("Label") or None,
                                      scale=_float(fields, "Scale")))
    elif msg_type == "link":
        parts.append(LinkPart(url=_s(fields, "Url") or "", title=fields.get("Title") or None,
                              description=fields.get("Description") or None))
    elif msg_type == "event":
        event = (_s(fields, "Event") or "").lower()
        key = fields.get("EventKey") or None
        data = {k: v.strip() for k, v in fields.items() if k not in _ENVELOPE}
        parts.append(EventPart(event=event, key=key, data=data))
        meta["event"] = event
    else:
        parts.append(UnknownPart(raw=dict(fields)))
    pid = provider_id(fields)
    if _s(fields, "MsgId"):
        meta["msg_id"] = pid
    return Inbound(openid=openid, account=_s(fields, "ToUserName") or "", msg_type=msg_type, provider_id=pid,
                   parts=parts, sent_at=sent, meta=meta, media=media)
