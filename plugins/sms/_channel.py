"""The SMS channel: provider webhooks in (Twilio inbound and status callbacks, Aliyun
SmsUp / SmsReport batch pushes, Tencent Cloud reply and status callbacks), sends out through the configured provider with failover,
opt-out, quiet hours and segment accounting."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from twilio.request_validator import HMAC_SHA1, HMAC_SHA256, RequestValidator, get_signature_algorithm

from gateway import (
    Channel,
    ChannelContext,
    Conversation,
    Deferred,
    DeliveryError,
    DeliveryState,
    ErrorInfo,
    FilePart,
    ImagePart,
    Outbound,
    Part,
    Participant,
    ProviderIndex,
    Reach,
    Receipt,
    RequestError,
    SignatureError,
    TextPart,
    public_url,
    quiet_until,
    stable_id,
    tokens_equal,
)

from ._config import SmsConfig
from ._providers import Adapter, AliyunAdapter, TencentAdapter, TwilioAdapter, now
from ._text import NumberError, keyword, mask, segment, to_e164

# Provider id → outbound, for delivery reports: carriers report within hours, Aliyun and
# Twilio retry their callbacks for up to a day or so; a week covers both.
_REPORT_TTL = 7 * 86400.0
_CHINA = ZoneInfo("Asia/Shanghai")
_TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
# Twilio's MessageStatus → our state; the others (queued, sending, sent, accepted,
# scheduled, ...) say nothing the "sent" status has not said.
# A report of non-delivery is final (the provider stopped trying): ``dead``, as the bus
# contract defines it for failures a provider reports after ``sent``.
_TWILIO_STATES: dict[str, DeliveryState] = {"delivered": "delivered", "read": "read", "undelivered": "dead",
                                            "failed": "dead"}


class OptOut(msgspec.Struct, frozen=True, kw_only=True):
    """State record ``optout:<E.164>``: the customer asked to receive nothing more."""

    at: datetime
    keyword: str


class _SmsUp(msgspec.Struct, kw_only=True):
    """One record of Aliyun's SmsUp push (a reply from a customer)."""

    phone_number: str
    content: str = ""
    send_time: str = ""
    sign_name: str = ""
    dest_code: str = ""
    sequence_id: int | str | None = None


class _SmsReport(msgspec.Struct, kw_only=True):
    """One record of Aliyun's SmsReport push (a delivery report)."""

    phone_number: str
    biz_id: str
    success: bool
    err_code: str = ""
    err_msg: str = ""
    send_time: str = ""
    report_time: str = ""
    sms_size: str = ""
    out_id: str = ""


class _TencentReply(msgspec.Struct, kw_only=True):
    """Tencent Cloud's reply callback (短信回复): one customer message."""

    mobile: str
    nationcode: str = ""
    text: str = ""
    sign: str = ""
    time: int | None = None
    extend: str = ""


class _TencentStatus(msgspec.Struct, kw_only=True):
    """One record of Tencent Cloud's status callback (短信下发状态通知)."""

    mobile: str
    sid: str
    report_status: str
    nationcode: str = ""
    errmsg: str = ""
    description: str = ""
    user_receive_time: str = ""


_up_decoder = msgspec.json.Decoder(list[_SmsUp])
_reply_decoder = msgspec.json.Decoder(_TencentReply | list[_TencentReply])
_tstatus_decoder = msgspec.json.Decoder(list[_TencentStatus])
_report_decoder = msgspec.json.Decoder(list[_SmsReport])


class _Form(dict[str, list[str]]):
    """A form-encoded body as Twilio's RequestValidator reads it (``getall``)."""

    def getall(self, name: str) -> list[str]:
        return self[name]

    def first(self, name: str) -> str:
        values = self.get(name)
        return values[0] if values else ""


class SmsChannel(Channel):
    """SMS through Twilio, Aliyun or Tencent Cloud: ``/channels/<name>/twilio/inbound``,
    ``/twilio/status``, ``/aliyun/up``, ``/aliyun/report``, ``/tencent/reply`` and
    ``/tencent/status`` in; the provider's send API out."""

    channel_type = "sms"
    config_type = SmsConfig
    supported_parts = frozenset({"text", "image"})

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        self.cfg: SmsConfig = ctx.config
        self.index = ProviderIndex(ctx.state, "sent", ttl=_REPORT_TTL)
        self.client: httpx.AsyncClient | None = None
        self.adapters: dict[str, Adapter] = {}
        self.status_path = ""
        self._fails = 0
        self._failover_until = 0.0
        self.opt_out_words = frozenset(keyword(k) for k in self.cfg.opt_out_keywords)
        self.opt_in_words = frozenset(keyword(k) for k in self.cfg.opt_in_keywords)

    # --- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        self.client = httpx.AsyncClient(timeout=cfg.api_timeout)
        mb = cfg.max_body
        if cfg.twilio is not None:
            self.ctx.add_route("/twilio/inbound", self._twilio_inbound, max_body=mb)
            self.status_path = self.ctx.add_route("/twilio/status", self._twilio_status, max_body=mb)
            callback = cfg.public_url.rstrip("/") + self.status_path \
                if cfg.twilio.status_callback and cfg.public_url else None
            self.adapters["twilio"] = TwilioAdapter(self.client, cfg.twilio, callback)
        if cfg.aliyun is not None:
            self.ctx.add_route("/aliyun/up", self._aliyun_up, max_body=mb)
            self.ctx.add_route("/aliyun/report", self._aliyun_report, max_body=mb)
            self.adapters["aliyun"] = AliyunAdapter(self.client, cfg.aliyun)
        if cfg.tencent is not None:
            self.ctx.add_route("/tencent/reply", self._tencent_reply, max_body=mb)
            self.ctx.add_route("/tencent/status", self._tencent_status, max_body=mb)
            self.adapters["tencent"] = TencentAdapter(self.client, cfg.tencent)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    # --- inbound -----------------------------------------------------------------------

    def _number(self, raw: str, field: str) -> str:
        try:
            return to_e164(raw, self.cfg.default_region)
        except NumberError as exc:
            raise RequestError(f"{field}: {exc}") from None

    async def _receive(self, provider: str, provider_id: str, customer: str, our: str, text: str,
                       parts: Sequence[Part], sent_at: datetime | None = None, meta: dict[str, Any] | None = None,
                       provider_says: str = "") -> None:
        """Opt-out bookkeeping, then publish (returns after the bus ack). ``provider_says``
        is the provider's own verdict (Twilio's ``OptOutType``: ``STOP`` / ``START``)."""
        meta = {"provider": provider, **(meta or {})}
        word = keyword(text)
        if provider_says == "STOP":
            word = word or "stop"
        if (word and word in self.opt_out_words) or provider_says == "STOP":
            # Recorded before publishing: the law asks to stop at once, and a retry of this
            # push records it again harmlessly.
            await self.ctx.state.put_record(f"optout:{customer}", OptOut(at=datetime.now(timezone.utc), keyword=word))
            meta["opt_out"] = True
            self.ctx.log.info("number opted out", number=mask(customer), provider=provider)
        opt_in = "opt_out" not in meta and ((bool(word) and word in self.opt_in_words) or provider_says == "START")
        if opt_in:
            meta["opt_in"] = True
        message = self.ctx.message(conversation=f"{our}|{customer}", sender=Participant(id=customer),
                                   recipient=Participant(id=our), parts=list(parts),
                                   provider_id=f"{provider}:{provider_id}", sent_at=sent_at, meta=meta)
        result = await self.ctx.publish(message, route={"number": customer, "our": our})
        if opt_in and not result.duplicate:
            # Lifted only by a new message: a late retry of an old START (a re-pushed batch)
            # must not undo a STOP the customer sent after it. A crash before this line
            # leaves the number opted out, the safe side: the customer writes START again.
            await self.ctx.state.delete(f"optout:{customer}")
            self.ctx.log.info("number opted in again", number=mask(customer), provider=provider)

    async def opted_out(self, number: str) -> OptOut | None:
        """The opt-out record of ``number`` (E.164), if it opted out."""
        return await self.ctx.state.get_record(f"optout:{number}", OptOut)

    # Twilio ------------------------------------------------------------------------------

    async def _twilio_form(self, request: Request) -> _Form:
        """The form, once its X-Twilio-Signature verified over the public URL Twilio called."""
        assert self.cfg.twilio is not None
        try:
            text = (await request.body()).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("body is not UTF-8") from None
        form = _Form()
        for k, v in parse_qsl(text, keep_blank_values=True):
            form.setdefault(k, []).append(v)
        signature = request.headers.get("x-twilio-signature")
        if not signature:
            raise SignatureError("missing X-Twilio-Signature")
        url = public_url(request, base_url=self.cfg.public_url or None, trust_forwarded=self.cfg.trust_forwarded)
        settings = request.headers.get("x-twilio-webhooks-signature-settings")
        secret, algorithm = self.cfg.twilio.auth_token, None
        if settings:
            # A Webhooks Rule signed it with its SharedKey and the algorithm it names.
            if not self.cfg.twilio.webhook_shared_key:
                raise SignatureError("signed with a webhook shared key, and none is configured")
            secret, algorithm = self.cfg.twilio.webhook_shared_key, get_signature_algorithm(settings)
            if algorithm.upper() not in (HMAC_SHA1, HMAC_SHA256):
                # Checked here: twilio's validator would log the (unsigned, anyone's) value.
                raise SignatureError("unsupported signature algorithm")
        if not RequestValidator(secret).validate(url, form, signature, algorithm):
            raise SignatureError("bad X-Twilio-Signature")
        return form

    async def _twilio_inbound(self, request: Request) -> Response:
        form = await self._twilio_form(request)
        sid = form.first("MessageSid") or form.first("SmsSid")
        if not sid:
            raise RequestError("missing MessageSid")
        customer = self._number(form.first("From"), "From")
        to = form.first("To").strip()
        # Our side may be a short code (5 to 6 digits in the US), which is no E.164 number.
        our = to if to.isdigit() and 3 <= len(to) <= 8 else self._number(to, "To")
        body = form.first("Body")
        parts: list[Part] = [TextPart(text=body)] if body else []
        count = form.first("NumMedia")
        for i in range(min(_count(count) or 0, 10)):
            url, ctype = form.first(f"MediaUrl{i}"), form.first(f"MediaContentType{i}") or None
            if url:
                # Twilio serves media to the account only (HTTP Basic): the URL is kept, the
                # bytes are not copied.
                parts.append(ImagePart(url=url, content_type=ctype) if (ctype or "").startswith("image/")
                             else FilePart(url=url, content_type=ctype))
        segments = _count(form.first("NumSegments"))
        # With Advanced Opt-Out (localized or custom keywords) Twilio says what it did.
        await self._receive("twilio", sid, customer, our, body, parts,
                            meta={"segments": segments} if segments is not None else None,
                            provider_says=form.first("OptOutType").strip().upper())
        return Response(_TWIML_EMPTY, media_type="text/xml")

    async def _twilio_status(self, request: Request) -> Response:
        form = await self._twilio_form(request)
        sid = form.first("MessageSid") or form.first("SmsSid")
        status = (form.first("MessageStatus") or form.first("SmsStatus")).lower()
        if not sid or not status:
            raise RequestError("missing MessageSid or MessageStatus")
        state = _TWILIO_STATES.get(status)
        if state is not None:
            code = form.first("ErrorCode")
            error = ErrorInfo(message=f"Twilio reports the message {status}" + (f" (error {code})" if code else ""),
                              permanent=True, code=f"twilio_{code}" if code else f"twilio_{status}") \
                if state == "dead" else None
            await self._report("twilio", sid, f"{sid}:{status}", state, error)
        return Response(status_code=204)

    # Aliyun ------------------------------------------------------------------------------

    async def _pushed_body(self, request: Request, token: str) -> bytes:
        # Aliyun's and Tencent's pushes carry no signature: the URL's token is the guard.
        if not tokens_equal(request.query_params.get("token"), token):
            raise SignatureError("missing or wrong push token")
        return await request.body()

    async def _aliyun_body(self, request: Request) -> bytes:
        assert self.cfg.aliyun is not None
        return await self._pushed_body(request, self.cfg.aliyun.push_token)

    async def _aliyun_up(self, request: Request) -> Response:
        body = await self._aliyun_body(request)
        try:
            records = _up_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise RequestError.from_decode("not an SmsUp push", exc) from None
        # Validated whole before anything is published: a bad batch publishes nothing.
        items = [(self._number(r.phone_number, f"record {i}: phone_number"), r) for i, r in enumerate(records)]
        assert self.cfg.aliyun is not None
        for customer, r in items:
            sent_at = _china_time(r.send_time)
            # sequence_id identifies a reply; without it, what the reply is made of does
            # (hashed: the provider id is on the bus and must not carry the text).
            pid = str(r.sequence_id) if r.sequence_id not in (None, "") else \
                stable_id(customer, r.send_time, r.dest_code, r.content)
            our = r.sign_name or self.cfg.aliyun.sign_name
            meta = {"dest_code": r.dest_code} if r.dest_code else None
            # One at a time, in the push's order: the customer's messages keep it on the bus.
            await self._receive("aliyun", pid, customer, our, r.content,
                                [TextPart(text=r.content)] if r.content else [], sent_at, meta)
        return _aliyun_ok()

    async def _aliyun_report(self, request: Request) -> Response:
        body = await self._aliyun_body(request)
        try:
            records = _report_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise RequestError.from_decode("not an SmsReport push", exc) from None
        for r in records:
            error = None if r.success else ErrorInfo(
                message=f"Aliyun reports the message undelivered ({r.err_code or 'no code'})", permanent=True,
                code=f"aliyun_{r.err_code}" if r.err_code else "aliyun_undelivered")
            # One report about one recipient: the send's BizId and the number. The send's
            # answer had no segment count: what Aliyun billed comes here (sms_size).
            segments = _count(r.sms_size)
            await self._report("aliyun", r.biz_id, f"{r.biz_id}:{r.phone_number}",
                               "delivered" if r.success else "dead", error,
                               {"segments": segments} if segments is not None else None)
        return _aliyun_ok()

    # Tencent Cloud ----------------------------------------------------------------------

    async def _tencent_reply(self, request: Request) -> Response:
        assert self.cfg.tencent is not None
        body = await self._pushed_body(request, self.cfg.tencent.push_token)
        try:
            decoded = _reply_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise RequestError.from_decode("not a Tencent Cloud reply callback", exc) from None
        replies = decoded if isinstance(decoded, list) else [decoded]
        items = [(self._number(f"+{r.nationcode}{r.mobile}" if r.nationcode else r.mobile, f"reply {i}: mobile"), r)
                 for i, r in enumerate(replies)]
        for customer, r in items:
            # The callback has no message id: what the reply is made of identifies it.
            pid = stable_id(customer, str(r.time), r.sign, r.extend, r.text)
            sent_at = _unix_time(r.time)
            await self._receive("tencent", pid, customer, r.sign or self.cfg.tencent.sign_name, r.text,
                                [TextPart(text=r.text)] if r.text else [], sent_at,
                                {"extend": r.extend} if r.extend else None)
        return _tencent_ok()

    async def _tencent_status(self, request: Request) -> Response:
        assert self.cfg.tencent is not None
        body = await self._pushed_body(request, self.cfg.tencent.push_token)
        try:
            records = _tstatus_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise RequestError.from_decode("not a Tencent Cloud status callback", exc) from None
        for r in records:
            ok = r.report_status.upper() == "SUCCESS"
            error = None if ok else ErrorInfo(
                message=f"Tencent Cloud reports the message undelivered ({r.errmsg or 'no code'})", permanent=True,
                code=f"tencent_{r.errmsg}" if r.errmsg else "tencent_undelivered")
            await self._report("tencent", r.sid, f"{r.sid}:{r.nationcode}{r.mobile}",
                               "delivered" if ok else "dead", error)
        return _tencent_ok()

    async def _report(self, provider: str, provider_id: str, dedup: str, state: DeliveryState,
                      error: ErrorInfo | None, meta: dict[str, Any] | None = None) -> None:
        """A delivery report → a status of the outbound it belongs to (``meta`` names the
        provider, plus what the report adds), once. A report repeated later (a re-pushed
        batch, a callback retry) is recognized by its key in the state KV; repeats close
        together also share the status's Nats-Msg-Id."""
        sent = await self.index.get(f"{provider}:{provider_id}")
        if sent is None:
            self.ctx.log.info("delivery report for a message this gateway did not send", provider=provider)
            return
        key = f"report:{provider}:{dedup}"
        if await self.ctx.state.get(key) is not None:
            return
        await self.ctx.report_status(sent.outbound_id, state, conversation=sent.conversation,
                                     provider_id=provider_id, error=error, meta={"provider": provider, **(meta or {})})
        await self.ctx.state.put(key, b"1", ttl=_REPORT_TTL)

    # --- outbound ----------------------------------------------------------------------

    def _order(self) -> list[Adapter]:
        """The providers to use now, preferred first."""
        first = self.adapters[self.cfg.provider]
        if self.cfg.failover is None:
            return [first]
        second = self.adapters[self.cfg.failover]
        return [second, first] if now() < self._failover_until else [first, second]

    async def reach(self, conversation: Conversation, at: datetime) -> Reach:
        """Opted-out numbers get nothing; a template-only provider (Aliyun) sends templates
        only. Quiet hours only delay a send, so they do not count here."""
        number = conversation.route.get("number")
        if not isinstance(number, str) or not number:
            return Reach(ok=False, code="no_route", detail="conversation has no phone number to answer")
        if await self.opted_out(number) is not None:
            return Reach(ok=False, code="opted_out", detail="the customer opted out of SMS")
        first = self.adapters.get(self.cfg.provider)
        if first is not None and first.templates_only:
            return Reach(ok=False, code="template_required", template=True,
                         detail=f"{first.name} sends approved templates only")
        return Reach(ok=True, template=True)

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        number = conversation.route.get("number")
        if not isinstance(number, str) or not number:
            raise DeliveryError("conversation has no phone number to answer", permanent=True, code="no_route")
        if await self.opted_out(number) is not None:
            raise DeliveryError("the customer opted out of SMS", permanent=True, code="opted_out")
        urgent = outbound.meta.get("urgent") is True
        if not urgent:
            until = quiet_until(self.ctx.quiet_hours, datetime.now(timezone.utc))
            if until is not None:
                raise Deferred("inside the channel's quiet hours", until=until, code="quiet_hours")
        text = "\n".join(p.text for p in outbound.parts if isinstance(p, TextPart))
        seg = segment(text) if text else None
        if seg is not None and seg.segments > self.cfg.max_segments:
            raise DeliveryError(f"text needs {seg.segments} {seg.encoding} segments, more than max_segments "
                                f"({self.cfg.max_segments})", permanent=True, code="too_long")
        if any(isinstance(p, ImagePart) and not p.url for p in outbound.parts):
            # MMS media are fetched by the provider from a URL; dropping the image silently
            # would be worse than refusing.
            raise DeliveryError("SMS sends images by URL and an image part has none", permanent=True,
                                code="unsupported_content")
        usable = [a for a in self._order() if a.can_send(outbound, text) and self._carries_template(a, outbound)]
        if not usable:
            first = self.adapters[self.cfg.provider]
            if first.templates_only and outbound.template is None:
                raise DeliveryError(f"{first.name} sends approved templates only and the outbound has no template",
                                    permanent=True, code="template_required")
            raise DeliveryError("nothing SMS can send in this outbound", permanent=True, code="empty")
        adapter = usable[0]
        try:
            provider_id, billed = await adapter.send(number, text, outbound)
        except DeliveryError as exc:
            if not exc.permanent:
                self._transient_failure(adapter)
            elif exc.code == "twilio_21610":
                # The number sent STOP to Twilio directly (Twilio's own opt-out handling):
                # remember it, so later outbounds fail here without a provider call.
                await self.ctx.state.put_record(f"optout:{number}", OptOut(at=datetime.now(timezone.utc),
                                                                           keyword="twilio_21610"))
                raise DeliveryError("the customer opted out of SMS (Twilio error 21610)", permanent=True,
                                    code="opted_out") from exc
            raise
        if adapter.name == self.cfg.provider:
            self._fails = 0
        await self.index.put(f"{adapter.name}:{provider_id}", outbound.id, outbound.conversation)
        meta: dict[str, Any] = {"provider": adapter.name}
        if seg is not None and not (adapter.templates_only or (not text and outbound.template is not None)):
            meta.update(segments=seg.segments, encoding=seg.encoding)
        else:
            meta["template"] = outbound.template.id if outbound.template else None
        if billed is not None:
            meta["segments"] = billed
        self.ctx.log.info("sms sent", outbound_id=outbound.id, number=mask(number), provider=adapter.name,
                          segments=meta.get("segments"))
        return Receipt(provider_id=provider_id, meta=meta)

    def _carries_template(self, adapter: Adapter, outbound: Outbound) -> bool:
        """A template-only failover behind a template-only provider knows the outbound's
        template only by its ``templates`` map: the two providers' ids never match, and an
        unknown id would be a permanent refusal (a dead letter for a passing outage)."""
        first = self.adapters[self.cfg.provider]
        if adapter is first or not (adapter.templates_only and first.templates_only) or outbound.template is None:
            return True
        return outbound.template.id in adapter.templates

    def _transient_failure(self, adapter: Adapter) -> None:
        if self.cfg.failover is None or adapter.name != self.cfg.provider:
            return
        self._fails += 1
        if self._fails >= self.cfg.failover_after:
            self._fails = 0
            self._failover_until = now() + self.cfg.failover_for
            self.ctx.log.warning("provider failing; sending through the failover provider",
                                 provider=adapter.name, failover=self.cfg.failover,
                                 seconds=float(self.cfg.failover_for))


def _aliyun_ok() -> Response:
    # The documented success answer; anything else makes Aliyun push the batch again.
    return JSONResponse({"code": 0, "msg": "接收成功"})


def _tencent_ok() -> Response:
    return JSONResponse({"result": 0, "errmsg": "OK"})


def _count(value: str) -> int | None:
    """A count Twilio sends (``NumMedia``, ``NumSegments``): ASCII digits, else None
    (``"²".isdigit()`` is true, and ``int("²")`` raises)."""
    return int(value) if value.isascii() and value.isdigit() else None


def _unix_time(value: int | None) -> datetime | None:
    """Seconds since the epoch as an aware datetime; None when absent or out of range."""
    if not value:
        return None
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None


def _china_time(value: str) -> datetime | None:
    """Aliyun's ``2017-01-01 00:00:00`` (Beijing time) in UTC, as the bus carries times."""
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=_CHINA).astimezone(timezone.utc)
    except (ValueError, OverflowError):  # OverflowError: 0001-01-01 00:00 Beijing is no UTC datetime
        return None

