"""Inbound benchmark: webhook → normalize → dedup → JetStream ack → HTTP 200.

Measured in one run, against one real nats-server (file storage):

1. baseline: raw nats-py ``js.publish_async`` of the same bus messages (same bytes, same
   headers) to a stream configured like ``GW_IN``, every ack awaited;
2. the JetStream operations the core does for one inbound (the dedup record and the
   pending survey as two direct gets sent together; the message and the conversation's KV
   write as two pipelined ``publish_async``; then the dedup KV write, not waited for),
   done with raw nats-py at the same concurrency as the HTTP load: the floor the
   pipeline's design sets (kept in step with ``gateway/core/inbound/pipeline.py``);
3. ``ctx.publish`` in process (the mock channel's ``inject``, no HTTP): the core without
   the web server;
4. the full path over HTTP to ``python -m gateway run`` in its own process with a mock
   channel, closed loop (throughput, latency) and open loop at a fixed offered rate
   (latency), plus the gateway's peak RSS and which fast paths (uvloop, httptools) it loaded;
5. cross-checks of the load generator: wrk (when installed) on the same endpoint, and
   the load generator against a trivial HTTP server;
6. a hand-written webhook-to-JetStream bridge (Starlette on uvicorn with uvloop and
   httptools, nats-py, ``js.publish`` with ``Nats-Msg-Id``, nothing else) under the same
   closed and open loops: what the gateway's guarantees cost against the least one could
   write.

Run: ``python -m bench.inbound [--quick]`` (or ``python -m bench`` for both benchmarks).
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
import nats.js.errors
from nats.js import api

from bench._common import (
    bench_main,
    HOST,
    Bus,
    CpuMeter,
    DirectGets,
    GatewayProcess,
    closed_loop,
    event_loop_name,
    free_port,
    interference,
    latency_summary,
    loadgen_ceiling,
    machine_info,
    now_iso,
    open_loop,
    peak_rss_mib,
    post_request,
    rate,
    wrk_run,
)

CHANNEL = "bench"
TEXT_BYTES = 1024
CONVERSATIONS = 1000


def webhook_body(prefix: str, i: int) -> bytes:
    """The mock channel's webhook JSON: 1 KiB of text, a distinct provider id, one of
    ``CONVERSATIONS`` threads."""
    head = f"{prefix}-{i:08d} "
    text = head + "x" * (TEXT_BYTES - len(head))
    k = i % CONVERSATIONS
    return json.dumps({"text": text, "sender": f"customer-{k}", "id": f"{prefix}-{i}", "thread": f"thread-{k}"}).encode()


def bus_messages(prefix: str, n: int) -> list[tuple[bytes, dict[str, str]]]:
    """The bytes and headers the gateway publishes for ``webhook_body(prefix, i)``, built
    with the gateway's own schema, for the raw baseline."""
    from datetime import datetime, timezone

    from gateway import Message, Participant, TextPart
    from gateway.core.inbound.pipeline import conversation_key, message_id

    out = []
    now = datetime.now(timezone.utc)
    for i in range(n):
        body = json.loads(webhook_body(prefix, i))
        msg = Message(id=message_id(CHANNEL, body["id"]), channel_type="mock", channel=CHANNEL, provider_id=body["id"],
                      conversation=conversation_key(CHANNEL, body["thread"]), sender=Participant(id=body["sender"]),
                      received_at=now, parts=[TextPart(text=body["text"])])
        headers = {"Nats-Msg-Id": msg.id, "Content-Type": "application/json", "Gw-Schema": "message/1",
                   "Gw-Conversation": msg.conversation, "ce-specversion": "1.0", "ce-id": msg.id,
                   "ce-type": "gateway.message.v1", "ce-source": f"/mock/{CHANNEL}"}
        out.append((msgspec.json.encode(msg), headers))
    return out


def file_stream(name: str, subject: str) -> api.StreamConfig:
    return api.StreamConfig(name=name, subjects=[subject], storage=api.StorageType.FILE, num_replicas=1,
                            retention=api.RetentionPolicy.LIMITS, duplicate_window=120.0, max_msg_size=1048576)


# --- 1. raw publish_async --------------------------------------------------------------


async def raw_publish_async(bus: Bus, n: int, repeats: int = 3) -> dict[str, Any]:
    """The baseline, ``repeats`` times on fresh ids (it varies from run to run more than
    the rest): the median run is the one reported, all rates are listed."""
    runs = []
    nc = await nats.connect(bus.url)
    try:
        js = nc.jetstream(publish_async_max_pending=20000)
        await js.add_stream(file_stream("BENCH_RAW", "bench.raw"))
        for rep in range(repeats):
            msgs = bus_messages(f"raw{rep}", n)
            cpu = CpuMeter({"nats_server": bus.pid, "bench_process": None}).start()
            t0 = time.perf_counter()
            futs = [await js.publish_async("bench.raw", data, headers=headers) for data, headers in msgs]
            acks = await asyncio.gather(*futs)
            elapsed = time.perf_counter() - t0
            runs.append({"acked": len(acks), "elapsed_s": round(elapsed, 3), "rate_msg_s": rate(len(acks), elapsed),
                         "cpu": cpu.stop(n)})
        stored = (await js.stream_info("BENCH_RAW")).state.messages
    finally:
        await nc.close()
    median = sorted(runs, key=lambda r: r["rate_msg_s"])[len(runs) // 2]
    return {"messages": n, "repeats": repeats, **median, "all_rates_msg_s": [r["rate_msg_s"] for r in runs],
            "stored": stored, "bus_message_bytes": len(msgs[0][0])}


# --- 2. the pipeline's bus operations, raw --------------------------------------------


async def raw_pipeline_ops(bus: Bus, n: int, concurrency: int) -> dict[str, Any]:
    msgs = bus_messages("ops", n)
    nc = await nats.connect(bus.url)
    cpu = CpuMeter({"nats_server": bus.pid, "bench_process": None})
    lat: list[float] = []
    try:
        js = nc.jetstream(publish_async_max_pending=20000)
        await js.add_stream(file_stream("BENCH_OPS", "bench.ops"))
        dedup = await js.create_key_value(api.KeyValueConfig(bucket="bench_dedup", history=1, direct=True,
                                                             storage=api.StorageType.FILE))
        # Written through its stream subject, as the core does; created for that stream.
        await js.create_key_value(api.KeyValueConfig(bucket="bench_conv", history=1, direct=True,
                                                     storage=api.StorageType.FILE))
        conv_value = b'{"key":"x","channel_type":"mock","channel":"bench","route":{"thread":"t","to":"t"}}'
        for k in range(200):
            await dedup.put(f"warm{k}", b"1")
            await dedup.get(f"warm{k}")
        gets = await DirectGets(nc).start()
        it = iter(range(n))
        perf = time.perf_counter
        behind: list[asyncio.Future[Any]] = []

        async def worker() -> None:
            for i in it:
                data, headers = msgs[i]
                t = perf()
                key = f"bench.{headers['Nats-Msg-Id']}"
                seen = await gets.ask("KV_bench_dedup", f"$KV.bench_dedup.{key}")
                survey = await gets.ask("KV_bench_conv", f"$KV.bench_conv.survey.{headers['Gw-Conversation']}")
                await seen
                await survey
                ack_fut = await js.publish_async("bench.ops", data, headers=headers)
                conv_fut = await js.publish_async(f"$KV.bench_conv.{headers['Gw-Conversation']}", conv_value)
                ack = await ack_fut
                await conv_fut
                # The dedup record is written behind the answer.
                behind.append(await js.publish_async(f"$KV.bench_dedup.{key}", str(ack.seq).encode()))
                lat.append(perf() - t)

        cpu.start()
        t0 = perf()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await asyncio.gather(*behind)
        elapsed = perf() - t0
        cpu_used = cpu.stop(n)
    finally:
        await nc.close()
    return {"messages": len(lat), "concurrency": concurrency, "elapsed_s": round(elapsed, 3),
            "rate_msg_s": rate(len(lat), elapsed), **latency_summary(lat), "cpu": cpu_used}


# --- 3. ctx.publish in process ---------------------------------------------------------


async def ctx_publish(bus: Bus, n: int, concurrency: int) -> dict[str, Any]:
    from gateway.core.logs import configure_logging
    from gateway.testing import make_config, start_gateway

    # Its start/stop lines would mix into the printed results.
    configure_logging("console", "warning")
    config = make_config(bus.url, {CHANNEL: {"type": "mock"}}, http={"enabled": False}, outbound={"enabled": False})
    gw = await start_gateway(config)
    lat: list[float] = []
    dup = 0
    try:
        mock = gw.channels[CHANNEL].channel
        for i in range(200):
            await mock.inject("warm-up", sender="warm", provider_id=f"ctx-warm-{i}", thread="warm")
        bodies = [json.loads(webhook_body("ctx", i)) for i in range(n)]
        it = iter(range(n))
        perf = time.perf_counter

        async def worker() -> None:
            nonlocal dup
            for i in it:
                b = bodies[i]
                t = perf()
                r = await mock.inject(b["text"], sender=b["sender"], provider_id=b["id"], thread=b["thread"])
                lat.append(perf() - t)
                dup += r.duplicate

        cpu = CpuMeter({"nats_server": bus.pid, "bench_process_with_gateway": None}).start()
        t0 = perf()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = perf() - t0
        cpu_used = cpu.stop(n)
    finally:
        await gw.stop()
    return {"messages": len(lat), "duplicates": dup, "concurrency": concurrency, "elapsed_s": round(elapsed, 3),
            "rate_msg_s": rate(len(lat), elapsed), **latency_summary(lat), "cpu": cpu_used}


# --- 4. over HTTP to a gateway process ---------------------------------------------------


async def http_runs(bus: Bus, *, n: int, connections: int, paced_rates: list[float], paced_seconds: float,
                    paced_connections: int, wrk_seconds: int, profile_to: Path | None) -> dict[str, Any]:
    gw = GatewayProcess(bus.url, channel=CHANNEL, profile_to=profile_to)
    path = f"/channels/{CHANNEL}/inbound"

    def reqs(prefix: str, count: int) -> list[bytes]:
        return [post_request(HOST, gw.http_port, path, webhook_body(prefix, i)) for i in range(count)]

    warm, full = reqs("warm", min(1000, n)), reqs("http", n)
    paced_reqs = {r: reqs(f"paced{r:g}", int(r * paced_seconds)) for r in paced_rates}
    await gw.start()
    libraries = gw.libraries()
    try:
        await closed_loop(HOST, gw.http_port, warm, connections)
        rss_idle = gw.rss()
        pids = {"gateway": gw.pid, "nats_server": bus.pid, "load_generator": None}
        cpu = CpuMeter(pids).start()
        res = await closed_loop(HOST, gw.http_port, full, connections)
        cpu_closed = cpu.stop(res.ok)
        rss_closed = gw.rss()
        print(f"  http closed loop: {res.summary()['rate_msg_s']} msg/s", file=sys.stderr)
        paced = []
        for r in paced_rates:
            await asyncio.sleep(1)
            cpu = CpuMeter(pids).start()
            res_p = await open_loop(HOST, gw.http_port, paced_reqs[r], r, paced_connections,
                                    deadline_s=paced_seconds + 20)
            paced.append({"offered_rate_msg_s": r, "seconds": paced_seconds, "connections": paced_connections,
                          **res_p.summary(), "cpu": cpu.stop(res_p.ok)})
            print(f"  http paced at {r:g}/s: p99 {paced[-1]['p99_ms']} ms", file=sys.stderr)
        wrk = None
        if wrk_seconds > 0:
            await asyncio.sleep(1)
            wrk = await wrk_run(gw.http_port, path, connections=connections, seconds=wrk_seconds, prefix="wrk",
                                threads=CONVERSATIONS)
        rss_end = gw.rss()
    finally:
        await gw.stop()
        if gw.peak_rss_mib is None:
            print(gw.logs(), file=sys.stderr)
        gw.cleanup()
    return {"closed": {"connections": connections, **res.summary(), "cpu": cpu_closed}, "paced": paced, "wrk": wrk,
            "libraries": libraries,
            "rss": {"after_warmup_mib": rss_idle, "after_closed_loop_mib": rss_closed, "peak_mib": rss_end}}


# --- 6. a hand-written webhook-to-JetStream bridge ---------------------------------------

# What a developer would write in an afternoon instead of the gateway: Starlette on uvicorn
# (uvloop, httptools), nats-py, one js.publish per request with the provider's id as
# Nats-Msg-Id, nothing else (no dedup KV, no conversation, no normalising, no checks).
_BRIDGE = r"""
import contextlib, json, sys
import nats, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

state = {}

@contextlib.asynccontextmanager
async def lifespan(app):
    nc = await nats.connect(sys.argv[1])
    state["js"] = nc.jetstream()
    yield
    await nc.close()

async def inbound(request):
    body = await request.body()
    ack = await state["js"].publish("bench.bridge", body, headers={"Nats-Msg-Id": json.loads(body)["id"]})
    return Response(b'{"seq": %d, "duplicate": %s}' % (ack.seq, b"true" if ack.duplicate else b"false"),
                    media_type="application/json")

app = Starlette(routes=[Route("/channels/bench/inbound", inbound, methods=["POST"])], lifespan=lifespan)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), loop="uvloop", http="httptools", log_level="warning",
            access_log=False)
"""


async def bridge_runs(bus: Bus, *, n: int, connections: int, paced_rates: list[float], paced_seconds: float,
                      paced_connections: int) -> dict[str, Any]:
    """The same closed and open loops as the gateway's, against the hand-written bridge
    (its own process, a stream configured like ``GW_IN``)."""
    nc = await nats.connect(bus.url)
    try:
        await nc.jetstream().add_stream(file_stream("BENCH_BRIDGE", "bench.bridge"))
    finally:
        await nc.close()
    port = free_port()
    path = f"/channels/{CHANNEL}/inbound"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _BRIDGE, bus.url, str(port),
                                                stdin=asyncio.subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                res = await closed_loop(HOST, port, [post_request(HOST, port, path, webhook_body("bwarm", i))
                                                     for i in range(min(1000, n))], connections)
                if res.ok:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.returncode is not None:
                raise RuntimeError("the bridge did not answer")
            await asyncio.sleep(0.2)
        pids = {"bridge": proc.pid, "nats_server": bus.pid, "load_generator": None}
        cpu = CpuMeter(pids).start()
        res = await closed_loop(HOST, port, [post_request(HOST, port, path, webhook_body("bridge", i)) for i in range(n)],
                                connections)
        closed = {"connections": connections, **res.summary(), "cpu": cpu.stop(res.ok)}
        print(f"  bridge closed loop: {closed['rate_msg_s']} msg/s", file=sys.stderr)
        paced = []
        for r in paced_rates:
            await asyncio.sleep(1)
            reqs = [post_request(HOST, port, path, webhook_body(f"bpaced{r:g}", i)) for i in range(int(r * paced_seconds))]
            cpu = CpuMeter(pids).start()
            res_p = await open_loop(HOST, port, reqs, r, paced_connections, deadline_s=paced_seconds + 20)
            paced.append({"offered_rate_msg_s": r, "seconds": paced_seconds, "connections": paced_connections,
                          **res_p.summary(), "cpu": cpu.stop(res_p.ok)})
            print(f"  bridge paced at {r:g}/s: p99 {paced[-1]['p99_ms']} ms", file=sys.stderr)
        rss = peak_rss_mib(proc.pid)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
    return {"closed": closed, "paced": paced, "peak_rss_mib": rss}


# --- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.n or (2000 if args.quick else 20000)
    paced_seconds = args.paced_seconds or (3.0 if args.quick else 10.0)
    wrk_seconds = 0 if args.no_wrk else (3 if args.quick else 5)
    paced_rates = [float(r) for r in args.paced_rates.split(",") if r.strip()]
    started = time.perf_counter()
    machine = machine_info()
    async with Bus() as bus:
        print(f"inbound: N={n}, nats-server at {bus.url}", file=sys.stderr)
        raw = await raw_publish_async(bus, n)
        print(f"  raw publish_async: {raw['rate_msg_s']} msg/s", file=sys.stderr)
        ops = await raw_pipeline_ops(bus, n, args.connections)
        print(f"  raw pipeline ops: {ops['rate_msg_s']} msg/s", file=sys.stderr)
        ctx = await ctx_publish(bus, n, args.connections)
        print(f"  ctx.publish in process: {ctx['rate_msg_s']} msg/s", file=sys.stderr)
        http = await http_runs(bus, n=n, connections=args.connections, paced_rates=paced_rates,
                               paced_seconds=paced_seconds, paced_connections=args.paced_connections,
                               wrk_seconds=wrk_seconds, profile_to=args.profile)
        bridge = await bridge_runs(bus, n=n, connections=args.connections, paced_rates=paced_rates,
                                   paced_seconds=paced_seconds, paced_connections=args.paced_connections)
    ceiling = await loadgen_ceiling([post_request(HOST, 1, "/channels/bench/inbound", webhook_body("cal", i))
                                     for i in range(n)], args.connections)
    full = http["closed"]
    at_1000 = next((p for p in http["paced"] if p["offered_rate_msg_s"] == 1000), None)
    ratio = full["rate_msg_s"] / raw["rate_msg_s"] if raw["rate_msg_s"] else 0.0
    bridge_rate = bridge["closed"]["rate_msg_s"]
    data: dict[str, Any] = {
        "benchmark": "inbound",
        "date": now_iso(),
        "quick": bool(args.quick),
        "n": n,
        "machine": machine,
        "event_loops": {"benchmark_process": event_loop_name(), "gateway_process_loaded": http["libraries"]},
        "load_generator": {
            "name": "bench._common.closed_loop/open_loop (asyncio streams, prebuilt HTTP/1.1 keep-alive requests)",
            "process": "the benchmark process; the gateway runs in its own `python -m gateway run` process",
            "connections": args.connections,
        },
        "payload": {"text_bytes": TEXT_BYTES, "request_body_bytes": len(webhook_body("http", 0)),
                    "bus_message_bytes": raw["bus_message_bytes"], "conversations": CONVERSATIONS,
                    "provider_ids": "distinct per request"},
        "results": {
            "raw_publish_async": raw,
            "raw_pipeline_ops": ops,
            "ctx_publish": ctx,
            "http_pipeline": full,
            "paced": http["paced"],
            "wrk": http["wrk"],
            "bridge": bridge,
            "loadgen_ceiling": {"connections": args.connections, **ceiling},
            "gateway_peak_rss_mib": http["rss"]["peak_mib"],
            "gateway_rss_mib": http["rss"],
            "bench_process_peak_rss_mib": peak_rss_mib(),
        },
        "targets": {
            "ratio_full_to_raw": round(ratio, 4),
            "half_raw_rate_met": ratio >= 0.5,
            "ratio_ctx_publish_to_raw": round(ctx["rate_msg_s"] / raw["rate_msg_s"], 4) if raw["rate_msg_s"] else 0.0,
            "paced_1000_p99_ms": at_1000["p99_ms"] if at_1000 else None,
            "paced_1000_achieved_msg_s": at_1000["rate_msg_s"] if at_1000 else None,
            "ratio_full_to_bridge": round(full["rate_msg_s"] / bridge_rate, 4) if bridge_rate else 0.0,
            "bridge_paced_1000_p99_ms": next((p["p99_ms"] for p in bridge["paced"] if p["offered_rate_msg_s"] == 1000),
                                             None),
            "p99_under_5ms_at_1000_met": bool(at_1000 and at_1000["p99_ms"] is not None and at_1000["p99_ms"] < 5),
            "p99_under_10ms_at_1000_met": bool(at_1000 and at_1000["p99_ms"] is not None and at_1000["p99_ms"] < 10
                                               and at_1000["ok"] == at_1000["requests"] == int(1000 * paced_seconds)),
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    data["interference"] = interference(data["results"])
    return data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.inbound", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=2,000 and 3 s paced runs (default N=20,000, 10 s)")
    p.add_argument("-n", type=int, default=0, help="messages per measurement")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections / concurrency (default 32)")
    p.add_argument("--paced-rates", default="1000,500",
                   help="offered msg/s of the open-loop runs, comma-separated (default 1000,500; 1000 is the target's)")
    p.add_argument("--paced-seconds", type=float, default=0.0)
    p.add_argument("--paced-connections", type=int, default=64)
    p.add_argument("--no-wrk", action="store_true", help="skip the wrk cross-check even if wrk is installed")
    p.add_argument("--profile", type=Path, default=None, metavar="FILE",
                   help="run the gateway process under cProfile, write FILE, print the top functions; "
                        "results are not written (profiling slows the gateway)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("inbound", parser, run, argv)


if __name__ == "__main__":
    main()
