"""WebSockets on the shared HTTP server and the reconnecting client, with real sockets: the
websockets library's client against the gateway's uvicorn server, and a local websockets
server for :class:`gateway.WebSocketClient`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import websockets.asyncio.client
import websockets.asyncio.server
import websockets.exceptions
from structlog.testing import capture_logs

from gateway import Backoff, WebSocketClient, tokens_equal
from gateway.testing import make_config, post_inbound, wait_until

TOKEN = "Zq7s3cretTOKENx9"


def ws_url(gw: Any, channel: str = "demo") -> str:
    return f"ws://127.0.0.1:{gw.http.port}/channels/{channel}/ws"


def sample(gw: Any, name: str, reason: str, channel: str = "demo") -> float:
    return gw.metrics.registry.get_sample_value(
        name, {"channel_type": "mock", "channel": channel, "reason": reason}) or 0.0


def refused(gw: Any, reason: str) -> float:
    return sample(gw, "gateway_websocket_refused_total", reason)


def ws_closed(gw: Any, reason: str) -> float:
    return sample(gw, "gateway_websocket_closed_total", reason)


def open_sockets(gw: Any) -> float:
    return gw.metrics.registry.get_sample_value(
        "gateway_websocket_connections", {"channel_type": "mock", "channel": "demo"}) or 0.0


async def ws_gateway(gateway_factory: Any, **websocket: Any) -> Any:
    return await gateway_factory({"demo": {"type": "mock", "websocket": websocket}})


def connect(url: str, **kwargs: Any) -> Any:
    return websockets.asyncio.client.connect(url, open_timeout=5, close_timeout=2, **kwargs)


async def refusal_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with connect(url, **kwargs):
            pass
    return info.value.response.status_code


async def closed_with(ws: Any, timeout: float = 10) -> websockets.exceptions.ConnectionClosed:
    """Read until the server closes; the close frame it sent."""
    with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return info.value


async def test_a_wrong_or_missing_bearer_token_is_refused_401_before_the_upgrade_and_never_logged(gateway_factory):
    gw = await ws_gateway(gateway_factory, token=TOKEN)
    channel = gw.channels["demo"].channel
    with capture_logs() as logs:
        assert await refusal_status(ws_url(gw), additional_headers={"Authorization": "Bearer wrong" + TOKEN}) == 401
        assert await refusal_status(ws_url(gw) + f"?access_token={TOKEN}x") == 401
    assert channel.websocket_sessions == 0
    assert refused(gw, "401") == 2
    assert TOKEN not in repr(logs) and logs, logs
    async with connect(ws_url(gw), additional_headers={"Authorization": f"Bearer {TOKEN}", "X-Self-ID": "10001"}) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
    assert channel.websocket_sessions == 1


async def test_an_origin_not_on_the_allow_list_is_refused_403(gateway_factory):
    gw = await ws_gateway(gateway_factory, allowed_origins=["https://shop.example"])
    assert await refusal_status(ws_url(gw), origin="https://evil.example") == 403
    assert await refusal_status(ws_url(gw)) == 403  # no Origin at all: not a page we serve
    assert refused(gw, "origin") == 2
    async with connect(ws_url(gw), origin="https://shop.example") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"


async def test_an_accepted_socket_round_trips_text_and_binary_messages(gateway_factory):
    gw = await ws_gateway(gateway_factory)
    async with connect(ws_url(gw)) as ws:
        await ws.send("文字 text")
        assert await ws.recv() == "文字 text"
        await ws.send(b"\x00\xffbinary")
        assert await ws.recv() == b"\x00\xffbinary"
        assert open_sockets(gw) == 1
        n = 2000
        t0 = time.perf_counter()
        for i in range(n):
            await ws.send(f"m{i}")
            assert await ws.recv() == f"m{i}"
        rate = n / (time.perf_counter() - t0)
    await wait_until(lambda: open_sockets(gw) == 0)
    print(f"echo round trips through one socket, one at a time: {rate:.0f}/s")


async def test_a_message_over_max_message_size_closes_the_socket_with_1009(gateway_factory):
    gw = await ws_gateway(gateway_factory, max_message_size=1024)
    async with connect(ws_url(gw)) as ws:
        await ws.send("x" * 1024)  # at the limit: fine
        assert len(await ws.recv()) == 1024
        await ws.send("x" * 1025)
        closed = await closed_with(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    await wait_until(lambda: ws_closed(gw, "too_large") == 1)


async def test_connections_beyond_the_channel_limit_are_refused_503_until_one_closes(gateway_factory):
    gw = await ws_gateway(gateway_factory, max_connections=2)
    async with connect(ws_url(gw)) as first, connect(ws_url(gw)):
        assert await refusal_status(ws_url(gw)) == 503
        assert refused(gw, "max_connections") == 1
        await first.close()
        await wait_until(lambda: open_sockets(gw) == 1)
        async with connect(ws_url(gw)) as third:
            await third.send("in")
            assert await third.recv() == "in"


async def test_a_peer_that_does_not_read_is_closed_as_a_slow_consumer_and_counted(gateway_factory):
    gw = await ws_gateway(gateway_factory, send_queue=8, send_timeout="500ms")
    size = 64 * 1024
    # The client library stops reading the socket once 1 message waits unread: from then
    # on the kernel buffers fill and the server's writes stall.
    # No compression: "xxx…" would shrink to nothing and never fill a buffer.
    async with connect(ws_url(gw), max_queue=1, max_size=None, compression=None) as ws:
        t0 = time.monotonic()
        await ws.send(f"flood 5000 {size}")
        await wait_until(lambda: ws_closed(gw, "slow_consumer") == 1, timeout=30)
        elapsed = time.monotonic() - t0
        await wait_until(lambda: open_sockets(gw) == 0)
    # Held for the peer at most: the send queue plus what the transport buffers.
    print(f"slow consumer closed {elapsed:.2f}s after the flood began; "
          f"server-side queue capped at 8 x {size // 1024} KiB")


async def test_a_socket_without_messages_is_closed_after_idle_timeout(gateway_factory):
    gw = await ws_gateway(gateway_factory, idle_timeout="700ms")
    async with connect(ws_url(gw)) as ws:
        t0 = time.monotonic()
        await ws.send("still here")  # a message restarts the idle clock
        assert await ws.recv() == "still here"
        closed = await closed_with(ws)
        elapsed = time.monotonic() - t0
    assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (1000, "idle timeout")
    assert elapsed >= 0.6
    assert ws_closed(gw, "idle_timeout") == 1


async def test_sockets_are_closed_with_1001_when_the_gateway_stops(gateway_factory):
    gw = await ws_gateway(gateway_factory)
    async with connect(ws_url(gw)) as a, connect(ws_url(gw)) as b:
        stopping = asyncio.create_task(gw.stop())
        codes = [(await closed_with(ws)).rcvd.code for ws in (a, b)]
        await stopping
    assert codes == [1001, 1001]
    assert ws_closed(gw, "gateway_stopped") == 2


async def test_sockets_are_closed_with_1001_when_a_reload_removes_their_channel(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock", "websocket": {}}, "other": {"type": "mock"}})
    async with connect(ws_url(gw)) as ws:
        assert await gw.reload(make_config(nats_server.url, {"other": {"type": "mock"}}))
        closed = await closed_with(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1001
    assert await refusal_status(ws_url(gw)) == 404
    assert (await post_inbound(gw.http.port, "other", text="still served")).status_code == 200


async def test_an_upgraded_socket_outlives_header_timeout_and_webhooks_are_unaffected(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock", "websocket": {}}}, http={"header_timeout": "1s"})
    async with connect(ws_url(gw)) as ws:
        await asyncio.sleep(1.5)  # past the header deadline of the request that opened it
        await ws.send("alive")
        assert await ws.recv() == "alive"
        r = await post_inbound(gw.http.port, "demo", text="webhook beside a socket", id="w-1")
        assert r.status_code == 200
        # A plain request still gets the header deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.http.port)
        writer.write(b"POST /channels/demo/inbound HTTP/1.1\r\nHost: x\r\n")
        assert (await asyncio.wait_for(reader.read(100), 10)).startswith(b"HTTP/1.1 408")
        writer.close()
        await ws.send("still alive")
        assert await ws.recv() == "still alive"


async def test_websocket_paths_that_are_no_websocket_route_are_refused(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    assert await refusal_status(ws_url(gw, "nope")) == 404
    assert await refusal_status(f"ws://127.0.0.1:{gw.http.port}/healthz") == 403


def test_tokens_equal_compares_whole_tokens():
    assert tokens_equal("abc", "abc") and tokens_equal(b"abc", "abc")
    assert not tokens_equal("abd", "abc") and not tokens_equal("ab", "abc") and not tokens_equal(None, "abc")


async def test_websocket_client_reconnects_after_the_server_drops_it_and_reports_degraded_meanwhile(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    ctx = gw.channels["demo"].ctx
    seen_auth: list[str | None] = []
    refuse = asyncio.Event()
    server_closes: list[int | None] = []
    received: list[str] = []

    def check(conn: Any, request: Any) -> Any:
        seen_auth.append(request.headers.get("Authorization"))
        if refuse.is_set():
            return conn.respond(503, "down for maintenance\n")
        return None

    async def serve(conn: Any) -> None:
        await conn.send(f"hello {len(seen_auth)}")
        try:
            async for msg in conn:
                if msg == "drop me":
                    refuse.set()  # the next attempts are refused until the test allows them
                    conn.transport.abort()
                    return
        finally:
            server_closes.append(conn.close_code)

    async def handler(ws: Any) -> None:
        async for msg in ws:
            received.append(msg)
            if msg == "hello 1":
                await ws.send("drop me")

    async with websockets.asyncio.server.serve(serve, "127.0.0.1", 0, process_request=check) as server:
        port = server.sockets[0].getsockname()[1]
        client = WebSocketClient(ctx, f"ws://127.0.0.1:{port}/onebot?access_token={TOKEN}", handler,
                                 headers={"Authorization": f"Bearer {TOKEN}"}, backoff=Backoff(first=0.05, cap=0.2))
        client.start()
        try:
            await wait_until(lambda: refuse.is_set())
            await wait_until(lambda: ctx.health == "degraded" and len(seen_auth) >= 3)
            assert "503" in (ctx.health_detail or "") and TOKEN not in (ctx.health_detail or "")
            refuse.clear()
            await wait_until(lambda: ctx.health == "running" and client.connected and client.connects == 2)
            assert received[0] == "hello 1" and received[-1].startswith("hello ")
            assert set(seen_auth) == {f"Bearer {TOKEN}"}
        finally:
            await client.stop()
        await wait_until(lambda: len(server_closes) == 2)
    assert server_closes[-1] == 1001
    assert not client.connected
