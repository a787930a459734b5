"""Sending an outbound through the Bot API: text split to Telegram's length, media,
quoting, the survey keyboard, per-chat and per-bot rate limits, and Telegram's errors
mapped to :class:`DeliveryError` with fixed codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import msgspec
import telegram
import telegram.error

from gateway import (
    AudioPart,
    ChannelContext,
    Conversation,
    DeliveryError,
    FilePart,
    ImagePart,
    LocationPart,
    Outbound,
    RateLimiter,
    Receipt,
    TextPart,
    VideoPart,
    stable_id,
    transport_error,
)

from ._config import TelegramConfig

MAX_TEXT = 4096
"""Telegram's limit for one text message, in UTF-16 code units."""
_VOICE_TYPES = frozenset({"audio/ogg", "audio/opus", "audio/mpeg", "audio/mp4", "audio/x-m4a"})
_FORBIDDEN_CODES = (("blocked by the user", "blocked"), ("user is deactivated", "user_deactivated"),
                    ("kicked", "kicked"), ("not a member", "kicked"))
_BAD_REQUEST_CODES = (("chat not found", "chat_not_found"), ("too long", "too_long"),
                      ("wrong file identifier", "bad_media"), ("wrong remote file", "bad_media"),
                      ("failed to get http url content", "bad_media"), ("wrong type of the web page", "bad_media"),
                      ("not enough rights", "not_allowed"), ("have no rights", "not_allowed"))
# How long what a send needs to finish or be answered is kept.
_PROGRESS_TTL = 86400.0
_QUOTE_TTL = 7 * 86400.0


class Refused(msgspec.Struct, frozen=True, kw_only=True):
    """State record ``refused:<chat id>``: Telegram refused the bot this chat for good
    (blocked by the user, kicked from the group) until the customer or group comes back."""

    code: str
    at: datetime
    date: int = 0
    """The ``my_chat_member`` update's date that set it (0 when a send's 403 did)."""


class Quoted(msgspec.Struct, frozen=True, kw_only=True):
    """State record ``msg:<gateway id>``: the Telegram message an inbound message was."""

    chat_id: str
    message_id: int


class SurveyRecord(msgspec.Struct, kw_only=True):
    """State record ``survey:<key>``: the keyboard of a survey, for its callback queries."""

    outbound_id: str
    chat_id: str
    choices: list[str]
    until: datetime
    answered: int | None = None


class _Progress(msgspec.Struct, kw_only=True):
    done: int
    first: str = ""


class _Migrated(msgspec.Struct, frozen=True, kw_only=True):
    chat_id: str


@dataclass
class _Step:
    method: str
    args: dict[str, Any] = field(default_factory=dict)


def delivery_error(exc: telegram.error.TelegramError, token: str) -> DeliveryError:
    """The :class:`DeliveryError` for a python-telegram-bot exception. 403s and 400s are
    permanent (``blocked``, ``kicked``, ``user_deactivated``, ``forbidden``;
    ``chat_not_found``, ``too_long``, ``bad_media``, ``not_allowed``, ``bad_request``); flood
    control (429) is transient with Telegram's ``retry_after``; the rest is transient
    (``unauthorized``, ``conflict``, ``unreachable`` and ``timeout`` when no answer came,
    ``server_error`` for a 5xx, ``api_error``)."""
    text = str(exc.message).replace(token, "<token>")
    lowered = text.lower()
    if isinstance(exc, telegram.error.RetryAfter):
        seconds = _retry_after(exc)
        return DeliveryError(f"Telegram flood control: retry after {seconds:g} s", permanent=False,
                             code="rate_limited", retry_after=seconds)
    if isinstance(exc, telegram.error.Forbidden):
        code = next((c for words, c in _FORBIDDEN_CODES if words in lowered), "forbidden")
        return DeliveryError(f"Telegram refused: {text}", permanent=True, code=code)
    if isinstance(exc, telegram.error.BadRequest):
        code = next((c for words, c in _BAD_REQUEST_CODES if words in lowered), "bad_request")
        return DeliveryError(f"Telegram refused: {text}", permanent=True, code=code)
    if isinstance(exc, telegram.error.InvalidToken):
        return DeliveryError("Telegram does not accept the bot token", permanent=False, code="unauthorized")
    if isinstance(exc, telegram.error.Conflict):
        return DeliveryError(f"Telegram: {text}", permanent=False, code="conflict")
    if isinstance(exc, telegram.error.NetworkError) and isinstance(exc.__cause__, httpx.TransportError):
        # No answer came: the toolkit's two codes, unreachable (not sent) or timeout (may be).
        return transport_error(exc.__cause__, provider="Telegram Bot API")
    if isinstance(exc, telegram.error.TimedOut):
        return DeliveryError("Telegram Bot API did not answer in time", permanent=False, code="timeout")
    if isinstance(exc, telegram.error.NetworkError):
        return DeliveryError(f"Telegram failing: {text}", permanent=False, code="server_error")
    return DeliveryError(f"Telegram: {text}", permanent=False, code="api_error")


def _retry_after(exc: telegram.error.RetryAfter) -> float:
    value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def split_text(text: str, limit: int = MAX_TEXT) -> list[str]:
    """``text`` in pieces of at most ``limit`` UTF-16 code units (how Telegram counts),
    cut after a newline, else a space, in the second half of a piece."""
    pieces: list[str] = []
    while text:
        units = 0
        cut = len(text)
        for i, ch in enumerate(text):
            units += 2 if ord(ch) > 0xFFFF else 1
            if units > limit:
                cut = i
                break
        if cut < len(text):
            soft = text.rfind("\n", 0, cut)
            if soft <= cut // 2:
                soft = text.rfind(" ", 0, cut)
            if soft > cut // 2:
                cut = soft + 1
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces


def survey_key(outbound_id: str) -> str:
    """The short key of a survey in its buttons' ``callback_data`` (at most 64 bytes)."""
    return stable_id("survey", outbound_id, n=20)


def keyboard(key: str, choices: list[str]) -> telegram.InlineKeyboardMarkup:
    """One button per choice (in one row when they are short), ``callback_data`` =
    ``sv:<key>:<index>``."""
    buttons = [telegram.InlineKeyboardButton(c, callback_data=f"sv:{key}:{i}") for i, c in enumerate(choices)]
    if sum(len(c) for c in choices) <= 24 and len(choices) <= 4:
        return telegram.InlineKeyboardMarkup([buttons])
    return telegram.InlineKeyboardMarkup([[b] for b in buttons])


class Outbox:
    """The sending side of a ``telegram`` channel."""

    def __init__(self, ctx: ChannelContext, cfg: TelegramConfig, bot: telegram.Bot) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.bot = bot
        # Bursts of one: "N per window" spaced evenly, never N at once and N more after.
        self.chat_limit = RateLimiter(cfg.per_chat_per_second, burst=1)
        self.group_limit = RateLimiter(cfg.per_group_per_minute, per=60.0, burst=1)
        self.bot_limit = RateLimiter(cfg.per_bot_per_second, burst=1)

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        route = conversation.route
        chat = route.get("chat_id")
        if not isinstance(chat, str) or not chat:
            raise DeliveryError("conversation has no Telegram chat to answer", permanent=True, code="no_route")
        chat_type = str(route.get("chat_type") or "private")
        if chat_type == "group":
            moved = await self.ctx.state.get_record(f"migrated:{chat}", _Migrated)
            chat = moved.chat_id if moved is not None else chat
        steps = await self._steps(outbound)
        if outbound.survey is not None and self.cfg.survey_buttons:
            key = survey_key(outbound.id)
            until = datetime.now(timezone.utc) + timedelta(seconds=outbound.survey.answer_within)
            # Stored before the keyboard is sent: a tap may come back before deliver returns.
            await self.ctx.state.put_record(f"survey:{key}", SurveyRecord(
                outbound_id=outbound.id, chat_id=chat, choices=list(outbound.survey.choices), until=until),
                ttl=outbound.survey.answer_within + 3600)
            steps[-1].args["reply_markup"] = keyboard(key, list(outbound.survey.choices))
        quote = await self._quote(outbound, conversation, chat)
        if quote is not None:
            steps[0].args["reply_parameters"] = telegram.ReplyParameters(quote, allow_sending_without_reply=True)
        thread = route.get("thread_id")
        progress_key = f"progress:{outbound.id}"
        progress = await self.ctx.state.get_record(progress_key, _Progress) if len(steps) > 1 else None
        done, first = (progress.done, progress.first) if progress is not None else (0, "")
        for step in steps[done:]:
            if thread:
                step.args["message_thread_id"] = int(thread)
            sent, chat = await self._send(step, chat, chat_type)
            done += 1
            first = first or str(sent.message_id)
            if len(steps) > 1 and done < len(steps):
                # A retry after a failure further on does not send this one again.
                await self.ctx.state.put_record(progress_key, _Progress(done=done, first=first), ttl=_PROGRESS_TTL)
        return Receipt(provider_id=f"{chat}:{first}", meta={"messages": len(steps)})

    async def _send(self, step: _Step, chat: str, chat_type: str) -> tuple[telegram.Message, str]:
        """One Bot API call, paced; a group that became a supergroup is followed once."""
        for _ in range(2):
            # Slowest first: by the time the group's turn comes the chat's is due, and the
            # bot's wait (1/30 s at most) is all that lies between a token and its send.
            if chat_type in ("group", "supergroup"):
                await self.group_limit.acquire(chat)
            await self.chat_limit.acquire(chat)
            await self.bot_limit.acquire()
            try:
                result = await getattr(self.bot, step.method)(chat_id=int(chat), **step.args)
            except telegram.error.ChatMigrated as exc:
                new = str(exc.new_chat_id)
                self.ctx.log.info("group became a supergroup; following it", chat_type=chat_type)
                await self.ctx.state.put_record(f"migrated:{chat}", _Migrated(chat_id=new))
                chat, chat_type = new, "supergroup"
                continue
            except telegram.error.TelegramError as exc:
                err = delivery_error(exc, self.cfg.token)
                if err.permanent and err.code in ("blocked", "kicked", "user_deactivated", "forbidden"):
                    await self.ctx.state.put_record(f"refused:{chat}", Refused(code=err.code or "forbidden",
                                                                               at=datetime.now(timezone.utc)))
                raise err from exc
            assert isinstance(result, telegram.Message)
            return result, chat
        raise DeliveryError("the group moved twice while sending", permanent=False, code="chat_migrated")

    async def _quote(self, outbound: Outbound, conversation: Conversation, chat: str) -> int | None:
        """The customer's message a reply quotes: the one it answers (``in_reply_to``),
        else the conversation's last one."""
        if not self.cfg.quote_reply or outbound.kind != "reply":
            return None
        last = conversation.route.get("message_id")
        if outbound.in_reply_to and outbound.in_reply_to != conversation.last_message_id:
            found = await self.ctx.state.get_record(f"msg:{outbound.in_reply_to}", Quoted)
            return found.message_id if found is not None and found.chat_id == conversation.route.get("chat_id") \
                else None
        return int(last) if isinstance(last, str) and last.isdigit() else None

    async def _steps(self, outbound: Outbound) -> list[_Step]:
        """One Bot API call per message to send, in the outbound's order."""
        steps: list[_Step] = []
        for part in outbound.parts:
            if isinstance(part, TextPart):
                steps += [_Step("send_message", {"text": piece}) for piece in split_text(part.text) if piece.strip()]
            elif isinstance(part, LocationPart):
                steps.append(_Step("send_location", {"latitude": part.latitude, "longitude": part.longitude}))
            elif isinstance(part, (ImagePart, FilePart, AudioPart, VideoPart)):
                steps.append(await self._media_step(part))
            else:
                raise DeliveryError(f"Telegram cannot send a {part.__struct_config__.tag} part", permanent=True,
                                    code="unsupported_content")
        if not steps:
            raise DeliveryError("nothing Telegram can send in this outbound", permanent=True, code="empty")
        return steps

    async def _media_step(self, part: ImagePart | FilePart | AudioPart | VideoPart) -> _Step:
        if isinstance(part, ImagePart):
            method, arg = "send_photo", "photo"
        elif isinstance(part, AudioPart):
            voice = (part.content_type or "").split(";")[0].strip() in _VOICE_TYPES and not part.filename
            method, arg = ("send_voice", "voice") if voice else ("send_audio", "audio")
        elif isinstance(part, VideoPart):
            method, arg = "send_video", "video"
        else:
            method, arg = "send_document", "document"
        content: Any
        if part.data is not None or part.ref is not None:
            content = telegram.InputFile(await self.ctx.part_bytes(part), filename=part.filename)
        elif part.url and part.url.startswith(("http://", "https://")):
            content = part.url  # Telegram fetches it
        elif part.media_id:
            content = part.media_id  # a Telegram file_id, sent again without uploading
        else:
            raise DeliveryError(f"{part.__struct_config__.tag} part has no content, URL or file id", permanent=True,
                                code="unsupported_content")
        return _Step(method, {arg: content})
