"""The `gateway run` process: embedded bus, graceful shutdown without loss, SIGHUP reload,
kill -9 safety. These run the real command in a subprocess."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import httpx

from gateway.wire import message_decoder
from gateway.testing import GatewayProcess, NatsServer, free_port, stream_messages


def embedded_server_running(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_gateway_run_starts_embedded_bus_on_loopback_and_stops_it(tmp_path):
    gp = GatewayProcess(tmp_path)
    gp.start()
    try:
        assert embedded_server_running(gp.nats_port)
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
        for port in (gp.nats_port, gp.http_port):
            addrs = [ln.split()[3] for ln in listening.splitlines() if ln.split()[3].endswith(f":{port}")]
            assert addrs and all(a.startswith("127.0.0.1:") for a in addrs), addrs
    finally:
        gp.signal(signal.SIGTERM)
        assert gp.wait() == 0
    assert not embedded_server_running(gp.nats_port)
    assert '"event": "stopped"' in gp.logs()


async def test_messages_accepted_before_sigterm_are_on_the_bus(tmp_path):
    gp = GatewayProcess(tmp_path)
    gp.start()
    accepted: list[str] = []
    refused = 0

    async def customer(i: int, client: httpx.AsyncClient) -> None:
        nonlocal refused
        try:
            r = await client.post(f"http://127.0.0.1:{gp.http_port}/channels/demo/inbound",
                                  content=json.dumps({"text": f"m{i}", "id": f"k{i}"}))
        except httpx.HTTPError:
            refused += 1
            return
        if r.status_code == 200:
            accepted.append(r.json()["id"])
        else:
            refused += 1

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as client:
        tasks = []
        for i in range(600):
            tasks.append(asyncio.create_task(customer(i, client)))
            if i == 300:
                gp.signal(signal.SIGTERM)  # in the middle of the stream
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
    assert await asyncio.to_thread(gp.wait) == 0
    print(f"accepted {len(accepted)}, refused {refused}")
    assert len(accepted) >= 100, (len(accepted), refused)
    assert refused > 0, "SIGTERM came after the last request: the test proves nothing"
    # Read the store the gateway left behind with a fresh server.
    server = NatsServer(tmp_path / "nats", port=free_port())
    await server.start()
    try:
        ids = {message_decoder.decode(m.data).id for m in await stream_messages(server.url, "GW_IN")}
    finally:
        await server.stop()
    missing = set(accepted) - ids
    assert not missing, f"{len(missing)} accepted messages are not on the bus"


async def test_sighup_reloads_channels_and_refuses_an_invalid_file(tmp_path):
    gp = GatewayProcess(tmp_path)
    gp.start()
    try:
        base = f"http://127.0.0.1:{gp.http_port}/channels"
        async with httpx.AsyncClient() as c:
            assert (await c.post(f"{base}/second/inbound", content=b'{"text":"x"}')).status_code == 404
            gp.write('[channels.demo]\ntype = "mock"\n[channels.second]\ntype = "mock"\n')
            gp.signal(signal.SIGHUP)
            for _ in range(100):
                if (await c.post(f"{base}/second/inbound", content=b'{"text":"x"}')).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("second channel never came up:\n" + gp.logs())
            gp.write('[channels.demo]\ntype = "mock"\nbogus = 1\n')
            gp.signal(signal.SIGHUP)
            for _ in range(100):
                if "reload refused" in gp.logs():
                    break
                await asyncio.sleep(0.1)
            assert "channels.demo.bogus: unknown key" in gp.logs()
            # The old configuration keeps running.
            assert (await c.post(f"{base}/second/inbound", content=b'{"text":"y"}')).status_code == 200
            assert (await c.post(f"{base}/demo/inbound", content=b'{"text":"y"}')).status_code == 200
    finally:
        gp.signal(signal.SIGTERM)
        gp.wait()


async def test_kill_9_of_the_gateway_takes_the_embedded_server_down_cleanly_and_restart_works(tmp_path):
    gp = GatewayProcess(tmp_path)
    gp.start()
    async with httpx.AsyncClient() as c:
        r = await c.post(f"http://127.0.0.1:{gp.http_port}/channels/demo/inbound", content=b'{"text":"before","id":"k9"}')
    assert r.status_code == 200
    gp.signal(signal.SIGKILL)
    gp.wait()
    for _ in range(100):
        if not embedded_server_running(gp.nats_port):
            break
        await asyncio.sleep(0.1)
    assert not embedded_server_running(gp.nats_port), "embedded nats-server outlived its gateway"
    gp.start()  # same store, same ports
    try:
        async with httpx.AsyncClient() as c:
            again = await c.post(f"http://127.0.0.1:{gp.http_port}/channels/demo/inbound", content=b'{"text":"before","id":"k9"}')
        assert again.json() == {"id": r.json()["id"], "duplicate": True}
        assert len(await stream_messages(gp.bus_url, "GW_IN")) == 1
    finally:
        gp.signal(signal.SIGTERM)
        gp.wait()


async def test_log_lines_are_json_and_carry_no_personal_data(tmp_path):
    gp = GatewayProcess(tmp_path)
    gp.start()
    try:
        async with httpx.AsyncClient() as c:
            await c.post(f"http://127.0.0.1:{gp.http_port}/channels/demo/inbound",
                         content=json.dumps({"text": "my phone is 13800138000", "sender": "alice@example.com"}))
            await c.post(f"http://127.0.0.1:{gp.http_port}/channels/demo/inbound", content=b'{"text": 1, "x": "13800138000"}')
    finally:
        gp.signal(signal.SIGTERM)
        gp.wait()
    lines = [ln for ln in gp.logs().splitlines() if ln.strip()]
    assert all(json.loads(ln) for ln in lines)
    assert "13800138000" not in gp.logs() and "alice@example.com" not in gp.logs()
    assert any("request rejected" in ln for ln in lines)


async def test_an_embedded_server_that_dies_is_restarted_and_nothing_accepted_is_lost(tmp_path):
    from gateway.testing import wait_until

    gp = GatewayProcess(tmp_path)
    gp.start()
    url = f"http://127.0.0.1:{gp.http_port}/channels/demo/inbound"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url, content=json.dumps({"text": "before", "id": "before"}))
            assert r.status_code == 200, r.text
            children = subprocess.run(["pgrep", "-P", str(gp.proc.pid), "nats-server"], capture_output=True,
                                      text=True).stdout.split()
            assert len(children) == 1, children
            subprocess.run(["kill", "-9", children[0]], check=True)

            async def accepted_again() -> bool:
                try:
                    r = await client.post(url, content=json.dumps({"text": "after", "id": "after"}))
                except httpx.HTTPError:
                    return False
                return r.status_code == 200

            await wait_until(accepted_again, timeout=30)
        ids = {message_decoder.decode(m.data).provider_id for m in await stream_messages(gp.bus_url, "GW_IN")}
        assert ids == {"before", "after"}
        restarted = subprocess.run(["pgrep", "-P", str(gp.proc.pid), "nats-server"], capture_output=True,
                                   text=True).stdout.split()
        assert len(restarted) == 1 and restarted != children
        assert "embedded nats-server exited; restarting it" in gp.logs()
        assert "embedded nats-server restarted" in gp.logs()
    finally:
        gp.signal(signal.SIGTERM)
        assert await asyncio.to_thread(gp.wait) == 0
    assert not embedded_server_running(gp.nats_port)
