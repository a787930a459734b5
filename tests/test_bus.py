"""The supervised bus connection: whatever closes it (a server error, a server gone longer
than nats-py's reconnect attempts), the gateway connects again by itself, webhooks answer
2xx again and outbound delivery resumes, without a restart. Real nats-server throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import nats

from gateway import Outbound, TextPart
from gateway.wire import encode
from gateway.testing import GatewayProcess, NatsServer, post_inbound, wait_until


async def close_from_the_server_side(nc: nats.NATS) -> None:
    """Publish a message the server refuses: nats-py checks the payload against the
    server's max_payload but not payload plus headers, so the server answers
    ``-ERR 'Maximum Payload Violation'`` and drops the connection, and nats-py then
    closes it for good (issue 9.1's real trigger, on the gateway's own connection). The
    gateway's client now refuses such a publish before sending it, so this calls nats-py's
    own ``publish`` past that guard: the server still sees exactly what it used to."""
    try:
        await nats.NATS.publish(nc, "gw.test.oversized", b"x" * nc.max_payload, headers={"X-Pad": "y" * 256})
        await nc.flush(timeout=2)
    except Exception:
        pass


async def reply(nc: nats.NATS, outbound_id: str, conversation: str) -> None:
    await nc.jetstream().publish("gw.out.mock.demo", encode(Outbound(id=outbound_id, conversation=conversation,
                                                                     parts=[TextPart(text="on it")])),
                                 headers={"Nats-Msg-Id": outbound_id})


async def test_webhooks_and_delivery_recover_after_the_server_closes_the_connection(gateway_factory, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    assert (await post_inbound(gw.http.port, "demo", text="before", sender="alice")).status_code == 200
    conv = gw.channels["demo"].ctx.conversation_key("alice")
    first = gw.bus.nc
    assert first is not None
    t0 = time.monotonic()
    await close_from_the_server_side(first)
    await wait_until(lambda: first.is_closed, timeout=10)
    await wait_until(lambda: gw.bus.connected and gw.bus.nc is not first, timeout=30)
    recovered = time.monotonic() - t0
    r = await post_inbound(gw.http.port, "demo", text="after", sender="alice", id="p-after")
    assert r.status_code == 200, r.text
    await reply(bus, "o-after", conv)
    mock = gw.channels["demo"].channel
    [(out, _)] = await mock.wait_for_deliveries(1, timeout=30)
    assert out.id == "o-after"
    # The KV and object store handles belong to the new connection.
    assert await gw.get_conversation(conv) is not None
    ref = await gw.put_blob(b"blob after reconnect")
    assert await gw.get_blob(ref) == b"blob after reconnect"
    print(f"recovered {recovered:.2f}s after the server-side close")


async def test_healthz_says_why_while_the_bus_is_gone_and_recovers_after_a_long_outage(tmp_path):
    server = NatsServer(tmp_path / "nats")
    await server.start()
    from gateway.testing import make_config, start_gateway

    gw = await start_gateway(make_config(server.url, {"demo": {"type": "mock"}}, bus={"publish_timeout": "1s"}))
    try:
        await close_from_the_server_side(gw.bus.nc)
        # The server stays away for longer than nats-py would try on its own.
        await server.stop()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}", timeout=10) as c:
            async def reports_the_outage() -> bool:
                h = await c.get("/healthz")
                return h.status_code == 503 and h.json()["bus"]["connected"] is False and bool(h.json()["bus"].get("error"))

            await wait_until(reports_the_outage, timeout=15)
            assert (await post_inbound(gw.http.port, "demo", text="while down", id="d-1")).status_code == 503
            await server.start()

            async def healthy() -> bool:
                return (await c.get("/healthz")).status_code == 200

            await wait_until(healthy, timeout=30)
        assert (await post_inbound(gw.http.port, "demo", text="while down", id="d-1")).status_code == 200
        conv = gw.channels["demo"].ctx.conversation_key("customer")
        nc = await nats.connect(server.url)
        try:
            await reply(nc, "o-late", conv)
        finally:
            await nc.close()
        [(out, _)] = await gw.channels["demo"].channel.wait_for_deliveries(1, timeout=30)
        assert out.id == "o-late"
    finally:
        await gw.stop()
        await server.stop()
        server.cleanup()


def embedded_server_pid(gp: GatewayProcess) -> int:
    assert gp.proc is not None
    out = subprocess.run(["pgrep", "-P", str(gp.proc.pid), "-f", "nats-server"], capture_output=True, text=True).stdout
    return int(out.split()[0])


async def test_sigterm_after_the_bus_died_stops_cleanly(tmp_path):
    gp = GatewayProcess(tmp_path)
    gp.start()
    os.kill(embedded_server_pid(gp), signal.SIGKILL)
    # The gateway sees the bus go (healthz 503) and keeps trying to reconnect.
    deadline = time.monotonic() + 20
    while httpx.get(f"http://127.0.0.1:{gp.http_port}/healthz", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, gp.logs()
        time.sleep(0.1)
    time.sleep(1.5)  # let nats-py get into its reconnect attempts, as in the report
    gp.signal(signal.SIGTERM)
    assert gp.wait(60) == 0, gp.logs()
    assert "Traceback" not in gp.logs()
    assert '"event": "stopped"' in gp.logs()

