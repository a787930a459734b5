"""The README runs as pasted: every fenced block is taken from README.md and run against a
real `gateway run`, and what the README says each command shows is checked.

Deviations from pasting, and why: the work happens in a temporary folder that looks like
the checkout (``.venv``, ``examples`` and ``gateway.example.toml`` are links or copies);
the ports 8080 and 4222 become free ones, because this machine is shared (only the port
numbers change, in the example file, the commands and the snippet); the install part of
the first command is not repeated (this test runs in that venv); ``bash .ci/run`` is
not run (it runs this suite)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import httpx
import pytest
import websockets.asyncio.client

from gateway.testing import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README.read_text(), re.M | re.S)]


def test_every_readme_block_is_covered_by_this_test():
    kinds = [_kind(lang, code) for lang, code in readme_blocks()]
    assert kinds == ["install-and-run", "ci", "tour", "backend"], kinds


def _kind(lang: str, code: str) -> str:
    if lang == "sh" and "pip install" in code and "gateway run" in code:
        return "install-and-run"
    if lang == "sh" and code.strip() == "bash .ci/run":
        return "ci"
    if lang == "sh" and "gateway tail" in code:
        return "tour"
    if lang == "python" and "gateway.client" in code:
        return "backend"
    return f"unknown {lang} block: {code[:60]!r}"


def _block(kind: str) -> str:
    [code] = [code for lang, code in readme_blocks() if _kind(lang, code) == kind]
    return code


class Folder:
    """A temporary folder laid out like the checkout, with its own ports, where commands
    run through bash with the venv activated, as the README says."""

    def __init__(self, path: Path):
        self.path = path
        self.http_port = free_port()
        self.nats_port = free_port()
        (path / ".venv").symlink_to(sys.prefix)
        (path / "examples").symlink_to(ROOT / "examples")
        example = (ROOT / "gateway.example.toml").read_text()
        assert "\nport = 8080" in example and "\nembedded_port = 4222" in example
        example = example.replace("\nport = 8080", f"\nport = {self.http_port}")
        example = example.replace("\nembedded_port = 4222", f"\nembedded_port = {self.nats_port}")
        (path / "gateway.example.toml").write_text(example)
        self.procs: list[asyncio.subprocess.Process] = []

    def localize(self, text: str) -> str:
        return text.replace("localhost:8080", f"localhost:{self.http_port}").replace(
            "127.0.0.1:8080", f"127.0.0.1:{self.http_port}").replace("127.0.0.1:4222", f"127.0.0.1:{self.nats_port}")

    async def start(self, command: str, activate: bool = True) -> asyncio.subprocess.Process:
        script = (". .venv/bin/activate && " if activate else "") + self.localize(command)
        env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_CONFIG", "GATEWAY_BUS_URL", "GATEWAY_HTTP_PORT",
                                                                 "GATEWAY_BUS_PORT", "VIRTUAL_ENV")}
        # Its own process group, signalled as a whole: what Ctrl-C in a terminal does.
        proc = await asyncio.create_subprocess_exec("bash", "-c", script, cwd=self.path, env=env, start_new_session=True,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.procs.append(proc)
        return proc

    async def run(self, command: str) -> str:
        proc = await self.start(command)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (command, out, err)
        return out.decode()

    @staticmethod
    def signal(proc: asyncio.subprocess.Process, sig: int) -> None:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass


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


@pytest.fixture
async def folder(tmp_path):
    f = Folder(tmp_path)
    yield f
    for proc in reversed(f.procs):
        if proc.returncode is None:
            f.signal(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                f.signal(proc, signal.SIGKILL)


def _commands(block: str) -> list[str]:
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


async def test_readme_run_tour_and_backend_work_as_written(folder):
    # --- Run it: the first command, without its install part ------------------------
    first = _block("install-and-run").strip().split(" && ")
    assert first[0] == "python3 -m venv .venv" and first[1].startswith(".venv/bin/pip install -c requirements.lock -e .")
    gateway = await folder.start(" && ".join(first[2:]), activate=False)
    log = Lines(gateway.stderr)
    await log.wait_for("http listening")
    await log.wait_for("channel started", "channel=demo")
    assert (folder.path / "data" / "nats").is_dir()  # "data in ./data/nats"

    # --- A five-minute tour ---------------------------------------------------------
    tour = _block("tour")
    commands = _commands(tour)
    done: list[str] = []

    def command(prefix: str) -> str:
        [cmd] = [c for c in commands if c.startswith(prefix)]
        done.append(cmd)
        return cmd

    # 1. watch the bus
    tail_proc = await folder.start(command("gateway tail"))
    tail = Lines(tail_proc.stdout)
    banner = (await asyncio.wait_for(tail_proc.stderr.readline(), 60)).decode()
    assert banner.startswith("tailing gw.> on "), banner

    # 2. play a customer; the comment says what tail shows
    curl = command("curl -s localhost:8080/channels/demo/inbound")
    first_answer = await folder.run(curl)
    assert '"duplicate": false' in first_answer
    shown = re.search(r"#\s+tail shows: (.*)", tour).group(1)
    head, _, rest = shown.partition("…")  # the README abbreviates the message id
    at = await tail.wait_for(head, rest)
    conversation = re.search(r"conv=(\S+)", shown).group(1)
    # "send the same id again: {"duplicate": true}, nothing new on the bus"
    assert '{"duplicate": true}' in tour
    assert '"duplicate": true' in await folder.run(curl)

    # 3. answer as a backend would, with the conversation key tail printed
    send = command("gateway send")
    assert f"--conversation {conversation} " in send
    sent = await folder.run(send)
    outbound_id = re.search(r"published outbound (\S+)", sent).group(1)
    text = shlex.split(send)[shlex.split(send).index("--text") + 1]
    # "tail shows the outbound, then status accepted, then status sent"
    out_at = await tail.wait_for("gw.out.mock.demo  outbound", outbound_id, repr(text), after=at + 1)
    accepted_at = await tail.wait_for("status accepted", f"outbound={outbound_id}", after=out_at + 1)
    await tail.wait_for("status sent", f"outbound={outbound_id}", after=accepted_at + 1)
    # ... and by now the duplicate would have shown: "nothing new on the bus"
    assert sum("gw.in.mock.demo" in ln for ln in tail.lines) == 1, "\n".join(tail.lines)

    # 4. the example backend acknowledges every message automatically
    # As pasted: no URL, the example reads the folder's gateway.toml (its port is a free one).
    echo_proc = await folder.start(command("python examples/echo_backend.py"))
    echo = Lines(echo_proc.stdout)
    await echo.wait_for("answered", f"in {conversation}")
    ack_at = await tail.wait_for("gw.out.mock.demo  outbound ack-", "We received your message")
    await tail.wait_for("status sent", "outbound=ack-", after=ack_at)
    folder.signal(echo_proc, signal.SIGTERM)

    # 5. health and metrics
    health = await folder.run(command("curl -s localhost:8080/healthz"))
    assert '"status": "ok"' in health and '"demo"' in health
    metrics = (await folder.run(command("curl -s localhost:8080/metrics | grep ^gateway_"))).splitlines()
    assert metrics and all(ln.startswith("gateway_") for ln in metrics)
    assert sorted(done) == sorted(commands), "a tour command was not run"

    # 6. the web chat demo page: served, and a visitor's message and the reply go as the
    # comments say (the visitor speaks the widget's WebSocket protocol, as widget.js does)
    demo = re.search(r"# 6\. .*open (http://\S+/channels/(\w+)/demo)", tour)
    assert demo, "tour step 6 names no demo page"
    url, name = folder.localize(demo.group(1)), demo.group(2)
    async with httpx.AsyncClient() as http:
        page = await http.get(url)
    assert page.status_code == 200 and 'src="widget.js"' in page.text, page.text[:300]
    assert f"gw.in.webchat.{name}" in tour and f"gateway send --channel {name}" in tour
    async with websockets.asyncio.client.connect(url.replace("http://", "ws://").replace("/demo", "/ws")) as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        assert json.loads(await ws.recv())["type"] == "history"
        await ws.send(json.dumps({"type": "message", "id": "tour-1", "text": "Hello from the website"}))
        web_at = await tail.wait_for(f"gw.in.webchat.{name}  message", "'Hello from the website'")
        web_conv = re.search(r"conv=(\S+)", tail.lines[web_at]).group(1)
        await folder.run(f"gateway send --channel {name} --conversation {web_conv} --text 'Hi, how can we help?'")
        async with asyncio.timeout(30):
            while (frame := json.loads(await ws.recv()))["type"] != "message" or frame["message"]["by"] != "agent":
                pass
        assert frame["message"]["text"] == "Hi, how can we help?"

    # --- Write a backend: the snippet as pasted, saved as backend.py -----------------
    snippet = _block("backend")
    assert "4222" not in snippet and "Client.from_config()" in snippet  # the bus of gateway.toml, not a fixed port
    (folder.path / "backend.py").write_text(snippet)
    backend = await folder.start("python backend.py")
    reply_at = await tail.wait_for("gw.out.mock.demo  outbound", "'Thanks, we are on it.'")
    reply_id = re.search(r"outbound (\S+)", tail.lines[reply_at]).group(1)
    accepted_at = await tail.wait_for("status accepted", f"outbound={reply_id}", after=reply_at + 1)
    await tail.wait_for("status sent", f"outbound={reply_id}", after=accepted_at + 1)
    assert backend.returncode is None, await backend.stderr.read()

    # "Ctrl-C drains and stops"
    folder.signal(gateway, signal.SIGINT)
    assert await asyncio.wait_for(gateway.wait(), 60) == 0
    await log.task
    assert any("stopped" in ln for ln in log.lines)
