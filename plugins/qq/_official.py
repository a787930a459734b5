"""The official QQ bot platform (QQ开放平台) by webhook: Ed25519-signed callbacks in,
passive replies out through the OpenAPI within the platform's reply windows."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import (
    AudioPart,
    ChannelContext,
    Conversation,
    DeliveryError,
    EventPart,
    FilePart,
    ImagePart,
    Outbound,
    Part,
    Participant,
    Reach,
    Receipt,
    RequestError,
    SharedValue,
    TextPart,
    VideoPart,
    check_timestamp,
    provider_call,
    provider_error,
    stable_id,
    verify_ed25519,
)

from ._config import OfficialConfig

WEBHOOK_PATH = "/webhook"
_MESSAGE_EVENTS = {"GROUP_AT_MESSAGE_CREATE": "group", "C2C_MESSAGE_CREATE": "c2c"}
# What a reply to a stored message needs is kept a little longer than the longest window.
_REF_TTL = 2 * 86400.0
# OpenAPI codes (openapi/error/error.md) that the platform says succeed on one retry, and
# those that mean the access token was refused (refreshed once, then retried).
_RETRY_ONCE = {11242, 11252, 11263, 11281, 304082, 304083}
_TOKEN_CODES = {11241, 11243}
_RATE_CODES = {22009, 20028}
# "消息被去重，请检查请求msgseq": a passive reply with a msg_seq the message already had.
_DUPLICATE_SEQ = 40054005
_FILE_TYPES = {ImagePart: 1, VideoPart: 2, AudioPart: 3}
_BEIJING = timezone(timedelta(hours=8))
# Counters and slots of proactive messages must outlive their month.
_MONTH_TTL = 40 * 86400.0


def _reply_key(ref: _Ref) -> str:
    """The counter of replies to one message (or event)."""
    return f"qb-count:{ref.msg_id or ref.event_id}"


def signing_key(secret: str) -> Ed25519PrivateKey:
    """The Ed25519 key the platform derives from the bot secret: the secret repeated to
    the 32-byte seed (its sign.md)."""
    seed = secret.encode("utf-8")
    if not seed:
        raise ValueError("the bot secret is empty")
    while len(seed) < 32:
        seed += seed
    return Ed25519PrivateKey.from_private_bytes(seed[:32])


def public_key(secret: str) -> bytes:
    """The raw public key that verifies the platform's callbacks."""
    return signing_key(secret).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def validation_answer(secret: str, event_ts: str, plain_token: str) -> dict[str, str]:
    """The op 13 answer: ``event_ts + plain_token`` signed with the bot's key, hex."""
    sig = signing_key(secret).sign((event_ts + plain_token).encode("utf-8")).hex()
    return {"plain_token": plain_token, "signature": sig}


class _Ref(msgspec.Struct, kw_only=True):
    """What a passive reply needs (state ``qb-ref:<gateway message id>``)."""

    kind: str
    target: str
    msg_id: str | None = None
    event_id: str | None = None
    received_at: float


class _Envelope(msgspec.Struct):
    op: int
    d: Any = None
    id: str | None = None
    t: str | None = None
    s: int | None = None


_envelope = msgspec.json.Decoder(_Envelope)


def classify(status: int, body: Any, headers: Any = None) -> DeliveryError | None:
    """The error of an OpenAPI answer, or None; ``provider_code`` is the platform's
    ``code``. The platform puts ``code``/``message`` in the body even with HTTP 200 (and
    201/202 "async success" carry an error body too)."""
    api_code = body.get("code") if isinstance(body, dict) else None
    if isinstance(api_code, int) and api_code != 0:
        if api_code in _RATE_CODES:
            return DeliveryError(f"QQ bot platform: sending too fast (code {api_code})", permanent=False,
                                 provider_code=api_code, code=f"api_{api_code}", retry_after=1.0)
        transient = api_code in _RETRY_ONCE or api_code in _TOKEN_CODES
        return DeliveryError(f"QQ bot platform refused the call (code {api_code})", permanent=not transient,
                             provider_code=api_code, code=f"api_{api_code}")
    return provider_error(status, headers, provider="QQ bot platform")


class Official:
    """The official-bot side of a ``qq`` channel."""

    def __init__(self, ctx: ChannelContext, cfg: OfficialConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.public_key = public_key(cfg.secret)
        self.tolerance = cfg.timestamp_tolerance
        self.windows = {"group": (cfg.group_reply_window, cfg.group_reply_limit),
                        "c2c": (cfg.c2c_reply_window, cfg.c2c_reply_limit)}
        timeout = cfg.api_timeout
        self.client: httpx.AsyncClient | None = None
        self.token = SharedValue(ctx.state, "qb-token", str, self._fetch_token,
                                 margin=cfg.token_refresh_margin, lease_ttl=timeout + 5,
                                 wait=2 * timeout + 5)

    async def start(self) -> None:
        self.client = httpx.AsyncClient(timeout=self.cfg.api_timeout,
                                        headers={"User-Agent": "omnichannel-gateway"})
        self.ctx.add_route(WEBHOOK_PATH, self.webhook, methods=["POST"], max_body=self.cfg.max_body)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    # --- inbound -----------------------------------------------------------------

    async def webhook(self, request: Request) -> Response:
        body = await request.body()
        timestamp = request.headers.get("x-signature-timestamp")
        # The signature comes first, op 13 included: its answer is a signature made with
        # the key that signs dispatches, so answering an unsigned one would sign for anyone.
        check_timestamp(timestamp, self.tolerance)
        assert timestamp is not None
        verify_ed25519(self.public_key, timestamp.encode() + body, request.headers.get("x-signature-ed25519"))
        try:
            env = _envelope.decode(body)
        except msgspec.DecodeError as exc:
            raise RequestError.from_decode("not a QQ bot payload", exc) from None
        except RecursionError:
            raise RequestError("not a QQ bot payload: nested too deep") from None
        if env.op == 13:
            d = env.d if isinstance(env.d, dict) else {}
            plain_token, event_ts = d.get("plain_token"), d.get("event_ts")
            if not isinstance(plain_token, str) or not isinstance(event_ts, str) or not plain_token:
                raise RequestError("validation request without plain_token or event_ts")
            return JSONResponse(validation_answer(self.cfg.secret, event_ts, plain_token))
        if env.op != 0:
            raise RequestError(f"unexpected op {env.op}")
        if not isinstance(env.d, dict):
            raise RequestError("dispatch without an object d")
        if env.t in _MESSAGE_EVENTS:
            await self._message(_MESSAGE_EVENTS[env.t], env.t, env.d, env.id)
        else:
            await self._event(env)
        return JSONResponse({"op": 12, "d": 0})

    async def _message(self, kind: str, event_type: str, d: dict[str, Any], event_id: str | None) -> None:
        author = d.get("author") if isinstance(d.get("author"), dict) else {}
        assert isinstance(author, dict)
        msg_id = d.get("id")
        sender = author.get("member_openid" if kind == "group" else "user_openid") or author.get("id")
        target = d.get("group_openid") if kind == "group" else sender
        if not isinstance(msg_id, str) or not msg_id or not isinstance(sender, str) or not sender \
                or not isinstance(target, str) or not target:
            raise RequestError(f"{event_type} without id, author or group_openid")
        content = d.get("content") if isinstance(d.get("content"), str) else ""
        assert isinstance(content, str)
        if kind == "group":
            # The platform leaves one space where the @bot was; what the customer typed
            # after it (indentation, a full-width space) is theirs and stays.
            content = content.removeprefix(" ")
        parts: list[Part] = [TextPart(text=content)] if content else []
        attachments = d.get("attachments")
        for a in attachments if isinstance(attachments, list) else []:
            if isinstance(a, dict):
                parts.append(_attachment(a))
        sent_at = None
        if isinstance(d.get("timestamp"), str):
            try:
                # The platform writes Beijing time; the bus carries UTC.
                sent_at = datetime.fromisoformat(d["timestamp"])
                sent_at = (sent_at if sent_at.tzinfo else sent_at.replace(tzinfo=_BEIJING)).astimezone(timezone.utc)
            except (ValueError, OverflowError):  # OverflowError: beyond year 9999 in UTC
                sent_at = None
        # The platform counts the reply window from its message: a push that reached us
        # late (its retry after our 503) must not lengthen it.
        received = time.time()
        if sent_at is not None:
            received = min(received, sent_at.timestamp())
        native = f"{kind}:{target}"
        meta: dict[str, Any] = {"transport": "official", "event": event_type, "msg_id": msg_id}
        if kind == "group":
            meta["group_openid"] = target
        message = self.ctx.message(conversation=native, sender=Participant(id=sender), parts=parts,
                                   provider_id=msg_id, sent_at=sent_at, meta=meta)
        route = {"transport": "official", "kind": kind, "target": target, "msg_id": msg_id,
                 "received_at": received}
        result = await self.ctx.publish(message, route=route)
        if not result.duplicate:
            await self.ctx.state.put_record(f"qb-ref:{message.id}", _Ref(kind=kind, target=target, msg_id=msg_id,
                                                                          received_at=received), ttl=_REF_TTL)

    async def _event(self, env: _Envelope) -> None:
        """Any other dispatch is published as an ``event`` part (not an error); one that
        names a group or user opens a conversation the ``event_id`` can answer."""
        d: dict[str, Any] = env.d
        name = (env.t or "unknown").lower()
        data = {k: str(v) for k, v in d.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
        group, user = d.get("group_openid"), d.get("openid") or d.get("user_openid") or d.get("op_member_openid")
        kind, target = ("group", group) if isinstance(group, str) and group else ("c2c", user)
        if not isinstance(target, str) or not target:
            kind, target = "app", self.cfg.app_id
        # Without an envelope id, what the event is made of identifies it: hashed, so the
        # provider id on the bus repeats none of its fields (openids) and stays short.
        ident = env.id or f"{env.t}:{stable_id(msgspec.json.encode(d).decode())}"
        message = self.ctx.message(conversation=f"{kind}:{target}",
                                   sender=Participant(id=str(user) if isinstance(user, str) and user else target),
                                   parts=[EventPart(event=name, data=data)], provider_id=f"event:{ident}", auto=True,
                                   meta={"transport": "official", "event": env.t or ""})
        route = None
        if env.id and kind in ("group", "c2c"):
            route = {"transport": "official", "kind": kind, "target": target, "event_id": env.id,
                     "received_at": time.time()}
        await self.ctx.publish(message, route=route, interaction=False)

    # --- passive replies ---------------------------------------------------------

    async def _ref(self, outbound: Outbound | None, route: dict[str, Any]) -> _Ref | None:
        kind, target, received = route.get("kind"), route.get("target"), route.get("received_at")
        if outbound is not None and outbound.in_reply_to:
            found = await self.ctx.state.get_record(f"qb-ref:{outbound.in_reply_to}", _Ref)
            # Only a message of this conversation: the reply goes to the ref's target, and
            # an in_reply_to from another conversation would carry it to another customer.
            if found is not None and (found.kind, found.target) == (kind, target):
                return found
        if not isinstance(kind, str) or not isinstance(target, str) or not isinstance(received, (int, float)):
            return None
        return _Ref(kind=kind, target=target, msg_id=route.get("msg_id"), event_id=route.get("event_id"),
                    received_at=float(received))

    def _month_key(self, ref: _Ref, at: float) -> str:
        # The platform counts proactive messages per calendar month (Beijing time).
        month = datetime.fromtimestamp(at, _BEIJING).strftime("%Y-%m")
        return f"qb-month:{ref.kind}:{ref.target}:{month}"

    async def _int(self, key: str) -> int:
        raw = await self.ctx.state.get(key)
        return int(raw) if raw and raw.isdigit() else 0

    async def reach(self, conversation: Conversation, at: datetime) -> Reach:
        ref = await self._ref(None, conversation.route)
        if ref is None:
            return Reach(ok=False, code="no_route", detail="nothing stored to reply to")
        window, limit = self.windows.get(ref.kind, self.windows["c2c"])
        until = datetime.fromtimestamp(ref.received_at + window, timezone.utc)
        if at >= until:
            why = f"the platform accepts replies for {_minutes(window)} after the customer's message"
        elif await self._used(_reply_key(ref), limit) >= limit:
            why = f"the customer's message has had its {limit} replies"
        else:
            return Reach(ok=True, until=until)
        quota = self.cfg.proactive_per_month
        if quota and await self._used(self._month_key(ref, at.timestamp()), quota) < quota:
            return Reach(ok=True, detail=f"{why}; a proactive message (of {quota} a month) can still go")
        return Reach(ok=False, code="outside_window", until=until, detail=why)

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        ref = await self._ref(outbound, conversation.route)
        if ref is None:
            raise DeliveryError("conversation has no QQ bot message to reply to", permanent=True, code="no_route")
        messages = self._messages(outbound)
        mode, counter, limit = await self._plan(outbound.id, ref, len(messages))
        base = f"/v2/groups/{ref.target}" if ref.kind == "group" else f"/v2/users/{ref.target}"
        progress_key = f"qb-progress:{outbound.id}"
        done = await self._int(progress_key)
        got = None
        for i, (content, media) in enumerate(messages[done:], start=done):
            # One message per text or medium, each counted and (passive) with its own
            # msg_seq; after a transient failure the retry resumes after those the
            # platform took.
            n = await self._take(f"qb-slot:{mode}:{outbound.id}:{i}", counter, limit,
                                 ttl=_MONTH_TTL if mode == "proactive" else _REF_TTL)
            payload: dict[str, Any] = {"content": content, "msg_type": 0}
            if media is not None:
                upload = await self._call("POST", f"{base}/files", {"file_type": _FILE_TYPES[type(media)],
                                                                      "url": media.url, "srv_send_msg": False})
                file_info = upload.get("file_info") if isinstance(upload, dict) else None
                if not isinstance(file_info, str) or not file_info:
                    raise DeliveryError("the platform answered an upload without file_info", permanent=False,
                                        code="bad_response")
                payload.update(msg_type=7, media={"file_info": file_info})
            if mode == "passive":
                payload["msg_seq"] = n
                if ref.msg_id:
                    payload["msg_id"] = ref.msg_id
                else:
                    payload["event_id"] = ref.event_id
            try:
                answer = await self._call("POST", f"{base}/messages", payload)
            except DeliveryError as exc:
                if mode != "passive" or exc.provider_code != _DUPLICATE_SEQ:
                    raise
                # This msg_seq was sent before (its answer was lost to a timeout or a crash):
                # the platform refuses the copy, and the reply is out.
                answer = None
            got = answer.get("id") if isinstance(answer, dict) else None
            if i + 1 < len(messages):
                await self.ctx.state.put(progress_key, str(i + 1).encode(), ttl=_REF_TTL)
        if len(messages) > 1:
            await self.ctx.state.delete(progress_key)
        return Receipt(provider_id=got if isinstance(got, str) and got else None,
                       meta={"transport": "official", "mode": mode, "messages": len(messages)})

    @staticmethod
    def _messages(outbound: Outbound) -> list[tuple[str, ImagePart | VideoPart | AudioPart | None]]:
        """(content, medium) per reply: the text parts joined into one, then one reply per
        image, video or voice (sent by URL: the platform fetches it; ``file_data`` is not
        supported by the platform, and files are not open to bots yet)."""
        text = "\n".join(p.text for p in outbound.parts if isinstance(p, TextPart))
        out: list[tuple[str, ImagePart | VideoPart | AudioPart | None]] = [(text, None)] if text else []
        for part in outbound.parts:
            if isinstance(part, TextPart):
                continue
            if isinstance(part, (ImagePart, VideoPart, AudioPart)):
                if not part.url or not part.url.startswith(("http://", "https://")):
                    raise DeliveryError("the QQ bot platform sends media only by http(s) URL", permanent=True,
                                        code="unsupported_content")
                # msg_type 7 needs some content; the platform's documentation suggests a space.
                out.append((" ", part))
            else:
                raise DeliveryError(f"the QQ bot platform cannot send a {part.__struct_config__.tag} part",
                                    permanent=True, code="unsupported_content")
        if not out:
            raise DeliveryError("nothing the QQ bot platform can send in this outbound", permanent=True,
                                code="empty")
        return out

    async def _plan(self, outbound_id: str, ref: _Ref, n: int) -> tuple[str, str, int]:
        """(mode, counter key, limit): a passive reply while the message's window is open
        and it has replies left for all ``n`` messages, else a proactive message where
        configured and this month's quota covers them, else ``outside_window`` — before
        anything is sent."""
        window, limit = self.windows.get(ref.kind, self.windows["c2c"])
        now = time.time()
        if now >= ref.received_at + window:
            why = f"the platform accepts replies only for {_minutes(window)} after the customer's message"
        else:
            missing = await self._missing("passive", outbound_id, n)
            if not missing or await self._used(_reply_key(ref), limit) + missing <= limit:
                return "passive", _reply_key(ref), limit
            why = f"the customer's message has had its {limit} replies (this outbound needs {missing} more)"
        quota = self.cfg.proactive_per_month
        if quota:
            key = self._month_key(ref, now)
            missing = await self._missing("proactive", outbound_id, n)
            if not missing or await self._used(key, quota) + missing <= quota:
                return "proactive", key, quota
            why += f", and this month's {quota} proactive messages are used"
        raise DeliveryError(why, permanent=True, code="outside_window")

    async def _missing(self, mode: str, outbound_id: str, n: int) -> int:
        """How many of the outbound's ``n`` messages have not been counted yet."""
        missing = 0
        for i in range(n):
            if await self.ctx.state.get(f"qb-slot:{mode}:{outbound_id}:{i}") is None:
                missing += 1
        return missing

    async def _take(self, slot: str, counter: str, limit: int, *, ttl: float) -> int:
        """Count one message against ``counter`` and remember its number under ``slot``:
        a retry reuses the number (as ``msg_seq`` the platform refuses a second copy).
        Numbers are keys ``<counter>:<n>`` created only if absent (so processes never take
        the same one), then given a TTL (a bare ``create`` has none)."""
        raw = await self.ctx.state.get(slot)
        if raw and raw.isdigit():
            return int(raw)
        for n in range(1, limit + 1):
            key = f"{counter}:{n}"
            if await self.ctx.state.create(key, b"1"):
                await self.ctx.state.put(key, b"1", ttl=ttl)
                await self.ctx.state.put(slot, str(n).encode(), ttl=ttl)
                return n
        raise DeliveryError(f"the limit of {limit} messages is used", permanent=True, code="outside_window")

    async def _used(self, counter: str, limit: int) -> int:
        """How many numbers of ``counter`` are taken."""
        used = 0
        for n in range(1, limit + 1):
            if await self.ctx.state.get(f"{counter}:{n}") is not None:
                used += 1
        return used

    # --- OpenAPI -----------------------------------------------------------------

    async def _fetch_token(self) -> tuple[str, float]:
        assert self.client is not None
        with provider_call("QQ bot token endpoint"):
            r = await self.client.post(self.cfg.token_url, json={"appId": self.cfg.app_id,
                                                                 "clientSecret": self.cfg.secret})
        body = _json(r)
        err = classify(r.status_code, body, r.headers)
        if err is not None:
            raise err
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise DeliveryError("token endpoint answered without access_token", permanent=False, code="bad_response")
        try:
            expires_in = float(body.get("expires_in") or 7200)  # the platform sends it as a string
        except (TypeError, ValueError):
            expires_in = 7200.0
        return token, expires_in

    async def _call(self, method: str, path: str, payload: dict[str, Any]) -> Any:
        assert self.client is not None
        token = await self.token.get()
        for attempt in (1, 2):
            with provider_call("QQ bot platform"):
                r = await self.client.request(method, self.cfg.api_base.rstrip("/") + path, json=payload,
                                              headers={"Authorization": f"QQBot {token}",
                                                       "X-Union-Appid": self.cfg.app_id})
            body = _json(r)
            err = classify(r.status_code, body, r.headers)
            token_refused = r.status_code == 401 or (err is not None and err.provider_code in _TOKEN_CODES)
            if token_refused and attempt == 1:
                token = await self.token.get(stale=token)
                continue
            if err is not None:
                raise err
            return body
        raise AssertionError("unreachable")


def _json(r: httpx.Response) -> Any:
    if not r.content:
        return {}
    try:
        return r.json()
    except ValueError:
        return {}


def _attachment(a: dict[str, Any]) -> Part:
    ctype = a.get("content_type") if isinstance(a.get("content_type"), str) else ""
    assert isinstance(ctype, str)
    url = a.get("url") if isinstance(a.get("url"), str) else None
    if url and "://" not in url:
        url = "https://" + url  # the platform sends some attachment URLs without a scheme
    fields: dict[str, Any] = {"url": url}
    if isinstance(a.get("filename"), str):
        fields["filename"] = a["filename"]
    size = a.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        fields["size"] = size
    if ctype.startswith("image/"):
        return ImagePart(content_type=ctype, **fields)
    if ctype.startswith("video/"):
        return VideoPart(content_type=ctype, **fields)
    if ctype == "voice" or ctype.startswith("audio/"):
        return AudioPart(content_type=None if ctype == "voice" else ctype, **fields)
    return FilePart(content_type=ctype if "/" in ctype else None, **fields)


def _minutes(window: float) -> str:
    return str(timedelta(seconds=round(window))) if window % 60 else f"{round(window / 60)} minutes"
