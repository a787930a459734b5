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
    for cmd in ("run", "check-config", "plugins", "schema", "send", "tail", "dlq", "reminders", "new-plugin"):
        r = subprocess.run([sys.executable, "-m", "gateway", cmd, "--help"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "usage: gateway" in r.stdout, cmd


def test_unknown_command_exits_2():
    r = subprocess.run([sys.executable, "-m", "gateway", "frobnicate"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "invalid choice" in r.stderr


async def test_bus_commands_run_without_the_channels_secret_variables(gateway_factory, nats_server, tmp_path,
                                                                      monkeypatch, capsys):
    # Only [bus] matters to a command that talks to the bus; a channel's ${SECRET} unset on
    # the operator's shell is irrelevant there (check-config and run still refuse it).
    monkeypatch.delenv("GW_TEST_UNSET_SECRET", raising=False)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[bus]\nurl = "{nats_server.url}"\n[channels.demo]\ntype = "mock"\n'
                   f'[channels.mail]\ntype = "email"\nsmtp_password = "${{GW_TEST_UNSET_SECRET}}"\n')
    await gateway_factory({"demo": {"type": "mock"}})  # the bus's streams

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["-c", str(cfg), *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = await asyncio.to_thread(cli, "send", "--channel", "demo", "--conversation", "demo.x", "--text", "hi")
    assert code == 0 and "published outbound" in out and "gw.out.mock.demo" in out, err
    code, out, err = await asyncio.to_thread(cli, "dlq", "list")
    assert code == 0, err
    code, out, err = await asyncio.to_thread(cli, "check-config")
    assert code == 2 and "GW_TEST_UNSET_SECRET is not set" in err, err
