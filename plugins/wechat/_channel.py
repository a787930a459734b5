"""The WeChat official account channel: the webhook (verification and messages in all
three encryption modes) and delivery through the customer-service and template APIs."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from gateway import (
    AudioPart,
    Channel,
    ChannelContext,
    Conversation,
    DeliveryError,
    ErrorInfo,
    EventPart,
    FilePart,
    ImagePart,
    LinkPart,
    MediaPart,
    ObjectRef,
    Outbound,
    Participant,
    ProviderIndex,
    Reach,
    Receipt,
    RequestError,
    SignatureError,
    TextPart,
    VideoPart,
    check_timestamp,
)

from . import _xml
from ._api import WeChatAPI
from ._config import WeChatConfig
from ._crypto import MessageCrypto, check_signature
from ._inbound import FieldError, normalize
from ._upgrade import template_sent_before_upgrade

WEBHOOK_PATH = "/webhook"
_WINDOW_ERRORS = {45015, 45047}
_MEDIA_KINDS = {"image": "image", "audio": "voice", "video": "video"}
# WeChat reports a template's result within seconds to minutes; a week covers its retries.
_TEMPLATE_REPORT_TTL = 7 * 86400.0


class StoredMedia(msgspec.Struct, kw_only=True):
    """What ``state`` key ``media-<MediaId>`` holds once an inbound medium is copied."""

    ref: ObjectRef
    content_type: str | None = None
    message_id: str
    """Gateway id of the message that carried the medium."""


class _Upload(msgspec.Struct, kw_only=True):
    media_id: str
    expires_at: float




def _success() -> Response:
    # "success" tells WeChat not to retry and to show nothing to the customer; it needs
    # no encryption even in safe mode.
    return PlainTextResponse("success")


class WeChatChannel(Channel):
    """A WeChat official account (公众号): ``POST/GET /channels/<name>/webhook`` in, the
    customer-service message API out, template messages outside the 48-hour window."""

    channel_type = "wechat"
    config_type = WeChatConfig
    supported_parts = frozenset({"text", "image", "audio", "video", "file", "link"})

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        cfg: WeChatConfig = ctx.config
        self.cfg = cfg
        self.crypto = MessageCrypto(cfg.token, cfg.encoding_aes_key, cfg.appid) if cfg.encoding_aes_key else None
        self.tolerance = cfg.timestamp_tolerance
        self.window = timedelta(seconds=cfg.window)
        self.api: WeChatAPI | None = None
        self.path = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self.templates = ProviderIndex(ctx.state, "tmpl", ttl=_TEMPLATE_REPORT_TTL)

    async def start(self) -> None:
        self.api = WeChatAPI(base_url=self.cfg.api_base, appid=self.cfg.appid, secret=self.cfg.secret,
                             state=self.ctx.state, timeout=self.cfg.api_timeout,
                             refresh_margin=self.cfg.token_refresh_margin, log=self.ctx.log)
        self.path = self.ctx.add_route(WEBHOOK_PATH, self._webhook, methods=["GET", "POST"], max_body=self.cfg.max_body)

    async def stop(self) -> None:
        if self._tasks:
            # Media copies in flight get a moment to finish; the rest is logged as lost.
            _, pending = await asyncio.wait(set(self._tasks), timeout=5)
            for t in pending:
                t.cancel()
        if self.api is not None:
            await self.api.aclose()

    async def wait_background(self, timeout: float = 10.0) -> None:
        """Wait for background media copies (tests, graceful shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    # --- inbound -----------------------------------------------------------------

    async def _webhook(self, request: Request) -> Response:
        q = request.query_params
        timestamp, nonce = q.get("timestamp"), q.get("nonce") or ""
        check_timestamp(timestamp, self.tolerance)
        assert timestamp is not None  # check_timestamp refuses a missing one
        if request.method == "GET":
            # URL verification (服务器配置): the official account platform sends echostr
            # in clear and signs it like a plaintext message, whatever the mode.
            check_signature(q.get("signature"), self.cfg.token, timestamp, nonce)
            echostr = q.get("echostr")
            if echostr is None:
                raise RequestError("missing echostr")
            return PlainTextResponse(echostr)
        fields, encrypted = self._open(await self._body(request), q, timestamp, nonce)
        try:
            inbound = normalize(fields)
        except FieldError as exc:
            raise RequestError(f"not a WeChat message: {exc}") from None
        except ValueError:
            # int() and datetime quote the value they refused: the reason must not.
            raise RequestError("not a WeChat message: a field has an unusable value") from None
        if inbound.msg_type == "event" and inbound.meta.get("event") == "templatesendjobfinish":
            await self._template_finished(fields)
            return _success()
        inbound.meta["encrypted"] = encrypted
        if inbound.account:
            inbound.meta["account"] = inbound.account
        message = self.ctx.message(
            conversation=inbound.openid, sender=Participant(id=inbound.openid),
            recipient=Participant(id=inbound.account) if inbound.account else None,
            parts=inbound.parts, provider_id=inbound.provider_id, sent_at=inbound.sent_at, meta=inbound.meta)
        result = await self.ctx.publish(message, route={"openid": inbound.openid, "account": inbound.account},
                                        interaction=_opens_window(inbound.msg_type, inbound.meta.get("event")))
        if not result.duplicate and inbound.media and self.cfg.download_media:
            for media_id, kind in inbound.media:
                self._spawn(self._copy_media(media_id, kind, message.id, inbound.openid, inbound.provider_id))
        return _success()

    async def _body(self, request: Request) -> bytes:
        # The HTTP layer enforces this route's max_body (and answers 413 naming it).
        return await request.body()

    def _open(self, body: bytes, q: Any, timestamp: str, nonce: str) -> tuple[dict[str, str], bool]:
        """Check the signature(s) and return the message fields and whether it was encrypted."""
        mode = self.cfg.mode
        outer = _xml.parse(body)
        encrypted = mode != "plaintext" and (q.get("encrypt_type", "").lower() == "aes" or "Encrypt" in outer)
        if not encrypted:
            if mode == "safe":
                raise SignatureError("safe mode: unencrypted message refused")
            check_signature(q.get("signature"), self.cfg.token, timestamp, nonce)
            return outer, False
        assert self.crypto is not None
        encrypt = outer.get("Encrypt", "").strip()
        if not encrypt:
            raise RequestError("encrypted message without Encrypt")
        if q.get("signature") is not None:
            check_signature(q.get("signature"), self.cfg.token, timestamp, nonce)
        plain = self.crypto.decrypt(encrypt, q.get("msg_signature"), timestamp, nonce)
        return _xml.parse(plain.encode("utf-8")), True

    async def _template_finished(self, fields: dict[str, str]) -> None:
        msgid = (fields.get("MsgID") or fields.get("MsgId") or "").strip()
        status = (fields.get("Status") or "").strip()
        sent = (await self.templates.get(msgid) or await template_sent_before_upgrade(self.ctx.state, msgid)
                if msgid else None)
        if sent is None:
            # Status is the sender's text: whether it says success is all the log may keep.
            self.ctx.log.info("template result for a template this gateway did not send", success=status == "success")
            return
        if status == "success":
            await self.ctx.report_status(sent.outbound_id, "delivered", conversation=sent.conversation, provider_id=msgid)
            return
        reason = {"failed:user block": "customer refuses messages from this account (user block)"}.get(
            status, f"WeChat could not deliver the template message ({status or 'no status'})")
        # Final: WeChat does not try again (the bus contract's late ``dead``).
        await self.ctx.report_status(sent.outbound_id, "dead", conversation=sent.conversation, provider_id=msgid,
                                     error=ErrorInfo(message=reason, permanent=True, code="template_" + (
                                         "user_block" if "block" in status else "failed")))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _copy_media(self, media_id: str, kind: str, message_id: str, openid: str, provider_id: str) -> None:
        """Copy an inbound medium into the object store, record where (state key
        ``media-<MediaId>``) and announce it with a follow-up ``media_stored`` event."""
        assert self.api is not None
        try:
            data, ctype = await self.api.download_media(media_id, self.cfg.max_media_size)
            ctype = ctype.split(";")[0].strip() if ctype else None
            ref = await self.ctx.put_blob(data, content_type=ctype)
            await self.ctx.state.put_record(f"media-{media_id}",
                                            StoredMedia(ref=ref, content_type=ctype, message_id=message_id))
            data_fields = {"media_id": media_id, "kind": kind, "message_id": message_id, "bucket": ref.bucket,
                           "name": ref.name, "size": str(ref.size), "sha256": ref.sha256}
            if ctype:
                data_fields["content_type"] = ctype
            follow_up = self.ctx.message(
                conversation=openid, sender=Participant(id=openid), provider_id=f"media:{media_id}",
                parts=[EventPart(event="media_stored", key=media_id, data=data_fields)], auto=True,
                in_reply_to=provider_id, meta={"msg_type": "media_stored", "message_id": message_id})
            await self.ctx.publish(follow_up)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.ctx.log.warning("inbound media not copied", kind=kind, error=f"{type(exc).__name__}: {exc}")

    async def stored_media(self, media_id: str) -> StoredMedia | None:
        """Where an inbound medium was copied, once it was."""
        return await self.ctx.state.get_record(f"media-{media_id}", StoredMedia)

    # --- outbound ----------------------------------------------------------------

    async def reach(self, conversation: Conversation, at: datetime) -> Reach:
        """Customer-service messages go until the window after the customer's last message
        closes; template messages go to any follower with an openid."""
        openid = conversation.route.get("openid")
        if not isinstance(openid, str) or not openid:
            return Reach(ok=False, code="no_openid", detail="conversation has no WeChat openid to answer")
        last = conversation.last_inbound_at
        if last is None:
            return Reach(ok=False, code="outside_window", detail="the customer has never written", template=True)
        if last.tzinfo is None:
            last = last.replace(tzinfo=timezone.utc)
        until = last + self.window
        if at >= until:
            return Reach(ok=False, code="outside_window", until=until, template=True,
                         detail=f"WeChat's window of {format_duration(self.window.total_seconds())} "
                                "after the customer's last message has closed")
        return Reach(ok=True, until=until, template=True)

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        openid = conversation.route.get("openid")
        if not isinstance(openid, str) or not openid:
            raise DeliveryError("conversation has no WeChat openid to answer", permanent=True, code="no_openid")
        last = conversation.last_inbound_at
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=timezone.utc)
        window = format_duration(self.window.total_seconds())
        if last is None or datetime.now(timezone.utc) - last >= self.window:
            if outbound.template is not None:
                return await self._send_template(outbound, openid, f"outside the window of {window}")
            raise DeliveryError(f"customer has not written for more than {window}: WeChat allows no "
                                "customer-service message and the outbound has no template", permanent=True,
                                code="outside_window")
        try:
            return await self._send_custom(outbound, openid)
        except DeliveryError as exc:
            if exc.provider_code in _WINDOW_ERRORS and outbound.template is not None:
                return await self._send_template(outbound, openid, f"errcode {exc.provider_code}")
            raise

    async def _send_custom(self, outbound: Outbound, openid: str) -> Receipt:
        assert self.api is not None
        payloads = await self._payloads(outbound, openid)
        progress_key = f"progress-{outbound.id}"
        done = 0
        if len(payloads) > 1:
            # One API call per part: after a transient failure, the retry resumes after
            # the parts WeChat already accepted instead of sending them again.
            raw = await self.ctx.state.get(progress_key)
            done = int(raw) if raw and raw.isdigit() else 0
        msgid = None
        for i, payload in enumerate(payloads[done:], start=done):
            answer = await self.api.send_custom(payload)
            # WeChat's documentation shows no id in this answer, but answers carry a
            # ``msgid`` (a JSON number above 2**53): kept as a string, exactly.
            got = answer.get("msgid")
            msgid = str(got) if got not in (None, "", 0) else None
            if len(payloads) > 1 and i + 1 < len(payloads):
                await self.ctx.state.put(progress_key, str(i + 1).encode())
        if len(payloads) > 1:
            await self.ctx.state.delete(progress_key)
        # Several parts are several WeChat messages: the receipt names the last one.
        return Receipt(provider_id=msgid, meta={"via": "custom", "messages": len(payloads)})

    async def _payloads(self, outbound: Outbound, openid: str) -> list[dict[str, Any]]:
        wx = outbound.meta.get("wechat") or {}
        if not isinstance(wx, dict):
            raise DeliveryError("meta.wechat must be an object", permanent=True, code="invalid_meta")
        bodies: list[dict[str, Any]] = []
        for part in outbound.parts:
            if isinstance(part, TextPart):
                bodies.append({"msgtype": "text", "text": {"content": part.text}})
            elif isinstance(part, LinkPart):
                article = {"title": part.title or part.url, "description": part.description or "", "url": part.url}
                if wx.get("picurl"):
                    article["picurl"] = wx["picurl"]
                bodies.append({"msgtype": "news", "news": {"articles": [article]}})
            elif isinstance(part, (ImagePart, AudioPart, VideoPart, FilePart)):
                kind = self._media_kind(part)
                media_id = await self._media_id(part, kind)
                if kind == "video":
                    video: dict[str, Any] = {"media_id": media_id}
                    thumb = part.thumb_media_id if isinstance(part, VideoPart) else None
                    if thumb:
                        video["thumb_media_id"] = thumb
                    for key in ("title", "description"):
                        if wx.get(f"video_{key}"):
                            video[key] = wx[f"video_{key}"]
                    bodies.append({"msgtype": "video", "video": video})
                else:
                    bodies.append({"msgtype": kind, kind: {"media_id": media_id}})
        news = wx.get("news")
        if news:
            articles = news if isinstance(news, list) else [news]
            bodies.append({"msgtype": "news", "news": {"articles": articles}})
        if wx.get("miniprogram"):
            bodies.append({"msgtype": "miniprogrampage", "miniprogrampage": wx["miniprogram"]})
        for body in bodies:
            body["touser"] = openid
            if wx.get("kf_account"):
                body["customservice"] = {"kf_account": wx["kf_account"]}
        if not bodies:
            raise DeliveryError("nothing WeChat can send in this outbound", permanent=True, code="empty")
        return bodies

    @staticmethod
    def _media_kind(part: MediaPart) -> str:
        if isinstance(part, FilePart):
            major = (part.content_type or "").split("/")[0]
            if major in _MEDIA_KINDS:
                return _MEDIA_KINDS[major]
            raise DeliveryError(f"WeChat customer-service messages cannot carry files of type "
                                f"{part.content_type or 'unknown'} (only images, voice and video)",
                                permanent=True, code="unsupported_content")
        return "image" if isinstance(part, ImagePart) else "voice" if isinstance(part, AudioPart) else "video"

    async def _media_id(self, part: MediaPart, kind: str) -> str:
        """The part's WeChat media id: given, or its content uploaded as temporary media
        (once per content hash and kind until the media expires)."""
        assert self.api is not None
        if part.media_id:
            return part.media_id
        data = await self.ctx.part_bytes(part)  # WeChat cannot send by URL
        key = f"upload-{kind}-{hashlib.sha256(data).hexdigest()}"
        cached = await self.ctx.state.get_record(key, _Upload)
        if cached is not None and cached.expires_at > time.time():
            return cached.media_id
        ctype = part.content_type or {"image": "image/jpeg", "voice": "audio/amr", "video": "video/mp4"}[kind]
        filename = part.filename or f"{kind}.{ctype.split('/')[-1]}"
        media_id = await self.api.upload_media(kind, data, filename, ctype)
        ttl = self.cfg.media_cache_ttl
        await self.ctx.state.put_record(key, _Upload(media_id=media_id, expires_at=time.time() + ttl), ttl=ttl)
        return media_id

    async def _send_template(self, outbound: Outbound, openid: str, why: str) -> Receipt:
        assert self.api is not None and outbound.template is not None
        t = outbound.template
        wx = outbound.meta.get("wechat") or {}
        if t.kind == "subscription":
            return await self._send_subscription(outbound, openid, why)
        payload: dict[str, Any] = {"touser": openid, "template_id": t.id,
                                   "data": {k: {"value": v} for k, v in t.data.items()},
                                   # WeChat drops a second send with the same client_msg_id.
                                   "client_msg_id": outbound.id[:64]}
        if t.url:
            payload["url"] = t.url
        if isinstance(wx, dict) and wx.get("template_miniprogram"):
            payload["miniprogram"] = wx["template_miniprogram"]
        answer = await self.api.send_template(payload)
        msgid = str(answer.get("msgid", ""))
        if msgid:
            await self.templates.put(msgid, outbound.id, outbound.conversation)
        self.ctx.log.info("sent as template message", outbound_id=outbound.id, why=why)
        return Receipt(provider_id=msgid or None, meta={"via": "template", "why": why})

    async def _send_subscription(self, outbound: Outbound, openid: str, why: str) -> Receipt:
        """A subscription notification (订阅通知): needs the customer's one-time or
        long-term consent; WeChat answers 43101 without it (permanent)."""
        assert self.api is not None and outbound.template is not None
        t = outbound.template
        wx = outbound.meta.get("wechat") or {}
        payload: dict[str, Any] = {"touser": openid, "template_id": t.id,
                                   "data": {k: {"value": v} for k, v in t.data.items()}}
        if t.url:
            payload["page"] = t.url
        if isinstance(wx, dict) and wx.get("template_miniprogram"):
            payload["miniprogram"] = wx["template_miniprogram"]
        await self.api.send_subscription(payload)
        self.ctx.log.info("sent as subscription notification", outbound_id=outbound.id, why=why)
        # bizsend answers no message id: the outbound id stands in for it.
        return Receipt(provider_id=None, meta={"via": "subscription", "why": why})


def format_duration(total_seconds: float) -> str:
    """``48 hours``, ``20 minutes``, ``1 hour 30 minutes``: the two largest units that are
    not zero, in hours as WeChat states its window (never ``0 hours`` under an hour)."""
    rest = max(0, round(total_seconds))
    units = []
    for name, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        n, rest = divmod(rest, size)
        if n:
            units.append(f"{n} {name}" + ("s" if n != 1 else ""))
    return " ".join(units[:2]) if units else "0 seconds"


# Events after which WeChat accepts customer-service messages for 48 hours (its
# customer-service API documentation: subscribe, QR scan, and the click / scancode_push /
# scancode_waitmsg menu types). A location report, a VIEW menu jump or an unsubscribe do
# not open the window, so they must not move last_inbound_at.
_WINDOW_EVENTS = frozenset({"subscribe", "scan", "click", "scancode_push", "scancode_waitmsg"})


def _opens_window(msg_type: str, event: object) -> bool:
    return msg_type != "event" or str(event or "").lower() in _WINDOW_EVENTS
