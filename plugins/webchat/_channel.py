"""The web chat channel: the widget script, a demo page, a WebSocket per visitor, image
uploads, and replies kept in a bounded history so a visitor who was away sees them."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any, Literal
from urllib.parse import quote

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from gateway import (
    BusUnavailable,
    Channel,
    ChannelContext,
    AudioPart,
    ChoicePart,
    Config,
    Conversation,
    DeliveryError,
    FilePart,
    Handshake,
    ImagePart,
    LinkPart,
    Outbound,
    Part,
    Participant,
    RateLimiter,
    Reach,
    Receipt,
    RequestError,
    SignatureError,
    Supervised,
    TextPart,
    VideoPart,
    WebSocketClosed,
    WebSocketConnection,
    quiet_until,
)

from ._config import IMAGE_TYPES, WebChatConfig, limit_warnings
from ._store import (
    USER,
    Contention,
    Entry,
    HistoryStore,
    Image,
    Profile,
    TooLarge,
    append,
    check_token,
    check_user,
    issue_token,
    new_visitor,
)

_CID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{2,}$")
_PHONE = re.compile(r"^\+?[0-9 ()-]{5,24}$")
# The first bytes of each image type we accept: a file is what it says it is.
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
    "application/pdf": (b"%PDF-",),
}
_SAFE_URL = re.compile(r"^https?://[^\s<>\"']{1,2000}$")
# What a file name may keep: no path, no control characters, no quotes (a header carries it).
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\\"<>:|?*]+")
_RANK = {"": 0, "delivered": 1, "read": 2}
INVALID_TOKEN = 4401
"""Close code of a socket whose token is not ours (the widget then starts afresh)."""
TRY_LATER = 1013
"""Close code while the bus is unavailable (RFC 6455 "try again later")."""
FORGOTTEN = 4410
"""Close code after the visitor erased the conversation (the widget then starts afresh)."""


# --- frames from the widget (JSON text, tagged on "type") ---------------------------------


class _Say(msgspec.Struct, tag="message", tag_field="type", forbid_unknown_fields=True):
    id: str
    text: str


class _Choose(msgspec.Struct, tag="choice", tag_field="type", forbid_unknown_fields=True):
    id: str
    survey: str
    index: int


class _Seen(msgspec.Struct, tag="seen", tag_field="type", forbid_unknown_fields=True):
    ids: list[str]
    state: Literal["delivered", "read"]


class _Profile(msgspec.Struct, tag="profile", tag_field="type", forbid_unknown_fields=True):
    name: str
    email: str = ""
    phone: str = ""


class _Forget(msgspec.Struct, tag="forget", tag_field="type", forbid_unknown_fields=True):
    pass


class _Context(msgspec.Struct, tag="context", tag_field="type", forbid_unknown_fields=True):
    """Where the visitor is: sent by the widget after each welcome, put in the ``meta`` of
    their messages for the agent."""

    page: str = ""
    referrer: str = ""
    locale: str = ""
    timezone: str = ""


_frames = msgspec.json.Decoder(_Say | _Choose | _Seen | _Profile | _Forget | _Context)
_CONTEXT_LIMITS = {"page": 2048, "referrer": 2048, "locale": 35, "timezone": 64}


@dataclass(frozen=True)
class Visitor:
    """Who a socket belongs to, decided at the handshake."""

    subject: str = ""
    """``v-<random>`` (anonymous) or ``u-<user id>`` (signed by the site)."""
    token: str | None = None
    """A token to hand to the widget (new visitor, or a signed-in user)."""
    address: str = ""
    error: str | None = None
    """Why the token or user signature was refused (told in-band, then closed)."""
    close_code: int = INVALID_TOKEN
    """The close code that tells why: 4401 not our token, 4410 its conversation was erased."""
    browser: str = ""
    """The browser's User-Agent (shortened), for the agent."""


class Refused(Exception):
    """A widget frame we answer with an error frame (the socket stays open)."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class WebChatChannel(Channel):
    """A chat widget on the desk's own website: ``/channels/<name>/widget.js`` to embed,
    ``/demo`` to try, ``/ws`` for the widget's socket, ``/upload`` for images."""

    channel_type = "webchat"
    config_type = WebChatConfig
    supported_parts = frozenset({"text", "image", "link", "file", "audio", "video"})

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        cfg: WebChatConfig = ctx.config
        self.cfg = cfg
        self.history = HistoryStore(ctx.state, cfg.history_size, cfg.history_ttl)
        self.sockets: dict[str, set[WebSocketConnection]] = {}
        """Open widget sockets of this process, by conversation key."""
        self.visitor_limit = RateLimiter(cfg.messages_per_minute, per=60, burst=max(1, cfg.messages_per_minute // 4))
        self.address_limit = RateLimiter(cfg.connections_per_minute, per=60, burst=max(1, cfg.connections_per_minute // 3))
        per_address = cfg.messages_per_address_minute
        self.address_messages = RateLimiter(per_address, per=60, burst=max(1, per_address // 4))
        # Every frame, even one that changes nothing ("seen", a choice of no survey), may read
        # the conversation's record on the bus: a socket cannot send them as fast as it likes.
        self.frame_limit = RateLimiter(max(240, 2 * cfg.messages_per_minute), per=60,
                                       burst=max(60, cfg.messages_per_minute // 2))
        self.open_by_address: dict[str, int] = {}
        """Open widget sockets of this process, by address."""
        self._secret: bytes | None = None
        # What the open widgets of a conversation were sent, for the catch-up of replies
        # another gateway process delivered: entry ids, and the history's last revision.
        self._known: dict[str, dict[str, None]] = {}
        self._revisions: dict[str, int] = {}
        self._sync: Supervised | None = None
        # Where each visitor last said they were (page, locale ...), for their messages' meta.
        self._contexts: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._widget = _static("widget.js").replace(b"/*{{config}}*/null", _encoder.encode(self._branding()), 1)
        # Compressed once: every page of the site loads it (about a third of the size).
        self._widget_gz = gzip.compress(self._widget, 9, mtime=0)
        self._demo = _static("demo.html").replace(b"{{title}}", _html_escape(cfg.title or "Web chat").encode())

    def _branding(self) -> dict[str, Any]:
        """What the widget needs before it connects (the launcher is drawn at once)."""
        cfg = self.cfg
        return {"color": cfg.color, "position": cfg.position, "launcher_icon": cfg.launcher_icon,
                "language": cfg.language, "strings": cfg.strings, "sound": cfg.sound, "title": cfg.title}

    @classmethod
    def config_warnings(cls, options: Any, config: Config) -> list[str]:
        """Limits that contradict each other or the gateway's (``gateway check-config``)."""
        return limit_warnings(options, config)

    async def start(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        ctx.add_route("/widget.js", self._serve_widget, methods=["GET"])
        if cfg.demo:
            ctx.add_route("/demo", self._serve_demo, methods=["GET"])
        # The upload's limit is the channel's own: a phone's photo is larger than any webhook.
        ctx.add_route("/upload", self._upload, methods=["POST", "OPTIONS"], max_body=cfg.max_upload_size,
                      own_limit=True)
        ctx.add_route("/status", self._status, methods=["GET", "OPTIONS"])
        ctx.add_route("/media/{entry}/{n:int}", self._media, methods=["GET", "OPTIONS"])
        # A text frame holds at most max_message_chars characters of 4 UTF-8 bytes, quoted.
        ctx.add_websocket("/ws", self._session, authorize=self._authorize, max_connections=cfg.max_connections,
                          max_message_size=cfg.max_message_chars * 6 + 1024, idle_timeout=cfg.idle_timeout,
                          send_queue=256)
        if cfg.sync_interval > 0:
            self._sync = Supervised(f"webchat-sync {ctx.name}", self._sync_loop, set_state=ctx.set_state, log=ctx.log)
            self._sync.start()

    async def stop(self) -> None:
        if self._sync is not None:
            await self._sync.stop()
            self._sync = None

    async def _sync_loop(self, task: Supervised) -> None:
        """Push replies that reached a conversation's history through another gateway
        process to this process's open widgets of that conversation."""
        interval = self.cfg.sync_interval
        task.running()
        while True:
            await asyncio.sleep(interval)
            for key in list(self.sockets):
                got = await self.ctx.state.get_revision(HistoryStore.key(key))
                if got is None or self._revisions.get(key) == got[1]:
                    continue
                self._revisions[key] = got[1]
                known = self._known.get(key, {})
                for entry in self.history.decode(got[0]):
                    if entry.id not in known:
                        await self._push(key, {"type": "message", "message": _view(entry)})

    # --- identity ------------------------------------------------------------------------

    async def secret(self) -> bytes:
        """The token key: from the configured secret, or one generated once and shared
        through the channel's state; bound to this channel's name, so a token of another
        channel with the same ``secret`` is not accepted here."""
        if self._secret is None:
            raw = self.cfg.secret.encode() if self.cfg.secret else await self.ctx.state.get("secret")
            if raw is None:
                await self.ctx.state.create("secret", secrets.token_hex(32).encode())
                raw = await self.ctx.state.get("secret")
            if not raw:
                raise BusUnavailable("the channel secret could not be read")
            self._secret = hmac.new(raw, b"webchat-channel:" + self.ctx.name.encode(), hashlib.sha256).digest()
        return self._secret

    def _origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """No Origin (not a browser), the gateway's own origin (the demo page), or listed."""
        if origin is None:
            return True
        if host and origin in (f"http://{host}", f"https://{host}"):
            return True
        return origin in self.cfg.allowed_origins

    def _address(self, headers: Any, client: Any) -> str:
        """Who counts as one address for the limits: the client's IPv4 address, or the /64
        network of its IPv6 address (whoever has one address of a /64 has them all)."""
        address = str(client[0]) if client else "unknown"
        if self.cfg.trust_forwarded:
            # The last entry is the one our own proxy added; the rest the client wrote.
            address = headers.get("x-forwarded-for", "").split(",")[-1].strip() or address
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    async def _authorize(self, handshake: Handshake) -> Visitor:
        return replace(await self._judge(handshake), browser=handshake.headers.get("user-agent", "")[:300])

    async def _judge(self, handshake: Handshake) -> Visitor:
        if not self._origin_allowed(handshake.origin, handshake.headers.get("host")):
            raise RequestError("origin not allowed", status=403)
        address = self._address(handshake.headers, handshake.client)
        if self.open_by_address.get(address, 0) >= self.cfg.sockets_per_address:
            raise RequestError(f"too many open sockets from this address (sockets_per_address "
                               f"{self.cfg.sockets_per_address})", status=429)
        wait = self.address_limit.take("ws:" + address)
        if wait:
            raise RequestError(f"too many connections from this address, retry in {_wait(wait)} s", status=429)
        try:
            secret = await self.secret()
        except BusUnavailable:
            raise RequestError("bus unavailable, retry later", status=503) from None
        q = handshake.query
        try:
            if q.get("user") is not None:
                subject = check_user(self.cfg.user_secret, q["user"], q.get("signature"))
                return Visitor(subject=subject, token=issue_token(secret, subject), address=address)
            if q.get("token"):
                subject = self._subject(secret, q["token"])
                try:
                    erased = await self._erased(subject)
                except BusUnavailable:
                    raise RequestError("bus unavailable, retry later", status=503) from None
                if erased:
                    return Visitor(address=address, error="conversation erased", close_code=FORGOTTEN)
                return Visitor(subject=subject, address=address)
        except SignatureError as exc:
            # In-band: a browser's WebSocket cannot read a refused handshake's status.
            return Visitor(address=address, error=exc.reason)
        subject = new_visitor()
        return Visitor(subject=subject, token=issue_token(secret, subject), address=address)


    def _subject(self, secret: bytes, token: str | None) -> str:
        """The subject of one of our tokens; a signed-in user's only while ``user_secret``
        is set (switching it off signs those users out)."""
        subject = check_token(secret, token)
        if subject.startswith(USER) and not self.cfg.user_secret:
            raise SignatureError("signed user ids are not enabled on this channel (user_secret)")
        return subject

    async def _bearer(self, request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            raise RequestError("missing visitor token (Authorization: Bearer)", status=401)
        try:
            return self._subject(await self.secret(), token.strip())
        except SignatureError:
            raise RequestError("invalid visitor token", status=401) from None

    # --- the socket ----------------------------------------------------------------------

    def online(self) -> bool:
        """Is the desk staffed now (outside ``offline_hours``)?"""
        hours = self.cfg.offline_hours
        return hours is None or quiet_until(hours.quiet(), datetime.now(timezone.utc)) is None

    async def _session(self, conn: WebSocketConnection) -> None:
        visitor: Visitor = conn.identity
        address = visitor.address
        self.open_by_address[address] = self.open_by_address.get(address, 0) + 1
        try:
            await self._visit(conn, visitor)
        finally:
            left = self.open_by_address.pop(address) - 1
            if left:
                self.open_by_address[address] = left

    async def _visit(self, conn: WebSocketConnection, visitor: Visitor) -> None:
        if visitor.error is not None:
            # The close reason is the message: a close goes out ahead of queued frames.
            await conn.close(visitor.close_code, visitor.error[:120])
            return
        key = self.ctx.conversation_key(visitor.subject)
        try:
            profile = await self.ctx.state.get_record("profile." + visitor.subject, Profile)
            entries = await self.history.read(key)
        except BusUnavailable:
            # Nothing can be shown or kept now: "try again later"; the widget reconnects.
            await conn.close(TRY_LATER, "bus unavailable, retry later")
            return
        self.sockets.setdefault(key, set()).add(conn)
        for e in entries:
            self._remember(key, e.id)
        try:
            cfg = self.cfg
            online = self.online()
            await conn.send(_json({
                "type": "welcome", "token": visitor.token, "title": cfg.title, "welcome": cfg.welcome,
                "online": online, "notice": None if online else cfg.offline_notice,
                "prechat": cfg.prechat and profile is None and not visitor.subject.startswith(USER),
                "upload_types": cfg.upload_types, "max_upload_size": cfg.max_upload_size,
                "max_chars": cfg.max_message_chars, "user": visitor.subject.startswith(USER)}))
            await conn.send(_json({"type": "history", "messages": [_view(e) for e in entries]}))
            async for data in conn:
                await self._frame(conn, visitor, key, data)
        finally:
            group = self.sockets.get(key)
            if group is not None:
                group.discard(conn)
                if not group:
                    del self.sockets[key]
                    self._known.pop(key, None)
                    self._revisions.pop(key, None)

    async def _frame(self, conn: WebSocketConnection, visitor: Visitor, key: str, data: str | bytes) -> None:
        try:
            frame: Any = _frames.decode(data)
        except msgspec.DecodeError:
            frame = None
        cid = getattr(frame, "id", None)
        wait = self.frame_limit.take(visitor.subject)
        if wait:
            await conn.send(_json({"type": "error", "id": cid, "code": "rate_limited",
                                   "message": f"too many messages, try again in {_wait(wait)} s",
                                   "retry_after": round(max(wait, 0.1), 1)}))
            return
        if frame is None:
            await conn.send(_json({"type": "error", "code": "bad_frame", "message": "not a widget message"}))
            return
        try:
            if isinstance(frame, _Say):
                entry = await self._say(visitor, key, frame)
            elif isinstance(frame, _Choose):
                entry = await self._choose(visitor, key, frame)
            elif isinstance(frame, _Seen):
                await self._seen(key, frame)
                return
            elif isinstance(frame, _Context):
                self._remember_context(visitor, frame)
                return
            elif isinstance(frame, _Forget):
                self._limit(visitor)
                await self._forget(conn, visitor, key)
                return
            else:
                self._limit(visitor)  # each profile is a write
                await self._profile(conn, visitor, frame)
                return
        except Refused as exc:
            await conn.send(_json({"type": "error", "id": cid, "code": exc.code, "message": exc.message,
                                   "retry_after": exc.retry_after}))
            return
        except (BusUnavailable, Contention):
            await conn.send(_json({"type": "error", "id": cid, "code": "unavailable",
                                   "message": "not stored yet, retrying", "retry_after": 3}))
            return
        view = _view(entry)
        await conn.send(_json({"type": "ack", "id": cid, "message": view}))
        await self._push(key, {"type": "message", "message": view}, skip=conn)

    def _limit(self, visitor: Visitor) -> None:
        wait = self.visitor_limit.take(visitor.subject) or self.address_messages.take(visitor.address)
        if wait:
            # Never a retry_after of 0: the widget would take the refusal as final.
            raise Refused("rate_limited", f"too many messages, try again in {_wait(wait)} s",
                          retry_after=round(max(wait, 0.1), 1))

    async def _say(self, visitor: Visitor, key: str, frame: _Say) -> Entry:
        if not _CID.match(frame.id):
            raise Refused("bad_frame", "message id must be 1-64 letters, digits or _.:-")
        text = frame.text.strip()
        if not text:
            raise Refused("empty", "empty message")
        if len(text) > self.cfg.max_message_chars:
            raise Refused("too_long", f"message longer than {self.cfg.max_message_chars} characters")
        self._limit(visitor)
        return await self._publish(visitor, key, frame.id, [TextPart(text=text)], Entry(
            id="", by="visitor", at=_now(), text=text, cid=frame.id))

    async def _choose(self, visitor: Visitor, key: str, frame: _Choose) -> Entry:
        if not _CID.match(frame.id):
            raise Refused("bad_frame", "message id must be 1-64 letters, digits or _.:-")
        entries = await self.history.read(key)
        survey = next((e for e in entries if e.id == frame.survey and e.by == "agent" and e.choices), None)
        if survey is None or not 0 <= frame.index < len(survey.choices):
            raise Refused("no_survey", "no such survey or choice in this conversation")
        if survey.answered is not None:
            raise Refused("answered", "this survey was answered already")
        if survey.answer_until is not None and _now() > survey.answer_until:
            raise Refused("expired", "this survey is closed")
        self._limit(visitor)
        choice = survey.choices[frame.index]
        entry = await self._publish(
            visitor, key, "choice:" + frame.survey,
            [TextPart(text=choice), ChoicePart(survey=frame.survey, choice=choice, index=frame.index)],
            Entry(id="", by="visitor", at=_now(), text=choice, cid=frame.id))

        def mark(items: list[Entry]) -> bool:
            for e in items:
                if e.id == frame.survey and e.answered is None:
                    e.answered = frame.index
                    return True
            return False

        items = await self.history.change(key, mark)
        # Tabs that raced each other all learn the answer that was kept, not their own.
        kept = next((e.answered for e in items if e.id == frame.survey), None)
        await self._push(key, {"type": "answered", "survey": frame.survey,
                               "index": frame.index if kept is None else kept})
        return entry

    async def _erased(self, subject: str) -> bool:
        """Did the visitor erase this conversation (within ``history_ttl``)? Its token, still
        held by another tab or process, then opens nothing: replies to it are dead letters."""
        return await self.ctx.state.get("forgotten." + self.ctx.conversation_key(subject)) is not None

    async def _publish(self, visitor: Visitor, key: str, cid: str, parts: list[Part], entry: Entry) -> Entry:
        """Publish a visitor's message (once per ``cid``: retries are duplicates), then keep it
        in the history (also on a retry, in case the first try stopped in between)."""
        if await self._erased(visitor.subject):
            raise Refused("forgotten", "this conversation was erased")
        profile = await self.ctx.state.get_record("profile." + visitor.subject, Profile)
        meta: dict[str, Any] = {"visitor": "user" if visitor.subject.startswith(USER) else "anonymous"}
        if profile is not None:
            meta.update({k: v for k, v in (("email", profile.email), ("phone", profile.phone)) if v})
        meta.update(self._contexts.get(visitor.subject, {}))
        if visitor.browser:
            meta["browser"] = visitor.browser
        message = self.ctx.message(conversation=visitor.subject,
                                   sender=Participant(id=visitor.subject, name=profile.name if profile else None),
                                   parts=parts, provider_id=f"{visitor.subject}:{cid}", meta=meta)
        await self.ctx.publish(message, route={"subject": visitor.subject})
        entry.id = message.id
        try:
            entries = await self.history.change(key, append(entry))
        except (BusUnavailable, Contention) as exc:
            # On the bus already: only the widget's copy is missing; its retry adds it.
            self.ctx.log.warning("visitor message published but not kept in history", error=str(exc))
            return entry
        # A retry of the same id with other words is the first message again (the bus kept
        # that one): the widget is told what was stored, not what it sent this time.
        return next((e for e in entries if e.id == entry.id), entry)

    def _remember_context(self, visitor: Visitor, frame: _Context) -> None:
        """Keep where the visitor is (the newest 10,000 visitors of this process)."""
        context = {name: str(getattr(frame, name))[:limit] for name, limit in _CONTEXT_LIMITS.items()
                   if getattr(frame, name)}
        if context.get("page") and not _SAFE_URL.match(context["page"]):
            context.pop("page")
        if context.get("referrer") and not _SAFE_URL.match(context["referrer"]):
            context.pop("referrer")
        self._contexts.pop(visitor.subject, None)
        self._contexts[visitor.subject] = context
        if len(self._contexts) > 10000:
            self._contexts.popitem(last=False)

    async def _seen(self, key: str, frame: _Seen) -> None:
        """The widget showed (``delivered``) or the visitor saw (``read``) agent messages:
        each state is reported once per message, only for messages of this conversation."""
        wanted = set(frame.ids[:200])
        rank = _RANK[frame.state]
        changed: list[str] = []

        def mark(entries: list[Entry]) -> bool:
            changed.clear()
            for e in entries:
                if e.by == "agent" and e.id in wanted and _RANK[e.state] < rank:
                    e.state = frame.state
                    changed.append(e.id)
            return bool(changed)

        await self.history.change(key, mark)
        for outbound_id in changed:
            await self.ctx.report_status(outbound_id, frame.state, conversation=key)

    async def _profile(self, conn: WebSocketConnection, visitor: Visitor, frame: _Profile) -> None:
        name, email, phone = frame.name.strip(), frame.email.strip(), frame.phone.strip()
        field, problem = (("name", "a name of 1 to 80 characters is needed") if not 0 < len(name) <= 80 else
                          # Lengths first: the pattern backtracks on a long enough string (40 ms at 24 KB).
                          ("email", "that email address does not look right")
                          if email and (len(email) > 254 or not _EMAIL.match(email)) else
                          ("phone", "that phone number does not look right")
                          if phone and (len(phone) > 24 or not _PHONE.match(phone)) else ("", ""))
        if problem:
            # ``field`` lets the widget say it in the visitor's language.
            await conn.send(_json({"type": "error", "code": "bad_profile", "field": field, "message": problem}))
            return
        await self.ctx.state.put_record("profile." + visitor.subject, Profile(name=name, email=email, phone=phone),
                                        ttl=self.history.ttl)
        await conn.send(_json({"type": "profile_saved"}))

    async def _forget(self, conn: WebSocketConnection, visitor: Visitor, key: str) -> None:
        """The visitor erases the conversation: history and profile go, replies still on their
        way are refused (``forgotten``) for ``history_ttl``, and the widget starts afresh as
        a new visitor. A signed-in user's conversation belongs to the site: not here."""
        if visitor.subject.startswith(USER):
            raise Refused("not_allowed", "a signed-in conversation is erased by the site, not the widget")
        await self.ctx.state.put("forgotten." + key, b"1", ttl=self.history.ttl)
        await self.ctx.state.delete(HistoryStore.key(key))
        await self.ctx.state.delete("profile." + visitor.subject)
        for other in list(self.sockets.get(key, ())):  # this one too; the close code says why
            await other.close(FORGOTTEN, "conversation erased")

    def _remember(self, key: str, entry_id: str) -> None:
        """Note what the open widgets of ``key`` were sent: the newest ids only, twice the
        history's size (an older id is no longer in the history the catch-up reads)."""
        known = self._known.setdefault(key, {})
        known.pop(entry_id, None)
        known[entry_id] = None
        if len(known) > 2 * self.cfg.history_size:
            del known[next(iter(known))]

    async def _push(self, key: str, frame: dict[str, Any], skip: WebSocketConnection | None = None) -> int:
        """Send ``frame`` to every open socket of the conversation in this process."""
        targets = [c for c in self.sockets.get(key, ()) if c is not skip]
        if frame["type"] == "message" and key in self.sockets:
            self._remember(key, frame["message"]["id"])
        data = _json(frame)

        async def one(c: WebSocketConnection) -> None:
            try:
                await c.send(data)
            except WebSocketClosed:
                pass

        await asyncio.gather(*(one(c) for c in targets))
        return len(targets)

    # --- outbound ----------------------------------------------------------------------

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        if not outbound.parts and outbound.survey is None:
            return await self._control(outbound, conversation)
        texts: list[str] = []
        files: list[Image] = []
        dropped: list[str] = []
        for n, part in enumerate(outbound.parts, 1):
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, LinkPart):
                texts.append(f"{part.title}: {part.url}" if part.title else part.url)
            elif isinstance(part, (ImagePart, FilePart, AudioPart, VideoPart)):
                file = await self._attachment(part)
                if file is None:
                    # The rest of the reply still goes: the receipt says what was left out.
                    dropped.append(f"{part.__struct_config__.tag} part {n}: no content and no http(s) URL")
                else:
                    files.append(file)
        if not texts and not files and outbound.survey is None:
            raise DeliveryError("; ".join(dropped) or "nothing to show", permanent=True, code="unsupported_content")
        if await self.ctx.state.get("forgotten." + conversation.key) is not None:
            raise DeliveryError("the visitor erased this conversation", permanent=True, code="forgotten")
        now = _now()
        survey, sender = outbound.survey, outbound.sender
        entry = Entry(id=outbound.id, by="agent", at=now, text="\n\n".join(texts), images=files,
                      choices=list(survey.choices) if survey else [],
                      answer_until=now + timedelta(seconds=survey.answer_within) if survey else None,
                      agent=(sender.name or "")[:80] if sender else "",
                      avatar=sender.avatar_url if sender and sender.avatar_url and
                      _SAFE_URL.match(sender.avatar_url) else "")
        read: list[str] = []

        def add(entries: list[Entry]) -> bool:
            # An answer means the desk read what the visitor wrote before it.
            read[:] = _mark_read(entries, None)
            return append(entry)(entries) or bool(read)

        try:
            await self.history.change(conversation.key, add)
        except (BusUnavailable, Contention) as exc:
            raise DeliveryError(f"history not stored: {exc}", permanent=False, code="history_unavailable") from exc
        except TooLarge as exc:
            raise DeliveryError(str(exc), permanent=True, code="too_large") from exc
        if read:
            await self._push(conversation.key, {"type": "read", "ids": read})
        online = await self._push(conversation.key, {"type": "message", "message": _view(entry)})
        meta: dict[str, Any] = {"open_widgets": online}
        if dropped:
            meta["dropped"] = dropped
        return Receipt(provider_id=outbound.id, meta=meta)

    async def _attachment(self, part: ImagePart | FilePart | AudioPart | VideoPart) -> Image | None:
        """A media part of a reply as the history keeps it: its bytes in the object store
        (a download for the visitor, an image shown inline), or a link when the part has
        only a ``url``."""
        kind = part.content_type or "application/octet-stream"
        name = _file_name(part.filename or "")
        if part.data is None and part.ref is None:
            if part.url and _SAFE_URL.match(part.url):
                return Image(content_type=kind, name=name, size=part.size or 0, url=part.url)
            return None
        ref = part.ref
        if ref is None:  # inline: into the object store, the history keeps only references
            ref = await self.ctx.put_blob(await self.ctx.part_bytes(part), content_type=part.content_type)
        return Image(ref=ref, content_type=kind, name=name, size=part.size or ref.size)

    async def _control(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        """An outbound without parts: the desk's typing indicator (``meta.typing``) or its
        reading of the visitor's messages (``meta.read``: a visitor message id, every one up
        to it). Shown to the open widgets; only ``read`` is kept (in the history)."""
        meta = outbound.meta
        typing, read_to = meta.get("typing"), meta.get("read")
        if not isinstance(typing, bool) and not isinstance(read_to, str):
            raise DeliveryError("an outbound without parts needs meta.typing (true or false) or meta.read "
                                "(a visitor message id)", permanent=True, code="empty")
        online = 0
        if isinstance(read_to, str):
            read: list[str] = []

            def mark(entries: list[Entry]) -> bool:
                read[:] = _mark_read(entries, read_to)
                return bool(read)

            try:
                await self.history.change(conversation.key, mark)
            except (BusUnavailable, Contention) as exc:
                raise DeliveryError(f"history not stored: {exc}", permanent=False,
                                    code="history_unavailable") from exc
            if read:
                online = await self._push(conversation.key, {"type": "read", "ids": read})
        if isinstance(typing, bool):
            sender = outbound.sender
            online = await self._push(conversation.key, {"type": "typing", "on": typing,
                                                         "agent": (sender.name or "")[:80] if sender else ""})
        return Receipt(provider_id=outbound.id, meta={"open_widgets": online})

    async def reach(self, conversation: Conversation, at: datetime) -> Reach:
        """Always reachable (a reply waits in the history until the visitor comes back),
        unless the visitor erased the conversation."""
        if await self.ctx.state.get("forgotten." + conversation.key) is not None:
            return Reach(ok=False, code="forgotten", detail="the visitor erased this conversation")
        return Reach(ok=True)

    async def read_history(self, conversation: str) -> list[Entry]:
        """A conversation's kept entries, oldest first (what a returning visitor is shown)."""
        return await self.history.read(conversation)

    # --- HTTP: script, demo, uploads, media ---------------------------------------------

    async def _serve_widget(self, request: Request) -> Response:
        headers = {"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff",
                   "Cross-Origin-Resource-Policy": "cross-origin", "Vary": "Accept-Encoding"}
        body = self._widget
        if "gzip" in request.headers.get("accept-encoding", ""):
            body, headers["Content-Encoding"] = self._widget_gz, "gzip"
        return Response(body, media_type="application/javascript; charset=utf-8", headers=headers)

    async def _serve_demo(self, request: Request) -> Response:
        url = request.url
        widget = f"{url.scheme}://{url.netloc}/channels/{self.ctx.name}/widget.js"
        page = self._demo.replace(b"{{widget}}", _html_escape(widget).encode())
        return Response(page, media_type="text/html; charset=utf-8", headers={
            "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' blob: data: https:; "
                                       "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    def _cors(self, request: Request) -> dict[str, str]:
        origin = request.headers.get("origin")
        if not self._origin_allowed(origin, request.headers.get("host")):
            raise RequestError("origin not allowed", status=403)
        if origin is None:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Headers": "authorization, content-type",
                "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Max-Age": "600"}

    async def _refusable(self, request: Request, cors: dict[str, str], answer: Any) -> Response:
        """``answer``'s response; a refusal carries the CORS headers too, so the widget on
        the embedding site can read why (a browser hides an answer without them)."""
        try:
            response: Response = await answer(request, cors)
            return response
        except RequestError as exc:
            if not cors:
                raise
            self.ctx.log.info("request rejected", path=request.url.path, status=exc.status, reason=exc.reason)
            return PlainTextResponse(exc.reason + "\n", status_code=exc.status, headers=cors)
        except BusUnavailable:
            if not cors:
                raise
            return PlainTextResponse("bus unavailable, retry later\n", status_code=503,
                                     headers={**cors, "Retry-After": "5"})

    async def _status(self, request: Request) -> Response:
        """``GET /status``: may this page use the chat? The widget asks when its socket
        cannot open (a browser does not tell a script why a handshake was refused): an
        origin not in ``allowed_origins`` is told so, readably (CORS), and the widget says
        the chat is unavailable instead of trying forever."""
        origin = request.headers.get("origin")
        if not self._origin_allowed(origin, request.headers.get("host")):
            return JSONResponse({"ok": False, "code": "origin_not_allowed",
                                 "message": "this site is not in the chat's allowed_origins"}, status_code=403,
                                headers={"Access-Control-Allow-Origin": origin or "*", "Vary": "Origin"})
        cors = self._cors(request)
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=cors)
        return JSONResponse({"ok": True, "online": self.online()}, headers={**cors, "Cache-Control": "no-store"})

    async def _upload(self, request: Request) -> Response:
        """``POST /upload?id=<widget id>`` with the image as the body, the visitor's token as
        ``Authorization: Bearer``: stored in the object store, published as an image part."""
        cors = self._cors(request)
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=cors)
        return await self._refusable(request, cors, self._take_upload)

    async def _take_upload(self, request: Request, cors: dict[str, str]) -> Response:
        subject = await self._bearer(request)
        cid = request.query_params.get("id", "")
        if not _CID.match(cid):
            raise RequestError("query parameter id must be 1-64 letters, digits or _.:-")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in self.cfg.upload_types:
            raise RequestError(f"this file type is not accepted (accepted: {', '.join(self.cfg.upload_types)})",
                               status=415)
        name = _file_name(request.query_params.get("name", ""))
        visitor = Visitor(subject=subject, address=self._address(request.headers, request.client),
                          browser=request.headers.get("user-agent", "")[:300])
        wait = self.visitor_limit.take(subject) or self.address_messages.take(visitor.address)
        if wait:
            raise RequestError(f"too many messages, try again in {_wait(wait)} s", status=429)
        body = await request.body()
        if not body.startswith(_MAGIC.get(content_type, (b"",))):
            raise RequestError("the file is not the type it claims", status=415)
        if content_type == "image/webp" and body[8:12] != b"WEBP":
            raise RequestError("the file is not the type it claims", status=415)
        if await self._erased(subject):
            raise RequestError("this conversation was erased", status=410)
        ref = await self.ctx.put_blob(body, content_type=content_type)
        key = self.ctx.conversation_key(subject)
        part: Part = (ImagePart(ref=ref, content_type=content_type, size=len(body), filename=name or None)
                      if content_type in IMAGE_TYPES else
                      FilePart(ref=ref, content_type=content_type, size=len(body), filename=name or None))
        try:
            entry = await self._publish(
                visitor, key, "img:" + cid, [part],
                Entry(id="", by="visitor", at=_now(), cid=cid,
                      images=[Image(ref=ref, content_type=content_type, name=name, size=len(body))]))
        except Refused as exc:  # erased meanwhile
            raise RequestError(exc.message, status=410) from None
        view = _view(entry)
        await self._push(key, {"type": "message", "message": view})
        return JSONResponse({"message": view}, headers=cors)

    async def _media(self, request: Request) -> Response:
        """``GET /media/<entry id>/<n>``: an image of the visitor's own conversation."""
        cors = self._cors(request)
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=cors)
        return await self._refusable(request, cors, self._serve_media)

    async def _serve_media(self, request: Request, cors: dict[str, str]) -> Response:
        subject = await self._bearer(request)
        entry_id, n = request.path_params["entry"], request.path_params["n"]
        entries = await self.history.read(self.ctx.conversation_key(subject))
        entry = next((e for e in entries if e.id == entry_id), None)
        if entry is None or not 0 <= n < len(entry.images) or entry.images[n].ref is None:
            raise RequestError("no such file in this conversation", status=404)
        image = entry.images[n]
        assert image.ref is not None
        data = await self.ctx.get_blob(image.ref)
        # Only raster types are shown inline; anything else (an agent's SVG ...) is a download.
        inline = image.content_type in IMAGE_TYPES
        media = image.content_type if image.content_type in _MAGIC else "application/octet-stream"
        disposition = "inline" if inline else "attachment"
        if image.name and not inline:
            # RFC 6266: the UTF-8 name (a Chinese file name) percent-encoded.
            disposition += f"; filename*=UTF-8''{quote(image.name, safe='')}"
        return Response(data, media_type=media, headers={
            **cors, "X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600",
            "Content-Disposition": disposition})


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _wait(seconds_: float) -> int:
    """A wait as the visitor is told it: whole seconds, never "0"."""
    return max(1, math.ceil(seconds_))


def _file_name(name: str) -> str:
    """A file name safe to show and to put in a header: no path, no control characters."""
    return _UNSAFE_NAME.sub("_", name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]).strip(" ._")[:120]


def _mark_read(entries: list[Entry], up_to: str | None) -> list[str]:
    """Mark the visitor's messages read (all, or up to the one with id ``up_to``); the ids
    that changed."""
    if up_to is not None and not any(e.id == up_to and e.by == "visitor" for e in entries):
        return []
    changed: list[str] = []
    for e in entries:
        if e.by == "visitor" and e.state != "read":
            e.state = "read"
            changed.append(e.id)
        if e.id == up_to:
            break
    return changed


def _view(e: Entry) -> dict[str, Any]:
    """An entry as the widget sees it: no object-store references."""
    view: dict[str, Any] = {"id": e.id, "by": e.by, "at": e.at.isoformat(), "text": e.text}
    if e.cid:
        view["cid"] = e.cid
    if e.images:
        view["attachments"] = [{"type": i.content_type, "name": i.name, "size": i.size,
                                "image": i.content_type in IMAGE_TYPES and i.ref is not None,
                                **({"url": i.url} if i.url else {})} for i in e.images]
    if e.agent:
        view["agent"] = e.agent
    if e.avatar:
        view["avatar"] = e.avatar
    if e.choices:
        view["choices"] = e.choices
        view["answered"] = e.answered
    if e.state:
        view["state"] = e.state
    return view


_encoder = msgspec.json.Encoder()


def _json(frame: dict[str, Any]) -> str:
    return _encoder.encode(frame).decode()


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
