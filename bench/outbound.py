"""Outbound benchmark: an ``Outbound`` published on ``gw.out.mock.<name>`` → the core's
dispatcher → mock channel → ``sent`` ``DeliveryStatus`` on ``gw.status.mock.<name>``.

Measured in one run, against one real nats-server (file storage):

1. baseline: a raw nats-py pull consumer (``fetch`` of 256 + ``ack``) over the same
   number of messages of the same size on a work-queue stream;
2. the JetStream operations the dispatcher does for one outbound (``accepted`` status
   publish pipelined with the receipt and conversation ``kv.get``; receipt KV write;
   ``sent`` status publish; plain ``ack``), with raw nats-py at the dispatcher's
   concurrency: the floor its design sets (kept in step with ``gateway/core/delivery/dispatcher.py``);
3. the gateway (``python -m gateway run`` in its own process, mock channel): M outbounds
   spread over many conversations published at once, time from each publish to its
   ``sent`` status (received over a core NATS subscription), throughput, and a paced run
   at a fixed offered rate; peak RSS of the gateway process;
4. with a provider over HTTP (a trivial HTTP server in its own process): a hand-written
   consumer (``fetch``, POST to the provider, ``ack``, 64 at a time) as the baseline, and
   the gateway's burst again with its mock channel POSTing each delivery there.

Run: ``python -m bench.outbound [--quick]`` (or ``python -m bench`` for both benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.js import api

from bench._common import (
    bench_main,
    HOST,
    Bus,
    CpuMeter,
    DirectGets,
    GatewayProcess,
    TrivialServer,
    closed_loop,
    event_loop_name,
    interference,
    latency_summary,
    machine_info,
    now_iso,
    peak_rss_mib,
    post_request,
    rate,
)

CHANNEL = "bench"
TEXT_BYTES = 1024
CONCURRENCY = 64
"""The gateway's ``[outbound] concurrency`` default, used for the raw floor too."""


class _Status(msgspec.Struct):
    """The two fields of a ``DeliveryStatus`` the benchmark needs (others are ignored)."""

    outbound_id: str
    state: str


_status_decoder = msgspec.json.Decoder(_Status)


def outbound_payload(prefix: str, i: int, conversation: str) -> bytes:
    from gateway import Outbound, TextPart

    head = f"{prefix}-{i:08d} "
    return msgspec.json.encode(Outbound(id=f"{prefix}-{i}", conversation=conversation,
                                        parts=[TextPart(text=head + "y" * (TEXT_BYTES - len(head)))]))


# --- 1. raw fetch + ack ----------------------------------------------------------------


async def raw_fetch_ack(bus: Bus, m: int, batch: int = 256, repeats: int = 3) -> dict[str, Any]:
    """The baseline, ``repeats`` times (it varies from run to run more than the rest):
    the median run is the one reported, all rates are listed."""
    runs = [await _fetch_ack_once(bus, m, batch, rep) for rep in range(repeats)]
    median = sorted(runs, key=lambda r: r["rate_msg_s"])[len(runs) // 2]
    return {**median, "repeats": repeats, "all_rates_msg_s": [r["rate_msg_s"] for r in runs]}


async def _fetch_ack_once(bus: Bus, m: int, batch: int, rep: int) -> dict[str, Any]:
    payloads = [outbound_payload(f"wq{rep}", i, "bench.conversation-key-of-typical-length") for i in range(m)]
    stream, subject = f"BENCH_WQ{rep}", f"bench.wq{rep}"
    nc = await nats.connect(bus.url)
    try:
        js = nc.jetstream(publish_async_max_pending=20000)
        await js.add_stream(api.StreamConfig(name=stream, subjects=[subject], storage=api.StorageType.FILE,
                                             retention=api.RetentionPolicy.WORK_QUEUE, duplicate_window=120.0))
        futs = [await js.publish_async(subject, p, headers={"Nats-Msg-Id": f"wq{rep}-{i}"})
                for i, p in enumerate(payloads)]
        await asyncio.gather(*futs)
        psub = await js.pull_subscribe(subject, durable="bench_wq", stream=stream,
                                       config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=60,
                                                                 max_ack_pending=CONCURRENCY * 16))
        got = 0
        cpu = CpuMeter({"nats_server": bus.pid, "bench_process": None}).start()
        t0 = time.perf_counter()
        deadline = t0 + 60
        while got < m and time.perf_counter() < deadline:
            try:
                msgs = await psub.fetch(batch=batch, timeout=5)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            for msg in msgs:
                await msg.ack()
            got += len(msgs)
        await nc.flush()
        elapsed = time.perf_counter() - t0
        cpu_used = cpu.stop(got)
        # A work queue deletes what was acked: confirm every ack took effect.
        left = None
        for _ in range(50):
            left = (await js.stream_info(stream)).state.messages
            if left == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    return {"messages": got, "batch": batch, "ack": "msg.ack() (fire and forget) + one flush",
            "max_ack_pending": CONCURRENCY * 16, "left_in_stream_after": left, "elapsed_s": round(elapsed, 3),
            "rate_msg_s": rate(got, elapsed), "message_bytes": len(payloads[0]), "cpu": cpu_used}


# --- 2. the dispatcher's bus operations, raw -------------------------------------------


async def raw_dispatch_ops(bus: Bus, m: int, conversations: int, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    conv_keys = [f"bench.conv{k:06d}" for k in range(conversations)]
    payloads = [outbound_payload("ops", i, conv_keys[i % conversations]) for i in range(m)]
    nc = await nats.connect(bus.url)
    lat: list[float] = []
    try:
        js = nc.jetstream(publish_async_max_pending=20000)
        await js.add_stream(api.StreamConfig(name="BENCH_OPS_OUT", subjects=["bench.opsout"], storage=api.StorageType.FILE,
                                             retention=api.RetentionPolicy.WORK_QUEUE, duplicate_window=120.0))
        await js.add_stream(api.StreamConfig(name="BENCH_OPS_STATUS", subjects=["bench.opsstatus"],
                                             storage=api.StorageType.FILE, duplicate_window=120.0))
        convs = await js.create_key_value(api.KeyValueConfig(bucket="bench_out_conv", history=1, direct=True,
                                                             storage=api.StorageType.FILE))
        await js.create_key_value(api.KeyValueConfig(bucket="bench_out_receipts", history=1, direct=True,
                                                                storage=api.StorageType.FILE))
        route = b'{"key":"x","channel_type":"mock","channel":"bench","route":{"thread":"t","to":"t"}}'
        for k in conv_keys:
            await convs.put(k, route)
        futs = [await js.publish_async("bench.opsout", p, headers={"Nats-Msg-Id": f"ops-{i}"})
                for i, p in enumerate(payloads)]
        await asyncio.gather(*futs)
        psub = await js.pull_subscribe("bench.opsout", durable="bench_ops", stream="BENCH_OPS_OUT",
                                       config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=60,
                                                                 max_ack_pending=concurrency * 16))
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=concurrency * 16)
        status = b'{"outbound_id":"x","state":"sent","channel":"bench"}'

        gets = await DirectGets(nc).start()
        perf = time.perf_counter

        async def fetcher() -> None:
            got = 0
            while got < m:
                try:
                    msgs = await psub.fetch(batch=256, timeout=5)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                for msg in msgs:
                    await queue.put(msg)
                got += len(msgs)
            for _ in range(concurrency):
                await queue.put(None)

        async def worker() -> None:
            while (msg := await queue.get()) is not None:
                t = perf()
                out = msgspec.json.decode(msg.data)
                rkey = "r-" + out["id"]
                accepted = await js.publish_async("bench.opsstatus", status,
                                                  headers={"Nats-Msg-Id": f"{out['id']}:accepted"})

                receipt = await gets.ask("KV_bench_out_receipts", f"$KV.bench_out_receipts.{rkey}")
                conv = await gets.ask("KV_bench_out_conv", f"$KV.bench_out_conv.{out['conversation']}")
                await receipt
                await conv
                await accepted
                await (await js.publish_async(f"$KV.bench_out_receipts.{rkey}", b'{"provider_id":"p"}'))
                await (await js.publish_async("bench.opsstatus", status, headers={"Nats-Msg-Id": f"{out['id']}:sent"}))
                await msg.ack()
                lat.append(perf() - t)

        cpu = CpuMeter({"nats_server": bus.pid, "bench_process": None}).start()
        t0 = perf()
        await asyncio.wait_for(asyncio.gather(fetcher(), *(worker() for _ in range(concurrency))), 90)
        elapsed = perf() - t0
        cpu_used = cpu.stop(len(lat))
    finally:
        await nc.close()
    return {"messages": len(lat), "concurrency": concurrency, "elapsed_s": round(elapsed, 3),
            "rate_msg_s": rate(len(lat), elapsed), **{k: v for k, v in latency_summary(lat).items()},
            "cpu": cpu_used}


# --- 3. the gateway ----------------------------------------------------------------------


class StatusWatch:
    """Core NATS subscription on the status subject: when each outbound reached a state."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.event = asyncio.Event()
        self.want: set[str] = set()

    async def on_msg(self, msg: Any) -> None:
        now = time.perf_counter()
        try:
            st = _status_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self.counts["undecodable"] = self.counts.get("undecodable", 0) + 1
            return
        self.counts[st.state] = self.counts.get(st.state, 0) + 1
        if st.state == "sent" and st.outbound_id not in self.sent:
            self.sent[st.outbound_id] = now
            self.want.discard(st.outbound_id)
            if not self.want:
                self.event.set()

    def expect(self, ids: list[str]) -> None:
        self.want = set(ids) - set(self.sent)
        self.event.clear()
        if not self.want:
            self.event.set()


async def make_conversations(gw: GatewayProcess, url: str, count: int, *, stream: str = "GW_IN",
                             channel: str = CHANNEL) -> list[str]:
    """One inbound webhook per conversation (the gateway only answers known
    conversations); their keys read back from GW_IN, as a backend would."""
    from gateway.testing import stream_messages

    path = f"/channels/{channel}/inbound"
    reqs = [post_request(HOST, gw.http_port, path, json.dumps(
        {"text": "hello", "sender": f"customer-{k}", "id": f"conv-{k}", "thread": f"thread-{k}"}).encode())
        for k in range(count)]
    res = await closed_loop(HOST, gw.http_port, reqs, 16)
    if res.ok != count:
        raise RuntimeError(f"creating conversations: {res.summary()}")
    created = [json.loads(m.data) for m in await stream_messages(url, stream)]
    keys = sorted({d["conversation"] for d in created
                   if d["channel"] == channel and str(d.get("provider_id", "")).startswith("conv-")})
    if len(keys) != count:
        raise RuntimeError(f"expected {count} conversations on GW_IN, found {len(keys)}")
    return keys


async def publish_and_wait(js: Any, watch: StatusWatch, items: list[tuple[str, bytes]], *, pace: float | None,
                           timeout: float, prefix: str = "gw", channel: str = CHANNEL) -> dict[str, Any]:
    """Publish every (id, payload) on the outbound subject (all at once, or ``pace`` per
    second on a fixed schedule) and wait for every ``sent`` status."""
    subject = f"{prefix}.out.mock.{channel}"
    watch.expect([i for i, _ in items])
    t_pub: dict[str, float] = {}
    perf = time.perf_counter
    futs = []
    t0 = perf()
    for n, (oid, payload) in enumerate(items):
        if pace:
            delay = t0 + n / pace - perf()
            if delay > 0:
                await asyncio.sleep(delay)
        # Latency counts from the scheduled time in a paced run (no coordinated omission).
        t_pub[oid] = t0 + n / pace if pace else perf()
        futs.append(await js.publish_async(subject, payload, headers={"Nats-Msg-Id": oid}))
    await asyncio.gather(*futs)
    published = perf()
    try:
        await asyncio.wait_for(watch.event.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    lat = [watch.sent[oid] - t for oid, t in t_pub.items() if oid in watch.sent]
    done = [watch.sent[oid] for oid in t_pub if oid in watch.sent]
    elapsed = (max(done) - t0) if done else perf() - t0
    return {"messages": len(items), "sent": len(lat), "missing": len(items) - len(lat),
            "publish_s": round(published - t0, 3), "elapsed_s": round(elapsed, 3), "rate_msg_s": rate(len(lat), elapsed),
            **latency_summary(lat)}


async def gateway_runs(bus: Bus, *, m: int, conversations: int, paced_rate: float, paced_seconds: float,
                       profile_to: Path | None) -> dict[str, Any]:
    gw = GatewayProcess(bus.url, channel=CHANNEL, profile_to=profile_to,
                        extra=f"[outbound]\nconcurrency = {CONCURRENCY}\n")
    await gw.start()
    libraries = gw.libraries()
    nc = await nats.connect(bus.url)
    try:
        keys = await make_conversations(gw, bus.url, conversations)
        js = nc.jetstream(publish_async_max_pending=20000)
        watch = StatusWatch()
        await nc.subscribe(f"gw.status.mock.{CHANNEL}", cb=watch.on_msg, pending_msgs_limit=1_000_000)
        await nc.flush()

        def items(prefix: str, count: int) -> list[tuple[str, bytes]]:
            return [(f"{prefix}-{i}", outbound_payload(prefix, i, keys[i % len(keys)])) for i in range(count)]

        warm = await publish_and_wait(js, watch, items("warm", min(500, m)), pace=None, timeout=60)
        rss_warm = gw.rss()
        pids = {"gateway": gw.pid, "nats_server": bus.pid, "bench_process": None}
        cpu = CpuMeter(pids).start()
        burst = await publish_and_wait(js, watch, items("out", m), pace=None, timeout=90)
        burst["cpu"] = cpu.stop(burst["sent"])
        print(f"  gateway outbound: {burst['rate_msg_s']} msg/s", file=sys.stderr)
        rss_burst = gw.rss()
        await asyncio.sleep(1)
        cpu = CpuMeter(pids).start()
        paced = await publish_and_wait(js, watch, items("paced", int(paced_rate * paced_seconds)), pace=paced_rate,
                                       timeout=60)
        paced["cpu"] = cpu.stop(paced["sent"])
        print(f"  gateway outbound paced: p99 {paced['p99_ms']} ms", file=sys.stderr)
        rss_end = gw.rss()
        states = dict(watch.counts)
    finally:
        await nc.close()
        await gw.stop()
        gw.cleanup()
    return {"warmup": {"messages": warm["messages"], "sent": warm["sent"]},
            "burst": burst, "paced": {"offered_rate_msg_s": paced_rate, "seconds": paced_seconds, **paced},
            "states_seen": states, "libraries": libraries,
            "rss": {"after_warmup_mib": rss_warm, "after_burst_mib": rss_burst, "peak_mib": rss_end}}


# --- 4. with a provider over HTTP: a hand-written consumer and the gateway ----------------


async def handwritten_consumer(bus: Bus, sink: TrivialServer, m: int, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """What one would write instead of the dispatcher: a pull consumer on a work-queue
    stream, ``fetch`` of 256, each message POSTed to the provider (httpx, as the mock
    channel does) by ``concurrency`` workers, then acked. No receipts, statuses, retries,
    order or conversation lookup."""
    import httpx

    payloads = [outbound_payload("hw", i, f"bench.conv{i % 1000:06d}") for i in range(m)]
    nc = await nats.connect(bus.url)
    client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=256))
    try:
        js = nc.jetstream(publish_async_max_pending=20000)
        await js.add_stream(api.StreamConfig(name="BENCH_HW", subjects=["bench.hw"], storage=api.StorageType.FILE,
                                             retention=api.RetentionPolicy.WORK_QUEUE, duplicate_window=120.0))
        futs = [await js.publish_async("bench.hw", p, headers={"Nats-Msg-Id": f"hw-{i}"}) for i, p in enumerate(payloads)]
        await asyncio.gather(*futs)
        psub = await js.pull_subscribe("bench.hw", durable="bench_hw", stream="BENCH_HW",
                                       config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=60,
                                                                 max_ack_pending=concurrency * 16))
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=concurrency * 4)
        done = 0

        async def fetcher() -> None:
            got = 0
            while got < m:
                try:
                    msgs = await psub.fetch(batch=256, timeout=5)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                for msg in msgs:
                    await queue.put(msg)
                got += len(msgs)
            for _ in range(concurrency):
                await queue.put(None)

        async def worker() -> None:
            nonlocal done
            while (msg := await queue.get()) is not None:
                r = await client.post(sink.url, content=msg.data, headers={"Content-Type": "application/json"})
                if r.status_code == 200:
                    await msg.ack()
                    done += 1
                else:
                    await msg.nak()

        cpu = CpuMeter({"nats_server": bus.pid, "bench_process": None, "provider": sink.pid}).start()
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(fetcher(), *(worker() for _ in range(concurrency))), 120)
        await nc.flush()
        elapsed = time.perf_counter() - t0
        cpu_used = cpu.stop(done)
    finally:
        await client.aclose()
        await nc.close()
    return {"messages": done, "concurrency": concurrency, "elapsed_s": round(elapsed, 3),
            "rate_msg_s": rate(done, elapsed), "cpu": cpu_used}


async def gateway_with_provider(bus: Bus, sink: TrivialServer, *, m: int, conversations: int) -> dict[str, Any]:
    """The gateway's burst again, its mock channel POSTing every delivery to the same
    provider (``provider_url``) as the hand-written consumer."""
    gw = GatewayProcess(bus.url, channel=CHANNEL, extra=f"[outbound]\nconcurrency = {CONCURRENCY}\n",
                        channel_keys=f'provider_url = "{sink.url}"\nkeep = 0', bus_keys='prefix = "gwp"')
    await gw.start()
    nc = await nats.connect(bus.url)
    try:
        keys = await make_conversations(gw, bus.url, conversations, stream="GWP_IN")
        js = nc.jetstream(publish_async_max_pending=20000)
        watch = StatusWatch()
        await nc.subscribe(f"gwp.status.mock.{CHANNEL}", cb=watch.on_msg, pending_msgs_limit=1_000_000)
        await nc.flush()

        def items(prefix: str, count: int) -> list[tuple[str, bytes]]:
            return [(f"{prefix}-{i}", outbound_payload(prefix, i, keys[i % len(keys)])) for i in range(count)]

        await publish_and_wait(js, watch, items("pwarm", min(500, m)), pace=None, timeout=60, prefix="gwp")
        cpu = CpuMeter({"gateway": gw.pid, "nats_server": bus.pid, "bench_process": None, "provider": sink.pid}).start()
        burst = await publish_and_wait(js, watch, items("pout", m), pace=None, timeout=120, prefix="gwp")
        burst["cpu"] = cpu.stop(burst["sent"])
        print(f"  gateway outbound with provider: {burst['rate_msg_s']} msg/s", file=sys.stderr)
    finally:
        await nc.close()
        await gw.stop()
        gw.cleanup()
    return burst


# --- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    m = args.m or (2000 if args.quick else 20000)
    conversations = args.conversations or (200 if args.quick else 1000)
    paced_seconds = args.paced_seconds or (3.0 if args.quick else 8.0)
    started = time.perf_counter()
    machine = machine_info()
    async with Bus() as bus:
        print(f"outbound: M={m} over {conversations} conversations, nats-server at {bus.url}", file=sys.stderr)
        base = await raw_fetch_ack(bus, m)
        print(f"  raw fetch+ack: {base['rate_msg_s']} msg/s", file=sys.stderr)
        ops = await raw_dispatch_ops(bus, m, conversations)
        print(f"  raw dispatcher ops: {ops['rate_msg_s']} msg/s", file=sys.stderr)
        g = await gateway_runs(bus, m=m, conversations=conversations, paced_rate=args.paced_rate,
                               paced_seconds=paced_seconds, profile_to=args.profile)
        async with TrivialServer() as sink:
            hw = await handwritten_consumer(bus, sink, m)
            print(f"  hand-written consumer with provider: {hw['rate_msg_s']} msg/s", file=sys.stderr)
            gp = await gateway_with_provider(bus, sink, m=m, conversations=conversations)
    ratio = g["burst"]["rate_msg_s"] / base["rate_msg_s"] if base["rate_msg_s"] else 0.0
    data: dict[str, Any] = {
        "benchmark": "outbound",
        "date": now_iso(),
        "quick": bool(args.quick),
        "m": m,
        "conversations": conversations,
        "gateway_concurrency": CONCURRENCY,
        "machine": machine,
        "event_loops": {"benchmark_process": event_loop_name(), "gateway_process_loaded": g["libraries"]},
        "payload": {"text_bytes": TEXT_BYTES, "outbound_bytes": base["message_bytes"]},
        "method": {
            "publisher": "nats-py js.publish_async with Nats-Msg-Id = outbound id, from the benchmark process",
            "status": "core NATS subscription on gw.status.mock.<name>; time of the first `sent` per outbound",
            "gateway": "python -m gateway run in its own process, mock channel, no deliver delay",
        },
        "results": {
            "raw_fetch_ack": base,
            "raw_dispatch_ops": ops,
            "gateway": g["burst"],
            "paced": g["paced"],
            "states_seen": g["states_seen"],
            "handwritten_consumer_with_provider": hw,
            "gateway_with_provider": gp,
            "gateway_peak_rss_mib": g["rss"]["peak_mib"],
            "gateway_rss_mib": g["rss"],
            "bench_process_peak_rss_mib": peak_rss_mib(),
        },
        "targets": {
            "ratio_gateway_to_baseline": round(ratio, 4),
            "half_baseline_met": ratio >= 0.5,
            "ratio_gateway_to_handwritten_with_provider": round(gp["rate_msg_s"] / hw["rate_msg_s"], 4)
            if hw["rate_msg_s"] else 0.0,
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    data["interference"] = interference(data["results"])
    return data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.outbound", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="M=2,000 over 200 conversations (default 20,000 over 1,000)")
    p.add_argument("-m", type=int, default=0, help="outbound messages")
    p.add_argument("--conversations", type=int, default=0)
    p.add_argument("--paced-rate", type=float, default=500.0, help="offered msg/s of the paced run (default 500)")
    p.add_argument("--paced-seconds", type=float, default=0.0)
    p.add_argument("--profile", type=Path, default=None, metavar="FILE",
                   help="run the gateway process under cProfile, write FILE, print the top functions; "
                        "results are not written (profiling slows the gateway)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("outbound", parser, run, argv)


if __name__ == "__main__":
    main()
