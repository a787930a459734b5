"""pytest fixtures: a real nats-server per test and a gateway factory.

This module is a ``pytest11`` plugin, so pytest loads it in *every* virtualenv where the
gateway is installed, also where the optional test dependencies are not: it must import
without pytest-asyncio (the fixtures then fail with a message saying what to install)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from . import NatsServer, make_config, start_gateway
from .. import Gateway

try:
    import pytest_asyncio
except ImportError:  # the [test] extra is not installed here
    # The usual optional import: None says it is missing (a module type has no None).
    pytest_asyncio = None  # type: ignore[assignment]

_MISSING = ("the gateway's {name} fixture needs pytest-asyncio: "
            "pip install 'omnichannel-gateway[test]' (or pytest-asyncio)")


if pytest_asyncio is not None:

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

else:

    @pytest.fixture
    def nats_server() -> None:
        """Needs pytest-asyncio (not installed): fails the test that asks for it."""
        pytest.fail(_MISSING.format(name="nats_server"), pytrace=False)

    @pytest.fixture
    def gateway_factory() -> None:
        """Needs pytest-asyncio (not installed): fails the test that asks for it."""
        pytest.fail(_MISSING.format(name="gateway_factory"), pytrace=False)
