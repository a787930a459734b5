"""Fixtures of the cluster tests: a 3-node nats-server cluster on loopback and gateway
processes (``gateway run``) on it with R3 streams and buckets."""

from __future__ import annotations

import asyncio
import signal

import pytest

from gateway.testing import GatewayProcess, NatsCluster, ProviderSink


@pytest.fixture
async def cluster(tmp_path):
    """Three clustered nats-servers with JetStream, their stores under the test's folder."""
    c = NatsCluster(tmp_path / "cluster")
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def sink():
    """The provider's send API the mock channels of the gateways post to."""
    async with ProviderSink() as s:
        yield s


@pytest.fixture
async def gateways(cluster, tmp_path):
    """``await gateways(n, channels)`` starts ``n`` gateway processes on the cluster
    (``replicas = 3``); every one still running is stopped (SIGTERM) after the test."""
    started: list[GatewayProcess] = []

    async def start(n: int, channels: str = '[channels.demo]\ntype = "mock"\n', extra: str = "") -> list[GatewayProcess]:
        procs = []
        for i in range(n):
            d = tmp_path / f"gw{len(started) + i}"
            d.mkdir()
            procs.append(GatewayProcess(d, channels, extra, bus_url=cluster.url, bus="replicas = 3"))
        # One first: it creates the streams and buckets; the others find them.
        await asyncio.to_thread(procs[0].start)
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs[1:]))
        started.extend(procs)
        return procs

    yield start
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.signal(signal.SIGTERM)
    for p in started:
        if p.proc is not None:
            try:
                await asyncio.to_thread(p.wait, 30)
            except Exception:
                p.proc.kill()
