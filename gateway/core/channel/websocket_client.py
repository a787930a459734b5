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

from ..retry import Backoff, Supervised

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

    The reconnect loop is :class:`Supervised`."""

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
        self._ws: ClientConnection | None = None
        self._stopping = False
        self._supervisor = Supervised(
            f"websocket {_safe_url(url)}", self._session,
            set_state=ctx.set_state if report_health else (lambda state, detail: None), log=ctx.log,
            backoff=self.backoff, stable_after=stable_after,
            describe=lambda exc: str(exc) if isinstance(exc, _Closed) else self._describe(exc))

    def start(self) -> None:
        """Start connecting in the background (returns at once)."""
        self._stopping = False
        self._supervisor.start()

    async def stop(self) -> None:
        """Close the connection (1001) and stop reconnecting."""
        self._stopping = True  # the close below is ours: no reconnect
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1001, "channel stopping"), 5)
        await self._supervisor.stop()
        self.connected = False

    @property
    def last_error(self) -> str | None:
        """Why the last connection ended or failed (no secrets)."""
        return self._supervisor.last_error

    def _describe(self, exc: BaseException) -> str:
        text = str(exc).replace(self.url, _safe_url(self.url))
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    async def _session(self, supervisor: Supervised) -> None:
        """One connection: open it, hand it to the handler, return when it closes (the
        supervisor connects again after its backoff delay)."""
        try:
            async with websockets.asyncio.client.connect(
                    self.url, additional_headers=self.headers, open_timeout=self.open_timeout,
                    ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
                    max_size=self.max_message_size, close_timeout=2) as ws:
                self._ws = ws
                self.connected, self.connects = True, self.connects + 1
                supervisor.running()
                self.ctx.log.info("websocket connected", url=_safe_url(self.url))
                try:
                    await self.handler(ws)
                except websockets.exceptions.ConnectionClosed:
                    pass
                except Exception as exc:
                    if not isinstance(exc, OSError | websockets.exceptions.WebSocketException):
                        self.ctx.log.error("websocket handler failed", url=_safe_url(self.url),
                                           error=self._describe(exc))
                    raise
            if self._stopping:
                await asyncio.Event().wait()  # stop() cancels us: no "down" report
            raise _Closed(f"closed ({ws.close_code})" if ws.close_code is not None else "handler returned")
        finally:
            self._ws = None
            self.connected = False


class _Closed(Exception):
    """A connection that ended (the supervisor reports it and connects again)."""

    def __str__(self) -> str:
        return str(self.args[0])
