"""The reconnecting outgoing WebSocket of the channel toolkit: we connect to a provider
(OneBot forward WebSocket, QQ's gateway) and stay connected for as long as the channel
runs, reporting the channel degraded while the socket is down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import websockets.asyncio.client
import websockets.exceptions

from ..retry import Backoff

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    from .api import ChannelContext


def _safe_url(url: str) -> str:
    """The URL without query and credentials, fit for logs and health details."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class WebSocketClient:
    """Keeps an outgoing WebSocket to ``url`` open for as long as it runs: connects (with
    ``headers``, e.g. ``{"Authorization": f"Bearer {token}"}``), hands each connection to
    ``handler`` (a websockets ``ClientConnection``: iterate it for messages, ``await
    send(...)``), and when the connection drops or cannot be made, reports the channel
    ``degraded`` (with the cause, never the query or credentials) and connects again after
    a :class:`Backoff` delay; ``running`` once connected again. Start it in
    ``Channel.start`` and ``await stop()`` in ``Channel.stop``.

    The loop is deliberately small: a supervised-task helper may take it over."""

    def __init__(self, ctx: ChannelContext, url: str, handler: Callable[[ClientConnection], Awaitable[None]], *,
                 headers: Mapping[str, str] | None = None, backoff: Backoff | None = None,
                 open_timeout: float = 10.0, ping_interval: float | None = 20.0, ping_timeout: float | None = 20.0,
                 max_message_size: int = 1 << 20, stable_after: float = 10.0, report_health: bool = True) -> None:
        if urlsplit(url).scheme not in ("ws", "wss"):
            raise ValueError(f"WebSocketClient: url must start with ws:// or wss://, got {_safe_url(url)!r}")
        self.ctx = ctx
        self.url = url
        self.handler = handler
        self.headers = dict(headers or {})
        self.backoff = backoff or Backoff(first=0.5, cap=30.0)
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_message_size = max_message_size
        self.stable_after = stable_after
        self.report_health = report_health
        self.connected = False
        """True while a connection is open."""
        self.connects = 0
        """Connections opened so far."""
        self.last_error: str | None = None
        """Why the last connection ended or failed (no secrets)."""
        self._task: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None
        self._stopping = False

    def start(self) -> None:
        """Start connecting in the background (returns at once)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"websocket-client {self.ctx.name}")

    async def stop(self) -> None:
        """Close the connection (1001) and stop reconnecting."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True  # the close below is ours: no "down" report, no reconnect
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1001, "channel stopping"), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.connected = False

    def _describe(self, exc: BaseException) -> str:
        text = str(exc).replace(self.url, _safe_url(self.url))
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        safe = _safe_url(self.url)
        first = True
        while True:
            opened: float | None = None
            try:
                async with websockets.asyncio.client.connect(
                        self.url, additional_headers=self.headers, open_timeout=self.open_timeout,
                        ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
                        max_size=self.max_message_size, close_timeout=2) as ws:
                    self._ws, opened = ws, loop.time()
                    self.connected, self.connects = True, self.connects + 1
                    if self.report_health:
                        self.ctx.set_state("running")
                    self.ctx.log.info("websocket connected", url=safe)
                    try:
                        await self.handler(ws)
                    except websockets.exceptions.ConnectionClosed:
                        pass
                reason = f"closed ({ws.close_code})" if ws.close_code is not None else "handler returned"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connect failures and handler errors alike: connect again
                reason = self._describe(exc)
                if opened is not None and not isinstance(exc, OSError | websockets.exceptions.WebSocketException):
                    self.ctx.log.error("websocket handler failed", url=safe, error=reason)
            finally:
                self._ws = None
            was_up, self.connected = self.connected, False
            self.last_error = reason
            if self._stopping:
                return
            if opened is not None and loop.time() - opened >= self.stable_after:
                self.backoff.reset()
            delay = self.backoff.next()
            if self.report_health:
                self.ctx.set_state("degraded", f"websocket {safe} down: {reason}; retrying in {delay:.1f}s")
            # One warning per outage (and for the first attempt); the retries that follow at debug.
            log = self.ctx.log.warning if was_up or first else self.ctx.log.debug
            log("websocket down, reconnecting", url=safe, error=reason, retry_in=round(delay, 2))
            first = False
            await asyncio.sleep(delay)
