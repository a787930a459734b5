"""No command prints a bus credential, however it was configured: every command runs
against a real nats-server that requires a password or a token, given in the URL, as
``[bus]`` keys, through ``${ENV}`` or ``GATEWAY_BUS_URL``; everything it prints on stdout
and stderr is scanned. Then the same with the bus unreachable (the error path)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli import main
from gateway.testing import NatsServer, free_port, post_inbound, wait_until

# form: (auth kind, [bus] lines given the port, environment given the port). Each form has
# its own secret, so a secret registered by an earlier form cannot hide a miss.
FORMS: dict[str, tuple[str, Any, Any]] = {
    "url-userinfo": ("password", lambda p, s: f'url = "nats://admin:{s}@127.0.0.1:{p}"', lambda p, s: {}),
    "bus-keys": ("password", lambda p, s: f'url = "nats://127.0.0.1:{p}"\nuser = "admin"\npassword = "{s}"', lambda p, s: {}),
    "env-url": ("password", lambda p, s: 'url = "${GW_TEST_BUS_URL}"',
                lambda p, s: {"GW_TEST_BUS_URL": f"nats://admin:{s}@127.0.0.1:{p}"}),
    "env-password": ("password", lambda p, s: f'url = "nats://127.0.0.1:{p}"\nuser = "admin"\npassword = "${{GW_TEST_BUS_PW}}"',
                     lambda p, s: {"GW_TEST_BUS_PW": s}),
    "GATEWAY_BUS_URL": ("password", lambda p, s: "", lambda p, s: {"GATEWAY_BUS_URL": f"nats://admin:{s}@127.0.0.1:{p}"}),
    "token-url": ("token", lambda p, s: f'url = "nats://{s}@127.0.0.1:{p}"', lambda p, s: {}),
    "token-key": ("token", lambda p, s: f'url = "nats://127.0.0.1:{p}"\ntoken = "{s}"', lambda p, s: {}),
}


def _write_config(path: Path, bus: str, http_port: int, connect_timeout: str = "3s") -> None:
    path.write_text(f'[bus]\n{bus}\nconnect_timeout = "{connect_timeout}"\n[http]\nport = {http_port}\n'
                    f'[outbound]\nbackoff = ["100ms"]\n[channels.demo]\ntype = "mock"\n')


@pytest.mark.parametrize("form", list(FORMS))
async def test_no_command_prints_the_bus_password_or_token(form, tmp_path, capsys, monkeypatch):
    kind, bus, environ = FORMS[form]
    # A URL that came from the environment is not printed at all, only where it came from.
    url_from_env = form in ("env-url", "GATEWAY_BUS_URL")
    secret = f"S3cret-{form}-x9"
    server = NatsServer(tmp_path / "nats", **({"user": "admin", "password": secret} if kind == "password" else {"token": secret}))
    await server.start()
    printed: list[str] = []  # everything any command wrote

    cfg = tmp_path / "gateway.toml"
    http_port = free_port()
    _write_config(cfg, bus(server.port, secret), http_port)
    env = environ(server.port, secret)
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    async def cli(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["-c", str(cfg), *args])
        out, err = capsys.readouterr()
        printed.extend([out, err])
        return code, out, err

    sub_env = {**os.environ, **env}
    run = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "run", "-c", str(cfg), env=sub_env,
                                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    tail = None
    try:
        async def healthy() -> bool:
            assert run.returncode is None, "gateway run exited"
            try:
                async with httpx.AsyncClient() as c:
                    return (await c.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2)).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(healthy, 60, 0.2)
        tail = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "tail", "-n", "1", "-c", str(cfg),
                                                    env=sub_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        banner = (await asyncio.wait_for(tail.stderr.readline(), 60)).decode()
        printed.append(banner)
        assert banner.startswith("tailing gw.> on " + ("the bus URL from the environment" if url_from_env else "nats://")), banner
        assert (await post_inbound(http_port, "demo", text="hello", sender="alice")).status_code == 200
        out, err = await asyncio.wait_for(tail.communicate(), 60)
        printed.extend([out.decode(), err.decode()])
        assert tail.returncode == 0 and "from=alice: 'hello'" in out.decode()

        code, out, _ = await cli("check-config")
        assert code == 0 and f"{cfg}: OK; channels: demo (mock); bus: " + ("from the environment" if url_from_env else "nats://") in out
        if "url" in form.lower() and not url_from_env:
            assert "nats://***@127.0.0.1" in out  # masked, not dropped
        assert (await cli("plugins"))[0] == 0
        assert (await cli("schema", "--out", str(tmp_path / "schemas")))[0] == 0
        # An unknown conversation is dead-lettered at once: something for dlq to show.
        code, out, _ = await cli("send", "--channel", "demo", "--conversation", "demo.unknown", "--text", "x", "--id", "o-1")
        assert code == 0 and "published outbound o-1" in out

        async def dead_letters() -> list[Any]:
            code, out, _ = await cli("dlq", "list", "--json")
            assert code == 0
            return json.loads(out)

        await wait_until(dead_letters, 30, 0.3)
        assert (await cli("dlq", "list", "--show-body"))[0] == 0
        code, out, _ = await cli("dlq", "replay", "--all")
        assert code == 0 and "replayed o-1" in out
        await wait_until(dead_letters, 30, 0.3)  # dead again: the conversation is still unknown
        code, out, _ = await cli("dlq", "purge", "--yes")
        assert code == 0 and "deleted 1 dead letter(s)" in out
    finally:
        for proc in (tail, run):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(run.communicate(), 60)
        printed.extend([out.decode(), err.decode()])
        await server.stop()
    assert run.returncode == 0, err.decode()
    assert "bus connected" in err.decode()

    # The error path: the same configuration, nobody listening (each command gives up
    # after connect_timeout).
    closed = free_port()
    _write_config(cfg, bus(closed, secret), http_port, connect_timeout="500ms")
    for k, v in environ(closed, secret).items():
        monkeypatch.setenv(k, v)
    for command in (["send", "--channel", "demo", "--conversation", "c", "--text", "t"], ["tail"], ["dlq", "list"]):
        code, _, err = await cli(*command)
        where = "the bus URL from the environment" if url_from_env else "the bus at nats://"
        assert code == 3 and f"cannot reach {where}" in err and "connection refused" in err, err

    everything = "".join(printed)
    assert secret not in everything
    assert "S3cret" not in everything  # not even part of it
