"""Fixtures for the QQ channel tests: a fake OneBot v11 implementation that connects to the
gateway by reverse WebSocket with the ``websockets`` library exactly as NapCat does (and
answers API calls by ``echo``), a local HTTP server speaking the QQ bot OpenAPI
(getAppAccessToken, group and C2C messages), and Ed25519-signed callbacks made with a
real key derived from the bot secret."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import secrets
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.testing import free_port, serve_asgi, stream_messages, wait_until
from gateway.wire import message_decoder

SELF_ID = "3889000001"
ACCESS_TOKEN = "onebot-test-token"
APP_ID = "102000111"
SECRET = "naOC0ocQE3shWLAfffVLB1rhYPG7"


# --- OneBot ----------------------------------------------------------------------------


class FakeOneBot:
    """A OneBot v11 implementation's side of a reverse WebSocket (Universal client).

    ``answer`` decides how API calls are answered: ``{"action": (status, retcode, data)}``
    scripts per action (a deque, consumed in order); unscripted sends succeed with a new
    ``message_id``. ``silent`` actions get no answer at all (an implementation that hangs)."""

    def __init__(self, url: str, self_id: str = SELF_ID, token: str | None = ACCESS_TOKEN):
        self.url = url
        self.self_id = self_id
        self.token = token
        self.ws: Any = None
        self.calls: list[dict[str, Any]] = []
        self.call_times: list[float] = []
        self.script: dict[str, deque[tuple[str, int, Any]]] = {}
        self.silent: set[str] = set()
        self._ids = itertools.count(9000)
        self._reader: asyncio.Task[None] | None = None

    def headers(self) -> dict[str, str]:
        h = {"X-Self-ID": self.self_id, "X-Client-Role": "Universal", "User-Agent": "NapCat/4 OneBot/11"}
        if self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    async def connect(self) -> None:
        self.ws = await websockets.connect(self.url, additional_headers=self.headers())
        self._reader = asyncio.create_task(self._read())
        await self.send({"time": int(time.time()), "self_id": int(self.self_id), "post_type": "meta_event",
                         "meta_event_type": "lifecycle", "sub_type": "connect"})

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    def fail_next(self, action: str, status: str = "failed", retcode: int = 100, data: Any = None) -> None:
        self.script.setdefault(action, deque()).append((status, retcode, data))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                call = json.loads(raw)
                self.calls.append(call)
                self.call_times.append(time.monotonic())
                action = call["action"]
                if action in self.silent:
                    continue
                if self.script.get(action):
                    status, retcode, data = self.script[action].popleft()
                elif action == "get_login_info":
                    status, retcode, data = "ok", 0, {"user_id": int(self.self_id), "nickname": "客服"}
                else:
                    status, retcode, data = "ok", 0, {"message_id": next(self._ids)}
                await self.ws.send(json.dumps({"status": status, "retcode": retcode, "data": data,
                                               "echo": call.get("echo")}))
        except websockets.ConnectionClosed:
            pass

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event, ensure_ascii=False))

    async def heartbeat(self, interval_ms: int = 5000) -> None:
        await self.send({"time": int(time.time()), "self_id": int(self.self_id), "post_type": "meta_event",
                         "meta_event_type": "heartbeat", "status": {"online": True, "good": True},
                         "interval": interval_ms})

    def sends(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["action"] in ("send_group_msg", "send_private_msg", "send_msg")]


class FakeOneBotServer(FakeOneBot):
    """The implementation's own WebSocket server (OneBot forward WebSocket, path ``/``),
    on 127.0.0.1: the gateway connects to it. ``accepted`` counts connections it took."""

    def __init__(self, self_id: str = SELF_ID, token: str = ACCESS_TOKEN):
        super().__init__("", self_id, token)
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/"
        self.accepted = 0
        self.connected = asyncio.Event()
        self.server: Any = None
        self.on_connect: list[dict[str, Any]] = []
        """Events sent as soon as a connection is taken (before any API answer)."""

    async def start(self) -> None:
        async def check(connection: Any, request: Any) -> Any:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return connection.respond(401, "token\n")
            return None

        async def handler(ws: Any) -> None:
            self.ws = ws
            self.accepted += 1
            for event in self.on_connect:
                await ws.send(json.dumps(event, ensure_ascii=False))
            self.connected.set()
            await self._read()

        self.server = await websockets.serve(handler, "127.0.0.1", self.port, process_request=check)

    async def drop(self) -> None:
        """Cut the current connection, as a restarting implementation does."""
        self.connected.clear()
        await self.ws.close(1001, "restarting")

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


class FakeOneBotHTTP:
    """The implementation's HTTP API (``POST /<action>``, Bearer token) on 127.0.0.1, and
    its HTTP POST of events to the gateway, signed with ``secret``."""

    def __init__(self, secret: str = "onebot-post-secret", token: str = ACCESS_TOKEN, self_id: str = SELF_ID):
        self.secret = secret
        self.token = token
        self.self_id = self_id
        self.calls: list[dict[str, Any]] = []
        self.script: deque[tuple[int, dict[str, Any]]] = deque()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ids = itertools.count(7000)
        self.app = Starlette(routes=[Route("/{action}", self.api, methods=["POST"])])

    def fail_next(self, http_status: int, body: dict[str, Any] | None = None) -> None:
        self.script.append((http_status, body or {}))

    async def api(self, request: Request) -> Response:
        auth = request.headers.get("authorization")
        if auth is None:
            return Response(status_code=401)
        if auth != f"Bearer {self.token}":
            return Response(status_code=403)
        if self.script:
            status, body = self.script.popleft()
            return JSONResponse(body, status_code=status)
        params = json.loads(await request.body())
        self.calls.append({"action": request.path_params["action"], "params": params})
        return JSONResponse({"status": "ok", "retcode": 0, "data": {"message_id": next(self._ids)}})

    async def post_event(self, gateway_port: int, event: dict[str, Any], *, secret: str | None = None,
                         channel: str = "qq", signed: bool = True) -> httpx.Response:
        body = json.dumps(event, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "X-Self-ID": self.self_id}
        if signed:
            mac = hmac.new((secret or self.secret).encode(), body, "sha1").hexdigest()
            headers["X-Signature"] = f"sha1={mac}"
        async with httpx.AsyncClient(timeout=10) as c:
            return await c.post(f"http://127.0.0.1:{gateway_port}/channels/{channel}/onebot", content=body,
                                headers=headers)


@pytest.fixture
async def onebot_http() -> Any:
    """The fake OneBot HTTP API, listening on a free port for this test."""
    fake = FakeOneBotHTTP()
    async with serve_asgi(fake.app, fake.port):
        yield fake


@pytest.fixture
async def onebot_server() -> Any:
    """A fake implementation's forward WebSocket server on a free port."""
    fake = FakeOneBotServer()
    await fake.start()
    yield fake
    await fake.stop()


def group_message(message: Any, message_id: int = 1001, group_id: int = 123456789, user_id: int = 10001,
                  self_id: str = SELF_ID, **extra: Any) -> dict[str, Any]:
    """A OneBot v11 group message event (numbers as JSON numbers, as implementations send them)."""
    raw = message if isinstance(message, str) else ""
    return {"time": int(time.time()), "self_id": int(self_id), "post_type": "message", "message_type": "group",
            "sub_type": "normal", "message_id": message_id, "group_id": group_id, "user_id": user_id,
            "anonymous": None, "message": message, "raw_message": raw, "font": 0,
            "sender": {"user_id": user_id, "nickname": "小明", "card": "客户小明", "role": "member"}, **extra}


def private_message(message: Any, message_id: int = 2001, user_id: int = 10002, self_id: str = SELF_ID) -> dict[str, Any]:
    return {"time": int(time.time()), "self_id": int(self_id), "post_type": "message", "message_type": "private",
            "sub_type": "friend", "message_id": message_id, "user_id": user_id, "message": message,
            "raw_message": message if isinstance(message, str) else "", "font": 0,
            "sender": {"user_id": user_id, "nickname": "小红"}}


def onebot_config(**overrides: Any) -> dict[str, Any]:
    onebot: dict[str, Any] = {"access_token": ACCESS_TOKEN, "group_interval": "0s"}
    onebot.update(overrides)
    return {"type": "qq", "onebot": onebot}


def ws_url(port: int, channel: str = "qq") -> str:
    return f"ws://127.0.0.1:{port}/channels/{channel}/onebot"


async def inbound(url: str, channel: str = "qq") -> list[Any]:
    """Every message on GW_IN for the channel, decoded."""
    return [message_decoder.decode(m.data) for m in await stream_messages(url, "GW_IN", f"gw.in.qq.{channel}")]


async def published(url: str, n: int, channel: str = "qq", timeout: float = 10) -> list[Any]:
    """Wait until ``n`` messages are on the channel's inbound subject; return them."""
    found: list[Any] = []

    async def enough() -> bool:
        found[:] = await inbound(url, channel)
        return len(found) >= n

    await wait_until(enough, timeout=timeout)
    return found


async def metric(port: int, name: str, **labels: str) -> float:
    """A sample of the gateway's /metrics (0 when absent)."""
    async with httpx.AsyncClient(timeout=10) as c:
        text = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- official bot ----------------------------------------------------------------------


def bot_key(secret: str = SECRET) -> Ed25519PrivateKey:
    """The platform's key for ``secret``: the secret repeated to a 32-byte seed (sign.md)."""
    seed = (secret * (32 // len(secret) + 1)).encode()[:32]
    return Ed25519PrivateKey.from_private_bytes(seed)


def signed_headers(body: bytes, secret: str = SECRET, timestamp: str | None = None) -> dict[str, str]:
    """The headers the platform sends with a callback, signed with the bot's key."""
    ts = timestamp or str(int(time.time()))
    sig = bot_key(secret).sign(ts.encode() + body).hex()
    return {"X-Signature-Ed25519": sig, "X-Signature-Timestamp": ts, "X-Bot-Appid": APP_ID,
            "User-Agent": "QQBot-Callback", "Content-Type": "application/json"}


def rfc3339_now() -> str:
    """Now as the platform writes ``timestamp`` (RFC 3339, Beijing time)."""
    return datetime.now(timezone(timedelta(hours=8))).isoformat(timespec="seconds")


def group_at(msg_id: str = "ROBOT1.0_group_1", content: str = " 你好", group: str = "C9F778FE6ADF9D1D1DBE395BF744A33A",
             member: str = "E4F4AEA33253A2797FB897C50B81D7ED", event_id: str | None = None, **extra: Any) -> bytes:
    d = {"author": {"member_openid": member}, "content": content, "group_openid": group, "id": msg_id,
         "timestamp": rfc3339_now(), **extra}
    return json.dumps({"op": 0, "id": event_id or f"GROUP_AT_MESSAGE_CREATE:{secrets.token_hex(8)}", "d": d,
                       "t": "GROUP_AT_MESSAGE_CREATE"}, ensure_ascii=False).encode()


def c2c(msg_id: str = "ROBOT1.0_c2c_1", content: str = "123", user: str = "E4F4AEA33253A2797FB897C50B81D7ED",
        **extra: Any) -> bytes:
    d = {"author": {"user_openid": user}, "content": content, "id": msg_id,
         "timestamp": rfc3339_now(), **extra}
    return json.dumps({"op": 0, "id": f"C2C_MESSAGE_CREATE:{secrets.token_hex(8)}", "d": d,
                       "t": "C2C_MESSAGE_CREATE"}, ensure_ascii=False).encode()


async def callback(port: int, body: bytes, headers: dict[str, str] | None = None, channel: str = "qq") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        return await c.post(f"/channels/{channel}/webhook", content=body,
                            headers=signed_headers(body) if headers is None else headers)


class FakeQQBot:
    """The documented JSON of bots.qq.com/app/getAppAccessToken and api.sgroup.qq.com's
    /v2/groups/{group_openid}/messages and /v2/users/{openid}/messages on 127.0.0.1.
    Errors come as ``{"code", "message"}`` in the body (with HTTP 200 unless scripted)."""

    def __init__(self, app_id: str = APP_ID, secret: str = SECRET):
        self.app_id = app_id
        self.secret = secret
        self.valid: set[str] = set()
        self.tokens_issued = 0
        self.messages: list[dict[str, Any]] = []
        self.script: dict[str, deque[tuple[int, int]]] = {"messages": deque(), "files": deque()}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = Starlette(routes=[
            Route("/app/getAppAccessToken", self.token, methods=["POST"]),
            Route("/v2/groups/{target}/messages", self.send, methods=["POST"]),
            Route("/v2/users/{target}/messages", self.send, methods=["POST"]),
            Route("/v2/groups/{target}/files", self.upload, methods=["POST"]),
            Route("/v2/users/{target}/files", self.upload, methods=["POST"]),
        ])
        self.uploads: list[dict[str, Any]] = []
        self.lose_answers = 0
        self.file_infos: set[str] = set()

    def fail_next(self, code: int, http_status: int = 200, endpoint: str = "messages") -> None:
        """The next call of ``endpoint`` (``messages`` or ``files``) answers ``code``."""
        self.script[endpoint].append((code, http_status))

    def _scripted(self, endpoint: str) -> Response | None:
        if self.script[endpoint]:
            code, status = self.script[endpoint].popleft()
            return JSONResponse({"code": code, "message": "scripted", "trace_id": "t"}, status_code=status)
        return None

    def expire_tokens(self) -> None:
        self.valid.clear()

    async def token(self, request: Request) -> Response:
        body = json.loads(await request.body())
        if body.get("appId") != self.app_id or body.get("clientSecret") != self.secret:
            return JSONResponse({"code": 100016, "message": "invalid appid or secret"})
        self.tokens_issued += 1
        token = f"TOKEN_{self.tokens_issued}_{secrets.token_hex(6)}"
        self.valid.add(token)
        return JSONResponse({"access_token": token, "expires_in": "7200"})

    async def upload(self, request: Request) -> Response:
        if (refused := self._auth(request)) is not None:
            return refused
        if (scripted := self._scripted("files")) is not None:
            return scripted
        body = json.loads(await request.body())
        if body.get("file_type") not in (1, 2, 3) or not str(body.get("url", "")).startswith("http"):
            return JSONResponse({"code": 40034001, "message": "bad file_type or url"})
        if body.get("srv_send_msg") is not False:
            return JSONResponse({"code": 40034002, "message": "this fake only stores media"})
        info = f"FILEINFO_{len(self.uploads)}_{secrets.token_hex(4)}"
        self.file_infos.add(info)
        self.uploads.append({"path": request.url.path, "body": body})
        return JSONResponse({"file_uuid": secrets.token_hex(8), "file_info": info, "ttl": 3600})

    def _auth(self, request: Request) -> Response | None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("QQBot ") or auth[6:] not in self.valid:
            return JSONResponse({"code": 11243, "message": "token not pass"}, status_code=401)
        if request.headers.get("x-union-appid") != self.app_id:
            return JSONResponse({"code": 11251, "message": "wrong appid"})
        return None

    async def send(self, request: Request) -> Response:
        if (refused := self._auth(request)) is not None:
            return refused
        if (scripted := self._scripted("messages")) is not None:
            return scripted
        body = json.loads(await request.body())
        if body.get("msg_type") == 7 and (body.get("media") or {}).get("file_info") not in self.file_infos:
            return JSONResponse({"code": 50035, "message": "invalid media"})
        seen = {(m["body"].get("msg_id"), m["body"].get("msg_seq")) for m in self.messages}
        if body.get("msg_id") and (body.get("msg_id"), body.get("msg_seq")) in seen:
            return JSONResponse({"code": 40054005, "message": "msg_seq duplicated"})
        self.messages.append({"path": request.url.path, "body": body})
        if self.lose_answers:
            # Sent, but the answer never reaches the gateway (a timeout, a crash, a proxy).
            self.lose_answers -= 1
            return Response(status_code=504)
        return JSONResponse({"id": f"SENT_{len(self.messages)}", "timestamp": int(time.time())})


@pytest.fixture
async def fake_qqbot() -> Any:
    """The fake QQ bot OpenAPI, listening on a free port for this test."""
    fake = FakeQQBot()
    async with serve_asgi(fake.app, fake.port):
        yield fake


def official_config(fake: FakeQQBot | None = None, **overrides: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"app_id": APP_ID, "secret": SECRET,
                               "api_base": fake.url if fake else "http://127.0.0.1:9",
                               "token_url": f"{fake.url}/app/getAppAccessToken" if fake else "http://127.0.0.1:9/t"}
    section.update(overrides)
    return {"type": "qq", "official": section}
