"""Shared pieces of the benchmarks: a real nats-server, the gateway as a separate
``python -m gateway run`` process, a small HTTP/1.1 load generator, peak RSS, percentiles,
machine facts and the results files.

Everything listens on and talks to 127.0.0.1 only. Nothing here asserts a target: the
benchmarks measure and write numbers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import platform
import pstats
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"


# --- numbers ---------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) by linear interpolation between closest ranks;
    None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_summary(seconds_list: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds, rounded to microseconds."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "p50_ms": ms(percentile(seconds_list, 50)),
        "p90_ms": ms(percentile(seconds_list, 90)),
        "p99_ms": ms(percentile(seconds_list, 99)),
        "max_ms": ms(max(seconds_list) if seconds_list else None),
        "samples": len(seconds_list),
    }


def rate(count: int, elapsed: float) -> float:
    return round(count / elapsed, 1) if elapsed > 0 else 0.0


# --- memory ----------------------------------------------------------------------------


def peak_rss_mib(pid: int | None = None) -> float | None:
    """Peak resident set size in MiB: ``VmHWM`` of a running process from /proc (the
    kernel's high-water mark), else psutil's current RSS, else getrusage for this process."""
    pid = pid or os.getpid()
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import psutil  # optional

        return round(psutil.Process(pid).memory_info().rss / 1048576, 1)
    except Exception:
        pass
    if pid == os.getpid():
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round((kib / 1024) if sys.platform != "darwin" else kib / 1048576, 1)
    return None


# --- CPU -------------------------------------------------------------------------------


def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU time a process has used so far (Linux /proc; this process
    anywhere)."""
    if pid is None or pid == os.getpid():
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux /proc/stat)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by named processes between ``start()`` and ``stop(messages)``: seconds,
    share of one core over the wall time, and milliseconds per message; plus what every
    other process of the machine used meanwhile (``other_processes``: a busy machine
    makes the numbers worse, and this says so)."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids = pids
        self.t0 = 0.0
        self.c0: dict[str, float | None] = {}
        self.m0: float | None = None

    def start(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.m0 = machine_busy_seconds()
        return self

    def stop(self, messages: int) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        out: dict[str, Any] = {}
        for name, pid in self.pids.items():
            c1, c0 = cpu_seconds(pid), self.c0.get(name)
            if c1 is None or c0 is None:
                out[name] = None
                continue
            used = c1 - c0
            out[name] = {"cpu_s": round(used, 3), "cores_busy": round(used / wall, 2) if wall > 0 else None,
                         "cpu_ms_per_msg": round(used * 1000 / messages, 4) if messages else None}
        m1 = machine_busy_seconds()
        if m1 is not None and self.m0 is not None and wall > 0:
            ours = sum(v["cpu_s"] for v in out.values() if v)
            # Kernel work on our behalf (loopback TCP, softirqs) is not always charged to
            # our processes, so a small remainder is expected even on a quiet machine.
            out["other_processes"] = {"cores_busy": round(max(0.0, (m1 - self.m0) - ours) / wall, 2)}
        return out


def interference(results: Any) -> dict[str, Any]:
    """The most CPU other processes of the machine used during any measured phase (cores):
    above about 0.3 the run shared the machine and its numbers are pessimistic."""
    found: dict[str, float] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            other = node.get("other_processes")
            if isinstance(other, dict) and other.get("cores_busy") is not None:
                found[path.removesuffix(".cpu") or "run"] = other["cores_busy"]
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(results, "")
    worst = max(found.values(), default=None)
    return {"max_other_cores_busy": worst, "by_phase": found, "quiet": worst is not None and worst <= 0.3}


# --- machine ---------------------------------------------------------------------------


def nats_server_version() -> str:
    from gateway.core.bus.embedded import nats_server_binary

    try:
        out = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip()
    except Exception as exc:  # the benchmark still runs; the file says why the field is empty
        return f"unknown ({type(exc).__name__})"


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        load = None
    return {
        "cores": os.cpu_count(),
        "loadavg_at_start": load,
        "cpu": cpu or platform.processor() or None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nats_server": nats_server_version(),
        "code": code_version(),
        "packages": {p: ver(p) for p in ("omnichannel-gateway", "nats-py", "uvicorn", "starlette", "msgspec",
                                           "h11", "httptools", "uvloop")},
    }


def code_version() -> dict[str, Any]:
    """The commit the benchmark ran on and whether the gateway's code differed from it
    (uncommitted changes under gateway/ are measured too, and should be named)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "gateway", "plugins", "pyproject.toml")
    return {"commit": git("rev-parse", "HEAD"), "gateway_uncommitted_changes": dirty.splitlines() if dirty else []}


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# --- event loop ------------------------------------------------------------------------


def event_loop_name() -> str:
    """The loop ``run_loop`` uses, chosen as ``gateway run`` chooses its own: uvloop when
    it is installed, unless ``GATEWAY_EVENT_LOOP=asyncio``."""
    if os.environ.get("GATEWAY_EVENT_LOOP", "uvloop") == "uvloop" and importlib.util.find_spec("uvloop"):
        return "uvloop"
    return "asyncio"


def run_loop(coro: Any) -> Any:
    """Run the benchmark on the same kind of event loop as the gateway process, so the
    in-process and raw nats-py rows compare like with like."""
    if event_loop_name() == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


# --- nats-server -----------------------------------------------------------------------


class Bus:
    """A real nats-server with JetStream (file storage) in a temporary folder."""

    def __init__(self) -> None:
        from gateway.testing import NatsServer

        self.server = NatsServer()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int | None:
        proc = self.server.proc
        return proc.pid if proc is not None else None

    async def __aenter__(self) -> Bus:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.server.stop()
        self.server.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- the gateway process ---------------------------------------------------------------


class GatewayProcess:
    """``python -m gateway -c <toml> run`` against the benchmark's nats-server, with one
    mock channel named ``channel`` (more keys of it in ``channel_keys``; ``channels``
    replaces that section by whatever TOML it holds; ``bus_keys`` go to ``[bus]``). With ``profile_to``, the process runs under cProfile
    and writes its statistics there when it stops."""

    def __init__(self, bus_url: str, *, channel: str = "bench", extra: str = "", profile_to: Path | None = None,
                 env: dict[str, str] | None = None, bus_keys: str = "", channel_keys: str = "",
                 channels: str | None = None):
        self.env = {**os.environ, **(env or {})}
        self.dir = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        self.http_port = free_port()
        self.channel = channel
        self.config = self.dir / "gateway.toml"
        self.config.write_text(textwrap.dedent(f"""
            [bus]
            url = "{bus_url}"
            {bus_keys}
            [http]
            host = "{HOST}"
            port = {self.http_port}
            [log]
            format = "json"
            level = "info"
            """) + extra + (channels if channels is not None else
                            f'\n[channels.{channel}]\ntype = "mock"\n{channel_keys}\n'))
        self.log_path = self.dir / "gateway.log"
        self.profile_to = profile_to
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_mib: float | None = None

    async def start(self, timeout: float = 30.0) -> None:
        cmd = [sys.executable]
        if self.profile_to is not None:
            cmd += ["-m", "cProfile", "-o", str(self.profile_to)]
        cmd += ["-m", "gateway", "-c", str(self.config), "run"]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.dir,
                                         env=self.env)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                conn = await HttpConn.open(HOST, self.http_port)
                try:
                    status, _ = await conn.roundtrip(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                finally:
                    conn.close()
                if status == 200:
                    return
            except (OSError, asyncio.IncompleteReadError, ValueError):
                pass
            await asyncio.sleep(0.1)
        await self.stop()
        raise RuntimeError("gateway did not become healthy within 30s:\n" + self.logs())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def libraries(self) -> dict[str, bool]:
        """Which fast paths the running gateway process actually loaded (from its memory
        map): uvloop as its event loop, httptools as uvicorn's HTTP parser."""
        try:
            maps = Path(f"/proc/{self.pid}/maps").read_text()
        except OSError:
            return {}
        return {"uvloop": "/uvloop/" in maps, "httptools": "/httptools/" in maps}

    def rss(self) -> float | None:
        """Peak RSS of the gateway process so far (MiB)."""
        return peak_rss_mib(self.pid) if self.proc and self.proc.poll() is None else self.peak_rss_mib

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.peak_rss_mib = peak_rss_mib(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        if self.peak_rss_mib is None:
            # Not readable from /proc (not Linux): the largest waited-for child so far.
            self.peak_rss_mib = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        self.proc = None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class DirectGets:
    """Direct gets of the last message on a subject as futures under one reply
    subscription: what the core's bus reads do, with raw nats-py."""

    def __init__(self, nc: Any):
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.n = 0

    async def start(self) -> "DirectGets":
        await self.nc.subscribe(self.inbox + ".*", cb=self._answer)
        return self

    async def _answer(self, msg: Any) -> None:
        fut = self.waiting.pop(msg.subject[len(self.inbox) + 1:], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def ask(self, stream: str, subject: str) -> asyncio.Future[Any]:
        self.n += 1
        token = str(self.n)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[token] = fut
        await self.nc.publish(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", reply=f"{self.inbox}.{token}")
        return fut


def print_profile(path: Path, limit: int = 30) -> None:
    """Top functions of a cProfile file, by own time and by cumulative time."""
    if not path.exists():
        print(f"no profile written at {path}")
        return
    st = pstats.Stats(str(path))
    st.strip_dirs()
    print(f"\n--- profile of the gateway process ({path}) by own time ---")
    st.sort_stats("tottime").print_stats(limit)
    print("--- by cumulative time ---")
    st.sort_stats("cumulative").print_stats(limit)


# --- HTTP/1.1 load generator -----------------------------------------------------------


class HttpConn:
    """One keep-alive HTTP/1.1 connection over asyncio streams. Requests are prebuilt
    bytes, so the load generator spends its CPU on sockets, not on building requests (a
    general-purpose client such as httpx costs several times more per request)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConn:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def roundtrip(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        i = lower.find(b"\r\ncontent-length:")
        if i < 0:
            raise ValueError("response without content-length")
        j = lower.index(b"\r\n", i + 2)
        body = await self.reader.readexactly(int(lower[i + 17:j]))
        return status, body

    def close(self) -> None:
        self.writer.close()


def post_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class LoadResult:
    """What one load run measured."""

    sent: int = 0
    ok: int = 0
    duplicates: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    """Seconds per request; in an open-loop run from the *scheduled* send time, so a
    stalled server is charged for the requests it made wait (no coordinated omission)."""
    elapsed: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.sent,
            "ok": self.ok,
            "duplicates": self.duplicates,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "elapsed_s": round(self.elapsed, 3),
            "rate_msg_s": rate(self.ok, self.elapsed),
            **latency_summary(self.latencies),
        }


async def _open_pool(host: str, port: int, n: int) -> list[HttpConn]:
    return list(await asyncio.gather(*(HttpConn.open(host, port) for _ in range(n))))


def _record(res: LoadResult, status: int, body: bytes, latency: float) -> None:
    res.statuses[status] += 1
    res.latencies.append(latency)
    if status == 200:
        res.ok += 1
        if b"true" in body:
            res.duplicates += 1


async def closed_loop(host: str, port: int, requests: list[bytes], connections: int,
                      deadline_s: float = 90.0) -> LoadResult:
    """Send every request as fast as ``connections`` keep-alive connections allow (each
    sends its next request when the previous answer arrived). Stops at ``deadline_s``."""
    conns = await _open_pool(host, port, connections)
    res = LoadResult()
    it = iter(range(len(requests)))
    perf = time.perf_counter
    stop_at = perf() + deadline_s

    async def worker(conn: HttpConn) -> None:
        for i in it:
            if perf() > stop_at:
                res.errors["deadline"] += 1
                return
            t = perf()
            res.sent += 1
            try:
                status, body = await conn.roundtrip(requests[i])
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                res.errors[type(exc).__name__] += 1
                return
            _record(res, status, body, perf() - t)

    t0 = perf()
    await asyncio.gather(*(worker(c) for c in conns))
    res.elapsed = perf() - t0
    for c in conns:
        c.close()
    return res


async def open_loop(host: str, port: int, requests: list[bytes], rate_per_s: float, connections: int,
                    deadline_s: float = 60.0) -> LoadResult:
    """Offer ``rate_per_s`` requests per second on a fixed schedule, whatever the server
    does (open loop), over a pool of keep-alive connections. Latency counts from each
    request's scheduled time."""
    conns = await _open_pool(host, port, connections)
    free: asyncio.Queue[HttpConn] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    res = LoadResult()
    perf = time.perf_counter
    tasks: set[asyncio.Task[None]] = set()
    last_done = 0.0

    async def one(i: int, scheduled: float, conn: HttpConn) -> None:
        nonlocal last_done
        try:
            status, body = await conn.roundtrip(requests[i])
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            res.errors[type(exc).__name__] += 1
            return
        done = perf()
        last_done = max(last_done, done)
        _record(res, status, body, done - scheduled)
        free.put_nowait(conn)

    t0 = perf() + 0.05
    stop_at = t0 + deadline_s
    for i in range(len(requests)):
        scheduled = t0 + i / rate_per_s
        delay = scheduled - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        if perf() > stop_at:
            res.errors["deadline"] += len(requests) - i
            break
        conn = await free.get()
        res.sent += 1
        t = asyncio.create_task(one(i, scheduled, conn))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=max(1.0, stop_at + 10 - perf()))
    res.elapsed = (last_done or perf()) - t0
    for c in conns:
        c.close()
    return res


# --- a trivial HTTP server, to measure the load generator's own ceiling ---------------

_TRIVIAL_SERVER = r"""
import asyncio, sys
BODY = b'{"id": "aaaaaaaaaaaaaaaaaaaaaaaaaa", "duplicate": false}'
RESP = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
class P(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b""
    def data_received(self, d):
        self.buf += d
        while True:
            h = self.buf.find(b"\r\n\r\n")
            if h < 0: return
            low = self.buf[:h].lower(); i = low.find(b"content-length:")
            n = int(low[i + 15:low.find(b"\r\n", i) if low.find(b"\r\n", i) >= 0 else h]) if i >= 0 else 0
            if len(self.buf) < h + 4 + n: return
            self.buf = self.buf[h + 4 + n:]
            self.t.write(RESP)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.sleep(float(sys.argv[2]))
asyncio.run(main())
"""


class TrivialServer:
    """The trivial asyncio HTTP server in its own process (``async with``; ``port``): every
    request is answered 200 with a small JSON body at once. The load generator's ceiling,
    and the provider sink of the outbound rows (``url``)."""

    def __init__(self, max_s: float = 600.0):
        self.port = free_port()
        self.max_s = max_s
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/send"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def __aenter__(self) -> TrivialServer:
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _TRIVIAL_SERVER, str(self.port),
                                                         str(self.max_s), stdout=asyncio.subprocess.PIPE,
                                                         stdin=asyncio.subprocess.DEVNULL)
        assert self.proc.stdout is not None
        await asyncio.wait_for(self.proc.stdout.readline(), 10)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def loadgen_ceiling(requests: list[bytes], connections: int, max_s: float = 60.0) -> dict[str, Any]:
    """The load generator against a trivial asyncio HTTP server in its own process: an
    upper bound of what the client can measure on this machine."""
    async with TrivialServer(max_s) as server:
        res = await closed_loop(HOST, server.port, requests, connections, deadline_s=max_s - 5)
        return {"requests": res.ok, "rate_req_s": rate(res.ok, res.elapsed), **latency_summary(res.latencies)}


# --- wrk (optional cross-check) --------------------------------------------------------

_WRK_LUA = r"""
local tid = 0
local text = string.rep("x", 1024)
setup = function(thread) thread:set("tid", tid); tid = tid + 1 end
local n = 0
request = function()
  n = n + 1
  local k = n % %THREADS%
  local body = '{"text":"' .. text .. '","sender":"c' .. k .. '","id":"%PREFIX%-' .. tid .. '-' .. n ..
               '","thread":"t' .. k .. '"}'
  return wrk.format("POST", "%PATH%", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n', summary.requests, summary.duration,
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


async def wrk_run(port: int, path: str, *, connections: int, seconds: int, prefix: str, threads: int = 1000) -> dict[str, Any] | None:
    """Closed-loop throughput measured by wrk (C, one thread), when it is installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    script = Path(tempfile.mkdtemp(prefix="gw-wrk-")) / "inbound.lua"
    script.write_text(_WRK_LUA.replace("%PREFIX%", prefix).replace("%PATH%", path).replace("%THREADS%", str(threads)))
    try:
        proc = await asyncio.create_subprocess_exec(
            wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script),
            f"http://{HOST}:{port}{path}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        shutil.rmtree(script.parent, ignore_errors=True)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("WRKJSON "):
            d = json.loads(line[8:])
            ok = d["requests"] - d["non2xx"]
            return {"tool": "wrk " + _wrk_version(wrk), "connections": connections, "threads": 1,
                    "requests": d["requests"], "non_2xx": d["non2xx"],
                    "socket_errors": {k: d[k] for k in ("connect", "read", "write", "timeout")},
                    "rate_msg_s": rate(ok, d["duration_us"] / 1e6), "p50_ms": d["p50_us"] / 1000,
                    "p99_ms": d["p99_us"] / 1000, "max_ms": d["max_us"] / 1000}
    return {"tool": "wrk", "error": out.decode(errors="replace")[-500:]}


def _wrk_version(wrk: str) -> str:
    try:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=5)
        return (out.stdout or out.stderr).split("[")[0].replace("wrk", "").strip()
    except Exception:
        return ""


# --- results ---------------------------------------------------------------------------


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (atomically) and regenerate RESULTS.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    write_results_md()
    return path


def _load(name: str) -> dict[str, Any] | None:
    try:
        return json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _f(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        s = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"
    else:
        s = f"{v:,}" if isinstance(v, int) else str(v)
    return s + unit


def write_results_md() -> None:
    """RESULTS.md: the small tables the project README quotes, from the JSON files."""
    inb, outb = _load("inbound"), _load("outbound")
    lines = ["# Benchmark results", "",
             "Generated by `python -m bench` from `bench/results/*.json` (every number is there, with",
             "the machine). Measurements, not pass/fail tests; see `bench/README.md` for the method.", ""]
    if inb:
        m, r = inb["machine"], inb["results"]
        full, raw = r["http_pipeline"], r["raw_publish_async"]
        lg = inb["load_generator"]
        lines += [f"## Inbound: webhook → normalize → dedup → JetStream ack → HTTP 200 ({inb['date']}, "
                  f"N = {inb['n']:,}{', quick' if inb.get('quick') else ''})", "",
                  f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['nats_server']}. The gateway runs in its "
                  f"own process ({_loops(inb)}); the load generator (prebuilt HTTP/1.1 requests, {lg['connections']} "
                  f"keep-alive connections) in another.", "",
                  "| measurement | msg/s | p50 ms | p99 ms | notes |", "|---|---:|---:|---:|---|",
                  f"| raw nats-py `js.publish_async`, all acks awaited (**baseline**) | {_f(raw['rate_msg_s'])} | | | "
                  f"same bus messages ({raw['bus_message_bytes']} B), same server; median of "
                  f"{' / '.join(_f(x) for x in raw.get('all_rates_msg_s', []))} |",
                  f"| the pipeline's 5 bus ops per message, raw nats-py, {r['raw_pipeline_ops']['concurrency']} concurrent | "
                  f"{_f(r['raw_pipeline_ops']['rate_msg_s'])} | {_f(r['raw_pipeline_ops']['p50_ms'])} | "
                  f"{_f(r['raw_pipeline_ops']['p99_ms'])} | dedup ∥ survey direct get; message ∥ conversation KV write; dedup KV write behind |",
                  f"| in-process `ctx.publish` (mock `inject`, no HTTP), {r['ctx_publish']['concurrency']} concurrent | "
                  f"{_f(r['ctx_publish']['rate_msg_s'])} | {_f(r['ctx_publish']['p50_ms'])} | {_f(r['ctx_publish']['p99_ms'])} | |",
                  f"| **full pipeline over HTTP**, closed loop | **{_f(full['rate_msg_s'])}** | {_f(full['p50_ms'])} | "
                  f"{_f(full['p99_ms'])} | gateway CPU {_f((full.get('cpu') or {}).get('gateway', {}).get('cpu_ms_per_msg'), ' ms')}/msg; "
                  f"peak RSS {_f(r['gateway_peak_rss_mib'], ' MiB')} |"]
        for p in r["paced"]:
            lines.append(f"| full pipeline over HTTP, open loop at {_f(p['offered_rate_msg_s'])} msg/s offered | "
                         f"{_f(p['rate_msg_s'])} achieved | **{_f(p['p50_ms'])}** | **{_f(p['p99_ms'])}** | "
                         f"latency from the scheduled send time |")
        b = r.get("bridge")
        if b:
            lines.append(f"| hand-written webhook → JetStream bridge (Starlette, uvicorn + uvloop + httptools, `js.publish` "
                         f"with `Nats-Msg-Id`, nothing else), closed loop (**baseline of the full pipeline**) | "
                         f"{_f(b['closed']['rate_msg_s'])} | {_f(b['closed']['p50_ms'])} | {_f(b['closed']['p99_ms'])} | "
                         f"bridge CPU {_f(((b['closed'].get('cpu') or {}).get('bridge') or {}).get('cpu_ms_per_msg'), ' ms')}/msg |")
            for p in b["paced"]:
                lines.append(f"| hand-written bridge, open loop at {_f(p['offered_rate_msg_s'])} msg/s offered | "
                             f"{_f(p['rate_msg_s'])} achieved | {_f(p['p50_ms'])} | {_f(p['p99_ms'])} | |")
        w = r.get("wrk")
        if w and "rate_msg_s" in w:
            lines.append(f"| full pipeline over HTTP, closed loop, measured by {w['tool']} | {_f(w['rate_msg_s'])} | "
                         f"{_f(w['p50_ms'])} | {_f(w['p99_ms'])} | cross-check of the load generator |")
        c = r.get("loadgen_ceiling")
        if c:
            lines.append(f"| the load generator against a trivial HTTP server | {_f(c['rate_req_s'])} | {_f(c['p50_ms'])} | "
                         f"{_f(c['p99_ms'])} | its own ceiling on this machine |")
        lines += _interference_note(inb)
        t = inb["targets"]
        lines += ["", f"Targets (issue): full pipeline ≥ ½ raw publish rate: ratio **{t['ratio_full_to_raw']:.3f}**, "
                  f"{'met' if t['half_raw_rate_met'] else 'not met'}. p99 < 10 ms at 1,000 msg/s: "
                  f"**{_f(t.get('paced_1000_p99_ms'), ' ms')}** ({_f(t.get('paced_1000_achieved_msg_s'))} msg/s achieved), "
                  f"{'met' if t['p99_under_10ms_at_1000_met'] else 'not met'}."]
        if "ratio_full_to_bridge" in t:
            lines += ["", f"Targets (issue 19): full pipeline ≥ 0.7 of the hand-written bridge: ratio "
                      f"**{t['ratio_full_to_bridge']:.2f}**, {'met' if t['ratio_full_to_bridge'] >= 0.7 else 'not met'}. "
                      f"p99 < 5 ms at 1,000 msg/s: **{_f(t.get('paced_1000_p99_ms'), ' ms')}** (the bridge: "
                      f"{_f(t.get('bridge_paced_1000_p99_ms'), ' ms')}), {'met' if t['p99_under_5ms_at_1000_met'] else 'not met'}."]
        lines.append("")
    if outb:
        m, r = outb["machine"], outb["results"]
        g, base = r["gateway"], r["raw_fetch_ack"]
        lines += [f"## Outbound: publish on `gw.out.mock.<name>` → `sent` status ({outb['date']}, M = {outb['m']:,} over "
                  f"{outb['conversations']:,} conversations{', quick' if outb.get('quick') else ''})", "",
                  f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['nats_server']}; gateway in its own process "
                  f"({_loops(outb)}, `[outbound] concurrency = {outb['gateway_concurrency']}`).", "",
                  "| measurement | msg/s | p50 ms | p99 ms | notes |", "|---|---:|---:|---:|---|",
                  f"| raw nats-py pull consumer, fetch {base['batch']} + ack, work-queue stream (**baseline**) | "
                  f"{_f(base['rate_msg_s'])} | | | same number of messages ({base['message_bytes']} B), same server; median of "
                  f"{' / '.join(_f(x) for x in base.get('all_rates_msg_s', []))} |",
                  f"| the dispatcher's 6 bus ops per message, raw nats-py, {r['raw_dispatch_ops']['concurrency']} concurrent | "
                  f"{_f(r['raw_dispatch_ops']['rate_msg_s'])} | {_f(r['raw_dispatch_ops']['p50_ms'])} | "
                  f"{_f(r['raw_dispatch_ops']['p99_ms'])} | status ∥ 2 direct gets; receipt KV write; status; ack |",
                  f"| **gateway: outbound → `sent` status**, all {outb['m']:,} published at once | **{_f(g['rate_msg_s'])}** | "
                  f"{_f(g['p50_ms'])} | {_f(g['p99_ms'])} | latency includes the queue; gateway CPU "
                  f"{_f((g.get('cpu') or {}).get('gateway', {}).get('cpu_ms_per_msg'), ' ms')}/msg; "
                  f"peak RSS {_f(r['gateway_peak_rss_mib'], ' MiB')} |"]
        hw, gp = r.get("handwritten_consumer_with_provider"), r.get("gateway_with_provider")
        if hw and gp:
            lines += [f"| hand-written consumer: fetch 256, POST to the provider, ack; {hw['concurrency']} at a time "
                      f"(**baseline with a provider**) | {_f(hw['rate_msg_s'])} | | | provider: a trivial HTTP server in "
                      f"its own process |",
                      f"| **gateway with the same provider over HTTP** (mock channel `provider_url`), all at once | "
                      f"**{_f(gp['rate_msg_s'])}** | {_f(gp['p50_ms'])} | {_f(gp['p99_ms'])} | gateway CPU "
                      f"{_f(((gp.get('cpu') or {}).get('gateway') or {}).get('cpu_ms_per_msg'), ' ms')}/msg |"]
        if r.get("paced"):
            p = r["paced"]
            lines.append(f"| gateway: outbound → `sent` status, paced at {_f(p['offered_rate_msg_s'])} msg/s | "
                         f"{_f(p['rate_msg_s'])} achieved | **{_f(p['p50_ms'])}** | **{_f(p['p99_ms'])}** | "
                         f"latency from the scheduled publish time |")
        lines += _interference_note(outb)
        t = outb["targets"]
        lines += ["", f"Target (issue): gateway ≥ ½ baseline rate: ratio **{t['ratio_gateway_to_baseline']:.3f}**, "
                  f"{'met' if t['half_baseline_met'] else 'not met'}."]
        if "ratio_gateway_to_handwritten_with_provider" in t:
            q = t["ratio_gateway_to_handwritten_with_provider"]
            lines += ["", f"Target (issue 19): gateway ≥ 0.5 of the hand-written consumer, both calling the provider: "
                      f"ratio **{q:.2f}**, {'met' if q >= 0.5 else 'not met'}."]
        lines.append("")
    clu = _load("cluster")
    if clu:
        lines += _cluster_md(clu)
    rem = _load("reminders")
    if rem:
        lines += _reminders_md(rem)
    soak = _load("soak")
    if soak:
        m, r = soak["machine"], soak["results"]
        rss, load = r["rss"], r["load"]
        lines += [f"## Soak: gateway RSS over {soak['duration_s'] / 60:g} min at {_f(soak['offered_rate_msg_s'])} msg/s, "
                  f"a reply to each ({soak['date']}{', ' + soak['label'] if soak.get('label') else ''})", "",
                  f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['nats_server']}; `python -m bench soak`, "
                  f"default configuration with one mock channel, RSS (`VmRSS`) sampled every {_f(soak['sample_interval_s'])} s.", "",
                  "| RSS after warm-up | at the end | growth | slope | requests ok | replies sent |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {_f(rss['after_warmup_mib'], ' MiB')} (at {_f(rss['after_warmup_at_s'])} s) | {_f(rss['end_mib'], ' MiB')} | "
                  f"{_f(rss['growth_after_warmup_mib'], ' MiB')} | {_f(rss['slope_mib_per_min'], ' MiB/min')} "
                  f"({_f(rss['slope_bytes_per_message'], ' B/msg')}) | {_f(load['ok'])} of {_f(load['requests'])} | "
                  f"{_f(r['replies']['sent_statuses'])} |"]
        lines += _interference_note(soak)
        lines.append("")
    (RESULTS / "RESULTS.md").write_text("\n".join(lines) + "\n")


def _cluster_md(clu: dict[str, Any]) -> list[str]:
    m, r, t = clu["machine"], clu["results"], clu["targets"]
    one, three, iso = r["single_node"], r["cluster"], r["backlog_isolation"]
    out = [f"## Cluster and backlog isolation ({clu['date']}, N = {clu['n']:,} inbound, M = {clu['m']:,} outbound"
           f"{', quick' if clu.get('quick') else ''})", "",
           f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['nats_server']}; `python -m bench.cluster`. "
           f"Two gateway processes, the webhooks split over both ({one['inbound']['connections']} connections), "
           f"outbounds published at once; on this machine the gateways, the servers and the load generator share "
           f"the same cores.", "",
           "| measurement | msg/s | p50 ms | p99 ms | notes |", "|---|---:|---:|---:|---|"]
    for label, row in (("one nats-server, R1 (**baseline**)", one), ("3-node cluster, R3", three)):
        i, o = row["inbound"], row["outbound"]
        out += [f"| inbound through 2 gateways, {label} | {_f(i['rate_msg_s'])} | {_f(i['p50_ms'])} | {_f(i['p99_ms'])} | "
                f"closed loop |",
                f"| outbound through 2 gateways, {label} | {_f(o['rate_msg_s'])} | {_f(o['p50_ms'])} | {_f(o['p99_ms'])} | "
                f"all published at once; latency includes the queue |"]
    behind, alone = iso["fast_behind_backlog"], iso["fast_alone"]
    out += [f"| backlog isolation: {iso['fast_replies']} replies on a fast channel, nothing else waiting (**baseline**) | | | | "
            f"last `sent` after **{_f(alone['elapsed_s'], ' s')}** |",
            f"| backlog isolation: the same with {iso['backlog_on_slow']:,} replies waiting on a slow channel "
            f"({iso['slow_delivery_s']} per delivery) | | | | last `sent` after **{_f(behind['elapsed_s'], ' s')}** "
            f"({behind['sent']} of {iso['fast_replies']} sent within {_f(iso['wait_limit_s'], ' s')}) |"]
    out += _interference_note(clu)
    out += ["", f"Cluster (R3) to one server (R1), two gateways each: inbound **{t['cluster_to_single_inbound']:.2f}**, "
            f"outbound **{t['cluster_to_single_outbound']:.2f}**. Target (issue 19): a fast channel's 100 replies under "
            f"1 s behind a slow channel's backlog: **{_f(t['fast_behind_backlog_s'], ' s')}**, "
            f"{'met' if t['isolation_under_1s_met'] else 'not met'}.", ""]
    return out


def _reminders_md(rem: dict[str, Any]) -> list[str]:
    m, r = rem["machine"], rem["results"]
    raw, sch, fire = r["raw_schedules"], r["gateway_scheduling"], r["gateway_firing"]
    lr, lf = raw["lateness"], fire["lateness_due_to_sent"]
    out = [f"## Reminders: due time → `sent` status ({rem['date']}, N = {rem['n']:,} due within {rem['window_s']:g} s"
           f"{', quick' if rem.get('quick') else ''})", "",
           f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['nats_server']}; gateway in its own process "
           f"({_loops(rem)}); `python -m bench.reminders`.", "",
           "| measurement | msg/s | p50 ms | p99 ms | max ms | notes |", "|---|---:|---:|---:|---:|---|",
           f"| raw nats-server `@at` schedules, fired copy read by a consumer (**baseline**) | {_f(raw['fire_rate_msg_s'])} | "
           f"{_f(lr['p50_ms'])} | {_f(lr['p99_ms'])} | {_f(lr['max_ms'])} | scheduled at {_f(raw['schedule_rate_msg_s'])}/s; "
           f"{raw['missing']} missing |",
           f"| gateway: schedules published (`ReminderStore.schedule_async`) | {_f(sch['publish_rate_msg_s'])} | | | | |",
           f"| gateway: schedules checked (`scheduled` statuses) | {_f(sch['check_rate_msg_s'])} | | | | "
           f"nats-server CPU {_f(((sch.get('cpu') or {}).get('nats_server') or {}).get('cpu_ms_per_msg'), ' ms')}/reminder |",
           f"| **gateway: due time → `sent`** | **{_f(fire['rate_msg_s'])}** | **{_f(lf['p50_ms'])}** | **{_f(lf['p99_ms'])}** | "
           f"{_f(lf['max_ms'])} | {fire['missing']} missing, fired twice {fire['fired_twice']}; gateway CPU "
           f"{_f(((fire.get('cpu') or {}).get('gateway') or {}).get('cpu_ms_per_msg'), ' ms')}/reminder |"]
    rss = r.get("rss_mib") or {}
    out += ["", f"Peak RSS: gateway {_f(rss.get('gateway_peak_mib'), ' MiB')}, nats-server {_f(rss.get('nats_server_peak_mib'), ' MiB')}."]
    c = r.get("crash")
    if c:
        out += [f"Crash (kill -9 of the gateway after {c['delivered_at_gateway_kill']:,} deliveries, of nats-server after "
                f"{c['delivered_at_server_kill']:,}; {c['reminders']:,} reminders due within {c['window_s']:g} s): "
                f"**{c['lost']} lost, {c['delivered_twice']} delivered twice**."]
    out += _interference_note(rem)
    t = rem["targets"]
    out += ["", f"Target (issue): p99 from due time to `sent` under 500 ms: **{_f(t['p99_due_to_sent_ms'], ' ms')}**, "
            f"{'met' if t['p99_under_500_ms'] else 'not met'}.", ""]
    return out


def _loops(data: dict[str, Any]) -> str:
    e = data.get("event_loops") or {}
    libs = e.get("gateway_process_loaded") or {}
    gw = ("uvloop" if libs.get("uvloop") else "asyncio loop") + (" + httptools" if libs.get("httptools") else " + h11")
    return f"{gw}; benchmark process on {e.get('benchmark_process', 'asyncio')}"


def _interference_note(data: dict[str, Any]) -> list[str]:
    i = data.get("interference") or {}
    worst = i.get("max_other_cores_busy")
    if worst is None:
        return []
    if i.get("quiet"):
        return ["", f"Other processes used at most {worst:.2f} cores during the measurements (a quiet machine)."]
    return ["", f"**Other processes used up to {worst:.2f} of the {data['machine']['cores']} cores during the "
            f"measurements**: the machine was shared, so these numbers are pessimistic."]


def bench_main(name: str, parser: Any, run: Any, argv: list[str] | None) -> dict[str, Any]:
    """The command line of one benchmark: parse, run, print the JSON, then either print
    the profile (``--profile``: results are not written) or write the results."""
    args = parser().parse_args(argv)
    if args.profile is not None:
        args.profile = args.profile.resolve()
    data = run_loop(run(args))
    print(json.dumps(data, indent=2))
    if args.profile is not None:
        print_profile(args.profile)
    else:
        print(f"written: {write_results(name, data)}", file=sys.stderr)
    return data
