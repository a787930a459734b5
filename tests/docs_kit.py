"""What the tests that run documentation share (tests/test_readme.py runs README.md,
tests/test_writing_plugins.py runs docs/writing-plugins.md): the fenced blocks of a
Markdown file, a shell that runs commands as a reader pastes them, a process's output
lines collected in the background, and a virtualenv of its own for a plugin package."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from gateway.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of a Markdown file, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", path.read_text(), re.M | re.S)]


class Shell:
    """Runs commands through bash in ``path``, each in its own process group (signalled
    as a whole: what Ctrl-C in a terminal does); :meth:`close` ends what is still running.
    ``prelude`` is prepended to every command (activating a venv, say)."""

    def __init__(self, path: Path, *, prelude: str = "", env: dict[str, str] | None = None):
        self.path = path
        self.prelude = prelude
        self.env = env if env is not None else {
            k: v for k, v in os.environ.items()
            if k not in ("GATEWAY_CONFIG", "GATEWAY_BUS_URL", "GATEWAY_HTTP_PORT", "GATEWAY_BUS_PORT", "VIRTUAL_ENV")}
        self.procs: list[asyncio.subprocess.Process] = []

    def localize(self, text: str) -> str:
        """The command as this machine runs it (a subclass changes ports, say)."""
        return text

    async def start(self, command: str, *, prelude: bool = True, cwd: Path | None = None) -> asyncio.subprocess.Process:
        script = (self.prelude if prelude else "") + self.localize(command)
        proc = await asyncio.create_subprocess_exec("bash", "-c", script, cwd=cwd or self.path, env=self.env,
                                                    start_new_session=True, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        self.procs.append(proc)
        return proc

    async def run(self, command: str, *, timeout: float = 60, cwd: Path | None = None) -> str:
        """Run to the end; its stdout. A non-zero exit fails with both outputs."""
        proc = await self.start(command, cwd=cwd)
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode == 0, (command, out.decode(), err.decode())
        return out.decode()

    @staticmethod
    def signal(proc: asyncio.subprocess.Process, sig: int) -> None:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    async def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                self.signal(proc, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except asyncio.TimeoutError:
                    self.signal(proc, signal.SIGKILL)


class Lines:
    """Collects a process's output lines in the background."""

    def __init__(self, stream: asyncio.StreamReader):
        self.lines: list[str] = []
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode().rstrip("\n"))

    async def wait_for(self, *needles: str, after: int = 0, timeout: float = 60) -> int:
        """Index of the first line from ``after`` on that contains every needle."""
        found: list[int] = []

        def check() -> bool:
            found[:] = [i for i, ln in enumerate(self.lines) if i >= after and all(n in ln for n in needles)]
            return bool(found)

        try:
            await wait_until(check, timeout, 0.1)
        except AssertionError:
            raise AssertionError(f"no line with {needles} after line {after}:\n" + "\n".join(self.lines)) from None
        return found[0]


class PluginVenv:
    """A virtualenv of its own for a plugin package, on top of the test venv's packages (a
    ``.pth`` line adds that site folder), so installing the plugin leaves the test venv as
    it was. The gateway is linked into it as a regular package folder: mypy reads it there
    as it reads any installed package, trusting its types only with a ``py.typed``.

    ``bin`` has ``python`` and, as an activated venv would, ``pip``, ``gateway``,
    ``pytest`` and ``mypy`` (running the venv's python), and the test venv's
    ``nats-server`` is on ``PATH``."""

    def __init__(self, path: Path):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
        self.bin = path / "bin"
        self.python = str(self.bin / "python")
        site = Path(subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        (site / "_test_venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
        (site / "gateway").symlink_to(ROOT / "gateway", target_is_directory=True)
        for tool in ("pip", "gateway", "pytest", "mypy"):
            script = self.bin / tool
            script.write_text(f'#!/bin/sh\nexec "{self.python}" -m {tool} "$@"\n')
            script.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                          f"{os.environ.get('PATH', '')}"}
        for name in ("VIRTUAL_ENV", "PYTHONPATH", "GATEWAY_CONFIG", "GATEWAY_BUS_URL", "GATEWAY_HTTP_PORT",
                     "GATEWAY_BUS_PORT", "GATEWAY_LOAD_PLUGINS"):
            self.env.pop(name, None)

    def run(self, args: list[str], cwd: Path, timeout: float = 300) -> str:
        """Run a command with this venv first on PATH; its stdout (a failure shows both outputs)."""
        r = subprocess.run(args, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r.stdout
