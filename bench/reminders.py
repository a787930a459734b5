"""Reminder benchmark: N reminders due within a window → the gateway fires each as an outbound
→ mock channel → ``sent`` ``DeliveryStatus``. Lateness is counted from each due time.

Measured in one run, against one real nats-server (file storage):

1. baseline: raw nats-server message schedules (``Nats-Schedule: @at``), N of them due
   within the same window on a stream with ``allow_msg_schedules``, the fired copies read
   by a core NATS subscription: how late the server itself fires (and how fast it takes
   schedules);
2. the gateway (``python -m gateway run`` in its own process, mock channel): N reminders
   published by ``ReminderStore.schedule`` (pipelined), the gateway's early checks
   (``scheduled`` statuses), then the time from each due time to its ``sent`` status;
   throughput; peak RSS of the gateway and of nats-server;
3. crash (``--crash N``): reminders due within a window while the gateway is killed -9
   once and nats-server once; counted: lost (no ``sent``), delivered twice (the mock's
   record file), ``fired`` statuses.

Run: ``python -m bench.reminders [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import nats
from nats.js import api

from bench._common import (
    Bus,
    CpuMeter,
    GatewayProcess,
    bench_main,
    event_loop_name,
    interference,
    latency_summary,
    machine_info,
    now_iso,
    peak_rss_mib,
    rate,
)
from bench.outbound import CHANNEL, make_conversations

TEXT = "您好，您的工单已处理完毕。请问您对本次服务满意吗？"


class _Status(msgspec.Struct):
    outbound_id: str
    state: str


class _RStatus(msgspec.Struct):
    reminder_id: str
    state: str


_status = msgspec.json.Decoder(_Status)
_rstatus = msgspec.json.Decoder(_RStatus)


def _due_times(n: int, start: float, window: float) -> list[float]:
    return [start + window * i / n for i in range(n)]


def _rfc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- 1. raw nats-server schedules --------------------------------------------------------


async def raw_schedules(bus: Bus, n: int, window: float, lead: float) -> dict[str, Any]:
    nc = await nats.connect(bus.url)
    js = nc.jetstream(publish_async_max_pending=20000)
    try:
        await js.add_stream(api.StreamConfig(name="RAWSCHED", subjects=["raw.>"], allow_msg_schedules=True,
                                             allow_msg_ttl=True, storage=api.StorageType.FILE))
        got: dict[int, float] = {}
        done = asyncio.Event()

        async def on_fire(msg: Any) -> None:
            got[int(msg.headers["Bench-I"])] = time.time()
            if len(got) >= n:
                done.set()

        # The server stores the fired copies itself: they reach JetStream consumers only
        # (a core subscription on the target subject sees nothing).
        await js.subscribe("raw.fire", cb=on_fire, ordered_consumer=True, pending_msgs_limit=1_000_000)
        start = time.time() + lead
        dues = _due_times(n, start, window)
        body = json.dumps({"text": TEXT}).encode()
        t0 = time.perf_counter()
        futs = [await js.publish_async(f"raw.at.{i}", body, headers={
            "Nats-Schedule": f"@at {_rfc(d)}", "Nats-Schedule-Target": "raw.fire", "Nats-Schedule-TTL": "300s",
            "Bench-I": str(i)}) for i, d in enumerate(dues)]
        await asyncio.gather(*futs)
        scheduled_s = time.perf_counter() - t0
        late_start = time.time() > start
        try:
            await asyncio.wait_for(done.wait(), lead + window + 60)
        except asyncio.TimeoutError:
            pass
        lateness = [got[i] - dues[i] for i in got]
        await js.delete_stream("RAWSCHED")
    finally:
        await nc.close()
    return {"reminders": n, "fired": len(got), "missing": n - len(got), "schedule_rate_msg_s": rate(n, scheduled_s),
            "scheduling_overran_lead": late_start, "fire_rate_msg_s": rate(len(got), window) if got else 0.0,
            "lateness": latency_summary(lateness), "early": sum(1 for x in lateness if x < 0)}


# --- 2. the gateway ----------------------------------------------------------------------


class Watch:
    """Core subscriptions on the gateway's delivery and reminder statuses."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.sent_count = 0
        self.rstates: Counter[str] = Counter()
        self.scheduled: set[str] = set()
        self.fired: Counter[str] = Counter()
        self.want = 0
        self.all_sent = asyncio.Event()
        self.all_scheduled = asyncio.Event()
        self.want_scheduled = 0

    async def on_status(self, msg: Any) -> None:
        now = time.time()
        try:
            st = _status.decode(msg.data)
        except msgspec.DecodeError:
            return
        if st.state == "sent":
            self.sent_count += 1
            if st.outbound_id not in self.sent:
                self.sent[st.outbound_id] = now
                if len(self.sent) >= self.want:
                    self.all_sent.set()

    async def on_rstatus(self, msg: Any) -> None:
        try:
            st = _rstatus.decode(msg.data)
        except msgspec.DecodeError:
            return
        self.rstates[st.state] += 1
        if st.state == "scheduled":
            self.scheduled.add(st.reminder_id)
            if len(self.scheduled) >= self.want_scheduled:
                self.all_scheduled.set()
        elif st.state == "fired":
            self.fired[st.reminder_id] += 1


async def schedule_all(nc: Any, keys: list[str], prefix: str, dues: list[float]) -> float:
    """Publish every reminder's schedule (pipelined, all acks awaited); seconds taken."""
    from gateway import Outbound, Reminder, Subjects, TextPart
    from gateway.client import ReminderStore

    js = nc.jetstream(publish_async_max_pending=20000)
    store = ReminderStore(nc, js, Subjects("gw"), keep_fired=3600)

    now = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    futs = []
    for i, due in enumerate(dues):
        conv = keys[i % len(keys)]
        r = Reminder(id=f"{prefix}-{i}", conversation=conv, channel_type="mock", channel=CHANNEL,
                     due_at=datetime.fromtimestamp(due, timezone.utc), created_at=now,
                     outbound=Outbound(id=f"{prefix}-o-{i}", conversation=conv, parts=[TextPart(text=TEXT)], kind="followup"))
        futs.append(await store.schedule_async(r))
    await asyncio.gather(*futs)
    return time.perf_counter() - t0


async def gateway_run(bus: Bus, *, n: int, window: float, conversations: int, processes: int = 1) -> dict[str, Any]:
    gws = [GatewayProcess(bus.url, channel=CHANNEL) for _ in range(processes)]
    for g in gws:
        await g.start()
    gw = gws[0]
    libraries = gw.libraries()
    nc = await nats.connect(bus.url)
    watch = Watch()
    try:
        keys = await make_conversations(gw, bus.url, conversations)
        await nc.subscribe(f"gw.status.mock.{CHANNEL}", cb=watch.on_status, pending_msgs_limit=2_000_000)
        await nc.subscribe(f"gw.sched.status.mock.{CHANNEL}", cb=watch.on_rstatus, pending_msgs_limit=2_000_000)
        await nc.flush()
        # Scheduling first, then the window: the due times start once every schedule can be
        # checked (700 to 1,500 a second here), so the firing is measured on its own.
        lead = 10 + n / 700
        start = time.time() + lead
        dues = _due_times(n, start, window)
        watch.want, watch.want_scheduled = n, n
        pids = {("gateway" if k == 0 else f"gateway_{k + 1}"): g.pid for k, g in enumerate(gws)}
        pids.update({"nats_server": bus.pid, "bench_process": None})
        cpu = CpuMeter(pids).start()
        publish_s = await schedule_all(nc, keys, "r", dues)
        try:
            await asyncio.wait_for(watch.all_scheduled.wait(), max(1.0, start - time.time()))
        except asyncio.TimeoutError:
            pass
        checked_s = time.perf_counter() - cpu.t0
        scheduling = {"published_s": round(publish_s, 3), "publish_rate_msg_s": rate(n, publish_s),
                      "scheduled_statuses": len(watch.scheduled), "all_checked_s": round(checked_s, 3),
                      "check_rate_msg_s": rate(len(watch.scheduled), checked_s),
                      "checks_finished_before_first_due": len(watch.scheduled) >= n, "cpu": cpu.stop(n)}
        print(f"  gateway scheduling: {scheduling['publish_rate_msg_s']} msg/s published, "
              f"{scheduling['check_rate_msg_s']} msg/s checked", file=sys.stderr)
        await asyncio.sleep(max(0.0, start - time.time()))
        cpu = CpuMeter(pids).start()
        try:
            await asyncio.wait_for(watch.all_sent.wait(), window + 120)
        except asyncio.TimeoutError:
            pass
        firing_cpu = cpu.stop(len(watch.sent))
        lateness = [watch.sent[f"r-o-{i}"] - d for i, d in enumerate(dues) if f"r-o-{i}" in watch.sent]
        last = max(watch.sent.values()) if watch.sent else time.time()
        firing = {"sent": len(watch.sent), "missing": n - len(watch.sent), "sent_statuses": watch.sent_count,
                  "fired_statuses": sum(watch.fired.values()), "fired_twice": sum(1 for v in watch.fired.values() if v > 1),
                  "rate_msg_s": rate(len(watch.sent), last - start), "lateness_due_to_sent": latency_summary(lateness),
                  "cpu": firing_cpu, "reminder_states_seen": dict(watch.rstates)}
        print(f"  gateway firing: p50 {firing['lateness_due_to_sent']['p50_ms']} ms, "
              f"p99 {firing['lateness_due_to_sent']['p99_ms']} ms", file=sys.stderr)
        rss = {"gateway_peak_mib": gw.rss(), "nats_server_peak_mib": peak_rss_mib(bus.pid) if bus.pid else None}
        if processes > 1:
            rss["gateway_processes_peak_mib"] = [g.rss() for g in gws]
    finally:
        await nc.close()
        for g in gws:
            await g.stop()
            g.cleanup()
    return {"scheduling": scheduling, "firing": firing, "rss": rss, "libraries": libraries}


# --- 3. crash ----------------------------------------------------------------------------


async def crash_run(n: int, window: float, conversations: int) -> dict[str, Any]:
    """kill -9 of the gateway, then of nats-server, while ``n`` reminders fire."""
    async with Bus() as bus:
        gw = GatewayProcess(bus.url, channel=CHANNEL, extra='[reminders]\nack_wait = "5s"\n')
        record = gw.dir / "delivered.jsonl"
        text = gw.config.read_text().replace(f'[channels.{CHANNEL}]\ntype = "mock"\n',
                                             f'[channels.{CHANNEL}]\ntype = "mock"\nrecord_file = "{record}"\n')
        gw.config.write_text(text)
        await gw.start()
        nc = await nats.connect(bus.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        watch = Watch()
        try:
            keys = await make_conversations(gw, bus.url, conversations)
            start = time.time() + 5 + n / 1500
            dues = _due_times(n, start, window)
            await schedule_all(nc, keys, "k", dues)
            await nc.close()

            def delivered() -> list[str]:
                return [json.loads(ln)["outbound"]["id"] for ln in record.read_text().splitlines()] \
                    if record.exists() else []

            async def until(count: int, timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while len(delivered()) < count and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)

            await until(n // 4, window + 60)
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(gw.proc.wait)
            at_gateway_kill = len(delivered())
            gw.proc = None
            await gw.start()
            await until(n * 3 // 5, window + 60)
            assert bus.server.proc is not None
            bus.server.proc.kill()
            await bus.server.proc.wait()
            at_server_kill = len(delivered())
            await bus.server.start()
            deadline = time.monotonic() + window + 120
            while len(set(delivered())) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            ids = delivered()
            counts = Counter(ids)
            from gateway.testing import stream_messages

            fired = Counter(json.loads(m.data)["reminder_id"] for m in await stream_messages(bus.url, "GW_SCHED")
                            if m.subject.startswith("gw.sched.status.") and json.loads(m.data)["state"] == "fired")
        finally:
            if not nc.is_closed:
                await nc.close()
            await gw.stop()
            gw.cleanup()
    return {"reminders": n, "window_s": window, "delivered_distinct": len(counts), "lost": n - len(counts),
            "delivered_twice": sum(1 for v in counts.values() if v > 1), "delivered_at_gateway_kill": at_gateway_kill,
            "delivered_at_server_kill": at_server_kill, "fired_statuses_distinct": len(fired)}


# --- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.n or (10_000 if args.quick else 100_000)
    window = args.window or (20.0 if args.quick else 60.0)
    conversations = args.conversations or (200 if args.quick else 1000)
    crash_n = args.crash if args.crash is not None else (2_000 if args.quick else 10_000)
    started = time.perf_counter()
    machine = machine_info()
    async with Bus() as bus:
        print(f"reminders: N={n} due within {window:.0f}s, nats-server at {bus.url}", file=sys.stderr)
        base = await raw_schedules(bus, n, window, lead=5 + n / 10000)
        print(f"  raw schedules: lateness p50 {base['lateness']['p50_ms']} ms, p99 {base['lateness']['p99_ms']} ms",
              file=sys.stderr)
        g = await gateway_run(bus, n=n, window=window, conversations=conversations, processes=args.processes)
    crash = await crash_run(crash_n, 30.0 if not args.quick else 15.0, min(conversations, 200)) if crash_n else None
    if crash:
        print(f"  crash: lost {crash['lost']}, delivered twice {crash['delivered_twice']}", file=sys.stderr)
    p99 = g["firing"]["lateness_due_to_sent"]["p99_ms"]
    data: dict[str, Any] = {
        "benchmark": "reminders",
        "date": now_iso(),
        "quick": bool(args.quick),
        "n": n,
        "window_s": window,
        "gateway_processes": args.processes,
        "conversations": conversations,
        "machine": machine,
        "event_loops": {"benchmark_process": event_loop_name(), "gateway_process_loaded": g["libraries"]},
        "method": {
            "baseline": "raw nats-py publish_async of @at schedules on a stream with allow_msg_schedules; fired copies "
                        "received by an ordered push consumer; lateness = receive wall time - due time",
            "gateway": "ReminderStore schedules (pipelined) for a python -m gateway run process with a mock channel; "
                       "lateness = wall time the `sent` DeliveryStatus was received - due time",
            "crash": "the gateway killed -9 after a quarter was delivered, nats-server killed -9 after three fifths; "
                     "deliveries counted in the mock's record file",
        },
        "results": {"raw_schedules": base, "gateway_scheduling": g["scheduling"], "gateway_firing": g["firing"],
                    "rss_mib": g["rss"], "crash": crash, "bench_process_peak_rss_mib": peak_rss_mib()},
        "targets": {"p99_due_to_sent_ms": p99, "p99_under_500_ms": p99 is not None and p99 < 500},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    data["interference"] = interference({k: v for k, v in data["results"].items() if isinstance(v, dict)})
    return data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.reminders", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=10,000 within 20 s, crash phase 2,000 (default 100,000 "
                                                        "within 60 s, crash 10,000)")
    p.add_argument("-n", type=int, default=0, help="reminders")
    p.add_argument("--window", type=float, default=0.0, help="seconds over which they are due")
    p.add_argument("--conversations", type=int, default=0)
    p.add_argument("--crash", type=int, default=None, help="reminders of the crash phase (0: skip it)")
    p.add_argument("--processes", type=int, default=1, help="gateway processes sharing the work (default 1)")
    p.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("reminders", parser, run, argv)


if __name__ == "__main__":
    main()
