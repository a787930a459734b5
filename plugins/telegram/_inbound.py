"""Reading a Telegram message (python-telegram-bot's types) into what the channel
publishes: pure, no network. Media are described here and downloaded by the channel."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import telegram

from gateway import LocationPart, Part, Participant, UnknownPart

MediaKind = Literal["image", "file", "audio", "video"]

# Message fields that carry content we do not map to a part of our own: kept as an
# ``unknown`` part naming the kind, so a backend sees that something came.
_OTHER = ("sticker", "animation", "contact", "poll", "dice", "game", "story", "checklist")


@dataclass(frozen=True)
class Media:
    """A file in a message, to be fetched with ``getFile``."""

    kind: MediaKind
    file_id: str
    size: int | None = None
    content_type: str | None = None
    filename: str | None = None
    duration: float | None = None


@dataclass
class Parsed:
    """A customer's message, read."""

    native: str
    """The conversation's natural key: the chat id, ``<chat id>:<topic id>`` in a forum topic."""
    sender: Participant
    provider_id: str
    text: str
    media: list[Media]
    other: list[Part]
    route: dict[str, str]
    meta: dict[str, Any]
    sent_at: datetime | None
    in_reply_to: str | None
    edit_of: str | None = None
    """The provider id of the message this edit changes."""
    chat_id: str = ""
    chat_type: str = ""
    addressed: bool | None = field(default=True)
    """In a group: does it mention the bot or reply to it (None: it mentions someone and
    the bot's username is not known yet)."""


def missing_field(update: telegram.Update) -> str | None:
    """The first field the channel needs that ``update`` lacks (python-telegram-bot reads
    an absent required field as None), or None when it has them all."""
    checks: list[tuple[str, Any]] = []
    for kind in ("message", "edited_message"):
        msg = getattr(update, kind)
        if msg is not None:
            checks += [(f"{kind}.chat", msg.chat), (f"{kind}.date", msg.date), (f"{kind}.message_id", msg.message_id)]
    cq = update.callback_query
    if cq is not None:
        checks += [("callback_query.id", cq.id), ("callback_query.from", cq.from_user)]
        if cq.message is not None:
            checks.append(("callback_query.message.chat", cq.message.chat))
    member = update.my_chat_member
    if member is not None:
        checks += [("my_chat_member.chat", member.chat), ("my_chat_member.date", member.date),
                   ("my_chat_member.new_chat_member", member.new_chat_member)]
    return next((name for name, value in checks if value is None), None)


def provider_id(bot_id: int, chat_id: int, message_id: int) -> str:
    """The provider id of a message: unique per bot, chat and message (Telegram's message
    ids count per chat), the same for every retry of its update."""
    return f"{bot_id}:{chat_id}:{message_id}"


def native_key(msg: telegram.Message) -> str:
    """The conversation key of the chat (and forum topic) ``msg`` is in."""
    if msg.is_topic_message and msg.message_thread_id is not None:
        return f"{msg.chat.id}:{msg.message_thread_id}"
    return str(msg.chat.id)


def route_of(msg: telegram.Message) -> dict[str, str]:
    """What a reply into ``msg``'s chat needs (ids as strings: group ids exceed 2**31)."""
    route = {"chat_id": str(msg.chat.id), "chat_type": msg.chat.type, "message_id": str(msg.message_id)}
    if msg.is_topic_message and msg.message_thread_id is not None:
        route["thread_id"] = str(msg.message_thread_id)
    return route


def sender_of(msg: telegram.Message) -> Participant:
    """The customer: the user, or the chat a message was sent on behalf of (an anonymous
    group admin, a linked channel)."""
    if msg.sender_chat is not None:
        return Participant(id=str(msg.sender_chat.id), name=msg.sender_chat.title or None)
    user = msg.from_user
    if user is None:
        return Participant(id=str(msg.chat.id))
    return Participant(id=str(user.id), name=user.full_name or None)


def is_group(chat_type: str) -> bool:
    """Group and supergroup chats (where the group filter applies)."""
    return chat_type in ("group", "supergroup")


def addressed_to_bot(msg: telegram.Message, bot_id: int, username: str) -> bool | None:
    """Does a group message mention the bot (``@username``, a text mention of its user,
    ``/command@username``) or reply to one of its messages? None when it mentions someone
    and ``username`` is unknown (empty)."""
    replied = msg.reply_to_message
    if replied is not None and replied.from_user is not None and replied.from_user.id == bot_id:
        return True
    undecided = False
    for entity, text in {**msg.parse_entities(), **msg.parse_caption_entities()}.items():
        if entity.type == "text_mention" and entity.user is not None and entity.user.id == bot_id:
            return True
        if entity.type in ("mention", "bot_command"):
            if not username:
                undecided = True
                continue
            if entity.type == "mention" and text[1:].casefold() == username.casefold():
                return True
            if entity.type == "bot_command" and text.casefold().endswith("@" + username.casefold()):
                return True
    return None if undecided else False


def _strip_mention(text: str, username: str) -> str:
    """The text without a leading ``@username`` (how a group addresses the bot)."""
    if username:
        head = text.lstrip()
        mention = "@" + username
        if head[:len(mention)].casefold() == mention.casefold():
            return head[len(mention):].lstrip(" ,:")
    return text


def _size(obj: Any) -> int | None:
    size = getattr(obj, "file_size", None)
    return size if isinstance(size, int) else None


def _duration(obj: Any) -> float | None:
    # Read from the dict form: the attribute warns about its coming type change.
    value = obj.to_dict().get("duration")
    return float(value) if isinstance(value, (int, float)) else None


def media_of(msg: telegram.Message, max_size: int) -> list[Media]:
    """The files of ``msg``. Of a photo's sizes, the largest within ``max_size`` (else the
    smallest, which is then not copied)."""
    out: list[Media] = []
    if msg.photo:
        sizes = sorted(msg.photo, key=lambda p: (p.file_size or 0, p.width * p.height))
        fitting = [p for p in sizes if (p.file_size or 0) <= max_size]
        best = fitting[-1] if fitting else sizes[0]
        out.append(Media("image", best.file_id, _size(best), "image/jpeg"))
    if msg.document is not None:
        d = msg.document
        out.append(Media("file", d.file_id, _size(d), d.mime_type, d.file_name))
    if msg.voice is not None:
        v = msg.voice
        out.append(Media("audio", v.file_id, _size(v), v.mime_type or "audio/ogg", None, _duration(v)))
    if msg.audio is not None:
        a = msg.audio
        out.append(Media("audio", a.file_id, _size(a), a.mime_type, a.file_name, _duration(a)))
    if msg.video is not None:
        vd = msg.video
        out.append(Media("video", vd.file_id, _size(vd), vd.mime_type, vd.file_name, _duration(vd)))
    if msg.video_note is not None:
        vn = msg.video_note
        out.append(Media("video", vn.file_id, _size(vn), "video/mp4", None, _duration(vn)))
    return out


def others_of(msg: telegram.Message) -> list[Part]:
    """Parts for content that is neither text nor a file: a location, or an ``unknown``
    part naming what it was (a sticker, a poll ...)."""
    parts: list[Part] = []
    if msg.location is not None and msg.venue is None:
        parts.append(LocationPart(latitude=msg.location.latitude, longitude=msg.location.longitude))
    if msg.venue is not None:
        parts.append(LocationPart(latitude=msg.venue.location.latitude, longitude=msg.venue.location.longitude,
                                  label=msg.venue.title))
    for kind in _OTHER:
        value = getattr(msg, kind, None)
        if value:
            raw: dict[str, Any] = {"type": kind}
            emoji = getattr(value, "emoji", None)
            if isinstance(emoji, str):
                raw["emoji"] = emoji
            parts.append(UnknownPart(raw=raw))
    return parts


def parse_message(msg: telegram.Message, *, bot_id: int, username: str, update_id: int, edited: bool,
                  max_media_size: int) -> Parsed | None:
    """``msg`` read, or None when it carries nothing a customer wrote (a service message:
    someone joined, the title changed ...)."""
    text = msg.text if msg.text is not None else (msg.caption or "")
    media = media_of(msg, max_media_size)
    other = others_of(msg)
    if not text and not media and not other:
        return None
    chat_id, chat_type = msg.chat.id, msg.chat.type
    addressed: bool | None = True
    if is_group(chat_type):
        addressed = addressed_to_bot(msg, bot_id, username)
        text = _strip_mention(text, username) or text
    pid = provider_id(bot_id, chat_id, msg.message_id)
    meta: dict[str, Any] = {"update_id": str(update_id), "chat_type": chat_type, "message_id": str(msg.message_id)}
    if is_group(chat_type) and msg.chat.title:
        meta["chat_title"] = msg.chat.title
    if msg.from_user is not None:
        if msg.from_user.username:
            meta["username"] = msg.from_user.username
        if msg.from_user.language_code:
            meta["language_code"] = msg.from_user.language_code
    edit_of = None
    if edited:
        stamp = int((msg.edit_date or msg.date).timestamp())
        edit_of, pid = pid, f"{pid}:edit:{stamp}"
        meta["edited"] = True
        meta["edited_at"] = stamp
    replied = msg.reply_to_message
    return Parsed(
        native=native_key(msg), sender=sender_of(msg), provider_id=pid, text=text, media=media, other=other,
        route=route_of(msg), meta=meta, sent_at=msg.date,
        in_reply_to=provider_id(bot_id, chat_id, replied.message_id) if replied is not None else None,
        edit_of=edit_of, chat_id=str(chat_id), chat_type=chat_type, addressed=addressed)
