"""Shared helpers for the core tests (the nats_server and gateway_factory fixtures come
from gateway.testing.fixtures, loaded through the pytest11 entry point)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import nats
import pytest

from gateway.testing import wait_until  # noqa: F401  (re-exported for the tests)


async def post_inbound(port: int, channel: str, **body: Any) -> httpx.Response:
    """POST a mock-channel webhook, as a provider would."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        return await c.post(f"/channels/{channel}/inbound", content=json.dumps(body))


@pytest.fixture
async def bus(nats_server):
    """A raw nats-py connection to the test's server (what a backend in any language does)."""
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()
