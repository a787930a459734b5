"""Start-up and connection errors of the `gateway` command: one line that names the key
and what to do, the documented exit code, nothing misleading. Real processes throughout."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from gateway.cli import build_parser, main
from gateway.testing import LOCK_FILE, GatewayProcess, NatsServer, free_port

GATEWAY = [sys.executable, "-m", "gateway"]


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _config(tmp_path: Path, body: str, name: str = "gateway.toml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


async def test_http_port_in_use_is_one_line_naming_http_port_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = _config(tmp_path, f'[bus]\nembedded_port = {free_port()}\ndata_dir = "{tmp_path / "nats"}"\n'
                                f'[http]\nport = {port}\n[channels.demo]\ntype = "mock"\n')
        r = await asyncio.to_thread(_run, ["run", "-c", str(cfg)], tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    [line] = r.stderr.splitlines()  # nothing else: no errno dump, no pending tasks, no warnings
    assert line == (f"error: [http] port {port} on 127.0.0.1 is already in use by another process "
                    f"(another `gateway run`?): stop it, or set [http] port to a free port")
    assert not (tmp_path / "nats").exists(), "the bus was started before the HTTP port was checked"


def _lock_holders(lock: Path) -> list[int]:
    """Processes with ``lock`` open (from /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == str(lock) for fd in (d / "fd").iterdir()):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


async def test_second_gateway_run_in_the_same_folder_is_refused_naming_data_dir(tmp_path):
    first = GatewayProcess(tmp_path)
    await asyncio.to_thread(first.start)
    try:
        # Same folder and bus settings; only the HTTP port differs (else that is refused first).
        second_cfg = _config(tmp_path, first.config.read_text().replace(f"port = {first.http_port}",
                                                                        f"port = {free_port()}"), "second.toml")
        r = await asyncio.to_thread(_run, ["-c", str(second_cfg), "run"], tmp_path)
        assert r.returncode == 2, r.stderr
        [line] = r.stderr.splitlines()
        store = (tmp_path / "nats").resolve()
        assert line.startswith(f"error: [bus] data_dir {store} is in use by another gateway (pid {first.proc.pid}, "
                               f"bus {first.bus_url})"), line
        assert "give this one its own [bus] data_dir and [bus] embedded_port" in line
        # The second never started a server on the store, and never used the first one's bus.
        assert (store / "nats-server.log").read_text().count("Starting nats-server") == 1
        assert "bus connected" not in r.stderr
        # The lock is held by the first gateway and by its nats-server (inherited), so a
        # server that outlives a killed gateway still keeps the store to itself.
        holders = _lock_holders(store / LOCK_FILE)
        assert first.proc.pid in holders and len(holders) == 2, holders
        async with httpx.AsyncClient() as c:
            ok = await c.post(f"http://127.0.0.1:{first.http_port}/channels/demo/inbound", content=b'{"text": "still here"}')
        assert ok.status_code == 200
    finally:
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait) == 0


async def test_embedded_port_taken_by_another_server_is_refused_naming_embedded_port(tmp_path):
    other = NatsServer(tmp_path / "other")
    await other.start()
    try:
        cfg = _config(tmp_path, f'[bus]\nembedded_port = {other.port}\ndata_dir = "{tmp_path / "nats"}"\n'
                                f'[http]\nport = {free_port()}\n[channels.demo]\ntype = "mock"\n')
        r = await asyncio.to_thread(_run, ["run", "-c", str(cfg)], tmp_path)
    finally:
        await other.stop()
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"error: [bus] embedded_port {other.port} on 127.0.0.1 is already in use by nats-server "
                           f"{other.server_name!r}: "), line
    assert "set [bus] embedded_port to a free port" in line


async def test_wrong_nats_password_prints_the_servers_reason(tmp_path, capsys):
    server = NatsServer(tmp_path / "nats", user="admin", password="Right-Pw-1")
    await server.start()
    try:
        cfg = _config(tmp_path, f'[bus]\nurl = "{server.url}"\nuser = "admin"\npassword = "Wrong-Pw-2"\n'
                                f'[channels.demo]\ntype = "mock"\n')
        for command in (["send", "--channel", "demo", "--conversation", "demo.x", "--text", "hi"],
                        ["tail"], ["dlq", "list"]):
            code = await asyncio.to_thread(main, ["-c", str(cfg), *command])
            out, err = capsys.readouterr()
            assert code == 3, (command, err)
            assert err.splitlines() == [
                f"error: cannot reach the bus at {server.url}: Authorization Violation (the server refused the "
                f"credentials: check [bus] user, password, token or creds_file)"], command
            assert out == ""
    finally:
        await server.stop()


async def test_run_without_a_configuration_file_says_no_channels_and_where_it_looked(tmp_path, nats_server):
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    env["GATEWAY_BUS_URL"] = nats_server.url  # no embedded server on 4222
    # Without a file the HTTP port is the default 8080: hold it when we can, so this test
    # does not start a server there (either way the line comes first).
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 8080))
        held.listen()
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE
    proc = await asyncio.create_subprocess_exec(*GATEWAY, "run", cwd=tmp_path, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        first = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
    finally:
        held.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 60)
    assert "[warning" in first
    assert (f"no channels configured (no configuration file: no -c FILE, $GATEWAY_CONFIG is not set and there is "
            f"no {tmp_path / 'gateway.toml'}); see gateway.example.toml") in first


COMMANDS = [["run"], ["check-config"], ["plugins"], ["schema"],
            ["send", "--channel", "demo", "--conversation", "c", "--text", "t"], ["tail"],
            ["dlq", "list"], ["dlq", "replay", "--all"], ["dlq", "purge"]]


def test_config_option_is_accepted_before_and_after_every_subcommand():
    parser = build_parser()
    for command in COMMANDS:
        assert parser.parse_args(["-c", "a.toml", *command]).config == "a.toml", command
        assert parser.parse_args([*command, "-c", "b.toml"]).config == "b.toml", command
        assert parser.parse_args([*command, "--config", "b.toml", "--log-level", "debug"]).log_level == "debug", command
        assert parser.parse_args(command).config is None, command
    # Given after the subcommand it wins, as the nearer option.
    assert parser.parse_args(["-c", "a.toml", "plugins", "-c", "b.toml"]).config == "b.toml"


def test_check_config_reads_the_file_given_after_the_subcommand(tmp_path, capsys):
    cfg = _config(tmp_path, '[channels.after]\ntype = "mock"\n')
    assert main(["check-config", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out == f"{cfg}: OK; channels: after (mock); bus: embedded\n"
