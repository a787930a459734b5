"""One HTTP server (uvicorn) for every webhook channel, plus /healthz and /metrics.

Each channel's routes live under ``/channels/<name>/``. Bodies are limited to
``[http] max_body``, or the route's own limit (413 above it): lower than ``max_body``, or
in its place (``own_limit``, an upload route whose files are larger than any webhook); a :class:`RequestError`
from an endpoint becomes its status with a short reason, :class:`BusUnavailable` becomes 503
with Retry-After so the provider retries; nothing of a request body is ever logged.

Slow clients cannot hold the server: a request's headers must arrive within
``header_timeout`` and its body within ``body_timeout`` (408, connection closed), an idle
keep-alive connection is closed after ``keep_alive_timeout``, and connections beyond
``max_connections`` are refused at once (503) so that file descriptors never run out.

Channels may also serve WebSockets here (``ctx.add_websocket``, see ``_websocket``); those
count toward ``max_connections`` and are closed with 1001 before the server stops."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, Router, WebSocketRoute

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import HttpConfig
from ..errors import BusUnavailable, PayloadTooLarge, RequestError, StartupError
from ..logs import Throttle
from ..metrics import Metrics
from .websocket import Authorize, GatewayWebSocketProtocol, WebSocketHandler, WebSocketHub, WebSocketLimits, _Route

Endpoint = Callable[[Request], Awaitable[Response]]


class RouteOwner(Protocol):
    """What the server needs of the channel a route belongs to (a ``ChannelContext``): its
    name for the path and its type, name and logger for metrics and logs."""

    name: str
    channel_type: str
    log: Any


class _BodyTimeout(Exception):
    pass


# Written straight to the socket: these connections never reach the ASGI app.
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 21\r\n"
            b"retry-after: 1\r\nconnection: close\r\n\r\ntoo many connections\n")
_HEADER_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 30\r\n"
                   b"connection: close\r\n\r\nrequest headers took too long\n")


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus what it lacks against slow clients: uvicorn arms no
    timer until a first response, so a connection that sends its headers one byte a
    second lives forever. Here the headers of every request must be complete within
    ``header_timeout``, and a connection beyond ``max_connections`` is refused at once."""

    owner: HttpServer  # set on the per-server subclass made by HttpServer.start()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None
        if len(self.connections) >= self.owner.cfg.max_connections and not self._evict_slowest():
            self.transport = transport  # uvicorn's connection_lost expects it
            transport.write(_REFUSED)
            transport.close()
            self.owner.connection_closed("max_connections")
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def _evict_slowest(self) -> bool:
        """At the cap, make room by closing the connection that has waited longest for its
        headers, if longer than a real client takes: otherwise a flood of slow clients
        would lock providers out for a whole ``header_timeout`` after another."""
        now = self.loop.time()
        waiting = [c for c in self.connections if isinstance(c, _GuardedProtocol) and c._waiting_since is not None
                   and now - c._waiting_since > self.owner.evict_after and not c.transport.is_closing()]
        if not waiting:
            return False
        min(waiting, key=lambda c: c._waiting_since or 0.0)._headers_too_slow(True, "evicted")
        return True

    def _arm_header_timer(self, answer: bool = True) -> None:
        if self._header_timer is None:
            self._waiting_since = self.loop.time()
            self._header_timer = self.loop.call_later(self.owner.header_timeout, self._headers_too_slow, answer)

    def _cancel_header_timer(self) -> None:
        self._waiting_since = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self, answer: bool, reason: str = "header_timeout") -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing():
            if answer:
                self.transport.write(_HEADER_TIMEOUT)
            self.transport.close()
            self.owner.connection_closed(reason)

    def on_message_begin(self) -> None:
        # The next request on a kept-alive connection: its headers get the same deadline.
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            # Answered before the body was all in (a 413, an endpoint that did not read
            # it): the rest is read and dropped, and must arrive as fast as headers would.
            # That request has its answer already: on time-out the connection just closes.
            self._arm_header_timer(answer=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM/SIGHUP belong to the gateway."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


_LOG_INTERVAL = 10.0


class HttpServer:
    """The shared ASGI app and its uvicorn server. ``health`` answers ``/healthz`` (its
    ``status`` is ``ok`` or not: 200 or 503)."""

    def __init__(self, cfg: HttpConfig, *, metrics: Metrics, log: Any, health: Callable[[], dict[str, Any]]):
        self.cfg = cfg
        self.metrics = metrics
        self.log = log
        self.health = health
        self.routers: dict[str, Router] = {}
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[None] | None = None
        self.port: int | None = None
        self.sockets: list[socket.socket] = []
        self.header_timeout = self.cfg.header_timeout
        self.body_timeout = self.cfg.body_timeout
        # At the cap, a connection still without complete headers after this long makes
        # room for a new one (real clients send their headers in milliseconds).
        self.evict_after = 1.0
        # One line per interval and cause (and channel), with the count of the rest: a bus
        # outage under load or a flood of slow clients must not become a flood of logs.
        self.throttle = Throttle(_LOG_INTERVAL)
        self.websockets = WebSocketHub(metrics.registry, self.throttle)

    # --- routes --------------------------------------------------------------------

    def add_route(self, ctx: RouteOwner, path: str, endpoint: Endpoint, methods: Sequence[str],
                  max_body: int | None = None, own_limit: bool = False) -> str:
        if not path.startswith("/"):
            path = "/" + path
        router = self.routers.setdefault(ctx.name, Router())
        router.routes.append(Route(path, self._wrap(ctx, endpoint, max_body, own_limit), methods=list(methods)))
        return f"/channels/{ctx.name}{path}"

    def add_websocket(self, ctx: RouteOwner, path: str, handler: WebSocketHandler, authorize: Authorize | None,
                      limits: WebSocketLimits) -> str:
        if not path.startswith("/"):
            path = "/" + path
        route = _Route(self.websockets, ctx, path, handler, authorize, limits)
        self.websockets.add(route)
        self.routers.setdefault(ctx.name, Router()).routes.append(WebSocketRoute(path, route))
        return f"/channels/{ctx.name}{path}"

    def remove_channel(self, name: str) -> None:
        self.routers.pop(name, None)
        self.websockets.close_channel(name)

    def connection_closed(self, reason: str) -> None:
        """Count (and log, throttled) a connection the server closed on its own."""
        self.metrics.http_closed.labels(reason).inc()
        held = self.throttle.allow(("closed", reason))
        if held is not None:
            what = {"max_connections": f"[http] max_connections ({self.cfg.max_connections}) reached: connection refused",
                    "header_timeout": f"request headers not complete within [http] header_timeout "
                                      f"({self.cfg.header_timeout}): connection closed",
                    "evicted": f"[http] max_connections ({self.cfg.max_connections}) reached: the connection "
                               f"waiting longest for its headers was closed to make room"}[reason]
            self.log.warning(what, suppressed=held, open_connections=self._open_connections())

    def _open_connections(self) -> int:
        return len(self.server.server_state.connections) if self.server is not None else 0

    def _wrap(self, ctx: RouteOwner, endpoint: Endpoint, route_limit: int | None, own_limit: bool = False):
        metrics = self.metrics
        # The lower of the server's and the route's limit applies, or the route's own when it
        # says so (uploads: a photo is larger than any webhook); the answer names it.
        if route_limit is not None and (own_limit or route_limit < self.cfg.max_body):
            limit, limit_name = route_limit, f"the limit of channel {ctx.name!r}"
        else:
            limit, limit_name = self.cfg.max_body, "[http] max_body"
        too_large = f"body exceeds {limit} bytes ({limit_name})"

        def reject(request: Request, status: int, reason: str, *, close: bool = False, own: bool = False) -> Response:
            metrics.inbound_rejected.labels(ctx.channel_type, ctx.name, str(status)).inc()
            ctx.log.info("request rejected", path=request.url.path, status=status, reason=reason)
            # After a body that did not come in time, close rather than wait for the rest.
            # (Not after a 413: closing with unread data makes the kernel send a reset,
            # and the client might never read the answer; the rest is read and dropped.)
            headers = {"Connection": "close"} if close else {}
            if own and "origin" in request.headers:
                # A page's script (the web chat widget uploading) may read why this layer
                # refused: the reason names a limit, nothing that depends on who asks.
                headers["Access-Control-Allow-Origin"] = "*"
            return PlainTextResponse(reason + "\n", status_code=status, headers=headers or None)

        async def handler(request: Request) -> Response:
            length = request.headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    return reject(request, 400, "invalid Content-Length header", own=True)
                if int(length) > limit:
                    return reject(request, 413, too_large, own=True)
            request = Request(request.scope, self._receive(request.receive, limit, too_large), request._send)  # noqa: SLF001
            try:
                return await endpoint(request)
            except _BodyTimeout:
                return reject(request, 408, f"body not received within [http] body_timeout ({self.cfg.body_timeout})",
                              close=True, own=True)
            except ClientDisconnect:
                # The client's doing, not ours: no error, no 500 (nobody reads the answer).
                metrics.inbound_rejected.labels(ctx.channel_type, ctx.name, "client_disconnected").inc()
                ctx.log.debug("client disconnected before its request was read", path=request.url.path)
                return Response(status_code=499)
            except BusUnavailable as exc:
                metrics.inbound_rejected.labels(ctx.channel_type, ctx.name, "bus").inc()
                held = self.throttle.allow(("bus", ctx.name))
                if held is not None:
                    ctx.log.warning("bus unavailable, answered 503", path=request.url.path, error=str(exc), suppressed=held)
                return PlainTextResponse("bus unavailable, retry later\n", status_code=503, headers={"Retry-After": "5"})
            except RequestError as exc:
                return reject(request, exc.status, exc.reason)
            except Exception as exc:  # a plugin bug must not take the server down
                ctx.log.error("webhook handler failed", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
                metrics.inbound_rejected.labels(ctx.channel_type, ctx.name, "error").inc()
                return PlainTextResponse("internal error\n", status_code=500)

        return handler

    def _receive(self, receive: Any, limit: int, too_large: str) -> Any:
        """``receive`` with the body limit (also without Content-Length, chunked) and one
        deadline for the whole body: a per-read timeout would let a body that trickles in a
        byte at a time live forever."""
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                raise _BodyTimeout() from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    # A RequestError like any other refusal: answered below with its
                    # status (413) and reason.
                    raise PayloadTooLarge(too_large)
            return msg

        return limited_receive

    # --- ASGI ----------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        path: str = scope["path"]
        if scope["type"] == "websocket" and not path.startswith("/channels/"):
            await send({"type": "websocket.close", "code": 1003})  # answered 403 before the upgrade
            return
        if path == "/healthz":
            await self._healthz(scope, receive, send)
            return
        if path == "/metrics":
            body = generate_latest(self.metrics.registry)
            await Response(body, media_type=CONTENT_TYPE_LATEST)(scope, receive, send)
            return
        parts = path.split("/", 3)
        router = self.routers.get(parts[2]) if len(parts) > 2 and parts[1] == "channels" else None
        if router is None:
            await PlainTextResponse("not found\n", status_code=404)(scope, receive, send)
            return
        sub = dict(scope)
        sub["root_path"] = scope.get("root_path", "") + f"/channels/{parts[2]}"
        sub["path"] = "/" + (parts[3] if len(parts) > 3 else "")
        await router(sub, receive, send)

    async def _healthz(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        report = self.health()
        status = 200 if report["status"] == "ok" else 503
        body = json.dumps(report, indent=2).encode() + b"\n"
        await Response(body, status_code=status, media_type="application/json")(scope, receive, send)

    # --- server --------------------------------------------------------------------

    def bind(self) -> None:
        """Take the listening socket(s) now, before anything else starts: a port in use is
        one clear :class:`StartupError` (uvicorn would log the errno and exit the process)."""
        if self.sockets:
            return
        host, port = self.cfg.host, self.cfg.port
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise StartupError(f"[http] host {host!r} cannot be resolved ({exc.strerror}): "
                               f"set [http] host to an address of this machine, such as 127.0.0.1") from None
        try:
            for family, kind, proto, _, addr in dict.fromkeys(infos):  # each address once, as asyncio does
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
        except OSError as exc:
            self.unbind()
            if exc.errno == errno.EADDRINUSE:
                what = (f"[http] port {port} on {host} is already in use by another process (another `gateway run`?): "
                        f"stop it, or set [http] port to a free port")
            elif exc.errno == errno.EADDRNOTAVAIL:
                what = f"[http] host {host} is not an address of this machine: set [http] host (127.0.0.1, 0.0.0.0 ...)"
            elif exc.errno == errno.EACCES:
                what = f"[http] port {port} needs privileges this process lacks: set [http] port to 1024 or above"
            else:
                what = f"[http] host {host} port {port}: cannot listen ({exc.strerror}): check [http] host and port"
            raise StartupError(what) from None

    def unbind(self) -> None:
        """Release sockets taken by :meth:`bind` when the server is not going to start."""
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    async def start(self) -> None:
        self.bind()
        config = uvicorn.Config(
            self, host=self.cfg.host, port=self.cfg.port, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=15, server_header=False, date_header=False,
            http=type("Protocol", (_GuardedProtocol,), {"owner": self}),
            # Size limit and keep-alive are set per route before accepting (see _websocket).
            ws=GatewayWebSocketProtocol, ws_max_size=1 << 20,
            timeout_keep_alive=self.cfg.keep_alive_timeout,  # type: ignore[arg-type]  # a float works
            # uvicorn would rewrite scheme and client from X-Forwarded-* sent by any local
            # process; webhooks read them only where configured (gateway.public_url).
            proxy_headers=False,
        )
        self.server = _Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=self.sockets), name="http")
        while not self.server.started:
            if self.task.done():
                exc = self.task.exception() if not self.task.cancelled() else None
                raise OSError(f"HTTP server could not start on {self.cfg.host}:{self.cfg.port}: {exc or 'exited'}")
            await asyncio.sleep(0.01)
        self.port = self.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting; requests in flight finish (their messages reach the bus)."""
        if self.server is None or self.task is None:
            return
        # Sockets first, with 1001 ("going away"): uvicorn's own shutdown would send 1012.
        await self.websockets.close_all(timeout=5)
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, 20)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.task.cancel()
        self.server = None
        self.unbind()
