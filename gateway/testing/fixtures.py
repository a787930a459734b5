"""pytest fixtures: a real nats-server per test and a gateway factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest_asyncio

from . import NatsServer, make_config, start_gateway
from ..core._gateway import Gateway


@pytest_asyncio.fixture
async def nats_server(tmp_path: Any) -> AsyncIterator[NatsServer]:
    """A fresh nats-server with JetStream, on a free port, for this test."""
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def gateway_factory(nats_server: NatsServer) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """``await gateway_factory({"chan": {"type": "mock"}}, outbound={...})`` starts a gateway
    on the test's nats-server; every gateway started is stopped after the test."""
    started: list[Gateway] = []

    async def factory(channels: dict[str, dict[str, Any]] | None = None, **sections: Any) -> Gateway:
        gw = await start_gateway(make_config(nats_server.url, channels, **sections))
        started.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in reversed(started):
            await gw.stop()
