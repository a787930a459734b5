"""OneBot v11 over reverse WebSocket: the implementation (NapCat, Lagrange.OneBot ...)
connects to ``/channels/<name>/onebot`` once per bot account (``X-Self-ID``); events come
in on that socket and API calls go out on it, matched to their answers by ``echo``."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import AsyncIterable
from typing import Any, Protocol

import httpx
import websockets
from starlette.requests import Request
from starlette.responses import Response
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

import msgspec

from gateway import (
    AudioPart,
    Backoff,
    BusUnavailable,
    ChannelContext,
    Conversation,
    SignatureError,
    WebSocketClient,
    DeliveryError,
    EventPart,
    FilePart,
    Handshake,
    ImagePart,
    Outbound,
    Participant,
    RateLimiter,
    Receipt,
    RequestError,
    TextPart,
    UnknownPart,
    VideoPart,
    WebSocketClosed,
    TIMEOUT,
    WebSocketConnection,
    not_connected,
    provider_call,
    provider_error,
    transport_error,
    tokens_equal,
    verify_hmac,
)

from ._config import GroupRule, OneBotConfig
from ._message import MessageError, Segment, parse_message, plain_text, to_parts

WS_PATH = "/onebot"
# How long the gateway remembers which OneBot message a gateway message id was, so a
# reply that names the inbound it answers quotes exactly that message.
_QUOTE_TTL = 7 * 86400.0
_MAX_QUEUE = 256
_MIN_HEARTBEAT_TIMEOUT = 15.0

# OneBot v11 retcodes (communication/ws.md): the HTTP statuses 400/401/403/404 as 14xx.
# Anything else is the implementation's own (go-cqhttp 100, NapCat/LLOneBot 200 ...) with
# status "failed": the implementation says it did not send, so a retry cannot double it.
_PERMANENT_RETCODES = {1400: "bad_request", 1401: "unauthorized", 1403: "forbidden", 1404: "unknown_action"}


class _Quoted(msgspec.Struct, kw_only=True):
    """State ``ob-msg:<gateway message id>``: what a reply needs to quote that message."""

    message_id: str
    user_id: str
    group: str = ""
    """``<self_id>:<group_id>`` of the message (empty in records written before it was kept)."""


class _Link(Protocol):
    """One socket to the implementation, whichever side opened it."""

    @property
    def closed(self) -> bool: ...

    async def send(self, data: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class _ServerLink:
    """A reverse WebSocket (the toolkit's :class:`WebSocketConnection`) as a :class:`_Link`."""

    def __init__(self, conn: WebSocketConnection) -> None:
        self.conn = conn

    @property
    def closed(self) -> bool:
        return self.conn.closed

    async def send(self, data: str) -> None:
        await self.conn.send(data)

    async def close(self, code: int, reason: str) -> None:
        await self.conn.close(code, reason)


class _ClientLink:
    """A forward WebSocket (websockets ``ClientConnection``) as a :class:`_Link`."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @property
    def closed(self) -> bool:
        return self.ws.state is not State.OPEN

    async def send(self, data: str) -> None:
        try:
            await self.ws.send(data)
        except websockets.ConnectionClosed:
            raise WebSocketClosed(self.ws.close_code, "") from None

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


@dataclass
class _Bot:
    """One bot account: its socket (None over HTTP), API calls waiting for their answer,
    the events waiting to be published, its heartbeats."""

    self_id: str
    link: _Link | None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once ``self_id`` is known (at once, except on a forward socket)."""
    pending: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=lambda: asyncio.Queue(_MAX_QUEUE))
    connected_at: float = field(default_factory=time.monotonic)
    last_heartbeat: float | None = None
    interval: float | None = None
    """Heartbeat interval the implementation announces (seconds)."""


def _s(value: Any) -> str:
    """An id as a string (OneBot sends QQ numbers and message ids as JSON numbers)."""
    if value is None or isinstance(value, (dict, list)):
        return ""
    return str(value)


_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _loads(data: str | bytes) -> Any:
    """JSON as the implementation sent it, with lone UTF-16 surrogates (``"\\ud83d"``:
    valid JSON, not valid Unicode; Node implementations write half an emoji so when QQ cut
    a group card) replaced by U+FFFD, since the bus carries UTF-8 only."""
    obj = json.loads(data)
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return _scrub(obj) if _LONE_SURROGATE.search(text) else obj


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def _unix_time(value: Any) -> datetime | None:
    """An event's ``time`` (seconds since the epoch); None when it is no such time."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None


def _num(value: str) -> int | str:
    """A QQ number or message id back as the JSON number OneBot expects."""
    return int(value) if value.lstrip("-").isdigit() else value


def _loopback(client: tuple[str, int] | None) -> bool:
    """Whether the peer is this host (127.0.0.0/8, ::1, or an IPv4-mapped loopback)."""
    if client is None:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def mask(qq: str) -> str:
    """A QQ number for logs and health details: only its last four digits."""
    return "…" + qq[-4:] if len(qq) > 4 else "…"


class _Malformed(RequestError):
    """An event that is not what OneBot v11 describes: counted (WebSocket) or 400 (HTTP)."""


def check_answer(answer: dict[str, Any]) -> Any:
    """The ``data`` of an API answer, or a :class:`DeliveryError` classified by ``retcode``
    (its ``provider_code``)."""
    status = answer.get("status")
    retcode = answer.get("retcode")
    if status in ("ok", "async") or (status is None and retcode in (0, 1)):
        return answer.get("data")
    rc = retcode if isinstance(retcode, int) else None
    if rc in _PERMANENT_RETCODES:
        return _raise(rc, permanent=True, code=_PERMANENT_RETCODES[rc])
    return _raise(rc, permanent=False, code=f"retcode_{rc}" if rc is not None else "failed")


def _raise(rc: int | None, *, permanent: bool, code: str) -> Any:
    # The implementation's ``wording``/``msg`` may quote the message: not repeated.
    raise DeliveryError(f"OneBot implementation refused the call (retcode {rc})", permanent=permanent,
                        provider_code=rc, code=code)


class OneBot:
    """The OneBot side of a ``qq`` channel."""

    def __init__(self, ctx: ChannelContext, cfg: OneBotConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.api_timeout = cfg.api_timeout
        self.interval = cfg.group_interval
        self.bots: dict[str, _Bot] = {}
        self._echo = itertools.count(1)
        # At most one send per group_interval into one group (this process).
        self.pace = RateLimiter(1, per=self.interval, burst=1) if self.interval > 0 else None
        self._watchdog: asyncio.Task[None] | None = None
        self.client: WebSocketClient | None = None
        self.http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        transport = self.cfg.transport
        if transport == "reverse_ws":
            self.ctx.add_websocket(WS_PATH, self.session, authorize=self.authorize,
                                   max_connections=self.cfg.max_connections,
                                   max_message_size=self.cfg.max_message_size, idle_timeout=None)
        elif transport == "forward_ws":
            headers = {"Authorization": f"Bearer {self.cfg.access_token}"} if self.cfg.access_token else {}
            self.client = WebSocketClient(self.ctx, self.cfg.url, self.forward_session, headers=headers,
                                          max_message_size=self.cfg.max_message_size, report_health=False)
            self.client.start()
        else:
            self.http = httpx.AsyncClient(timeout=self.api_timeout, headers={"User-Agent": "omnichannel-gateway"})
            self.ctx.add_route(WS_PATH, self.http_event, methods=["POST"], max_body=self.cfg.max_message_size)
        self._watchdog = asyncio.create_task(self._watch(), name=f"qq-onebot-watchdog:{self.ctx.name}")

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except asyncio.CancelledError:
                pass
        if self.http is not None:
            await self.http.aclose()

    def connected_here(self) -> bool:
        """False while a reverse-WebSocket channel has no account connected to this process."""
        if self.cfg.transport != "reverse_ws":
            return True
        return any(b.link is not None and not b.link.closed for b in self.bots.values())

    # --- handshake and session ---------------------------------------------------

    def authorize(self, handshake: Handshake) -> str:
        """Bearer token (or ``?access_token=``) and the ``X-Self-ID`` of the bot account."""
        if self.cfg.access_token:
            token = handshake.bearer_token() or handshake.query.get("access_token")
            if not tokens_equal(token, self.cfg.access_token):
                raise RequestError("missing or wrong access token", status=401)
        elif not _loopback(handshake.client):
            # Without a token anyone could claim any account, inject messages and, by
            # replacing the real socket, receive the replies meant for customers.
            raise RequestError("no access_token is configured: only loopback clients are accepted", status=401)
        self_id = handshake.headers.get("x-self-id", "").strip()
        if not self_id.isdigit():
            raise RequestError("missing or malformed X-Self-ID", status=400)
        if self.cfg.self_ids and self_id not in self.cfg.self_ids:
            raise RequestError("X-Self-ID is not an allowed bot account", status=403)
        if handshake.headers.get("x-client-role", "Universal").lower() != "universal":
            # Separate API and Event sockets of one account would replace each other here:
            # the channel needs events and API calls on one Universal socket.
            raise RequestError("only X-Client-Role Universal is served", status=400)
        return self_id

    async def session(self, conn: WebSocketConnection) -> None:
        """A reverse WebSocket: the implementation connected with its ``X-Self-ID``."""
        bot = _Bot(conn.identity, _ServerLink(conn))
        bot.ready.set()
        await self._serve(bot, conn)

    async def forward_session(self, ws: ClientConnection) -> None:
        """A forward WebSocket the gateway opened: the account is asked for its number
        (``get_login_info``) before its events are published."""
        bot = _Bot("", _ClientLink(ws))
        identify = asyncio.create_task(self._identify(bot))
        try:
            await self._serve(bot, ws)
        finally:
            identify.cancel()

    async def _identify(self, bot: _Bot) -> None:
        try:
            data = await self._call_bot(bot, "get_login_info", {})
        except DeliveryError as exc:
            self.ctx.log.warning("OneBot get_login_info failed", error=str(exc))
            assert bot.link is not None
            await bot.link.close(1011, "get_login_info failed")
            return
        self_id = _s(data.get("user_id")) if isinstance(data, dict) else ""
        if not self_id.isdigit() or (self.cfg.self_ids and self_id not in self.cfg.self_ids):
            self.ctx.log.warning("OneBot account not allowed or unknown", bot=mask(self_id))
            assert bot.link is not None
            await bot.link.close(1008, "account not allowed")
            return
        bot.self_id = self_id
        self._register(bot)
        bot.ready.set()

    def _register(self, bot: _Bot) -> _Bot | None:
        old = self.bots.get(bot.self_id)
        self.bots[bot.self_id] = bot
        self.ctx.log.info("OneBot connected", bot=mask(bot.self_id), transport=self.cfg.transport)
        self._health()
        return old

    async def _serve(self, bot: _Bot, messages: AsyncIterable[str | bytes]) -> None:
        """Read one socket until it closes: answers to our calls resolve their futures,
        meta events feed health, other events go to the bot's worker, in order."""
        if bot.ready.is_set():
            old = self._register(bot)
            if old is not None and old.link is not None:
                # The implementation reconnected before we saw the old socket drop.
                await old.link.close(1000, "replaced by a new connection")
        worker = asyncio.create_task(self._work(bot), name=f"qq-onebot-events:{self.ctx.name}")
        try:
            try:
                async for data in messages:
                    await self._received(bot, data)
            except websockets.ConnectionClosed:
                pass
        finally:
            for fut in bot.pending.values():
                if not fut.done():
                    fut.set_exception(DeliveryError("OneBot connection closed before the answer", permanent=False,
                                                    code=TIMEOUT))
            if bot.self_id and self.bots.get(bot.self_id) is bot:
                del self.bots[bot.self_id]
            # Events already received are still published (the worker drains the queue);
            # those of a forward socket whose account was never identified are dropped.
            bot.ready.set()
            await bot.queue.put(None)
            try:
                await asyncio.shield(worker)
            except asyncio.CancelledError:
                worker.cancel()
                raise
            self.ctx.log.info("OneBot disconnected", bot=mask(bot.self_id))
            self._health()

    async def http_event(self, request: Request) -> Response:
        """OneBot HTTP POST: one event per request, signed ``X-Signature: sha1=<hex>``
        (HMAC-SHA1 of the body with ``secret``). Answered 204 (no quick operation) once
        the event is on the bus; 503 while the bus is down."""
        body = await request.body()
        verify_hmac(self.cfg.secret, body, request.headers.get("x-signature"), digest="sha1", prefix="sha1=")
        try:
            event = _loads(body)
        except (ValueError, RecursionError):
            raise RequestError("body is not JSON (or nested too deep)") from None
        if not isinstance(event, dict) or not isinstance(event.get("post_type"), str):
            raise RequestError("body is not a OneBot event")
        self_id = request.headers.get("x-self-id", "").strip() or _s(event.get("self_id"))
        if not self_id.isdigit():
            raise RequestError("missing or malformed X-Self-ID")
        if self.cfg.self_ids and self_id not in self.cfg.self_ids:
            raise SignatureError("X-Self-ID is not an allowed bot account")
        bot = self.bots.get(self_id)
        if bot is None:
            bot = self.bots[self_id] = _Bot(self_id, None)
            bot.ready.set()
        if event["post_type"] == "meta_event":
            self._meta(bot, event)
        else:
            await self._event(self_id, event)
        return Response(status_code=204)

    async def _received(self, bot: _Bot, data: str | bytes) -> None:
        try:
            obj = _loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser recurses
            self.ctx.count("onebot_malformed")
            self.ctx.log.warning("OneBot sent something that is not JSON", bot=mask(bot.self_id))
            return
        if not isinstance(obj, dict):
            self.ctx.count("onebot_malformed")
            return
        if "post_type" not in obj:
            echo = obj.get("echo")
            fut = bot.pending.get(echo) if isinstance(echo, str) else None
            if fut is not None and not fut.done():
                fut.set_result(obj)
            return
        if obj.get("post_type") == "meta_event":
            self._meta(bot, obj)
            return
        await bot.queue.put(obj)  # waits when full: the socket is then not read (backpressure)

    def _meta(self, bot: _Bot, event: dict[str, Any]) -> None:
        """Heartbeats and lifecycle events feed the channel's health; nothing is published."""
        if event.get("meta_event_type") == "heartbeat":
            bot.last_heartbeat = time.monotonic()
            interval = event.get("interval")
            if isinstance(interval, (int, float)) and interval > 0:
                bot.interval = interval / 1000.0
            status = event.get("status")
            self._health()

    # --- health ------------------------------------------------------------------

    def _timeout(self, bot: _Bot) -> float:
        configured = self.cfg.heartbeat_timeout
        if configured > 0:
            return configured
        return max(_MIN_HEARTBEAT_TIMEOUT, 3 * (bot.interval or 5.0))

    def _health(self) -> None:
        now = time.monotonic()
        problems = []
        for bot in self.bots.values():
            if bot.link is None and bot.last_heartbeat is None:
                continue  # HTTP POST: judged by heartbeats only once it sends them
            since = bot.last_heartbeat if bot.last_heartbeat is not None else bot.connected_at
            if now - since > self._timeout(bot):
                problems.append(f"no heartbeat from bot {mask(bot.self_id)} for {round(now - since)}s")
        if not self.bots and self.cfg.transport != "http":
            why = self.client.last_error if self.client is not None else None
            problems.append("no OneBot implementation connected" + (f" (last error: {why})" if why else ""))
        if problems:
            self.ctx.set_state("degraded", "; ".join(problems))
        else:
            self.ctx.set_state("running", None)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._health()

    # --- events ------------------------------------------------------------------

    async def _work(self, bot: _Bot) -> None:
        """Publish the bot's events in order; while the bus is down, wait and retry (the
        implementation never resends an event, so giving up would lose it)."""
        backoff = Backoff(0.2, 5.0)
        await bot.ready.wait()
        while True:
            event = await bot.queue.get()
            if event is None:
                return
            if not bot.self_id:
                self.ctx.count("onebot_unidentified")
                continue
            while True:
                try:
                    await self._event(bot.self_id, event)
                    backoff.reset()
                    break
                except _Malformed as exc:
                    self.ctx.count("onebot_malformed")
                    self.ctx.log.warning("OneBot event not understood", bot=mask(bot.self_id), reason=exc.reason)
                    break
                except BusUnavailable:
                    delay = backoff.next()
                    self.ctx.log.warning("bus unavailable; OneBot event held", retry_in=round(delay, 2))
                    await asyncio.sleep(delay)
                except Exception as exc:  # noqa: BLE001 - one bad event must not stop the bot's stream
                    self.ctx.count("onebot_event_error")
                    self.ctx.log.warning("OneBot event not published", error=f"{type(exc).__name__}")
                    break

    def _rule(self, group_id: str) -> GroupRule:
        rule = self.cfg.groups.get(group_id)
        if rule is not None:
            return rule
        return GroupRule(filter=self.cfg.filter, keywords=self.cfg.keywords)

    def _passes(self, rule: GroupRule, segments: list[Segment], at_bot: bool) -> bool:
        if rule.filter == "all" or at_bot:
            return True
        if rule.filter == "keyword":
            text = plain_text(segments).lstrip()
            return any(text.startswith(k) for k in rule.keywords if k)
        return False

    async def _event(self, self_id: str, event: dict[str, Any]) -> None:
        post_type = event.get("post_type")
        if post_type == "message":
            await self._message(self_id, event)
        elif post_type in ("notice", "request"):
            await self._notice(self_id, event)
        else:
            self.ctx.count("onebot_unknown_post_type")

    async def _message(self, self_id: str, event: dict[str, Any]) -> None:
        message_type = _s(event.get("message_type"))
        message_id, user_id, group_id = _s(event.get("message_id")), _s(event.get("user_id")), _s(event.get("group_id"))
        if not message_id or not user_id or message_type not in ("group", "private") or (
                message_type == "group" and not group_id):
            raise _Malformed("message event without its ids (message_id, user_id, group_id)")
        if user_id == self_id:
            return  # the account's own messages (sent from another device) are not the customer's
        try:
            segments = parse_message(event.get("message", event.get("raw_message", "")))
        except MessageError as exc:
            raise _Malformed(str(exc)) from None
        inbound = to_parts(segments, self_id)
        if message_type == "group":
            rule = self._rule(group_id)
            if not rule.enabled:
                self.ctx.count("group_disabled")
                return
            if not self._passes(rule, segments, inbound.at_bot):
                self.ctx.count("group_filtered")
                return
        sender = event.get("sender") if isinstance(event.get("sender"), dict) else {}
        assert isinstance(sender, dict)
        name = sender.get("card") or sender.get("nickname")
        native = f"group:{self_id}:{group_id}" if message_type == "group" else f"private:{self_id}:{user_id}"
        meta: dict[str, Any] = {"transport": "onebot", "self_id": self_id, "message_type": message_type,
                                "message_id": message_id, "user_id": user_id}
        if group_id:
            meta["group_id"] = group_id
        if isinstance(event.get("sub_type"), str):
            meta["sub_type"] = event["sub_type"]
        if inbound.at_bot:
            meta["at_bot"] = True
        if inbound.at_all:
            meta["at_all"] = True
        if inbound.mentions:
            meta["mentions"] = inbound.mentions
        if inbound.reply_to:
            meta["reply_to"] = inbound.reply_to
        if isinstance(sender.get("role"), str):
            meta["sender_role"] = sender["role"]
        sent = event.get("time")
        message = self.ctx.message(
            conversation=native, sender=Participant(id=user_id, name=name if isinstance(name, str) and name else None),
            recipient=Participant(id=self_id), parts=inbound.parts, provider_id=f"{self_id}:{message_id}",
            sent_at=_unix_time(sent),
            in_reply_to=f"{self_id}:{inbound.reply_to}" if inbound.reply_to else None, meta=meta)
        route = {"transport": "onebot", "self_id": self_id, "message_type": message_type, "user_id": user_id,
                 "group_id": group_id or None, "message_id": message_id}
        result = await self.ctx.publish(message, route=route)
        if result.duplicate:
            self.ctx.count("onebot_replayed")
        elif message_type == "group":
            await self.ctx.state.put_record(f"ob-msg:{message.id}", _Quoted(
                message_id=message_id, user_id=user_id, group=f"{self_id}:{group_id}"), ttl=_QUOTE_TTL)

    async def _notice(self, self_id: str, event: dict[str, Any]) -> None:
        """Notices (member joined or left, a recall, a group file upload ...) and requests
        are published as ``event`` parts; they do not count as the customer writing."""
        kind = _s(event.get("notice_type") or event.get("request_type"))
        if not kind:
            raise _Malformed("notice or request without notice_type or request_type")
        group_id, user_id = _s(event.get("group_id")), _s(event.get("user_id"))
        if group_id and not self._rule(group_id).enabled:
            self.ctx.count("group_disabled")
            return
        data: dict[str, str] = {}
        for key, value in event.items():
            if key in ("time", "self_id", "post_type") or isinstance(value, (dict, list)) or value is None:
                continue
            data[key] = _s(value)
        file = event.get("file")
        if isinstance(file, dict):
            for key in ("id", "name", "size", "busid", "url"):
                if file.get(key) is not None:
                    data[f"file_{key}"] = _s(file[key])
        native = f"group:{self_id}:{group_id}" if group_id else f"private:{self_id}:{user_id or self_id}"
        ident = ":".join(_s(event.get(k)) for k in ("sub_type", "group_id", "user_id", "operator_id", "message_id",
                                                     "time", "flag"))
        if isinstance(file, dict):
            ident += ":" + _s(file.get("id"))
        message = self.ctx.message(
            conversation=native, sender=Participant(id=user_id or self_id), recipient=Participant(id=self_id),
            parts=[EventPart(event=kind, key=_s(event.get("sub_type")) or None, data=data)],
            provider_id=f"{self_id}:{event.get('post_type')}:{kind}:{ident}", auto=True,
            meta={"transport": "onebot", "self_id": self_id, "post_type": _s(event.get("post_type")),
                  "notice_type": kind})
        await self.ctx.publish(message, interaction=False)

    # --- API calls ---------------------------------------------------------------

    async def call(self, self_id: str, action: str, params: dict[str, Any]) -> Any:
        """Call ``action`` for the bot: on its socket, answered with the same ``echo``, or
        by the HTTP API."""
        if self.cfg.transport == "http":
            return await self._call_http(action, params)
        bot = self.bots.get(self_id)
        if bot is None or bot.link is None or bot.link.closed:
            raise not_connected(f"OneBot bot {mask(self_id)}")
        return await self._call_bot(bot, action, params)

    async def _call_bot(self, bot: _Bot, action: str, params: dict[str, Any]) -> Any:
        assert bot.link is not None
        echo = f"gw-{next(self._echo)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        bot.pending[echo] = fut
        try:
            await bot.link.send(json.dumps({"action": action, "params": params, "echo": echo}, ensure_ascii=False))
            async with asyncio.timeout(self.api_timeout):
                answer = await fut
        except WebSocketClosed as exc:
            raise transport_error(exc, provider="OneBot") from None
        except TimeoutError:
            raise DeliveryError(f"OneBot did not answer {action} within {self.api_timeout:g}s", permanent=False,
                                code=TIMEOUT) from None
        finally:
            bot.pending.pop(echo, None)
        return check_answer(answer)

    async def _call_http(self, action: str, params: dict[str, Any]) -> Any:
        """The OneBot HTTP API: ``POST <url>/<action>`` with the params as JSON. 401/403
        (token), 404 (no such action), 400/406 (request) are permanent; 5xx transient."""
        assert self.http is not None
        headers = {"Authorization": f"Bearer {self.cfg.access_token}"} if self.cfg.access_token else {}
        with provider_call("OneBot HTTP API"):
            r = await self.http.post(f"{self.cfg.url.rstrip('/')}/{action}", json=params, headers=headers)
        if r.status_code != 200:
            code = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "unknown_action",
                    406: "bad_request"}.get(r.status_code)
            if code is not None:
                raise DeliveryError(f"OneBot HTTP API answered {r.status_code}", permanent=True,
                                    provider_code=1000 + r.status_code, code=code)
            err = provider_error(r.status_code, r.headers, provider="OneBot HTTP API")
            raise err if err is not None else DeliveryError(f"OneBot HTTP API answered {r.status_code}",
                                                            permanent=False, code=f"http_{r.status_code}")
        try:
            answer = r.json()
        except ValueError:
            raise DeliveryError("OneBot HTTP API answered something that is not JSON", permanent=False,
                                code="bad_response") from None
        if not isinstance(answer, dict):
            raise DeliveryError("OneBot HTTP API answered something that is not an object", permanent=False,
                                code="bad_response")
        return check_answer(answer)

    # --- outbound ----------------------------------------------------------------

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        route = conversation.route
        self_id, message_type = route.get("self_id"), route.get("message_type")
        if not isinstance(self_id, str) or message_type not in ("group", "private"):
            raise DeliveryError("conversation has no OneBot route", permanent=True, code="no_route")
        segments = await self._segments(outbound)
        if message_type == "group":
            group_id = str(route.get("group_id") or "")
            head: list[dict[str, Any]] = []
            if outbound.kind == "reply":
                quoted = await self._quoted(outbound, route)
                if quoted is not None and self.cfg.quote_reply:
                    head.append({"type": "reply", "data": {"id": quoted.message_id}})
                if quoted is not None and self.cfg.mention_sender:
                    head += [{"type": "at", "data": {"qq": quoted.user_id}}, {"type": "text", "data": {"text": " "}}]
            if self.pace is not None:
                await self.pace.acquire(f"{self_id}:{group_id}")
            data = await self.call(self_id, "send_group_msg", {"group_id": _num(group_id), "message": head + segments})
        else:
            data = await self.call(self_id, "send_private_msg",
                                   {"user_id": _num(str(route.get("user_id") or "")), "message": segments})
        message_id = _s(data.get("message_id")) if isinstance(data, dict) else ""
        return Receipt(provider_id=f"{self_id}:{message_id}" if message_id else None,
                       meta={"transport": "onebot"})

    async def _quoted(self, outbound: Outbound, route: dict[str, Any]) -> _Quoted | None:
        if outbound.in_reply_to:
            found = await self.ctx.state.get_record(f"ob-msg:{outbound.in_reply_to}", _Quoted)
            # Only a message of this group: one of another group would be quoted (and its
            # sender @mentioned) here.
            if found is not None and found.group in ("", f"{route.get('self_id')}:{route.get('group_id')}"):
                return found
        if route.get("message_id") and route.get("user_id"):
            return _Quoted(message_id=str(route["message_id"]), user_id=str(route["user_id"]))
        return None

    async def _segments(self, outbound: Outbound) -> list[dict[str, Any]]:
        """The outbound's parts as array-form segments (text stays text, whatever it holds)."""
        out: list[dict[str, Any]] = []
        for part in outbound.parts:
            if isinstance(part, TextPart):
                out.append({"type": "text", "data": {"text": part.text}})
            elif isinstance(part, (ImagePart, AudioPart, VideoPart, FilePart)):
                kind = {ImagePart: "image", AudioPart: "record", VideoPart: "video", FilePart: "file"}[type(part)]
                if part.url and part.url.startswith(("http://", "https://")):
                    file = part.url
                elif part.data is not None or part.ref is not None:
                    file = "base64://" + base64.b64encode(await self.ctx.part_bytes(part)).decode()
                elif part.media_id:
                    file = part.media_id
                else:
                    raise DeliveryError(f"{kind} part has no content, URL or file id", permanent=True,
                                        code="unsupported_content")
                data: dict[str, Any] = {"file": file}
                if kind == "file" and part.filename:
                    data["name"] = part.filename
                out.append({"type": kind, "data": data})
            elif isinstance(part, EventPart) and part.event in ("at", "face"):
                if part.event == "at":
                    self._check_at(part.key or "")
                    out.append({"type": "at", "data": {"qq": part.key or ""}})
                else:
                    out.append({"type": "face", "data": {"id": part.key or ""}})
            elif isinstance(part, UnknownPart) and isinstance(part.raw.get("type"), str):
                raw_data = part.raw.get("data") if isinstance(part.raw.get("data"), dict) else {}
                assert isinstance(raw_data, dict)
                if part.raw["type"] == "at":
                    self._check_at(_s(raw_data.get("qq")))
                out.append({"type": part.raw["type"], "data": raw_data})
            else:
                raise DeliveryError(f"OneBot cannot send a {part.__struct_config__.tag} part", permanent=True,
                                    code="unsupported_content")
        if not out:
            raise DeliveryError("nothing OneBot can send in this outbound", permanent=True, code="empty")
        return out

    def _check_at(self, qq: str) -> None:
        if qq == "all" and not self.cfg.allow_at_all:
            raise DeliveryError("@all is not allowed on this channel (onebot.allow_at_all)", permanent=True,
                                code="at_all_refused")
