"""The shared HTTP server against slow and misbehaving clients (real sockets): header and
body deadlines, keep-alive timeout, a connection cap, and answers and logs that are
counted, rate-limited and never repeat what the client sent."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from structlog.testing import capture_logs

from gateway.testing import post_inbound, wait_until

MARKER = "Zq7MARKERx9"


def rejected(gw: Any, reason: str, channel: str = "demo") -> float:
    return gw.metrics.registry.get_sample_value(
        "gateway_inbound_rejected_total", {"channel_type": "mock", "channel": channel, "reason": reason}) or 0.0


def closed(gw: Any, reason: str) -> float:
    return gw.metrics.registry.get_sample_value("gateway_http_connections_closed_total", {"reason": reason}) or 0.0


async def open_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection; what came before a reset
    (a write of ours that hit the closed socket), or ``<reset>`` if nothing did."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionError:
        pass
    return data or b"<reset>"


async def trickle(writers: list[asyncio.StreamWriter], data: bytes, interval: float) -> None:
    """Send ``data`` one byte per ``interval`` on every connection, as a slow-loris does."""
    for byte in data:
        for w in writers:
            if not w.is_closing():
                try:
                    w.write(bytes([byte]))
                except (ConnectionError, RuntimeError):
                    pass
        await asyncio.sleep(interval)


async def test_slow_clients_are_closed_after_header_timeout_while_normal_requests_are_answered(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}}, http={"header_timeout": "2s"})
    port = gw.http.port
    n = 300
    conns = [await open_connection(port) for _ in range(n)]
    opened = time.monotonic()
    headers = b"POST /channels/demo/inbound HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: y\r\n" % i for i in range(100))
    slow = asyncio.create_task(trickle([w for _, w in conns], headers, 0.2))
    try:
        # While 300 connections dribble their headers, providers are served as usual.
        latencies = []
        for i in range(20):
            t0 = time.monotonic()
            r = await post_inbound(port, "demo", text=f"normal {i}", id=f"n-{i}")
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200
        answers = await asyncio.gather(*(read_until_closed(r, 30) for r, _ in conns))
        elapsed = time.monotonic() - opened
    finally:
        slow.cancel()
        for _, w in conns:
            w.close()
    assert all(a.startswith(b"HTTP/1.1 408") or a == b"<reset>" for a in answers), {a[:30] for a in answers}
    assert elapsed >= 1.8  # not before the deadline
    assert closed(gw, "header_timeout") == n
    print(f"{n} slow connections closed {elapsed:.2f}s after opening; normal requests meanwhile: "
          f"max {max(latencies) * 1000:.0f} ms, median {sorted(latencies)[10] * 1000:.0f} ms")


async def test_connections_beyond_max_connections_are_refused_and_logged_once(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}}, http={"max_connections": 20, "header_timeout": "2s"})
    gw.http.evict_after = 60.0  # this test is about refusing; making room is the next one
    port = gw.http.port
    with capture_logs() as logs:
        conns = [await open_connection(port) for _ in range(30)]
        # Connections that send nothing at all: 20 are held, 10 refused at once.
        await wait_until(lambda: closed(gw, "max_connections") >= 10, timeout=10)
        # One more is answered at once, before it sends anything (a client that does send
        # may see a reset instead: the socket is closed as soon as it is accepted).
        probe, w = await open_connection(port)
        assert (await read_until_closed(probe, 10)).endswith(b"\r\n\r\ntoo many connections\n")
        w.close()
        answers = await asyncio.gather(*(read_until_closed(r, 30) for r, _ in conns))
        for _, w in conns:
            w.close()
        assert sum(a.startswith(b"HTTP/1.1 503") for a in answers) == 10
        assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) == 20
        # The idle ones are gone: the server serves again.
        assert (await post_inbound(port, "demo", text="after")).status_code == 200
    lines = [e for e in logs if "max_connections" in e["event"]]
    assert len(lines) == 1 and lines[0]["log_level"] == "warning", lines
    assert closed(gw, "max_connections") == 11


async def test_a_body_that_trickles_in_gets_408_and_the_connection_is_closed(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}}, http={"body_timeout": "1s"})
    reader, writer = await open_connection(gw.http.port)
    body = json.dumps({"text": "x" * 80}).encode()
    writer.write(b"POST /channels/demo/inbound HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    t0 = time.monotonic()
    slow = asyncio.create_task(trickle([writer], body, 0.2))
    try:
        answer = await read_until_closed(reader, 15)
    finally:
        slow.cancel()
        writer.close()
    elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer
    assert 0.8 <= elapsed < 10
    assert rejected(gw, "408") == 1


async def test_an_idle_kept_alive_connection_is_closed_after_keep_alive_timeout(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}}, http={"keep_alive_timeout": "1s"})
    reader, writer = await open_connection(gw.http.port)
    body = b'{"text":"hi"}'
    writer.write(b"POST /channels/demo/inbound HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    t0 = time.monotonic()
    answer = await read_until_closed(reader, 15)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert time.monotonic() - t0 < 4  # uvicorn's own default would keep it 5 s


async def test_a_client_hanging_up_mid_body_is_counted_apart_and_not_logged_as_an_error(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    with capture_logs() as logs:
        reader, writer = await open_connection(gw.http.port)
        writer.write(b'POST /channels/demo/inbound HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"text": "hal')
        await writer.drain()
        writer.close()
        await wait_until(lambda: rejected(gw, "client_disconnected") == 1, timeout=10)
    assert rejected(gw, "error") == 0
    assert not [e for e in logs if e["log_level"] in ("error", "warning", "info") and "path" in e], logs


async def test_503s_during_a_bus_outage_are_logged_once_per_interval_with_a_count(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    gw.http.throttle.interval = 1.0  # the default is 10 s; the promise is the same
    await nats_server.stop()
    await wait_until(lambda: not gw.bus.connected, timeout=10)
    with capture_logs() as logs:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}", timeout=10) as c:
            t0 = time.monotonic()
            for i in range(200):
                assert (await c.post("/channels/demo/inbound", content=b'{"text":"x"}')).status_code == 503
            burst = time.monotonic() - t0
            # The interval after the burst's last line has passed (time is the condition).
            await wait_until(lambda: time.monotonic() - t0 > burst + 1.1, timeout=30)
            assert (await c.post("/channels/demo/inbound", content=b'{"text":"x"}')).status_code == 503
    lines = [e for e in logs if e["event"] == "bus unavailable, answered 503"]
    assert rejected(gw, "bus") == 201
    # One line per elapsed interval (the burst may straddle one), each saying how many it stands for.
    assert 2 <= len(lines) <= 2 + int(burst), [(e["suppressed"]) for e in lines]
    assert lines[0]["suppressed"] == 0 and sum(e["suppressed"] for e in lines) == 201 - len(lines)


async def test_413_from_content_length_is_counted_logged_and_names_the_limit_that_applied(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}}, http={"max_body": 2048})
    with capture_logs() as logs:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}", timeout=10) as c:
            r = await c.post("/channels/demo/inbound", content=json.dumps({"text": "x" * 5000}))
            assert r.status_code == 413 and r.text == "body exceeds 2048 bytes ([http] max_body)\n"
            assert (await c.post("/channels/demo/inbound", content=b'{"text":"ok"}')).status_code == 200
    assert rejected(gw, "413") == 1
    [line] = [e for e in logs if e["event"] == "request rejected"]
    assert line["status"] == 413 and "2048" in line["reason"]


async def test_rejection_reasons_never_repeat_what_the_client_sent(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    bodies = [
        {"text": "hi", MARKER: 1},  # an unknown key
        {MARKER: "x"},  # an unknown key and a missing field
        {"text": "hi", "name": 5, MARKER: [1]},
        {"text": ["hi"]},
    ]
    with capture_logs() as logs:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}", timeout=10) as c:
            answers = [await c.post("/channels/demo/inbound", content=json.dumps(b)) for b in bodies]
            answers.append(await c.post("/channels/demo/inbound", content=b'{"' + MARKER.encode()))
    assert all(a.status_code == 400 for a in answers), [a.text for a in answers]
    assert all(MARKER not in a.text for a in answers), [a.text for a in answers]
    assert MARKER not in repr(logs)
    reasons = [a.text for a in answers]
    assert reasons[0] == "invalid JSON: unknown field\n"
    assert reasons[3] == "invalid JSON: Expected `str`, got `array` at $.text\n"


async def test_at_the_connection_cap_the_slowest_waiting_connection_makes_room(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}}, http={"max_connections": 20, "header_timeout": "60s"})
    gw.http.evict_after = 0.5
    conns = [await open_connection(gw.http.port) for _ in range(20)]
    try:
        # They have sent nothing for longer than a real client takes (time is the condition).
        t0 = time.monotonic()
        await wait_until(lambda: time.monotonic() - t0 > 0.6)
        for i in range(5):
            assert (await post_inbound(gw.http.port, "demo", text=f"provider {i}")).status_code == 200
        # The oldest went, with a 408, long before its header_timeout; the place it freed
        # served the following requests.
        assert (await read_until_closed(conns[0][0], 10)).startswith(b"HTTP/1.1 408")
    finally:
        for _, w in conns:
            w.close()
    assert closed(gw, "evicted") == 1 and closed(gw, "max_connections") == 0
