"""WebSocket routes for channel plugins on the shared HTTP server.

* **Routes on the shared HTTP server** (:meth:`ChannelContext.add_websocket`): a provider
  (OneBot v11 reverse WebSocket) or a browser (a web chat widget) connects to us. The
  handshake is judged before the upgrade (a refusal is a plain HTTP answer), and every
  accepted socket is bounded: a per-channel connection limit, a message size limit, a
  bounded send queue (a consumer that does not keep up is closed, not buffered for),
  ping/pong keep-alive and an idle timeout. Sockets close with 1001 when their channel or
  the gateway stops.

The reconnecting client (we connect to a provider) is the channel toolkit's
(``channel/websocket_client.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge
from starlette.datastructures import Headers, QueryParams
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ..errors import RequestError, WebSocketClosed

if TYPE_CHECKING:
    from ..logs import Throttle


def tokens_equal(given: str | bytes | None, expected: str | bytes) -> bool:
    """Compare a secret the client sent with the expected one in constant time (``==``
    returns sooner the earlier the first wrong character is, which leaks the token)."""
    if given is None:
        return False
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


@dataclass(frozen=True)
class Handshake:
    """The opening request of a WebSocket, as ``authorize`` sees it before accepting."""

    path: str
    """The path under the channel (``/onebot`` for ``/channels/<name>/onebot``)."""
    headers: Headers
    """Request headers, case-insensitive (``headers["x-self-id"]``)."""
    query: QueryParams
    """The query string, parsed (OneBot may send ``?access_token=``)."""
    client: tuple[str, int] | None
    """The peer's address and port, as the socket sees it."""

    @property
    def origin(self) -> str | None:
        """The ``Origin`` header: a browser always sends it, a server usually not."""
        return self.headers.get("origin")

    def bearer_token(self) -> str | None:
        """The token of an ``Authorization: Bearer <token>`` header, or None."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    def bearer_matches(self, token: str) -> bool:
        """True when ``Authorization: Bearer`` carries ``token`` (compared in constant time)."""
        return tokens_equal(self.bearer_token(), token)


Authorize = Callable[[Handshake], Awaitable[Any] | Any]
"""Judges a handshake: returns an identity (kept as :attr:`WebSocketConnection.identity`) or
raises :class:`RequestError` with the status to answer (401, 403 ...)."""
WebSocketHandler = Callable[["WebSocketConnection"], Coroutine[Any, Any, None]]
"""Runs for one accepted connection (an ``async def``: it runs as a task); the connection
closes (1000) when it returns."""


@dataclass(frozen=True)
class WebSocketLimits:
    """The bounds of one WebSocket route (see :meth:`ChannelContext.add_websocket`)."""

    max_connections: int = 100
    max_message_size: int = 1 << 20
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    idle_timeout: float | None = 300.0
    send_queue: int = 64
    send_timeout: float = 5.0
    allowed_origins: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_message_size", "send_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"add_websocket: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("ping_interval", "ping_timeout", "idle_timeout", "send_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"add_websocket: {name} must be a positive number of seconds (or None), got {value}")


# Messages taken off the socket but not yet by the handler: beyond this the socket is not
# read (uvicorn pauses reading until the app receives), so a fast sender waits on TCP.
_INBOX = 8
# How long a close may wait for the close frame to be written (a peer that does not read
# keeps the transport paused) before the socket is cut.
_CLOSE_WRITE_TIMEOUT = 2.0
# How long a handler may go on after its connection closed before it is cancelled.
_HANDLER_GRACE = 5.0


class WebSocketConnection:
    """One accepted WebSocket. Iterate it for the messages the peer sends (``str`` for text
    frames, ``bytes`` for binary); iteration ends when the connection closes. ``send`` queues
    a message (backpressure: it waits while the send queue is full, and closes the connection
    as a slow consumer after ``send_timeout``)."""

    def __init__(self, route: _Route, handshake: Handshake, identity: Any, asgi_send: Any, protocol: Any) -> None:
        self.handshake = handshake
        self.identity = identity
        """What ``authorize`` returned (a bot account id, a visitor session ...)."""
        self.close_code: int | None = None
        """The close code once closed (1000 normal, 1001 stopping, 1008 slow consumer, 1009
        too large, 1011 handler error; 1005/1006 the peer left without one)."""
        self.close_reason = ""
        self._route = route
        self._limits = route.limits
        self._asgi_send = asgi_send
        self._protocol = protocol
        self._outbox: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._inbox: deque[str | bytes] = deque()
        self._inbox_ready = asyncio.Event()
        self._inbox_room = asyncio.Event()
        self._eof = False
        self._close_request: tuple[int, str] | None = None
        self._closed = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        """True once the connection is closed or a close was requested."""
        return self._closed.is_set() or self._close_request is not None

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self

    async def __anext__(self) -> str | bytes:
        while not self._inbox:
            if self._eof:
                raise StopAsyncIteration
            self._inbox_ready.clear()
            await self._inbox_ready.wait()
        self._inbox_room.set()
        return self._inbox.popleft()

    async def receive(self) -> str | bytes:
        """The next message; raises :class:`WebSocketClosed` once the connection is closed."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise WebSocketClosed(self.close_code, self.close_reason) from None

    async def send(self, data: str | bytes) -> None:
        """Queue ``data`` (text for ``str``, binary for ``bytes``). Waits while the send queue
        is full; if it stays full for ``send_timeout`` the peer is not reading: the
        connection is closed (1008, counted as ``slow_consumer``) and this raises
        :class:`WebSocketClosed`, as it does on a closed connection."""
        if self.closed:
            raise WebSocketClosed(self.close_code, self.close_reason)
        if len(self._outbox) >= self._limits.send_queue:
            try:
                async with asyncio.timeout(self._limits.send_timeout):
                    while len(self._outbox) >= self._limits.send_queue and not self.closed:
                        self._room.clear()
                        await self._room.wait()
            except TimeoutError:
                self._slow_consumer()
            if self.closed:
                raise WebSocketClosed(self.close_code or 1008, self.close_reason)
        self._outbox.append({"type": "websocket.send", "text": data} if isinstance(data, str)
                            else {"type": "websocket.send", "bytes": bytes(data)})
        self._wake.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code`` and wait until the connection is closed."""
        self._request_close(code, reason, "closed_by_channel")
        await self._closed.wait()

    # --- internals -------------------------------------------------------------

    def _request_close(self, code: int, reason: str, why: str) -> None:
        """Close soon: ahead of anything still queued (a stopping gateway does not wait for
        a slow peer). A close frame that cannot be written in time is given up on."""
        if self._close_request is not None or self._closed.is_set():
            return
        self._close_request = (code, reason)
        self.close_code, self.close_reason = code, reason
        self._route.count_closed(why)
        self._wake.set()
        self._room.set()
        asyncio.get_running_loop().call_later(_CLOSE_WRITE_TIMEOUT, self._cut)

    def _slow_consumer(self) -> None:
        held = self._route.throttle.allow(("ws_slow", self._route.channel))
        if held is not None:
            self._route.log.warning("websocket peer does not read: closed as a slow consumer", path=self._route.path,
                                    send_queue=self._limits.send_queue, suppressed=held)
        self._request_close(1008, "slow consumer", "slow_consumer")
        # The close frame cannot get past a peer that does not read: cut the socket now.
        self._cut()

    def _cut(self) -> None:
        if self._closed.is_set():
            return
        transport = getattr(self._protocol, "transport", None)
        if transport is not None:
            transport.abort()  # uvicorn then reports the disconnect; the writer's send fails
        elif self._writer is not None:
            self._writer.cancel()

    def _mark_closed(self, code: int | None, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self._route.count_closed({1009: "too_large"}.get(code or 0, "peer"))
        self._eof = True
        self._inbox_ready.set()
        self._room.set()
        self._closed.set()

    async def _read(self, receive: Any) -> None:
        limits = self._limits
        idle = limits.idle_timeout
        self._inbox_room.set()
        try:
            while True:
                try:
                    async with asyncio.timeout(idle if self._close_request is None else None):
                        msg = await receive()
                except TimeoutError:
                    self._request_close(1000, "idle timeout", "idle_timeout")
                    continue  # uvicorn answers the close with a disconnect event
                if msg["type"] == "websocket.disconnect":
                    self._mark_closed(msg.get("code", 1005), msg.get("reason") or "")
                    return
                data = msg.get("text")
                if data is None:
                    data = msg.get("bytes") or b""
                if len(data) > limits.max_message_size:
                    # Only without our uvicorn protocol (which stops such a frame as it comes).
                    self._request_close(1009, "message too large", "too_large")
                    continue
                while len(self._inbox) >= _INBOX and not self._eof:
                    self._inbox_room.clear()
                    await self._inbox_room.wait()
                self._inbox.append(data)
                self._inbox_ready.set()
        finally:
            self._eof = True
            self._inbox_ready.set()
            self._closed.set()

    async def _write(self) -> None:
        send = self._asgi_send
        try:
            while True:
                while not self._outbox and self._close_request is None:
                    self._wake.clear()
                    await self._wake.wait()
                if self._close_request is not None:
                    code, reason = self._close_request
                    await send({"type": "websocket.close", "code": code, "reason": reason})
                    return
                msg = self._outbox.popleft()
                self._room.set()
                await send(msg)
        except (ClientDisconnected, OSError, RuntimeError):
            pass  # the peer is gone (or closed first): the reader sees the disconnect


class _Route:
    """One ``add_websocket`` registration: checks handshakes and runs accepted sockets. A
    callable instance, so Starlette's ``WebSocketRoute`` calls it as a plain ASGI app."""

    def __init__(self, hub: WebSocketHub, ctx: Any, path: str, handler: WebSocketHandler,
                 authorize: Authorize | None, limits: WebSocketLimits) -> None:
        self.hub = hub
        self.channel = ctx.name
        self.channel_type = ctx.channel_type
        self.log = ctx.log
        self.path = path
        self.handler = handler
        self.authorize = authorize
        self.limits = limits
        self.throttle = hub.throttle
        self.connections: set[WebSocketConnection] = set()
        self.pending = 0  # handshakes being judged: they hold a slot too
        self.active = True

    def count_closed(self, why: str) -> None:
        self.hub.closed.labels(self.channel_type, self.channel, why).inc()

    async def _refuse(self, scope: dict[str, Any], send: Any, status: int, reason: str, why: str) -> None:
        self.hub.refused.labels(self.channel_type, self.channel, why).inc()
        held = self.throttle.allow(("ws_refused", self.channel, why))
        if held is not None:
            # Never headers or the query: they carry the tokens being refused.
            self.log.info("websocket refused", path=self.path, status=status, reason=reason, suppressed=held)
        if "websocket.http.response" in scope.get("extensions", {}):
            body = (reason + "\n").encode()
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
            if status == 503:
                headers.append((b"retry-after", b"5"))
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # a server without the denial extension: close before accepting (HTTP 403)
            await send({"type": "websocket.close", "code": 1013 if status == 503 else 1008})

    def _full(self) -> bool:
        return len(self.connections) + self.pending >= self.limits.max_connections

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        limits = self.limits
        if not self.active:
            await self._refuse(scope, send, 503, "channel stopping", "stopping")
            return
        if self._full():
            await self._refuse(scope, send, 503, f"too many connections (limit {limits.max_connections})",
                               "max_connections")
            return
        handshake = Handshake(path=scope["path"], headers=Headers(scope=scope),
                              query=QueryParams(scope.get("query_string", b"")),
                              client=tuple(scope["client"]) if scope.get("client") else None)
        if limits.allowed_origins is not None and handshake.origin not in limits.allowed_origins:
            await self._refuse(scope, send, 403, "origin not allowed", "origin")
            return
        self.pending += 1
        try:
            identity = None
            if self.authorize is not None:
                try:
                    identity = self.authorize(handshake)
                    if inspect.isawaitable(identity):
                        identity = await identity
                except RequestError as exc:
                    await self._refuse(scope, send, exc.status, exc.reason, str(exc.status))
                    return
                except Exception as exc:  # a plugin bug refuses this socket, nothing more
                    self.log.error("websocket authorize failed", path=self.path, error=f"{type(exc).__name__}: {exc}")
                    await self._refuse(scope, send, 500, "internal error", "error")
                    return
            if not self.active:  # the channel stopped while authorize ran
                await self._refuse(scope, send, 503, "channel stopping", "stopping")
                return
        finally:
            self.pending -= 1
        protocol = scope.get("extensions", {}).get(_EXTENSION)
        if protocol is not None:
            # Per route, on uvicorn's protocol: websockets stops an oversized frame as it
            # arrives (close 1009) instead of buffering it, and pings on our interval.
            protocol.conn.max_message_size = limits.max_message_size
            protocol.ping_interval = limits.ping_interval
            protocol.ping_timeout = limits.ping_timeout
        await send({"type": "websocket.accept"})
        conn = WebSocketConnection(self, handshake, identity, send, protocol)
        await self._run(conn, receive)

    async def _run(self, conn: WebSocketConnection, receive: Any) -> None:
        self.connections.add(conn)
        self.hub.started(conn)
        self.hub.open.labels(self.channel_type, self.channel).inc()
        reader = asyncio.create_task(conn._read(receive))
        conn._writer = writer = asyncio.create_task(conn._write())
        handler = asyncio.create_task(self.handler(conn))
        try:
            await asyncio.wait({handler, reader}, return_when=asyncio.FIRST_COMPLETED)
            if handler.done():
                exc = None if handler.cancelled() else handler.exception()
                if exc is not None and not isinstance(exc, WebSocketClosed):
                    self.log.error("websocket handler failed", path=self.path, error=f"{type(exc).__name__}: {exc}")
                    conn._request_close(1011, "internal error", "handler_error")
                else:
                    conn._request_close(1000, "", "handler_done")
                await reader
            else:
                # Closed under the handler: it gets a moment to notice (its iteration ended).
                done, _ = await asyncio.wait({handler}, timeout=_HANDLER_GRACE)
                if not done:
                    handler.cancel()
        finally:
            for task in (handler, reader, writer):
                if not task.done():
                    task.cancel()
            for task in (handler, reader, writer):
                with contextlib.suppress(BaseException):
                    await task
            self.connections.discard(conn)
            self.hub.open.labels(self.channel_type, self.channel).dec()
            self.hub.finished(conn)


_EXTENSION = "gateway.websocket"


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol, handing itself to the app in the scope so a
    route can set its own size limit and keep-alive before accepting and cut a peer that
    does not read. Its access lines are kept below INFO: they repeat the query string,
    where a token may be."""

    _quiet = logging.getLogger("gateway.websocket.uvicorn")
    _quiet.setLevel(logging.WARNING)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = self._quiet

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the app task was created above and has not run yet
            scope.setdefault("extensions", {})[_EXTENSION] = self

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body") and self.close_sent:
            # A refusal answered in full (the route counted it and logged it, throttled):
            # uvicorn would still log "ASGI callable returned without completing handshake"
            # at ERROR for each one, unthrottled. Done is done: nothing more to send.
            self.handshake_complete = True


class WebSocketHub:
    """Every WebSocket route and accepted connection of one HTTP server, by channel."""

    def __init__(self, registry: Any, throttle: Throttle) -> None:
        self.throttle = throttle
        self.routes: dict[str, list[_Route]] = {}
        self._sessions: set[WebSocketConnection] = set()
        self._done = asyncio.Event()
        labels = ["channel_type", "channel"]
        self.open = Gauge("gateway_websocket_connections", "Open WebSocket connections", labels, registry=registry)
        self.refused = Counter("gateway_websocket_refused_total",
                               "WebSocket handshakes refused (401/403 by authorize, origin, max_connections, stopping)",
                               labels + ["reason"], registry=registry)
        self.closed = Counter("gateway_websocket_closed_total",
                              "WebSocket connections closed, by cause (peer, idle_timeout, slow_consumer, too_large, "
                              "channel_stopped, gateway_stopped, handler_done, handler_error)",
                              labels + ["reason"], registry=registry)

    def add(self, route: _Route) -> None:
        self.routes.setdefault(route.channel, []).append(route)

    def connections(self, channel: str | None = None) -> list[WebSocketConnection]:
        """Open connections (of one channel, or all)."""
        routes = self.routes.get(channel, []) if channel is not None else [r for rs in self.routes.values() for r in rs]
        return [c for r in routes for c in r.connections]

    def close_channel(self, channel: str, reason: str = "channel stopped", why: str = "channel_stopped") -> None:
        """Refuse new sockets of ``channel`` and close its open ones with 1001."""
        for route in self.routes.pop(channel, []):
            route.active = False
            for conn in list(route.connections):
                conn._request_close(1001, reason, why)

    async def close_all(self, timeout: float) -> None:
        """Close every socket with 1001 and wait (up to ``timeout``) until they are gone."""
        for channel in list(self.routes):
            self.close_channel(channel, "gateway stopping", "gateway_stopped")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._sessions:
                    self._done.clear()
                    await self._done.wait()

    def started(self, conn: WebSocketConnection) -> None:
        self._sessions.add(conn)

    def finished(self, conn: WebSocketConnection) -> None:
        self._sessions.discard(conn)
        self._done.set()
