"""``ProviderSink``: a provider's send API on loopback for the mock channel's
``provider_url``, counting what it was asked to send, per outbound id and in arrival order
per conversation: the witness for "nothing lost, nothing doubled, order kept" when several
gateway processes deliver."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import free_port, serve_asgi  # bound before this module is imported


class ProviderSink:
    """Serves ``POST /send`` on 127.0.0.1 (``url``). Each request is an outbound as JSON;
    ``delay`` seconds pass before the 200 answer (a slow provider). ``sends`` counts the
    requests per outbound id, ``order`` lists the outbound ids per conversation as they
    arrived, ``count`` is the total. Use as ``async with ProviderSink() as sink:``."""

    def __init__(self, *, delay: float = 0.0, port: int = 0):
        self.delay = delay
        self.port = port or free_port()
        self.sends: dict[str, int] = defaultdict(int)
        self.order: dict[str, list[str]] = defaultdict(list)
        self.count = 0
        self.arrived = asyncio.Event()
        """Set on every request (clear it to wait for the next)."""
        self.app = Starlette(routes=[Route("/send", self._send, methods=["POST"])])
        self._serving: contextlib.AbstractAsyncContextManager[None] | None = None

    @property
    def url(self) -> str:
        """What the mock channel's ``provider_url`` takes."""
        return f"http://127.0.0.1:{self.port}/send"

    async def _send(self, request: Request) -> Response:
        body: dict[str, Any] = json.loads(await request.body())
        if self.delay:
            await asyncio.sleep(self.delay)
        oid = str(body.get("id"))
        self.sends[oid] += 1
        self.order[str(body.get("conversation"))].append(oid)
        self.count += 1
        self.arrived.set()
        return Response(json.dumps({"id": f"sink-{self.count}"}), media_type="application/json")

    def doubles(self) -> dict[str, int]:
        """Outbound ids sent more than once, with their counts."""
        return {k: v for k, v in self.sends.items() if v > 1}

    @contextlib.asynccontextmanager
    async def _serve(self) -> AsyncIterator[None]:
        async with serve_asgi(self.app, self.port):
            yield

    async def __aenter__(self) -> ProviderSink:
        self._serving = self._serve()
        await self._serving.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._serving is not None:
            await self._serving.__aexit__(None, None, None)
            self._serving = None
