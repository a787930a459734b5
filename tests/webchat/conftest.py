"""Helpers of the web chat tests: a visitor speaking the widget's WebSocket protocol with the
websockets library (what widget.js does, frame for frame), and bus helpers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import websockets.asyncio.client
import websockets.exceptions

from gateway import Outbound, Subjects, TextPart
from gateway.testing import stream_messages
from gateway.wire import encode, message_decoder

SECRET = "test-secret-0123456789abcdef"
USER_SECRET = "site-user-secret-9876543210"


def webchat(**keys: Any) -> dict[str, Any]:
    """A ``[channels.web]`` section."""
    return {"type": "webchat", "secret": SECRET, **keys}


class Visitor:
    """One widget socket: ``welcome`` and ``history`` are read on connect; ``frames`` collects
    what arrives afterwards."""

    def __init__(self, ws: Any, welcome: dict[str, Any], history: list[dict[str, Any]]) -> None:
        self.ws, self.welcome, self.history = ws, welcome, history
        self.frames: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, port: int, query: str = "", channel: str = "web", **kwargs: Any) -> Visitor:
        ws = await websockets.asyncio.client.connect(f"ws://127.0.0.1:{port}/channels/{channel}/ws{query}",
                                                     open_timeout=5, close_timeout=2, **kwargs)
        try:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
        except websockets.exceptions.ConnectionClosed as exc:
            # A refused token: closed at once, the reason says why.
            assert exc.rcvd is not None, exc
            return cls(ws, {"type": "closed", "code": exc.rcvd.code, "message": exc.rcvd.reason}, [])
        history = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert welcome["type"] == "welcome" and history["type"] == "history", (welcome, history)
        return cls(ws, welcome, history["messages"])

    @property
    def token(self) -> str:
        return self.welcome["token"]

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def next(self, kind: str | None = None, timeout: float = 5) -> dict[str, Any]:
        """The next frame (of ``kind``), skipping others (kept in ``frames``)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await self.ws.recv())
                self.frames.append(frame)
                if kind is None or frame["type"] == kind:
                    return frame

    async def say(self, text: str, cid: str) -> dict[str, Any]:
        """Send a text; the server's answer to it (``ack`` or ``error``)."""
        await self.send({"type": "message", "id": cid, "text": text})
        async with asyncio.timeout(5):
            while True:
                frame = await self.next()
                if frame["type"] in ("ack", "error") and frame.get("id") == cid:
                    return frame

    async def close(self) -> None:
        await self.ws.close()


async def inbound(url: str, channel: str = "web") -> list[Any]:
    """Every message the channel published, decoded."""
    s = Subjects()
    return [message_decoder.decode(m.data) for m in await stream_messages(url, s.stream_in, s.inbound("webchat", channel))]


async def reply(url: str, conversation: str, outbound_id: str, text: str = "", channel: str = "web",
                **fields: Any) -> None:
    """Publish an outbound as a backend does."""
    fields.setdefault("parts", [TextPart(text=text)] if text else [])
    out = Outbound(id=outbound_id, conversation=conversation, **fields)
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(Subjects().outbound("webchat", channel), encode(out),
                                     headers={"Nats-Msg-Id": outbound_id})
    finally:
        await nc.close()


async def refused(port: int, query: str = "", **kwargs: Any) -> int:
    """The HTTP status of a refused handshake."""
    try:
        async with websockets.asyncio.client.connect(f"ws://127.0.0.1:{port}/channels/web/ws{query}",
                                                     open_timeout=5, **kwargs):
            pass
    except websockets.exceptions.InvalidStatus as exc:
        return exc.response.status_code
    raise AssertionError("the handshake was accepted")


CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags chromium keeps calling home on a closed network.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, driven by Playwright (one per test module)."""
    if not Path(CHROMIUM).exists():
        pytest.fail("these tests need Debian's chromium at /usr/bin/chromium (.ci/run installs it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the browser tests' screenshots go: under pytest's temporary directory, never in
    the tree (``--basetemp DIR`` to keep them somewhere known)."""
    return tmp_path_factory.mktemp("webchat-screenshots")
