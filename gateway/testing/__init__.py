"""Test kit for the gateway and its plugins: :class:`MockChannel`, a real nats-server
runner and helpers. The pytest fixtures in :mod:`gateway.testing.fixtures` are loaded
automatically (pytest11 entry point) wherever the gateway is installed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats

from .. import Config, DeliveryStatus, Gateway, PluginManager, Subjects, parse_config

# The one private import of the test kit: the nats-server runner is test infrastructure,
# not plugin API (tests/test_public_api.py allows exactly this line).
from ..core.bus.embedded import LOCK_FILE, EmbeddedServer, free_port
from ..wire import status_decoder
from ._mock import MockChannel, MockConfig
from ._process import GatewayProcess

__all__ = ["LOCK_FILE", "ClusterNode", "GatewayProcess", "MockChannel", "MockConfig", "NatsCluster", "NatsServer", "ProviderSink", "post_inbound", "free_port", "make_config", "start_gateway", "statuses",
           "stream_messages", "wait_for_status", "wait_until", "serve_asgi"]


class NatsServer(EmbeddedServer):
    """A real nats-server with JetStream on a free loopback port and its own store.
    ``user`` and ``password``, or ``token``, make it require them from every client."""

    def __init__(self, store_dir: str | Path | None = None, port: int = 0, *,
                 user: str = "", password: str = "", token: str = ""):
        self._tmp = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gw-nats-")
            store_dir = self._tmp.name
        super().__init__(host="127.0.0.1", port=port, store_dir=store_dir)
        self.user, self.password, self.token = user, password, token

    def _extra_config(self) -> str:
        if self.token:
            return f"authorization {{ token: {json.dumps(self.token)} }}\n"
        if self.user:
            return f"authorization {{ user: {json.dumps(self.user)}, password: {json.dumps(self.password)} }}\n"
        return ""

    async def stop(self, timeout: float = 10.0) -> None:
        await super().stop(timeout)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def make_config(bus_url: str, channels: dict[str, dict[str, Any]] | None = None, *,
                plugins: PluginManager | None = None, **sections: dict[str, Any]) -> Config:
    """A validated :class:`Config` for tests: the given bus, HTTP on a free port, and
    ``channels`` as ``{name: {"type": ..., ...}}``. Extra sections override defaults."""
    pm = plugins or PluginManager()
    data: dict[str, Any] = {
        "bus": {"url": bus_url, "connect_timeout": "5s", **sections.pop("bus", {})},
        "http": {"port": 0, **sections.pop("http", {})},
        "outbound": {"backoff": ["100ms"], **sections.pop("outbound", {})},
        **sections,
        "channels": channels or {},
    }
    return parse_config(data, pm.channel_types, source="<test>", env={})


async def start_gateway(config: Config, plugins: PluginManager | None = None) -> Gateway:
    """Start a gateway and wait until it is connected to the bus."""
    gw = Gateway(config, plugins)
    await gw.start()
    await gw.bus.wait_ready(10)
    return gw


async def stream_messages(url: str, stream: str, subject: str | None = None, *, after: int = 0) -> list[Any]:
    """Every message currently in ``stream`` (optionally only ``subject``; only those with
    a sequence above ``after``), in order. ``url`` may list several servers, comma-separated
    (a :class:`NatsCluster`'s ``url``)."""
    nc = await nats.connect([u.strip() for u in url.split(",") if u.strip()])
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        seq = max(info.state.first_seq, after + 1)
        while seq and seq <= info.state.last_seq:
            try:
                m = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                seq += 1
                continue
            if subject is None or m.subject == subject:
                out.append(m)
            seq += 1
        return out
    finally:
        await nc.close()


async def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll a sync or async predicate until it is true; AssertionError after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        r = predicate()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def _subjects(prefix: str | Subjects) -> Subjects:
    return prefix if isinstance(prefix, Subjects) else Subjects(prefix)


async def statuses(url: str, outbound_id: str | None = None, *, prefix: str | Subjects = "gw") -> list[DeliveryStatus]:
    """Every status event in the status stream of ``prefix`` (the ``[bus] prefix``, or its
    :class:`Subjects`), optionally of one outbound, in order."""
    stream = _subjects(prefix).stream_status
    out = [status_decoder.decode(m.data) for m in await stream_messages(url, stream)]
    return [s for s in out if outbound_id is None or s.outbound_id == outbound_id]


async def wait_for_status(url: str, outbound_id: str, state: str, timeout: float = 10.0, *,
                          prefix: str | Subjects = "gw") -> list[DeliveryStatus]:
    """Wait until ``outbound_id`` has a status ``state``; return all its statuses so far."""
    found: list[DeliveryStatus] = []
    subjects = _subjects(prefix)

    async def check() -> bool:
        found[:] = await statuses(url, outbound_id, prefix=subjects)
        return any(s.state == state for s in found)

    await wait_until(check, timeout)
    return found


async def post_inbound(port: int, channel: str, **body: Any) -> httpx.Response:
    """POST a mock-channel webhook (``text``, ``sender``, ``id``, ``thread``, ``name``) to a
    gateway's HTTP port, as a provider would."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        return await c.post(f"/channels/{channel}/inbound", content=json.dumps(body))


@contextlib.asynccontextmanager
async def serve_asgi(app: Any, port: int) -> AsyncIterator[None]:
    """Serve an ASGI app (a provider's fake API) with uvicorn on 127.0.0.1:``port`` for the
    duration of the ``async with``; returns once it listens, stops it on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        await task


# Last: the cluster is made of NatsServer nodes.
from ._cluster import ClusterNode, NatsCluster  # noqa: E402
from ._sink import ProviderSink  # noqa: E402
