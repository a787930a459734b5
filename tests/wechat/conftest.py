"""Fixtures for the WeChat channel tests: a local HTTP server that speaks the WeChat API
(token, customer-service send, template send, temporary media) on a real socket, and
helpers that build WeChat's signed and encrypted callbacks."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import itertools
import json
import secrets
import time
from collections import defaultdict, deque
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.wire import message_decoder
from gateway.testing import free_port, serve_asgi, stream_messages
from gateway_plugins.wechat._crypto import MessageCrypto, signature

APPID = "wx2c2769f8efd9abc2"
SECRET = "test-app-secret"
TOKEN = "spamtest"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
ACCOUNT = "gh_10f6c3c3ac5a"


class FakeWeChat:
    """The documented JSON of api.weixin.qq.com, on 127.0.0.1. ``fail_next`` scripts
    errcodes per endpoint; ``expire_tokens`` makes every issued token answer 42001."""

    def __init__(self, appid: str = APPID, secret: str = SECRET):
        self.appid = appid
        self.secret = secret
        self.expires_in = 7200
        self.valid: set[str] = set()
        self.expired: set[str] = set()
        self.tokens_issued = 0
        self.custom: list[dict[str, Any]] = []
        self.templates: list[dict[str, Any]] = []
        self.subscriptions: list[dict[str, Any]] = []
        self.custom_msgid = True
        """Answer customer-service sends with a ``msgid`` (a JSON number, as WeChat's
        answers carry it; its documentation shows only errcode and errmsg)."""
        self.consented: set[str] = set()
        """openids that accepted subscription notifications (others get 43101)."""
        self.uploads: list[dict[str, Any]] = []
        self.media: dict[str, tuple[bytes, str]] = {}
        self.downloads = 0
        self.download_delay = 0.0
        self.token_delay = 0.0
        self.script: dict[str, deque[tuple[int, str]]] = defaultdict(deque)
        self._ids = itertools.count(1)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = Starlette(routes=[
            Route("/cgi-bin/token", self.token, methods=["GET"]),
            Route("/cgi-bin/message/custom/send", self.custom_send, methods=["POST"]),
            Route("/cgi-bin/message/template/send", self.template_send, methods=["POST"]),
            Route("/cgi-bin/message/subscribe/bizsend", self.subscription_send, methods=["POST"]),
            Route("/cgi-bin/media/upload", self.media_upload, methods=["POST"]),
            Route("/cgi-bin/media/get", self.media_get, methods=["GET"]),
            Route("/videos/{media_id}", self.video_file, methods=["GET"]),
        ])

    # --- scripting -----------------------------------------------------------------

    def fail_next(self, endpoint: str, errcode: int, errmsg: str = "scripted", count: int = 1) -> None:
        """The next ``count`` calls of ``endpoint`` ("custom", "template", "upload",
        "token", "get") answer ``errcode``."""
        for _ in range(count):
            self.script[endpoint].append((errcode, errmsg))

    def expire_tokens(self) -> None:
        """Every token issued so far now answers 42001 (access_token expired)."""
        self.expired |= self.valid
        self.valid.clear()

    def add_media(self, data: bytes, content_type: str) -> str:
        media_id = f"MEDIA_{next(self._ids)}_{secrets.token_hex(8)}"
        self.media[media_id] = (data, content_type)
        return media_id

    # --- endpoints -----------------------------------------------------------------

    def _scripted(self, endpoint: str) -> Response | None:
        if self.script[endpoint]:
            code, msg = self.script[endpoint].popleft()
            if code != 0:  # 0: answer this call normally (lets a script fail the 2nd call)
                return JSONResponse({"errcode": code, "errmsg": msg})
        return None

    def _check_token(self, request: Request) -> Response | None:
        token = request.query_params.get("access_token")
        if not token:
            return JSONResponse({"errcode": 41001, "errmsg": "access_token missing"})
        if token in self.expired:
            return JSONResponse({"errcode": 42001, "errmsg": "access_token expired"})
        if token not in self.valid:
            return JSONResponse({"errcode": 40001, "errmsg": "invalid credential, access_token is invalid or not latest"})
        return None

    async def token(self, request: Request) -> Response:
        q = request.query_params
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        if (r := self._scripted("token")) is not None:
            return r
        if q.get("grant_type") != "client_credential":
            return JSONResponse({"errcode": 40002, "errmsg": "invalid grant_type"})
        if q.get("appid") != self.appid:
            return JSONResponse({"errcode": 40013, "errmsg": "invalid appid"})
        if q.get("secret") != self.secret:
            return JSONResponse({"errcode": 40125, "errmsg": "invalid appsecret"})
        self.tokens_issued += 1
        token = f"ACCESS_TOKEN_{self.tokens_issued}_{secrets.token_hex(8)}"
        self.valid.add(token)
        return JSONResponse({"access_token": token, "expires_in": self.expires_in})

    async def custom_send(self, request: Request) -> Response:
        if (r := self._check_token(request)) is not None:
            return r
        if (r := self._scripted("custom")) is not None:
            return r
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"errcode": 47001, "errmsg": "data format error"})
        msgtype = body.get("msgtype")
        if not body.get("touser"):
            return JSONResponse({"errcode": 40003, "errmsg": "invalid openid"})
        if msgtype not in ("text", "image", "voice", "video", "music", "news", "mpnews", "mpnewsarticle", "msgmenu",
                           "wxcard", "miniprogrampage") or not isinstance(body.get(msgtype), dict):
            return JSONResponse({"errcode": 40008, "errmsg": "invalid message type"})
        if msgtype in ("image", "voice", "video") and body[msgtype].get("media_id") not in self.media:
            return JSONResponse({"errcode": 40007, "errmsg": "invalid media_id"})
        self.custom.append(body)
        if self.custom_msgid:
            return JSONResponse({"errcode": 0, "errmsg": "ok", "msgid": 6918340117829758977 + len(self.custom)})
        return JSONResponse({"errcode": 0, "errmsg": "ok"})

    async def subscription_send(self, request: Request) -> Response:
        if (r := self._check_token(request)) is not None:
            return r
        body = json.loads(await request.body())
        if not body.get("template_id"):
            return JSONResponse({"errcode": 40037, "errmsg": "invalid template_id"})
        if body.get("touser") not in self.consented:
            return JSONResponse({"errcode": 43101, "errmsg": "user refuse to accept the msg"})
        self.subscriptions.append(body)
        return JSONResponse({"errcode": 0, "errmsg": "ok"})

    async def template_send(self, request: Request) -> Response:
        if (r := self._check_token(request)) is not None:
            return r
        if (r := self._scripted("template")) is not None:
            return r
        body = json.loads(await request.body())
        if not body.get("template_id"):
            return JSONResponse({"errcode": 40037, "errmsg": "invalid template_id"})
        self.templates.append(body)
        return JSONResponse({"errcode": 0, "errmsg": "ok", "msgid": 200228332 + len(self.templates)})

    async def media_upload(self, request: Request) -> Response:
        if (r := self._check_token(request)) is not None:
            return r
        if (r := self._scripted("upload")) is not None:
            return r
        kind = request.query_params.get("type")
        if kind not in ("image", "voice", "video", "thumb"):
            return JSONResponse({"errcode": 40004, "errmsg": "invalid media type"})
        raw = await request.body()
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(head + raw)
        for part in msg.iter_parts():
            if part.get_param("name", header="content-disposition") == "media":
                data = part.get_payload(decode=True)
                media_id = self.add_media(data, part.get_content_type())
                self.uploads.append({"type": kind, "media_id": media_id, "filename": part.get_filename(),
                                     "size": len(data)})
                return JSONResponse({"type": kind, "media_id": media_id, "created_at": int(time.time())})
        return JSONResponse({"errcode": 41005, "errmsg": "media data missing"})

    async def media_get(self, request: Request) -> Response:
        if (r := self._check_token(request)) is not None:
            return r
        if (r := self._scripted("get")) is not None:
            return r
        self.downloads += 1
        if self.download_delay:
            await asyncio.sleep(self.download_delay)
        media_id = request.query_params.get("media_id", "")
        if media_id not in self.media:
            return JSONResponse({"errcode": 40007, "errmsg": "invalid media_id"})
        data, ctype = self.media[media_id]
        if ctype.startswith("video/"):
            return JSONResponse({"video_url": f"{self.url}/videos/{media_id}"})
        return Response(data, media_type=ctype,
                        headers={"Content-disposition": f'attachment; filename="{media_id}"'})

    async def video_file(self, request: Request) -> Response:
        data, ctype = self.media[request.path_params["media_id"]]
        return Response(data, media_type=ctype)


@pytest.fixture
async def fake_wechat() -> Any:
    """The fake WeChat API, listening on a free port for this test."""
    fake = FakeWeChat()
    async with serve_asgi(fake.app, fake.port):
        yield fake



def channel_config(fake: FakeWeChat | None = None, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"type": "wechat", "appid": APPID, "secret": SECRET, "token": TOKEN,
                           "api_base": fake.url if fake else "http://127.0.0.1:9"}
    cfg.update(overrides)
    return cfg


# --- callbacks as WeChat sends them -----------------------------------------------


def xml(fields: dict[str, Any]) -> str:
    """A WeChat callback body: numbers bare, strings in CDATA."""
    out = ["<xml>"]
    for k, v in fields.items():
        if isinstance(v, int):
            out.append(f"<{k}>{v}</{k}>")
        else:
            out.append(f"<{k}><![CDATA[{v}]]></{k}>")
    out.append("</xml>")
    return "".join(out)


def text_message(content: str = "你好", msg_id: str = "6054768590064713728", openid: str = "oyORnuP8q7ou2gfYjqLzSIWZf0rs",
                 **extra: Any) -> dict[str, Any]:
    return {"ToUserName": ACCOUNT, "FromUserName": openid, "CreateTime": int(time.time()), "MsgType": "text",
            "Content": content, "MsgId": int(msg_id), **extra}


def signed_query(token: str = TOKEN, timestamp: str | None = None, nonce: str | None = None) -> dict[str, str]:
    timestamp = timestamp or str(int(time.time()))
    nonce = nonce or str(secrets.randbelow(10**9))
    return {"signature": signature(token, timestamp, nonce), "timestamp": timestamp, "nonce": nonce}


def encrypted_request(body_xml: str, mode: str = "safe", token: str = TOKEN, appid: str = APPID,
                      key: str = AES_KEY) -> tuple[dict[str, str], str]:
    """(query, body) of an encrypted callback: safe mode carries only ToUserName and
    Encrypt, compatible mode the plaintext fields too."""
    q = signed_query(token)
    encrypt, msg_sig = MessageCrypto(token, key, appid).encrypt(body_xml, q["timestamp"], q["nonce"])
    q.update(encrypt_type="aes", msg_signature=msg_sig, openid="oyORnuP8q7ou2gfYjqLzSIWZf0rs")
    if mode == "safe":
        body = f"<xml><ToUserName><![CDATA[{ACCOUNT}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    else:
        body = body_xml.replace("</xml>", f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>")
    return q, body


async def post(port: int, body: str | bytes, params: dict[str, str], channel: str = "wx") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        return await c.post(f"/channels/{channel}/webhook", params=params,
                            content=body.encode() if isinstance(body, str) else body,
                            headers={"Content-Type": "text/xml"})


async def inbound(url: str, channel: str = "wx") -> list[Any]:
    """Every message on GW_IN for the channel, decoded."""
    return [message_decoder.decode(m.data) for m in await stream_messages(url, "GW_IN", f"gw.in.wechat.{channel}")]


from gateway.testing import statuses, wait_until  # noqa: E402,F401  (shared helpers)
from gateway.testing import wait_for_status as wait_state  # noqa: E402,F401



