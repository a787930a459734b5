"""Soak benchmark: the gateway in its default configuration under steady load for minutes,
its resident memory sampled over time.

One real nats-server (file storage) and ``python -m gateway run`` in its own process with
one mock channel and no other settings (the README's demo). For ``--duration`` seconds:

- the benchmark offers ``--rate`` mock webhooks per second on a fixed schedule (open loop,
  keep-alive connections, a distinct provider id each, ``CONVERSATIONS`` threads);
- a backend in the benchmark process (:class:`gateway.client.Client`, durable consumer)
  answers every inbound message with one reply, which the gateway delivers to the mock
  channel; ``sent`` statuses are counted over a core NATS subscription;
- every ``--sample-interval`` seconds the gateway's current RSS (``VmRSS``) is read from
  /proc, together with what was sent and delivered so far.

Reported: RSS after ``--warmup`` and at the end, their difference, the slope of a
least-squares line through the samples after warm-up (MiB per minute and bytes per
message), the gateway's CPU per message, and whether every request and reply went
through. Measured, never asserted: a growing line is the finding, not a failure.

Run: ``python -m bench soak [--duration 600] [--rate 200]`` (about ``duration`` + 20 s;
``--duration 60`` for a quick look).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats

from bench._common import (
    HOST,
    Bus,
    CpuMeter,
    GatewayProcess,
    HttpConn,
    event_loop_name,
    interference,
    latency_summary,
    machine_info,
    now_iso,
    peak_rss_mib,
    post_request,
    rate,
    run_loop,
    write_results,
)

CHANNEL = "soak"
TEXT_BYTES = 1024
CONVERSATIONS = 1000


def current_rss_mib(pid: int) -> float | None:
    """Resident set size of a process right now (``VmRSS``, MiB), not its peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def webhook_body(i: int) -> bytes:
    head = f"soak-{i:09d} "
    k = i % CONVERSATIONS
    return json.dumps({"text": head + "x" * (TEXT_BYTES - len(head)), "sender": f"customer-{k}",
                       "id": f"soak-{i}", "thread": f"thread-{k}"}).encode()


def slope_per_s(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t, y) points (y per second); None for fewer than two."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mt) * (y - my) for t, y in points) / var


class Backend:
    """Replies to every inbound message, as a helpdesk backend would (the gateway's own
    client, durable consumer), and counts ``sent`` statuses on a core subscription."""

    def __init__(self, url: str):
        self.url = url
        self.replied = 0
        self.sent = 0
        self.status_counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.dead_examples: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._nc: Any = None

    async def start(self) -> None:
        from gateway.client import Client

        self._nc = await nats.connect(self.url)

        async def on_status(msg: Any) -> None:
            # Substring checks: decoding every status would cost the benchmark process more
            # than the gateway spends producing it.
            for state in ("accepted", "sent", "failed", "dead"):
                if f'"state":"{state}"'.encode() in msg.data:
                    self.status_counts[state] += 1
                    if state == "sent":
                        self.sent += 1
                    elif state == "dead" and len(self.dead_examples) < 3:
                        self.dead_examples.append(json.loads(msg.data).get("error"))
                    break

        await self._nc.subscribe(f"gw.status.mock.{CHANNEL}", cb=on_status, pending_msgs_limit=1_000_000)
        await self._nc.flush()
        client = Client(nc=self._nc)

        async def loop() -> None:
            async for msg in client.inbound(durable="soak-backend", batch=64):
                try:
                    await client.reply(msg, text="Thank you, we will answer within a day. " + "y" * 200,
                                       id=f"re-{msg.id}")
                    self.replied += 1
                except Exception as exc:  # counted and reported, the soak goes on
                    self.errors[type(exc).__name__] += 1

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._nc is not None:
            await self._nc.close()


async def paced_load(port: int, rate_per_s: float, duration: float, connections: int,
                     progress: dict[str, int]) -> dict[str, Any]:
    """Offer ``rate_per_s`` webhooks per second for ``duration`` seconds on a fixed
    schedule; requests are built as they go (a prebuilt list would be the largest thing
    in memory). Latency counts from the scheduled time."""
    path = f"/channels/{CHANNEL}/inbound"
    conns = [await HttpConn.open(HOST, port) for _ in range(connections)]
    free: asyncio.Queue[HttpConn] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    perf = time.perf_counter

    async def one(i: int, scheduled: float, conn: HttpConn) -> None:
        try:
            status, _ = await conn.roundtrip(post_request(HOST, port, path, webhook_body(i)))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors[type(exc).__name__] += 1
            conn.close()
            try:
                free.put_nowait(await HttpConn.open(HOST, port))
            except OSError:
                pass
            return
        latencies.append(perf() - scheduled)
        statuses[status] += 1
        if status == 200:
            progress["ok"] += 1
        free.put_nowait(conn)

    total = int(rate_per_s * duration)
    t0 = perf() + 0.05
    for i in range(total):
        scheduled = t0 + i / rate_per_s
        delay = scheduled - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        conn = await free.get()
        progress["offered"] += 1
        t = asyncio.create_task(one(i, scheduled, conn))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    elapsed = perf() - t0
    while not free.empty():
        free.get_nowait().close()
    return {"requests": total, "ok": statuses.get(200, 0), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "errors": dict(errors), "elapsed_s": round(elapsed, 1), "rate_msg_s": rate(statuses.get(200, 0), elapsed),
            **latency_summary(latencies)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    machine = machine_info()
    samples: list[dict[str, Any]] = []
    async with Bus() as bus:
        gw = GatewayProcess(bus.url, channel=CHANNEL)
        await gw.start()
        libraries = gw.libraries()
        backend = Backend(bus.url)
        await backend.start()
        progress = {"offered": 0, "ok": 0}
        t0 = time.perf_counter()

        def sample() -> None:
            samples.append({"t_s": round(time.perf_counter() - t0, 1), "rss_mib": current_rss_mib(gw.pid),
                            "nats_server_rss_mib": current_rss_mib(bus.pid) if bus.pid else None,
                            "requests_ok": progress["ok"], "replies_sent": backend.sent})

        async def sampler() -> None:
            while True:
                sample()
                print(f"  t={samples[-1]['t_s']:>6}s  gateway RSS {samples[-1]['rss_mib']} MiB  "
                      f"requests {progress['ok']}  replies sent {backend.sent}", file=sys.stderr, flush=True)
                await asyncio.sleep(args.sample_interval)

        sampling = asyncio.create_task(sampler())
        cpu = CpuMeter({"gateway": gw.pid, "nats_server": bus.pid, "bench_process": None}).start()
        try:
            load = await paced_load(gw.http_port, args.rate, args.duration, args.connections, progress)
            # The last replies are still on their way: wait for them (bounded).
            deadline = time.perf_counter() + 30
            while backend.sent + backend.status_counts["dead"] < progress["ok"] and time.perf_counter() < deadline:
                await asyncio.sleep(0.2)
            cpu_used = cpu.stop(progress["ok"])
            sample()
        finally:
            sampling.cancel()
            await backend.stop()
            await gw.stop()
            gw.cleanup()
    after_warmup = [s for s in samples if s["t_s"] >= args.warmup and s["rss_mib"] is not None]
    first = after_warmup[0] if after_warmup else None
    last = samples[-1]
    slope = slope_per_s([(s["t_s"], s["rss_mib"]) for s in after_warmup])
    msg_rate = args.rate
    data: dict[str, Any] = {
        "benchmark": "soak",
        "date": now_iso(),
        "label": args.label,
        "duration_s": args.duration,
        "offered_rate_msg_s": args.rate,
        "warmup_s": args.warmup,
        "sample_interval_s": args.sample_interval,
        "machine": machine,
        "event_loops": {"benchmark_process": event_loop_name(), "gateway_process_loaded": libraries},
        "method": {
            "gateway": "python -m gateway run in its own process: default configuration, one mock channel",
            "load": f"{args.rate:g} mock webhooks/s on a fixed schedule over {args.connections} keep-alive connections, "
                    f"1 KiB text, distinct provider ids, {CONVERSATIONS} threads",
            "backend": "gateway.client.Client in the benchmark process: durable consumer on GW_IN, one reply per message",
            "rss": "VmRSS of the gateway process from /proc, sampled every sample_interval_s",
        },
        "results": {
            "load": load,
            "replies": {"replied": backend.replied, "sent_statuses": backend.sent,
                        "status_counts": dict(backend.status_counts), "errors": dict(backend.errors),
                        "dead_examples": backend.dead_examples},
            "rss": {
                "after_warmup_mib": first["rss_mib"] if first else None,
                "after_warmup_at_s": first["t_s"] if first else None,
                "end_mib": last["rss_mib"],
                "growth_after_warmup_mib": round(last["rss_mib"] - first["rss_mib"], 1) if first and last["rss_mib"] else None,
                "slope_mib_per_min": round(slope * 60, 3) if slope is not None else None,
                "slope_bytes_per_message": round(slope * 1048576 / msg_rate) if slope is not None and msg_rate else None,
                "peak_mib": gw.peak_rss_mib,
            },
            "cpu": cpu_used,
            "samples": samples,
            "bench_process_peak_rss_mib": peak_rss_mib(),
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    data["interference"] = interference({"cpu": cpu_used})
    return data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--rate", type=float, default=200.0, help="webhooks per second, each answered by one reply (default 200)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline is taken (default 60)")
    p.add_argument("--sample-interval", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections of the load generator")
    p.add_argument("--label", default="", help="a note stored with the results (e.g. what was changed)")
    p.add_argument("--no-write", action="store_true", help="print the JSON only; leave bench/results/ alone")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    args.warmup = min(args.warmup, args.duration / 2)
    data = run_loop(run(args))
    print(json.dumps(data, indent=2))
    if not args.no_write:
        print(f"written: {write_results('soak', data)}", file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
