"""One HTTP server (uvicorn) for every webhook channel, plus /healthz and /metrics.

Each channel's routes live under ``/channels/<name>/``. Bodies are limited to
``[http] max_body`` (413 above it); a :class:`RequestError` from an endpoint becomes its
status with a short reason, :class:`BusUnavailable` becomes 503 with Retry-After so the
provider retries; nothing of a request body is ever logged."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, Router

from ._errors import BusUnavailable, RequestError, StartupError

if TYPE_CHECKING:
    from ._channel import Endpoint
    from ._gateway import Gateway
    from ._pipeline import Context


class _BodyTooLarge(Exception):
    pass


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM/SIGHUP belong to the gateway."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The shared ASGI app and its uvicorn server."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.cfg = gw.config.http
        self.routers: dict[str, Router] = {}
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[None] | None = None
        self.port: int | None = None
        self.sockets: list[socket.socket] = []

    # --- routes --------------------------------------------------------------------

    def add_route(self, ctx: Context, path: str, endpoint: Endpoint, methods: Sequence[str]) -> str:
        if not path.startswith("/"):
            path = "/" + path
        router = self.routers.setdefault(ctx.name, Router())
        router.routes.append(Route(path, self._wrap(ctx, endpoint), methods=list(methods)))
        return f"/channels/{ctx.name}{path}"

    def remove_channel(self, name: str) -> None:
        self.routers.pop(name, None)

    def _wrap(self, ctx: Context, endpoint: Endpoint):
        metrics = self.gw.metrics

        async def handler(request: Request) -> Response:
            try:
                return await endpoint(request)
            except _BodyTooLarge:
                reason, status = f"body exceeds {self.cfg.max_body} bytes", 413
            except BusUnavailable as exc:
                metrics.inbound_rejected.labels(ctx.channel_type, ctx.name, "bus").inc()
                ctx.log.warning("bus unavailable, answered 503", path=request.url.path, error=str(exc))
                return PlainTextResponse("bus unavailable, retry later\n", status_code=503, headers={"Retry-After": "5"})
            except RequestError as exc:
                reason, status = exc.reason, exc.status
            except Exception as exc:  # a plugin bug must not take the server down
                ctx.log.error("webhook handler failed", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
                metrics.inbound_rejected.labels(ctx.channel_type, ctx.name, "error").inc()
                return PlainTextResponse("internal error\n", status_code=500)
            metrics.inbound_rejected.labels(ctx.channel_type, ctx.name, str(status)).inc()
            ctx.log.info("request rejected", path=request.url.path, status=status, reason=reason)
            return PlainTextResponse(reason + "\n", status_code=status)

        return handler

    # --- ASGI ----------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        path: str = scope["path"]
        if path == "/healthz":
            await self._healthz(scope, receive, send)
            return
        if path == "/metrics":
            body = generate_latest(self.gw.metrics.registry)
            await Response(body, media_type=CONTENT_TYPE_LATEST)(scope, receive, send)
            return
        parts = path.split("/", 3)
        router = self.routers.get(parts[2]) if len(parts) > 2 and parts[1] == "channels" else None
        if router is None:
            await PlainTextResponse("not found\n", status_code=404)(scope, receive, send)
            return
        limit = self.cfg.max_body
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    await PlainTextResponse("bad content-length\n", status_code=400)(scope, receive, send)
                    return
                if too_big:
                    await PlainTextResponse(f"body exceeds {limit} bytes\n", status_code=413)(scope, receive, send)
                    return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return msg

        sub = dict(scope)
        sub["root_path"] = scope.get("root_path", "") + f"/channels/{parts[2]}"
        sub["path"] = "/" + (parts[3] if len(parts) > 3 else "")
        await router(sub, limited_receive, send)

    async def _healthz(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        report = self.gw.health()
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
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, 20)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.task.cancel()
        self.server = None
        self.unbind()
