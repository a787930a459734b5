"""The backend side: gateway.client, the echo example, and a backend that does not use
our Python package at all (only the documented subjects and JSON)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway import ConfigError
from gateway.testing import post_inbound
from gateway.client import Client

ROOT = Path(__file__).parent.parent


async def test_round_trip_inbound_backend_reply_delivered_in_the_same_conversation(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    mock = gw.channels["demo"].channel
    await post_inbound(gw.http.port, "demo", text="Is my refund done?", sender="carol", id="c-1")
    async with Client(nats_server.url) as client:
        async for msg in client.inbound(durable="helpdesk"):
            assert msg.parts[0].text == "Is my refund done?"
            out_id = await client.reply(msg, text="Yes, since Monday.")
            break
        statuses = client.status(outbound_id=out_id, from_start=True)
        states = []
        async for st in statuses:
            states.append(st.state)
            if st.state == "sent":
                break
    [(out, conv)] = await mock.wait_for_deliveries(1)
    assert out.id == out_id and out.in_reply_to == msg.id and conv.route["to"] == "carol"
    assert states == ["accepted", "sent"]


async def test_handler_exception_means_redelivery_and_offline_messages_come_first(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    for i in range(3):  # arrive while no backend is online
        await post_inbound(gw.http.port, "demo", text=f"m{i}", id=f"off-{i}")
    async with Client(nats_server.url) as client:
        seen = []
        try:
            async for msg in client.inbound(durable="desk", ack_wait=1):
                seen.append(msg.parts[0].text)
                raise RuntimeError("backend bug")
        except RuntimeError:
            pass
        got = []
        async for msg in client.inbound(durable="desk", ack_wait=1):
            got.append(msg.parts[0].text)
            if len(got) == 3:
                break
    assert seen == ["m0"]
    assert got == ["m0", "m1", "m2"]


async def test_reply_by_conversation_key_finds_the_channel(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    await post_inbound(gw.http.port, "demo", text="hi", sender="dave")
    key = gw.channels["demo"].ctx.conversation_key("dave")
    async with Client(nats_server.url) as client:
        await client.reply(key, text="A follow-up", kind="followup")
    [(out, _)] = await gw.channels["demo"].channel.wait_for_deliveries(1)
    assert out.kind == "followup" and out.parts[0].text == "A follow-up"


async def test_echo_backend_example_answers_with_the_expected_handling_time_and_exits_cleanly(
        gateway_factory, nats_server, tmp_path):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    await post_inbound(gw.http.port, "demo", text="hello?", sender="erin")
    # No URL: the example reads ./gateway.toml as `gateway tail` does.
    (tmp_path / "gateway.toml").write_text(f'[bus]\nurl = "{nats_server.url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "examples" / "echo_backend.py"),
                                                "--count", "1", "--within", "2 working days", cwd=tmp_path, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    # Leaving the loop early closes the consumer before the connection: nothing on stderr
    # (it was "Task exception was never retrieved ... ConnectionClosedError").
    assert err.decode() == "" and out.decode().startswith("answered ")
    [(reply, _)] = await gw.channels["demo"].channel.wait_for_deliveries(1)
    assert reply.parts[0].text == "We received your message and will reply within 2 working days."
    assert reply.auto is True


async def test_client_from_config_reads_the_bus_url_prefix_and_credentials_like_the_cli(tmp_path, monkeypatch):
    from gateway.testing import NatsServer

    server = NatsServer(tmp_path / "nats", user="desk", password="pw-123")
    await server.start()
    try:
        for k in ("GATEWAY_CONFIG", "GATEWAY_BUS_URL", "GATEWAY_BUS_PORT"):
            monkeypatch.delenv(k, raising=False)
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(f'[bus]\nurl = "nats://127.0.0.1:{server.port}"\nprefix = "acme"\nuser = "desk"\n'
                       f'password = "${{GW_TEST_PW}}"\n[channels.x]\ntype = "not-installed-here"\n')
        monkeypatch.setenv("GW_TEST_PW", "pw-123")
        # A backend needs [bus] only: channel sections of types it does not have are no error.
        async with Client.from_config(cfg) as client:
            assert client.subjects.prefix == "acme" and client.nc.is_connected
        # Without a path: $GATEWAY_CONFIG, else ./gateway.toml; GATEWAY_BUS_URL overrides.
        monkeypatch.chdir(tmp_path)
        assert Client.from_config().url == f"nats://127.0.0.1:{server.port}"
        monkeypatch.setenv("GATEWAY_BUS_URL", "nats://127.0.0.1:4999")
        assert Client.from_config().url == "nats://127.0.0.1:4999"
        monkeypatch.delenv("GATEWAY_BUS_URL")
        (tmp_path / "gateway.toml").write_text("[bus]\nembedded_port = 4333\n")
        assert Client.from_config().url == "nats://127.0.0.1:4333"
        monkeypatch.setenv("GATEWAY_BUS_PORT", "4334")
        assert Client.from_config().url == "nats://127.0.0.1:4334"
        (tmp_path / "gateway.toml").write_text('[bus]\nurl = "localhost"\n')
        with pytest.raises(ConfigError, match=r"gateway.toml:2: bus.url: expected nats://"):
            Client.from_config()
    finally:
        await server.stop()


NON_PYTHON_BACKEND = textwrap.dedent('''
    # Uses only nats-py and json, as a Go or Node backend would use its NATS client:
    # the documented subjects, stream names, headers and JSON fields, nothing of ours.
    import asyncio, json, sys
    import nats

    async def main(url):
        nc = await nats.connect(url)
        js = nc.jetstream()
        sub = await js.pull_subscribe("gw.in.>", durable="polyglot", stream="GW_IN")
        [msg] = await sub.fetch(1, timeout=10)
        m = json.loads(msg.data)
        reply = {"id": "poly-1", "conversation": m["conversation"], "in_reply_to": m["id"],
                 "parts": [{"type": "text", "text": "answered without the gateway package"}]}
        await js.publish("gw.out.%s.%s" % (m["channel_type"], m["channel"]), json.dumps(reply).encode(),
                         headers={"Nats-Msg-Id": reply["id"]})
        await msg.ack()
        status = await js.subscribe("gw.status.>", ordered_consumer=True)
        async for s in status.messages:
            st = json.loads(s.data)
            if st["outbound_id"] == "poly-1" and st["state"] == "sent":
                print("sent", st["provider_id"])
                break
        await nc.close()

    asyncio.run(main(sys.argv[1]))
''')


async def test_a_backend_without_the_gateway_package_can_consume_and_reply(gateway_factory, nats_server, tmp_path):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    await post_inbound(gw.http.port, "demo", text="from a customer", sender="fay")
    script = tmp_path / "backend.py"
    script.write_text(NON_PYTHON_BACKEND)
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-I", str(script), nats_server.url],
                                capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sent mock-1"
    assert "gateway" not in script.read_text().replace("gateway package", "")
    [(out, _)] = gw.channels["demo"].channel.deliveries
    assert out.parts[0].text == "answered without the gateway package"
