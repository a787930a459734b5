"""`gateway send`, `gateway tail`, `gateway schema` and exit codes, as ops use them."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from gateway.testing import post_inbound
from gateway.cli import main


def _config(tmp_path, url: str) -> str:
    p = tmp_path / "gateway.toml"
    p.write_text(f'[bus]\nurl = "{url}"\n[channels.demo]\ntype = "mock"\n')
    return str(p)


async def test_send_publishes_an_outbound_and_tail_shows_the_traffic(gateway_factory, nats_server, tmp_path):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    cfg = _config(tmp_path, nats_server.url)
    tail = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "-c", cfg, "tail", "-n", "4",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert b"tailing gw.>" in await asyncio.wait_for(tail.stderr.readline(), 20)
    await post_inbound(gw.http.port, "demo", text="Where is my order?", sender="alice")
    conv = gw.channels["demo"].ctx.conversation_key("alice")
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "-c", cfg, "send", "--channel", "demo",
                                                 "--conversation", conv, "--text", "On its way", "--id", "cli-1"],
                                capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "published outbound cli-1 on gw.out.mock.demo" in r.stdout
    out, _ = await asyncio.wait_for(tail.communicate(), 20)
    lines = out.decode().splitlines()
    assert "gw.in.mock.demo" in lines[0] and "from=alice: 'Where is my order?'" in lines[0] and f"conv={conv}" in lines[0]
    assert "gw.out.mock.demo  outbound cli-1" in lines[1] and "'On its way'" in lines[1]
    assert "status accepted outbound=cli-1" in lines[2]
    assert "status sent outbound=cli-1 attempt=1 provider_id=mock-1" in lines[3]
    [(delivered, _)] = gw.channels["demo"].channel.deliveries
    assert delivered.parts[0].text == "On its way"


def test_send_without_a_bus_exits_3_with_a_hint(tmp_path, capsys):
    from gateway.testing import free_port

    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[bus]\nembedded_port = {free_port()}\n[channels.demo]\ntype = "mock"\n')
    code = main(["-c", str(cfg), "send", "--channel", "demo", "--conversation", "demo.x", "--text", "hi"])
    assert code == 3
    assert "is `gateway run` running with the embedded bus?" in capsys.readouterr().err


def test_send_to_an_unknown_channel_without_type_is_a_usage_error(tmp_path, capsys):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("")
    assert main(["-c", str(cfg), "send", "--channel", "nope", "--conversation", "c", "--text", "t"]) == 2
    assert "give --type" in capsys.readouterr().err


def test_every_command_has_help():
    for cmd in ("run", "check-config", "plugins", "schema", "send", "tail", "dlq"):
        r = subprocess.run([sys.executable, "-m", "gateway", cmd, "--help"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "usage: gateway" in r.stdout, cmd


def test_unknown_command_exits_2():
    r = subprocess.run([sys.executable, "-m", "gateway", "frobnicate"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "invalid choice" in r.stderr


async def test_run_takes_its_ports_from_options_or_the_environment_and_other_commands_follow_the_environment(tmp_path):
    import os
    import signal

    import httpx

    from gateway.testing import free_port, wait_until

    # The file names ports that are not used: the options and variables must win.
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[bus]\ndata_dir = "{tmp_path / "nats"}"\nembedded_port = {free_port()}\n'
                   f'[http]\nport = {free_port()}\n[channels.demo]\ntype = "mock"\n')
    http_port, bus_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    runs = [(["run", "--port", str(http_port), "--bus-port", str(bus_port)], env),
            (["run"], {**env, "GATEWAY_HTTP_PORT": str(http_port), "GATEWAY_BUS_PORT": str(bus_port)})]
    for args, run_env in runs:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "-c", str(cfg), *args, env=run_env,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            async def healthy() -> bool:
                assert proc.returncode is None, "gateway run exited"
                try:
                    async with httpx.AsyncClient() as c:
                        return (await c.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2)).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(healthy, 60, 0.2)
            # Another command with the same variable finds the bus on that port.
            r = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "gateway", "-c", str(cfg), "send", "--channel", "demo",
                                 "--conversation", "demo.x", "--text", "hi"],
                capture_output=True, text=True, timeout=30, env={**env, "GATEWAY_BUS_PORT": str(bus_port)})
            assert r.returncode == 0 and "published outbound" in r.stdout, r.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0


def test_run_refuses_a_port_out_of_range(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["run", "--port", "70000"])
    assert exc.value.code == 2 and "--port: expected a port number from 0 to 65535" in capsys.readouterr().err


async def test_tail_reconnects_after_the_gateway_restarts_and_says_so(tmp_path):
    import os
    import signal

    from gateway.testing import GatewayProcess

    gp = GatewayProcess(tmp_path)
    await asyncio.to_thread(gp.start)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    tail = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "-c", str(gp.config), "tail", "gw.in.>",
                                                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert b"tailing gw.in.>" in await asyncio.wait_for(tail.stderr.readline(), 30)
        await post_inbound(gp.http_port, "demo", text="before the restart", sender="alice")
        assert b"'before the restart'" in await asyncio.wait_for(tail.stdout.readline(), 30)

        gp.signal(signal.SIGTERM)
        assert await asyncio.to_thread(gp.wait) == 0
        lost = (await asyncio.wait_for(tail.stderr.readline(), 30)).decode()
        assert "lost the connection to the bus" in lost and "reconnecting" in lost, lost
        await asyncio.to_thread(gp.start)
        back = (await asyncio.wait_for(tail.stderr.readline(), 60)).decode()
        assert back.startswith("tail: reconnected to nats://127.0.0.1:"), back
        await post_inbound(gp.http_port, "demo", text="after the restart", sender="alice")
        assert b"'after the restart'" in await asyncio.wait_for(tail.stdout.readline(), 30)
        assert tail.returncode is None
    finally:
        if tail.returncode is None:
            tail.send_signal(signal.SIGINT)
            await asyncio.wait_for(tail.wait(), 30)
        if gp.proc is not None and gp.proc.poll() is None:
            gp.signal(signal.SIGTERM)
            await asyncio.to_thread(gp.wait)
