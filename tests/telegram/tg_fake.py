"""A local HTTP server speaking the Telegram Bot API (https://core.telegram.org/bots/api:
``/bot<token>/<method>`` with form or multipart parameters, ``{"ok": true, "result": ...}``
answers, the documented error bodies, files under ``/file/bot<token>/<file_path>``) and
the update JSON Telegram sends, for the channel's tests."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.testing import free_port

BOT_ID = 7012345678
TOKEN = f"{BOT_ID}:AAH3kTzqYx9nWvB4sEfL2gR8uJmC6pQdT1o"
USERNAME = "acme_support_bot"
SECRET = "tg-webhook-secret-0123456789"
CUSTOMER = 123456789
GROUP = -1001987654321
# JSON-encoded parameters of the methods the channel calls (PTB sends them as form fields).
_JSON_PARAMS = frozenset({"reply_parameters", "reply_markup", "allowed_updates"})
_SEND = {"sendMessage", "sendPhoto", "sendDocument", "sendVoice", "sendAudio", "sendVideo", "sendLocation"}

ERRORS: dict[str, tuple[int, dict[str, Any]]] = {
    "blocked": (403, {"ok": False, "error_code": 403, "description": "Forbidden: bot was blocked by the user"}),
    "kicked": (403, {"ok": False, "error_code": 403,
                     "description": "Forbidden: bot was kicked from the supergroup chat"}),
    "chat_not_found": (400, {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}),
    "flood": (429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
                    "parameters": {"retry_after": 1}}),
    "migrated": (400, {"ok": False, "error_code": 400,
                       "description": "Bad Request: group chat was upgraded to a supergroup chat",
                       "parameters": {"migrate_to_chat_id": -1002222333444}}),
    "server": (502, {"ok": False, "error_code": 502, "description": "Bad Gateway"}),
    "too_big": (400, {"ok": False, "error_code": 400, "description": "Bad Request: file is too big"}),
}


def user(uid: int = CUSTOMER, first: str = "Wang", last: str | None = "Fang", username: str | None = "wangfang",
         is_bot: bool = False) -> dict[str, Any]:
    """A ``User`` object."""
    u: dict[str, Any] = {"id": uid, "is_bot": is_bot, "first_name": first}
    if last:
        u["last_name"] = last
    if username:
        u["username"] = username
    if not is_bot:
        u["language_code"] = "zh-hans"
    return u


BOT_USER = user(BOT_ID, "Acme Support", None, USERNAME, is_bot=True)


def private_chat(uid: int = CUSTOMER) -> dict[str, Any]:
    """A private ``Chat`` object (its id is the user's)."""
    return {"id": uid, "first_name": "Wang", "last_name": "Fang", "username": "wangfang", "type": "private"}


def group_chat(gid: int = GROUP, kind: str = "supergroup") -> dict[str, Any]:
    """A group ``Chat`` object."""
    return {"id": gid, "title": "Acme customers", "type": kind}


def message(message_id: int, text: str | None = "Hello, where is my order?", *, chat: dict[str, Any] | None = None,
            sender: dict[str, Any] | None = None, date: int = 1764900000, **extra: Any) -> dict[str, Any]:
    """A ``Message`` object as an update carries it."""
    m: dict[str, Any] = {"message_id": message_id, "from": sender or user(), "chat": chat or private_chat(),
                         "date": date}
    if text is not None:
        m["text"] = text
    m.update(extra)
    return m


def update(update_id: int, **body: Any) -> dict[str, Any]:
    """An ``Update`` with one of its optional fields (``message=``, ``callback_query=`` ...)."""
    return {"update_id": update_id, **body}


def mention(text: str, name: str = USERNAME) -> dict[str, Any]:
    """``entities`` for a text that starts with ``@name``."""
    return {"entities": [{"offset": 0, "length": len(name) + 1, "type": "mention"}], "text": text}


async def post_update(port: int, body: dict[str, Any] | bytes, *, channel: str = "tg", secret: str | None = SECRET,
                      headers: dict[str, str] | None = None) -> httpx.Response:
    """POST an update to the channel's webhook as Telegram does (the secret token header)."""
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if secret is not None:
        h["X-Telegram-Bot-Api-Secret-Token"] = secret
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as c:
        return await c.post(f"/channels/{channel}/webhook", content=data, headers=h)


class FakeTelegram:
    """The Bot API on 127.0.0.1. ``calls`` records every method call (name and decoded
    parameters, files as bytes), ``fail_next`` scripts error answers of the send methods,
    ``updates`` is what ``getUpdates`` hands out and ``files`` what ``getFile`` knows."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls: list[tuple[str, dict[str, Any], float]] = []
        self.script: deque[str] = deque()
        self.get_file_script: deque[str] = deque()
        self.files: dict[str, tuple[str, bytes]] = {}
        self.updates: list[dict[str, Any]] = []
        self.webhook: dict[str, Any] | None = None
        self.offsets: list[int | None] = []
        self.polling = 0
        self.max_polling = 0
        self._ids = itertools.count(1000)
        self._news = asyncio.Event()
        self.app = Starlette(routes=[
            Route("/bot{token}/{method}", self.api, methods=["GET", "POST"]),
            Route("/file/bot{token}/{path:path}", self.file, methods=["GET"]),
        ])

    # --- scripting -----------------------------------------------------------------

    def fail_next(self, error: str, count: int = 1) -> None:
        """The next ``count`` sends answer one of :data:`ERRORS` (``"ok"``: are accepted)."""
        self.script.extend([error] * count)

    def add_file(self, file_id: str, content: bytes, path: str) -> None:
        """A file ``getFile`` knows and ``/file/bot<token>/<path>`` serves."""
        self.files[file_id] = (path, content)

    def push(self, *updates: dict[str, Any]) -> None:
        """Updates for ``getUpdates``."""
        self.updates.extend(updates)
        self._news.set()

    def sent(self, method: str | None = None) -> list[dict[str, Any]]:
        """Parameters of the send calls the fake accepted (of ``method`` only if given)."""
        return [p for m, p, _ in self.calls if m in _SEND and "_refused" not in p and (method is None or m == method)]

    def called(self, method: str) -> list[dict[str, Any]]:
        """Parameters of every call of ``method``."""
        return [p for m, p, _ in self.calls if m == method]

    # --- the API -------------------------------------------------------------------

    async def _params(self, request: Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query_params)
        body = await request.body()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if part.get_filename() is not None:
                    params[str(name)] = {"filename": part.get_filename(), "content": payload}
                else:
                    params[str(name)] = payload.decode()
        elif body:
            if ctype.startswith("application/json"):
                params.update(json.loads(body))
            else:
                params.update(parse_qsl(body.decode(), keep_blank_values=True))
        for key in _JSON_PARAMS & params.keys():
            if isinstance(params[key], str):
                params[key] = json.loads(params[key])
        return params

    @staticmethod
    def ok(result: Any) -> JSONResponse:
        return JSONResponse({"ok": True, "result": result})

    async def api(self, request: Request) -> Response:
        if request.path_params["token"] != TOKEN:
            return JSONResponse({"ok": False, "error_code": 401, "description": "Unauthorized"}, status_code=401)
        method = request.path_params["method"]
        params = await self._params(request)
        self.calls.append((method, params, time.monotonic()))
        if method in _SEND and self.script and self.script[0] == "ok":
            self.script.popleft()
        elif method in _SEND and self.script:
            status, body = ERRORS[self.script.popleft()]
            params["_refused"] = True
            return JSONResponse(body, status_code=status)
        handler = getattr(self, "m_" + method, None)
        if handler is None:
            return JSONResponse({"ok": False, "error_code": 404, "description": "Not Found"}, status_code=404)
        return await handler(params)

    async def m_getMe(self, params: dict[str, Any]) -> Response:
        return self.ok({**BOT_USER, "can_join_groups": True, "can_read_all_group_messages": False,
                        "supports_inline_queries": False})

    async def m_setWebhook(self, params: dict[str, Any]) -> Response:
        self.webhook = params
        return self.ok(True)

    async def m_deleteWebhook(self, params: dict[str, Any]) -> Response:
        self.webhook = None
        return self.ok(True)

    async def m_getUpdates(self, params: dict[str, Any]) -> Response:
        if self.webhook is not None and self.webhook.get("url"):
            return JSONResponse({"ok": False, "error_code": 409, "description": "Conflict: can't use getUpdates "
                                 "method while webhook is active; use deleteWebhook to delete the webhook first"},
                                status_code=409)
        offset = int(params["offset"]) if params.get("offset") not in (None, "") else None
        self.offsets.append(offset)
        if offset is not None:  # confirms every update before it
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        self.polling += 1
        self.max_polling = max(self.max_polling, self.polling)
        try:
            deadline = time.monotonic() + float(params.get("timeout") or 0)
            while not self.updates and time.monotonic() < deadline:
                self._news.clear()
                try:
                    await asyncio.wait_for(self._news.wait(), max(0.01, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
            return self.ok(self.updates[:100])
        finally:
            self.polling -= 1

    def _message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        chat = private_chat(chat_id) if chat_id > 0 else group_chat(chat_id)
        result = {"message_id": next(self._ids), "from": BOT_USER, "chat": chat, "date": int(time.time()), **content}
        if "reply_parameters" in params:
            result["reply_to_message"] = message(int(params["reply_parameters"]["message_id"]), "(quoted)", chat=chat)
        if "reply_markup" in params:
            result["reply_markup"] = params["reply_markup"]
        return result

    async def m_sendMessage(self, params: dict[str, Any]) -> Response:
        if not params.get("text"):
            return JSONResponse({"ok": False, "error_code": 400, "description": "Bad Request: message text is empty"},
                                status_code=400)
        return self.ok(self._message(params, text=params["text"]))

    async def _media(self, params: dict[str, Any], field: str, shape: dict[str, Any]) -> Response:
        if not params.get(field):
            return JSONResponse({"ok": False, "error_code": 400,
                                 "description": f"Bad Request: there is no {field} in the request"}, status_code=400)
        return self.ok(self._message(params, **{field: shape}))

    async def m_sendPhoto(self, params: dict[str, Any]) -> Response:
        return await self._media(params, "photo", [{"file_id": "AgACAgIAAxkDAAIB", "file_unique_id": "AQADAgAT",
                                                    "width": 90, "height": 90, "file_size": 1200}])

    async def m_sendDocument(self, params: dict[str, Any]) -> Response:
        return await self._media(params, "document", {"file_id": "BQACAgIAAxkDAAIC", "file_unique_id": "AgADBQAD"})

    async def m_sendVoice(self, params: dict[str, Any]) -> Response:
        return await self._media(params, "voice", {"file_id": "AwACAgIAAxkDAAID", "file_unique_id": "AgADAwAD",
                                                   "duration": 1})

    async def m_sendAudio(self, params: dict[str, Any]) -> Response:
        return await self._media(params, "audio", {"file_id": "CQACAgIAAxkDAAIE", "file_unique_id": "AgADCQAD",
                                                   "duration": 1})

    async def m_sendVideo(self, params: dict[str, Any]) -> Response:
        return await self._media(params, "video", {"file_id": "BAACAgIAAxkDAAIF", "file_unique_id": "AgADBAAD",
                                                   "width": 1, "height": 1, "duration": 1})

    async def m_sendLocation(self, params: dict[str, Any]) -> Response:
        return self.ok(self._message(params, location={"latitude": float(params["latitude"]),
                                                       "longitude": float(params["longitude"])}))

    async def m_getFile(self, params: dict[str, Any]) -> Response:
        if self.get_file_script:
            status, body = ERRORS[self.get_file_script.popleft()]
            return JSONResponse(body, status_code=status)
        found = self.files.get(params.get("file_id", ""))
        if found is None:
            return JSONResponse({"ok": False, "error_code": 400, "description": "Bad Request: invalid file_id"},
                                status_code=400)
        path, content = found
        return self.ok({"file_id": params["file_id"], "file_unique_id": "u" + params["file_id"][-6:],
                        "file_size": len(content), "file_path": path})

    async def m_answerCallbackQuery(self, params: dict[str, Any]) -> Response:
        return self.ok(True)

    async def m_editMessageReplyMarkup(self, params: dict[str, Any]) -> Response:
        return self.ok(True)

    async def file(self, request: Request) -> Response:
        if request.path_params["token"] != TOKEN:
            return JSONResponse({"ok": False, "error_code": 401, "description": "Unauthorized"}, status_code=401)
        for path, content in self.files.values():
            if path == request.path_params["path"]:
                return Response(content, media_type="application/octet-stream")
        return JSONResponse({"ok": False, "error_code": 404, "description": "Not Found"}, status_code=404)


def tg_config(fake: FakeTelegram | None = None, **over: Any) -> dict[str, Any]:
    """A webhook-mode channel section against ``fake``."""
    return {"type": "telegram", "token": TOKEN, "secret_token": SECRET,
            "api_base": fake.url if fake else "http://127.0.0.1:9", **over}
