"""The ``telegram`` channel: updates in by webhook (``X-Telegram-Bot-Api-Secret-Token``
checked) or by long polling (one gateway process, under a lease, offset checkpointed),
replies out through python-telegram-bot's :class:`telegram.Bot`."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timezone
from typing import Any

import msgspec
import telegram
import telegram.error
from starlette.requests import Request
from starlette.responses import Response
from telegram.request import HTTPXRequest

from gateway import (
    AudioPart,
    Backoff,
    Channel,
    ChannelContext,
    ChoicePart,
    Conversation,
    DeliveryError,
    FilePart,
    GatewayError,
    ImagePart,
    Lease,
    Outbound,
    Part,
    Participant,
    Reach,
    Receipt,
    RequestError,
    SignatureError,
    Supervised,
    TextPart,
    VideoPart,
    tokens_equal,
)

from ._config import TelegramConfig
from ._inbound import Media, Parsed, is_group, missing_field, native_key, parse_message
from ._outbound import _QUOTE_TTL, Outbox, Quoted, Refused, SurveyRecord

ALLOWED_UPDATES = ["message", "edited_message", "callback_query", "my_chat_member"]
"""The update types the channel asks Telegram for (``setWebhook`` / ``getUpdates``)."""
_SECRET_HEADER = "x-telegram-bot-api-secret-token"
_OFFSET_KEY = "poll-offset"
_LEFT = frozenset({"kicked", "left"})



def _silence_library_log() -> None:
    """python-telegram-bot logs through the standard library, without a handler of its own:
    a batch it cannot read would reach stderr (Python's last-resort handler) or the
    application's root handlers with the raw updates, customers' names and words included.
    The channel reports what happened through its own redacted log instead. Done at each
    start: ``logging.config.dictConfig`` (uvicorn's, an application's) resets it."""
    log = logging.getLogger("telegram")
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    log.propagate = False


class TelegramAPIError(GatewayError):
    """A Bot API call of the receiving side failed (the bot token is never in the message)."""


class _Offset(msgspec.Struct, kw_only=True):
    offset: int


class TelegramChannel(Channel):
    """A Telegram bot: ``/channels/<name>/webhook`` (webhook mode) or ``getUpdates`` (polling
    mode) in; ``sendMessage``, ``sendPhoto`` ... out."""

    channel_type = "telegram"
    config_type = TelegramConfig
    supported_parts = frozenset({"text", "image", "file", "audio", "video", "location"})

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        self.cfg: TelegramConfig = ctx.config
        self.bot_id = int(self.cfg.token.split(":", 1)[0])
        self.username = self.cfg.username.lstrip("@")
        self.bot: telegram.Bot | None = None
        self.outbox: Outbox | None = None
        self.task: Supervised | None = None
        self.webhook_path = ""
        self._requests: list[HTTPXRequest] = []

    # --- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        _silence_library_log()
        timeout = cfg.api_timeout
        api = HTTPXRequest(connection_pool_size=16, connect_timeout=timeout, read_timeout=timeout,
                           write_timeout=timeout, pool_timeout=timeout, media_write_timeout=max(timeout, 60.0))
        poll = HTTPXRequest(connection_pool_size=1, connect_timeout=timeout, read_timeout=timeout,
                            write_timeout=timeout, pool_timeout=timeout)
        self._requests = [api, poll]
        base = cfg.api_base.rstrip("/")
        # The token goes into PTB's URLs only: never into a URL the gateway serves.
        self.bot = telegram.Bot(cfg.token, base_url=base + "/bot{token}", base_file_url=base + "/file/bot{token}",
                                request=api, get_updates_request=poll)
        self.outbox = Outbox(self.ctx, cfg, self.bot)
        if cfg.mode == "webhook":
            self.webhook_path = self.ctx.add_route("/webhook", self._webhook, max_body=cfg.max_body)
            self.task = Supervised(f"telegram-setup:{self.ctx.name}", self._setup, set_state=self.ctx.set_state,
                                   log=self.ctx.log, backoff=Backoff(1.0, 60.0))
            # Until getMe (and setWebhook) answered. Not in polling mode: a process waiting
            # for the lease is healthy, and the poller reports its own trouble.
            self.ctx.set_state("degraded", "connecting to the Bot API")
        else:
            lease = Lease(self.ctx.state, "poller-lease", cfg.lease_ttl)
            self.task = Supervised(f"telegram-poller:{self.ctx.name}", self._poll, set_state=self.ctx.set_state,
                                   log=self.ctx.log, lease=lease, backoff=Backoff(1.0, 60.0))
        self.task.start()

    async def stop(self) -> None:
        if self.task is not None:
            await self.task.stop()
        for request in self._requests:
            await request.shutdown()

    # --- receiving -----------------------------------------------------------------------

    async def _setup(self, task: Supervised) -> None:
        """Webhook mode: learn the bot's username, register the webhook if ``public_url``
        is set, then stay (the supervisor restarts this after an error, and would
        otherwise run it again)."""
        assert self.bot is not None
        await self._identify()
        if self.cfg.public_url:
            url = self.cfg.public_url.rstrip("/") + self.webhook_path
            await self._api(self.bot.set_webhook(url, secret_token=self.cfg.secret_token,
                                                 allowed_updates=ALLOWED_UPDATES))
        task.running()
        await asyncio.Event().wait()

    async def _poll(self, task: Supervised) -> None:
        """Polling mode, while this process holds the lease: ``getUpdates`` from the
        checkpointed offset; each update is published, then the offset moves past it."""
        assert self.bot is not None
        await self._identify()
        await self._api(self.bot.delete_webhook())  # getUpdates is refused while a webhook is set
        stored = await self.ctx.state.get_record(_OFFSET_KEY, _Offset)
        offset = stored.offset if stored is not None else None
        task.running()
        while True:
            try:
                updates = await self._api(self.bot.get_updates(
                    offset=offset, timeout=int(self.cfg.poll_timeout), allowed_updates=ALLOWED_UPDATES))
            except TelegramAPIError:
                raise
            except Exception as exc:  # noqa: BLE001 - the library could not read the batch
                updates, offset = await self._unreadable(offset, exc)
            for update in updates:
                try:
                    await self.handle(update)
                except RequestError as exc:
                    if exc.status >= 500:
                        raise  # try again (bus away, a file not fetched): the offset stays
                    self.ctx.log.warning("update refused and skipped", update_id=update.update_id, reason=exc.reason)
                    self.ctx.count("update_refused")
                offset = update.update_id + 1
                await self.ctx.state.put_record(_OFFSET_KEY, _Offset(offset=offset))

    async def _unreadable(self, offset: int | None, exc: Exception) -> tuple[list[telegram.Update], int | None]:
        """python-telegram-bot reads a ``getUpdates`` answer whole, so one update it cannot
        read would stop the poller for good. Asked one at a time, the first unconfirmed
        update comes alone: if it is readable it is returned, else it is skipped (logged,
        counted ``update_unreadable``) by moving the offset past it. Without a checkpoint
        its id is unknown: the error stands and the poller tries again."""
        assert self.bot is not None
        if offset is None:
            raise exc
        try:
            one = await self._api(self.bot.get_updates(offset=offset, limit=1, timeout=0,
                                                       allowed_updates=ALLOWED_UPDATES))
        except TelegramAPIError:
            raise
        except Exception as again:  # noqa: BLE001 - the update at the offset is the unreadable one
            self.ctx.log.warning("update unreadable by python-telegram-bot; skipped", at_offset=offset,
                                 error=type(again).__name__)
            self.ctx.count("update_unreadable")
            await self.ctx.state.put_record(_OFFSET_KEY, _Offset(offset=offset + 1))
            return [], offset + 1
        return list(one), offset

    async def _identify(self) -> None:
        if not self.username:
            assert self.bot is not None
            me = await self._api(self.bot.get_me())
            self.username = me.username or ""

    async def _api(self, call: Any) -> Any:
        """Await a Bot API call of the receiving side; its error without the token."""
        try:
            return await call
        except telegram.error.TelegramError as exc:
            raise TelegramAPIError(f"{type(exc).__name__}: {exc.message}".replace(self.cfg.token, "<token>")) from None

    async def _webhook(self, request: Request) -> Response:
        if not tokens_equal(request.headers.get(_SECRET_HEADER), self.cfg.secret_token):
            raise SignatureError("missing or wrong X-Telegram-Bot-Api-Secret-Token")
        try:
            data = json.loads(await request.body())
        except ValueError:
            raise RequestError("body is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("update_id"), int):
            raise RequestError("not a Telegram update: no integer update_id")
        if not any(kind in data for kind in ALLOWED_UPDATES):
            # Not parsed: a kind the channel does not handle must not be refused (Telegram
            # would retry it) because this library version reads its fields differently.
            self.ctx.count("update_ignored")
            return Response(status_code=200)
        try:
            update = telegram.Update.de_json(data, self.bot)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise RequestError("not a Telegram update: a field is missing or has the wrong type") from None
        await self.handle(update)
        return Response(status_code=200)

    async def handle(self, update: telegram.Update) -> None:
        """One update, from the webhook or the poller; returns once it is on the bus (or
        deliberately dropped). Raises :class:`RequestError` (400: not a valid update;
        503: try again later)."""
        missing = missing_field(update)
        if missing is not None:
            raise RequestError(f"not a Telegram update: {missing} is missing")
        if update.message is not None:
            await self._message(update.message, update.update_id, edited=False)
        elif update.edited_message is not None:
            if self.cfg.edits:
                await self._message(update.edited_message, update.update_id, edited=True)
            else:
                self.ctx.count("edit_ignored")
        elif update.callback_query is not None:
            await self._callback(update.callback_query, update.update_id)
        elif update.my_chat_member is not None:
            await self._member(update.my_chat_member)
        else:
            self.ctx.count("update_ignored")

    async def _message(self, msg: telegram.Message, update_id: int, *, edited: bool) -> None:
        parsed = parse_message(msg, bot_id=self.bot_id, username=self.username, update_id=update_id, edited=edited,
                               max_media_size=self.cfg.max_media_size)
        if parsed is None:
            self.ctx.count("service_message_ignored")
            return
        if is_group(parsed.chat_type):
            if self.cfg.group_messages == "none":
                self.ctx.count("group_message_ignored")
                return
            if self.cfg.group_messages == "mentions":
                if parsed.addressed is None:
                    raise RequestError("the bot's username is not known yet (getMe failed); try again", status=503)
                if not parsed.addressed:
                    self.ctx.count("group_message_ignored")
                    return
        await self._publish(parsed)

    async def _publish(self, parsed: Parsed) -> None:
        parts: list[Part] = []
        if parsed.text.strip():
            parts.append(TextPart(text=parsed.text))
        for media in parsed.media:
            parts.append(await self._fetch(media))
        parts += parsed.other
        meta = dict(parsed.meta)
        if parsed.edit_of is not None:
            meta["edit_of"] = self.ctx.message(conversation=parsed.native, sender=parsed.sender,
                                               provider_id=parsed.edit_of).id
        message = self.ctx.message(conversation=parsed.native, sender=parsed.sender, parts=parts,
                                   provider_id=parsed.provider_id, sent_at=parsed.sent_at,
                                   in_reply_to=parsed.in_reply_to, meta=meta)
        # Written first: a reply may be published the moment the message is on the bus.
        await self._state_write(self.ctx.state.put_record(
            f"msg:{message.id}", Quoted(chat_id=parsed.chat_id, message_id=int(parsed.route["message_id"])),
            ttl=_QUOTE_TTL))
        await self.ctx.publish(message, route=parsed.route)

    async def _state_write(self, write: Any) -> None:
        try:
            await write
        except GatewayError:
            raise
        except Exception as exc:  # the state KV is on the bus: the provider tries again later
            raise RequestError(f"state not stored ({type(exc).__name__}); try again", status=503) from None

    async def _fetch(self, media: Media) -> Part:
        """The part of a file: its content copied into the object store when allowed and
        within ``max_media_size``; Telegram's ``file_id`` in ``media_id`` either way."""
        cfg = self.cfg
        data: bytes | None = None
        if cfg.download_media and (media.size or 0) <= cfg.max_media_size:
            assert self.bot is not None
            try:
                file = await self.bot.get_file(media.file_id)
                if (file.file_size or 0) <= cfg.max_media_size:
                    data = bytes(await file.download_as_bytearray())
            except telegram.error.BadRequest as exc:  # too big for the Bot API, or gone: not copied
                self.ctx.log.info("inbound file not copied", kind=media.kind, reason=exc.message)
                self.ctx.count("media_not_copied")
            except telegram.error.TelegramError as exc:
                raise RequestError(f"could not fetch a file from Telegram ({type(exc).__name__}); try again",
                                   status=503) from None
            if data is not None and len(data) > cfg.max_media_size:
                data = None
                self.ctx.count("media_not_copied")
        ref = None
        if data is not None:
            ref = await self.ctx.put_blob(data, content_type=media.content_type)
        fields: dict[str, Any] = {"content_type": media.content_type, "filename": media.filename,
                                  "size": len(data) if data is not None else media.size, "ref": ref,
                                  "media_id": media.file_id}
        if media.kind == "image":
            return ImagePart(**fields)
        if media.kind == "audio":
            return AudioPart(duration=media.duration, **fields)
        if media.kind == "video":
            return VideoPart(duration=media.duration, **fields)
        return FilePart(**fields)

    async def _callback(self, cq: telegram.CallbackQuery, update_id: int) -> None:
        """A tap on a survey button: published as the customer's answer (a ``choice`` part)
        once, then the query is answered and the keyboard removed."""
        parts = (cq.data or "").split(":")
        msg = cq.message
        if len(parts) != 3 or parts[0] != "sv" or not parts[2].isdigit() or msg is None:
            self.ctx.count("callback_ignored")
            await self._answer(cq, None)
            return
        record = await self.ctx.state.get_record(f"survey:{parts[1]}", SurveyRecord)
        index = int(parts[2])
        if record is None or record.chat_id != str(msg.chat.id) or index >= len(record.choices) \
                or datetime.now(timezone.utc) > record.until:
            await self._answer(cq, "This survey is closed.")
            return
        if record.answered is not None:
            await self._answer(cq, "You answered already.")
            return
        choice = record.choices[index]
        native = native_key(msg) if isinstance(msg, telegram.Message) else str(msg.chat.id)
        sender = Participant(id=str(cq.from_user.id), name=cq.from_user.full_name or None)
        meta: dict[str, Any] = {"update_id": str(update_id), "chat_type": msg.chat.type,
                                "message_id": str(msg.message_id), "callback": True}
        message = self.ctx.message(
            conversation=native, sender=sender, provider_id=f"{self.bot_id}:callback:{cq.id}", meta=meta,
            parts=[TextPart(text=choice), ChoicePart(survey=record.outbound_id, choice=choice, index=index)])
        await self.ctx.publish(message)
        record.answered = index
        await self._state_write(self.ctx.state.put_record(
            f"survey:{parts[1]}", record, ttl=max(1.0, (record.until - datetime.now(timezone.utc)).total_seconds())))
        await self._answer(cq, choice)
        assert self.bot is not None
        try:
            await self.bot.edit_message_reply_markup(chat_id=msg.chat.id, message_id=msg.message_id, reply_markup=None)
        except telegram.error.TelegramError as exc:  # the answer is on the bus; the buttons only linger
            self.ctx.log.info("survey keyboard not removed", error=type(exc).__name__)

    async def _answer(self, cq: telegram.CallbackQuery, text: str | None) -> None:
        """Answer a callback query (the customer's app shows a spinner until then)."""
        assert self.bot is not None
        try:
            await self.bot.answer_callback_query(cq.id, text=text)
        except telegram.error.TelegramError as exc:  # too late (older than ~15 s) or a network hiccup
            self.ctx.log.info("callback query not answered", error=type(exc).__name__)

    async def _member(self, update: telegram.ChatMemberUpdated) -> None:
        """The bot's own membership: blocked or kicked (reminders see it in ``reach``),
        unblocked or added again."""
        chat = str(update.chat.id)
        date = int(update.date.timestamp())
        key = f"refused:{chat}"
        current = await self.ctx.state.get_record(key, Refused)
        if current is not None and current.date > date:
            return  # a late retry of an older change
        if update.new_chat_member.status in _LEFT:
            code = "blocked" if update.chat.type == "private" else "kicked"
            await self._state_write(self.ctx.state.put_record(key, Refused(code=code, at=update.date, date=date)))
        elif current is not None:
            await self._state_write(self.ctx.state.delete(key))

    # --- sending -------------------------------------------------------------------------

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        if self.outbox is None:
            raise DeliveryError("channel not started", permanent=False, code="channel_down")
        return await self.outbox.deliver(outbound, conversation)

    async def reach(self, conversation: Conversation, at: datetime) -> Reach:
        """Any time, unless Telegram refused the bot the chat (blocked by the customer,
        kicked from the group): then the code of the 403 a send would get."""
        chat = conversation.route.get("chat_id")
        if not isinstance(chat, str) or not chat:
            return Reach(ok=False, code="no_route", detail="conversation has no Telegram chat to answer")
        refused = await self.ctx.state.get_record(f"refused:{chat}", Refused)
        if refused is not None:
            return Reach(ok=False, code=refused.code,
                         detail="Telegram refuses the bot this chat (blocked by the customer or removed from the group)")
        return Reach(ok=True)
