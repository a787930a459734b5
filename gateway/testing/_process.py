"""Run ``gateway run`` in a subprocess with its own folder, ports and embedded bus: for
tests that send signals (SIGTERM, SIGHUP, SIGKILL) to a real gateway process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from . import free_port  # bound before this module is imported


class GatewayProcess:
    """`gateway run` in a subprocess with its own folder, ports and embedded bus (JSON
    logs in ``<dir>/gateway.log``; ``write()`` rewrites the config, SIGHUP applies it).
    ``bus_url`` (a :class:`NatsCluster`'s ``url``, say) uses that bus instead of an embedded
    one; ``bus`` is more TOML for the ``[bus]`` section (``replicas = 3``)."""

    def __init__(self, tmp_path: Path, channels: str = '[channels.demo]\ntype = "mock"\n', extra: str = "",
                 env: dict[str, str] | None = None, *, bus_url: str = "", bus: str = ""):
        self.dir = tmp_path
        self.external_bus_url = bus_url
        self.bus_extra = bus
        self.http_port = free_port()
        self.nats_port = free_port()
        self.config = tmp_path / "gateway.toml"
        self.write(channels, extra)
        self.log_path = tmp_path / "gateway.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, channels: str, extra: str = "") -> None:
        self.config.write_text(textwrap.dedent(f"""
            [bus]
            data_dir = "{self.dir / 'nats'}"
            embedded_port = {self.nats_port}
            url = "{self.external_bus_url}"
            {self.bus_extra}
            [http]
            port = {self.http_port}
            [log]
            format = "json"
            [outbound]
            ack_wait = "2s"
            lease = "3s"
            backoff = ["100ms"]
            """) + extra + "\n" + channels)

    @property
    def bus_url(self) -> str:
        return self.external_bus_url or f"nats://127.0.0.1:{self.nats_port}"

    def start(self) -> None:
        # The child gets its own descriptor; ours is closed at once (a file left open
        # here would be reported unclosed in whatever test runs when it is collected).
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "-c", str(self.config), "run"],
                                         stdout=log, stderr=log, env=self.env, cwd=self.dir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.logs()
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("gateway did not become healthy:\n" + self.logs())

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)
