"""Cluster and backlog-isolation benchmark.

1. **cluster**: two ``python -m gateway run`` processes on a 3-node nats-server cluster on
   loopback (R3 streams and buckets, ``[bus] replicas = 3``), against the same two
   processes on one nats-server (R1) in the same run: inbound (closed loop, the webhooks
   split over both gateways) and outbound (M outbounds published at once, publish →
   ``sent`` status).
2. **backlog isolation**: one gateway with two mock channels, ``slow`` (the provider takes
   2 s) and ``fast``: the time from publishing 100 replies on ``fast`` to the last one's
   ``sent``, first with nothing waiting (the baseline), then with 3,000 replies waiting on
   ``slow`` (goal: under 1 s).

Run: ``python -m bench.cluster [--quick]`` (part of ``python -m bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import nats

from bench._common import (
    HOST,
    CpuMeter,
    GatewayProcess,
    bench_main,
    closed_loop,
    event_loop_name,
    interference,
    latency_summary,
    machine_info,
    now_iso,
    post_request,
    rate,
)
from bench.inbound import webhook_body
from bench.outbound import StatusWatch, make_conversations, outbound_payload, publish_and_wait

CHANNEL = "bench"


# --- 1. two gateways on a cluster vs on one server ----------------------------------------


async def two_gateways(url: str, *, replicas: int, n: int, m: int, conversations: int, connections: int,
                       server_pids: dict[str, int | None]) -> dict[str, Any]:
    """Inbound and outbound through two gateway processes on the bus at ``url``."""
    gws = [GatewayProcess(url, channel=CHANNEL, bus_keys=f"replicas = {replicas}",
                          extra="[outbound]\nconcurrency = 64\n") for _ in range(2)]
    await gws[0].start()
    await gws[1].start()
    nc = await nats.connect([u for u in url.split(",") if u])
    try:
        path = f"/channels/{CHANNEL}/inbound"
        for g in gws:
            await closed_loop(HOST, g.http_port, [post_request(HOST, g.http_port, path, webhook_body(f"w{g.http_port}", i))
                                                  for i in range(min(500, n))], connections // 2)
        reqs = [[post_request(HOST, g.http_port, path, webhook_body(f"in{k}", i)) for i in range(n // 2)]
                for k, g in enumerate(gws)]
        pids = {"gateway_1": gws[0].pid, "gateway_2": gws[1].pid, **server_pids, "load_generator": None}
        cpu = CpuMeter(pids).start()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(closed_loop(HOST, g.http_port, reqs[k], connections // 2)
                                         for k, g in enumerate(gws)))
        elapsed = time.perf_counter() - t0
        ok = sum(r.ok for r in results)
        lat = [x for r in results for x in r.latencies]
        inbound = {"requests": n, "ok": ok, "connections": connections, "elapsed_s": round(elapsed, 3),
                   "rate_msg_s": rate(ok, elapsed), **latency_summary(lat), "cpu": cpu.stop(ok)}
        print(f"  {replicas=}: inbound through 2 gateways {inbound['rate_msg_s']} msg/s", file=sys.stderr)

        keys = await make_conversations(gws[0], url, conversations)
        js = nc.jetstream(publish_async_max_pending=20000)
        watch = StatusWatch()
        await nc.subscribe(f"gw.status.mock.{CHANNEL}", cb=watch.on_msg, pending_msgs_limit=1_000_000)
        await nc.flush()

        def items(prefix: str, count: int) -> list[tuple[str, bytes]]:
            return [(f"{prefix}-{i}", outbound_payload(prefix, i, keys[i % len(keys)])) for i in range(count)]

        await publish_and_wait(js, watch, items("warm", min(500, m)), pace=None, timeout=60)
        cpu = CpuMeter(pids).start()
        outbound = await publish_and_wait(js, watch, items("out", m), pace=None, timeout=120)
        outbound["cpu"] = cpu.stop(outbound["sent"])
        outbound["sent_statuses_seen"] = watch.counts.get("sent", 0)
        print(f"  {replicas=}: outbound through 2 gateways {outbound['rate_msg_s']} msg/s", file=sys.stderr)
    finally:
        await nc.close()
        for g in gws:
            await g.stop()
            g.cleanup()
    return {"replicas": replicas, "gateways": 2, "inbound": inbound, "outbound": outbound}


async def cluster_rows(*, n: int, m: int, conversations: int, connections: int) -> dict[str, Any]:
    from gateway.testing import NatsCluster, NatsServer

    single = NatsServer()
    await single.start()
    try:
        one = await two_gateways(single.url, replicas=1, n=n, m=m, conversations=conversations,
                                 connections=connections, server_pids={"nats_server": single.proc.pid if single.proc else None})
    finally:
        await single.stop()
        single.cleanup()
    async with NatsCluster() as cluster:
        three = await two_gateways(cluster.url, replicas=3, n=n, m=m, conversations=conversations,
                                   connections=connections,
                                   server_pids={f"nats_{node.name}": node.proc.pid if node.proc else None
                                                for node in cluster.nodes})
    return {"single_node": one, "cluster": three}


# --- 2. backlog isolation --------------------------------------------------------------


async def backlog_isolation(*, backlog: int, fast: int, slow_delay: str, wait_s: float) -> dict[str, Any]:
    from gateway.testing import NatsServer

    server = NatsServer()
    await server.start()
    channels = (f'\n[channels.fast]\ntype = "mock"\nkeep = 0\n'
                f'\n[channels.slow]\ntype = "mock"\nkeep = 0\ndeliver_delay = "{slow_delay}"\n')
    gw = GatewayProcess(server.url, channels=channels)
    await gw.start()
    nc = await nats.connect(server.url)
    try:
        fast_keys = await make_conversations(gw, server.url, 100, channel="fast")
        slow_keys = await make_conversations(gw, server.url, 100, channel="slow")
        js = nc.jetstream(publish_async_max_pending=20000)
        fast_watch, slow_watch = StatusWatch(), StatusWatch()
        await nc.subscribe("gw.status.mock.fast", cb=fast_watch.on_msg, pending_msgs_limit=1_000_000)
        await nc.subscribe("gw.status.mock.slow", cb=slow_watch.on_msg, pending_msgs_limit=1_000_000)
        await nc.flush()

        def items(prefix: str, count: int, keys: list[str]) -> list[tuple[str, bytes]]:
            return [(f"{prefix}-{i}", outbound_payload(prefix, i, keys[i % len(keys)])) for i in range(count)]

        alone = await publish_and_wait(js, fast_watch, items("alone", fast, fast_keys), pace=None, timeout=wait_s,
                                       channel="fast")
        print(f"  fast channel alone: {alone['elapsed_s']} s for {fast}", file=sys.stderr)
        slow_items = items("slow", backlog, slow_keys)
        futs = [await js.publish_async("gw.out.mock.slow", p, headers={"Nats-Msg-Id": oid}) for oid, p in slow_items]
        await asyncio.gather(*futs)
        # Let the slow channel fill its places and whatever buffer the gateway gives it.
        await asyncio.sleep(3)
        behind = await publish_and_wait(js, fast_watch, items("behind", fast, fast_keys), pace=None, timeout=wait_s,
                                        channel="fast")
        print(f"  fast channel behind {backlog} slow: {behind['elapsed_s']} s for {behind['sent']} of {fast}",
              file=sys.stderr)
        slow_sent = len(slow_watch.sent)
    finally:
        await nc.close()
        await gw.stop()
        gw.cleanup()
        await server.stop()
        server.cleanup()
    return {"backlog_on_slow": backlog, "slow_delivery_s": slow_delay, "fast_replies": fast,
            "fast_alone": alone, "fast_behind_backlog": behind, "slow_sent_meanwhile": slow_sent,
            "all_fast_sent": behind["sent"] == fast, "wait_limit_s": wait_s}


# --- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.n or (2000 if args.quick else 10000)
    m = args.m or (2000 if args.quick else 10000)
    conversations = 200 if args.quick else 1000
    started = time.perf_counter()
    machine = machine_info()
    print(f"cluster: N={n} inbound, M={m} outbound, two gateways", file=sys.stderr)
    rows = await cluster_rows(n=n, m=m, conversations=conversations, connections=args.connections)
    print("backlog isolation", file=sys.stderr)
    iso = await backlog_isolation(backlog=args.backlog, fast=100, slow_delay="2s", wait_s=args.wait)
    one, three = rows["single_node"], rows["cluster"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 4) if b else 0.0

    behind = iso["fast_behind_backlog"]
    data: dict[str, Any] = {
        "benchmark": "cluster",
        "date": now_iso(),
        "quick": bool(args.quick),
        "n": n,
        "m": m,
        "conversations": conversations,
        "machine": machine,
        "event_loops": {"benchmark_process": event_loop_name()},
        "results": {"single_node": one, "cluster": three, "backlog_isolation": iso},
        "targets": {
            "cluster_to_single_inbound": ratio(three["inbound"]["rate_msg_s"], one["inbound"]["rate_msg_s"]),
            "cluster_to_single_outbound": ratio(three["outbound"]["rate_msg_s"], one["outbound"]["rate_msg_s"]),
            "fast_behind_backlog_s": behind["elapsed_s"] if iso["all_fast_sent"] else None,
            "fast_alone_s": iso["fast_alone"]["elapsed_s"],
            "isolation_under_1s_met": bool(iso["all_fast_sent"] and behind["elapsed_s"] < 1.0),
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    data["interference"] = interference(data["results"])
    return data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N = M = 2,000 (default 10,000)")
    p.add_argument("-n", type=int, default=0, help="inbound messages")
    p.add_argument("-m", type=int, default=0, help="outbound messages")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections over both gateways")
    p.add_argument("--backlog", type=int, default=3000, help="replies waiting on the slow channel (default 3,000)")
    p.add_argument("--wait", type=float, default=60.0, help="how long to wait for the fast channel's replies")
    p.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("cluster", parser, run, argv)


if __name__ == "__main__":
    main()
