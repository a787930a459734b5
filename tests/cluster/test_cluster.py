"""Several gateway processes on a 3-node NATS cluster (R3 streams and buckets): inbound
through all of them, outbound shared, and kill -9 of a stream leader and of a gateway under
load. The provider is a :class:`ProviderSink` over HTTP, counting sends per outbound id."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest

from gateway import Outbound, TextPart
from gateway.wire import encode, message_decoder
from gateway.testing import GatewayProcess, stream_messages, wait_until


def _sink_channel(sink, name: str = "demo", **keys: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    return f'[channels.{name}]\ntype = "mock"\nprovider_url = "{sink.url}"\nkeep = 0\n{extra}'


class _Webhooks:
    """A provider calling the gateways' webhooks: distinct provider ids, round robin over
    the gateways, ``rate`` per second on a fixed schedule from ``workers`` connections.
    An id not answered 200 is retried (on the next gateway) as a provider would; ``acked``
    holds the ids answered 200 and ``ack_times`` when."""

    def __init__(self, ports: list[int], *, rate: float, workers: int = 8, channel: str = "demo",
                 conversations: int = 50):
        self.ports = list(ports)
        self.rate = rate
        self.workers = workers
        self.channel = channel
        self.conversations = conversations
        self.acked: set[str] = set()
        self.ack_times: list[float] = []
        self.failures = 0
        self._next = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        t0 = time.monotonic()
        self._tasks = [asyncio.create_task(self._worker(w, t0)) for w in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _worker(self, w: int, t0: float) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while not self._stop.is_set():
                i = self._next
                self._next += 1
                due = t0 + i / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                pid = f"p{i}"
                body = json.dumps({"text": f"m{i}", "sender": f"c{i % self.conversations}", "id": pid})
                attempt = 0
                while not self._stop.is_set():
                    port = self.ports[(i + attempt) % len(self.ports)]
                    attempt += 1
                    try:
                        r = await client.post(f"http://127.0.0.1:{port}/channels/{self.channel}/inbound", content=body)
                        if r.status_code == 200:
                            self.acked.add(pid)
                            self.ack_times.append(time.monotonic())
                            break
                    except httpx.HTTPError:
                        pass
                    self.failures += 1
                    await asyncio.sleep(0.1)

    def longest_gap(self, since: float = 0.0) -> float:
        """The longest time without a 200 answer after ``since``."""
        ts = sorted(t for t in self.ack_times if t >= since)
        return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)


async def _inbound(url: str) -> list:
    return [message_decoder.decode(m.data) for m in await stream_messages(url, "GW_IN")]


async def _conversations(ports: list[int], url: str, n: int) -> list[str]:
    """Create ``n`` conversations by webhooks (spread over the gateways); their keys."""
    async with httpx.AsyncClient(timeout=10) as c:
        for i in range(n):
            r = await c.post(f"http://127.0.0.1:{ports[i % len(ports)]}/channels/demo/inbound",
                             content=json.dumps({"text": "hi", "sender": f"k{i}", "id": f"k{i}"}))
            assert r.status_code == 200, r.text
    keys = {m.sender.id: m.conversation for m in await _inbound(url)}
    return [keys[f"k{i}"] for i in range(n)]


async def _publish(js, outbounds: list[Outbound]) -> None:
    futs = [await js.publish_async("gw.out.mock.demo", encode(o), headers={"Nats-Msg-Id": o.id}) for o in outbounds]
    await asyncio.gather(*futs)


async def _sent_by(gp: GatewayProcess) -> float:
    async with httpx.AsyncClient(timeout=5) as c:
        text = (await c.get(f"http://127.0.0.1:{gp.http_port}/metrics")).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("gateway_outbound_total{"))


async def test_every_stream_and_bucket_has_three_replicas_on_the_cluster(cluster, gateways):
    await gateways(1)
    nc = await nats.connect(cluster.urls)
    try:
        js = nc.jetstream()
        names = [s.config.name for s in await js.streams_info()]
        assert {"GW_IN", "GW_OUT", "GW_STATUS", "GW_DEAD", "GW_SCHED", "GW_TASKS", "KV_gw_dedup", "KV_gw_conversations",
                "KV_gw_state", "KV_gw_receipts", "OBJ_gw_blobs"} <= set(names)
        for name in names:
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3, name
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, name
    finally:
        await nc.close()


async def test_a_single_node_bus_moved_to_replicas_3_gets_its_buckets_replicated(cluster, gateways, tmp_path):
    # Streams and buckets created with replicas = 1 (a single-node start), then the gateway
    # restarted with replicas = 3: every one of them must follow.
    d = tmp_path / "single"
    d.mkdir()
    gp = GatewayProcess(d, bus_url=cluster.url, bus="replicas = 1")
    await asyncio.to_thread(gp.start)
    gp.signal(signal.SIGTERM)
    await asyncio.to_thread(gp.wait)
    await gateways(1)
    nc = await nats.connect(cluster.urls)
    try:
        js = nc.jetstream()
        replicas = {s.config.name: s.config.num_replicas for s in await js.streams_info()}
    finally:
        await nc.close()
    assert replicas and set(replicas.values()) == {3}, replicas


async def test_webhooks_through_three_gateways_reach_the_bus_once_each(cluster, gateways):
    gps = await gateways(3)
    ports = [g.http_port for g in gps]
    n = 300

    async def post(c: httpx.AsyncClient, port: int, i: int) -> httpx.Response:
        return await c.post(f"http://127.0.0.1:{port}/channels/demo/inbound",
                            content=json.dumps({"text": f"m{i}", "sender": f"c{i % 30}", "id": f"p{i}"}))

    # Every provider id is delivered to two different gateways at the same time (a provider
    # retrying on another address while the first attempt is still running).
    async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=64)) as c:
        sem = asyncio.Semaphore(48)

        async def both(i: int) -> list[int]:
            async with sem:
                rs = await asyncio.gather(post(c, ports[i % 3], i), post(c, ports[(i + 1) % 3], i))
                return [r.status_code for r in rs]

        codes = await asyncio.gather(*(both(i) for i in range(n)))
    assert collections.Counter(code for pair in codes for code in pair) == {200: 2 * n}
    msgs = await _inbound(cluster.url)
    by_provider = collections.Counter(m.provider_id for m in msgs)
    assert set(by_provider) == {f"p{i}" for i in range(n)}  # none lost
    assert [p for p, k in by_provider.items() if k > 1] == []  # none twice on the bus
    # All three gateways published some of them (else the test proves nothing about sharing).
    async with httpx.AsyncClient(timeout=5) as c:
        for g in gps:
            metrics = (await c.get(f"http://127.0.0.1:{g.http_port}/metrics")).text
            published = sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
                            if ln.startswith("gateway_inbound_total{"))
            assert published > 0


async def test_outbound_shared_by_two_gateways_is_sent_once_each(cluster, gateways, sink):
    gps = await gateways(2, _sink_channel(sink))
    convs = await _conversations([g.http_port for g in gps], cluster.url, 50)
    n = 1000
    nc = await nats.connect(cluster.urls)
    try:
        await _publish(nc.jetstream(), [Outbound(id=f"o{i}", conversation=convs[i % 50], parts=[TextPart(text="x")])
                                        for i in range(n)])
        await wait_until(lambda: sink.count >= n, timeout=60)
        await wait_until(lambda: _stream_empty(nc, "GW_OUT"), timeout=30)
    finally:
        await nc.close()
    assert set(sink.sends) == {f"o{i}" for i in range(n)}
    assert sink.doubles() == {}
    shares = [await _sent_by(g) for g in gps]
    # One channel is delivered by the one process holding its lease (order by design):
    # the other stands by; what matters is that every send is counted once, by one of them.
    assert sum(shares) == n and max(shares) == n, shares


async def _stream_empty(nc, stream: str) -> bool:
    return (await nc.jetstream().stream_info(stream)).state.messages == 0


class _Replies:
    """A backend publishing replies to GW_OUT at ``rate`` per second (``Nats-Msg-Id`` =
    outbound id, a publish not acknowledged is retried with the same id); ``acked`` in
    publish-acknowledgement order, ``ack_times`` when."""

    def __init__(self, url: list[str], convs: list[str], *, total: int, rate: float):
        self.url, self.convs, self.total, self.rate = url, convs, total, rate
        self.acked: list[Outbound] = []
        self.ack_times: list[float] = []
        self.retries = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        nc = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = nc.jetstream(timeout=2)
        t0 = time.monotonic()
        try:
            for i in range(self.total):
                delay = t0 + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                # One conversation's replies are published one after the other (each waits
                # for its ack), as a backend answering a conversation does.
                o = Outbound(id=f"o{i}", conversation=self.convs[i % len(self.convs)], parts=[TextPart(text=f"r{i}")])
                while True:
                    try:
                        await js.publish("gw.out.mock.demo", encode(o), headers={"Nats-Msg-Id": o.id})
                        break
                    except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError):
                        self.retries += 1
                        await asyncio.sleep(0.1)
                self.acked.append(o)
                self.ack_times.append(time.monotonic())
        finally:
            await nc.close()

    def longest_gap(self, since: float = 0.0) -> float:
        ts = [t for t in self.ack_times if t >= since]
        return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)


async def _leader_then_gateway_kill(cluster, gateways, sink) -> dict:
    """Two gateways under inbound and outbound load; kill -9 the node leading GW_IN, then
    (once it has a new leader) one gateway; bring the node back; let everything drain."""
    gps = await gateways(2, _sink_channel(sink))
    ports = [g.http_port for g in gps]
    convs = await _conversations(ports, cluster.url, 200)
    hooks = _Webhooks(ports, rate=150)
    replies = _Replies(cluster.urls, convs, total=2000, rate=200)
    hooks.start()
    replies.start()
    try:
        await wait_until(lambda: len(replies.acked) >= 400 and sink.count >= 300, timeout=30)
        leader = await cluster.stream_leader("GW_IN")
        out_leader = await cluster.stream_leader("GW_OUT")
        killed_at = time.monotonic()
        await cluster.kill(leader)
        await cluster.wait_new_leader("GW_IN", leader)
        # The gap counts from the kill: wait for acknowledged publishes after it.
        await wait_until(lambda: hooks.ack_times and hooks.ack_times[-1] > killed_at + 0.5, timeout=30)
        await wait_until(lambda: replies.ack_times and replies.ack_times[-1] > killed_at + 0.5, timeout=30)
        sent_before_gateway_kill = sink.count
        gps[0].signal(signal.SIGKILL)
        await asyncio.to_thread(gps[0].wait)
        gateway_killed_at = time.monotonic()
        await cluster.restart(leader)
        await replies.task
    finally:
        await hooks.stop()
        if replies.task is not None and not replies.task.done():
            replies.task.cancel()
    nc = await nats.connect(cluster.urls)
    try:
        await wait_until(lambda: len(sink.sends) >= len(replies.acked), timeout=90)
        await wait_until(lambda: _stream_empty(nc, "GW_OUT"), timeout=60)
    finally:
        await nc.close()
    msgs = await _inbound(cluster.url)
    on_bus = collections.Counter(m.provider_id for m in msgs if m.provider_id and m.provider_id.startswith("p"))
    published = [o.id for o in replies.acked]
    position = {oid: i for i, oid in enumerate(published)}
    conv_of = {o.id: o.conversation for o in replies.acked}
    broken = set()
    for conv, ids in sink.order.items():
        first = [oid for k, oid in enumerate(ids) if oid not in ids[:k]]  # first sends, in arrival order
        if [position[o] for o in first] != sorted(position[o] for o in first):
            broken.add(conv)
    result = dict(
        leader=leader.name, out_leader=out_leader.name,
        inbound_gap=hooks.longest_gap(killed_at - 1), outbound_gap=replies.longest_gap(killed_at - 1),
        inbound_acked=hooks.acked, inbound_on_bus=on_bus, inbound_retries=hooks.failures,
        published=published, sends=dict(sink.sends), doubles=sink.doubles(), conv_of=conv_of,
        broken=broken, conversations=len(convs), at_gateway_kill=sent_before_gateway_kill,
        gateway_gap=hooks.longest_gap(gateway_killed_at - 1),
    )
    print(f"\nleader {leader.name} of GW_IN killed (GW_OUT led by {out_leader.name}): "
          f"inbound publish gap {result['inbound_gap']:.2f} s, outbound publish gap {result['outbound_gap']:.2f} s; "
          f"after the gateway kill: inbound gap {result['gateway_gap']:.2f} s; "
          f"webhooks acked {len(hooks.acked)} (retried {hooks.failures}), replies {len(published)} "
          f"(publish retries {replies.retries}), doubles {sum(v - 1 for v in result['doubles'].values())}, "
          f"conversations out of order {len(broken)} of {len(convs)}")
    return result


async def test_stream_leader_kill_then_gateway_kill_under_load_loses_nothing_acknowledged(cluster, gateways, sink):
    r = await _leader_then_gateway_kill(cluster, gateways, sink)
    # Every webhook answered 200 is on the bus, once.
    assert set(r["inbound_acked"]) <= set(r["inbound_on_bus"])
    assert [p for p, k in r["inbound_on_bus"].items() if k > 1] == []
    # Every reply the bus acknowledged was sent; a double is possible only for what the
    # killed gateway had handed to the provider and not yet written as a receipt.
    assert set(r["published"]) == set(r["sends"])
    # Measured 0-6, once 64: when the gateway dies while the receipts bucket still elects
    # its new leader, every receipt it wrote meanwhile is lost with it, so the bound is
    # what one process holds in delivery ([outbound] concurrency), not the 8 of one server.
    assert sum(v - 1 for v in r["doubles"].values()) <= 64, r["doubles"]
    # The kills were under load, not after it.
    assert r["at_gateway_kill"] < len(r["published"]) - 200
    assert r["inbound_gap"] > 0 and r["outbound_gap"] > 0


async def test_order_kept_per_conversation_across_a_leader_kill_and_a_gateway_kill(cluster, gateways, sink):
    r = await _leader_then_gateway_kill(cluster, gateways, sink)
    assert set(r["published"]) == set(r["sends"])
    assert r["broken"] == set(), f"{len(r['broken'])} of {r['conversations']} conversations out of order"
