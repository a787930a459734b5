"""An async client for the WeChat API (httpx) with one access_token per app, shared by
every gateway process through the channel's state.

wechatpy has a WeChat client too, but it is synchronous (requests): calling it on the
event loop would stall every channel of the gateway, so this module speaks the few JSON
endpoints itself."""

from __future__ import annotations

import json
from typing import Any

import httpx

from gateway import DeliveryError, KeyValue, SharedValue, provider_call, provider_error

TOKEN_KEY = "access-token"
_TOKEN_ERRORS = {40001, 40014, 42001}

# errcode → (permanent, reason). Reasons are shown to the backend as they are.
ERRORS: dict[int, tuple[bool, str]] = {
    -1: (False, "WeChat system busy"),
    40001: (False, "access_token rejected even after a refresh"),
    40014: (False, "access_token invalid even after a refresh"),
    42001: (False, "access_token expired even after a refresh"),
    45009: (False, "daily API quota of the account reached"),
    45011: (False, "API called too often (minute quota)"),
    40003: (True, "invalid openid (not a follower of this account)"),
    43004: (True, "customer has unsubscribed or blocked the account"),
    43101: (True, "customer refused to receive this message"),
    45015: (True, "customer has not written for more than 48 hours"),
    45047: (True, "customer-service message limit reached: the customer has not written since"),
    45002: (True, "message content too long"),
    40004: (True, "invalid media type"),
    40007: (True, "invalid media_id"),
    40008: (True, "invalid message type"),
    40037: (True, "invalid template_id"),
    47003: (True, "template data invalid"),
    40013: (True, "invalid appid"),
    40125: (True, "invalid AppSecret"),
    40164: (True, "the gateway's IP address is not in the account's IP whitelist"),
    41001: (True, "access_token missing"),
    44002: (True, "empty request body"),
    48001: (True, "API not authorized for this account"),
}
_RETRY_AFTER = {45009: 3600.0, 45011: 60.0}


class APIError(DeliveryError):
    """WeChat refused a call with an ``errcode`` (its own error code, in an HTTP 200
    answer) or answered something unusable. ``permanent``: retrying the same call cannot
    help. HTTP and network failures are plain :class:`DeliveryError` (``http_<status>``,
    ``timeout``, ``network``)."""

    def __init__(self, message: str, *, permanent: bool, errcode: int | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message, permanent=permanent, retry_after=retry_after,
                         code=code or (str(errcode) if errcode is not None else None))
        self.errcode = errcode


def api_error(errcode: int, errmsg: str) -> APIError:
    """Classify a WeChat ``errcode``; unknown codes are permanent (a blind retry of an
    unknown refusal could send twice)."""
    permanent, reason = ERRORS.get(errcode, (True, "WeChat refused the call"))
    return APIError(f"{reason} (errcode {errcode}: {errmsg})", permanent=permanent, errcode=errcode,
                    retry_after=_RETRY_AFTER.get(errcode))


class WeChatAPI:
    """The calls the channel needs, each returning WeChat's JSON or raising :class:`APIError`."""

    def __init__(self, *, base_url: str, appid: str, secret: str, state: KeyValue, timeout: float,
                 refresh_margin: float, log: Any):
        self.appid = appid
        self._secret = secret
        self.state = state
        self.timeout = timeout
        self.refresh_margin = refresh_margin
        self.log = log
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout,
                                        headers={"User-Agent": "omnichannel-gateway"})
        # One token per app, shared by every gateway process: one of them refreshes it.
        self._token = SharedValue(state, TOKEN_KEY, str, self._fetch_token, margin=refresh_margin,
                                  lease_ttl=timeout + 5, wait=2 * timeout + 5)

    @property
    def token_fetches(self) -> int:
        """How many times this process asked WeChat for a token (for tests and metrics)."""
        return self._token.fetches

    async def aclose(self) -> None:
        await self.client.aclose()

    # --- access_token ------------------------------------------------------------

    async def access_token(self, *, stale: str | None = None) -> str:
        """A valid token. ``stale`` is a token WeChat just refused: it is never returned,
        and only one process replaces it (the others wait for and reuse the new one)."""
        return await self._token.get(stale=stale)

    async def _fetch_token(self) -> tuple[str, float]:
        data = await self._request("GET", "/cgi-bin/token",
                                   params={"grant_type": "client_credential", "appid": self.appid, "secret": self._secret})
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise APIError("token endpoint answered without access_token", permanent=False, code="bad_response")
        expires_in = float(data.get("expires_in") or 7200)
        self.log.info("access_token refreshed", expires_in=expires_in)
        return token, expires_in

    # --- calls -------------------------------------------------------------------

    async def _request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        response = await self._send(method, path, **kw)
        return self._json(response)

    async def _send(self, method: str, path: str, *, stream_limit: int | None = None, **kw: Any) -> httpx.Response:
        with provider_call("WeChat API"):
            if stream_limit is None:
                response = await self.client.request(method, path, **kw)
            else:
                response = await self._bounded(method, path, stream_limit, **kw)
        error = provider_error(response.status_code, response.headers, provider="WeChat API")
        if error is not None:
            raise error
        return response

    async def _bounded(self, method: str, path: str, limit: int, **kw: Any) -> httpx.Response:
        """Read a response of at most ``limit`` bytes; stop reading as soon as it is larger."""
        async with self.client.stream(method, path, **kw) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise DeliveryError(f"media larger than {limit} bytes", permanent=True, code="too_large")
                chunks.append(chunk)
        # The chunks are already decoded: drop the headers that would decode them again.
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in ("content-encoding", "content-length")]
        return httpx.Response(response.status_code, headers=headers, content=b"".join(chunks), request=response.request)

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError as exc:
            raise APIError("WeChat API answered something other than JSON", permanent=False,
                           code="bad_response") from exc
        if not isinstance(data, dict):
            raise APIError("WeChat API answered unexpected JSON", permanent=False, code="bad_response")
        errcode = data.get("errcode", 0)
        if errcode not in (0, None):
            try:
                errcode = int(errcode)
            except (TypeError, ValueError):
                errcode = -1
            raise api_error(errcode, str(data.get("errmsg", "")))
        return data

    async def _with_token(self, method: str, path: str, *, raw: bool = False, **kw: Any) -> Any:
        """Call with the access_token; on 40001/42001/40014 refresh once and retry once."""
        params = dict(kw.pop("params", {}) or {})
        token = await self.access_token()
        for attempt in (1, 2):
            params["access_token"] = token
            response = await self._send(method, path, params=params, **kw)
            try:
                if raw and not _is_json(response):
                    return response
                data = self._json(response)  # raises on errcode, token errors included
                return response if raw else data
            except APIError as exc:
                if exc.errcode in _TOKEN_ERRORS and attempt == 1:
                    self.log.info("access_token refused, refreshing", errcode=exc.errcode)
                    token = await self.access_token(stale=token)
                    continue
                raise
        raise AssertionError("unreachable")

    async def send_custom(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /cgi-bin/message/custom/send`` (customer-service message)."""
        return await self._with_token("POST", "/cgi-bin/message/custom/send", content=_dump(payload),
                                      headers={"Content-Type": "application/json; charset=utf-8"})

    async def send_template(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /cgi-bin/message/template/send``; the answer carries ``msgid``."""
        return await self._with_token("POST", "/cgi-bin/message/template/send", content=_dump(payload),
                                      headers={"Content-Type": "application/json; charset=utf-8"})

    async def send_subscription(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /cgi-bin/message/subscribe/bizsend`` (subscription notification, 订阅通知)."""
        return await self._with_token("POST", "/cgi-bin/message/subscribe/bizsend", content=_dump(payload),
                                      headers={"Content-Type": "application/json; charset=utf-8"})

    async def upload_media(self, kind: str, data: bytes, filename: str, content_type: str) -> str:
        """``POST /cgi-bin/media/upload`` (temporary media, kept 3 days): the media_id."""
        answer = await self._with_token("POST", "/cgi-bin/media/upload", params={"type": kind},
                                        files={"media": (filename, data, content_type)})
        media_id = answer.get("media_id") or answer.get("thumb_media_id")
        if not isinstance(media_id, str) or not media_id:
            raise APIError("media upload answered without media_id", permanent=False, code="bad_response")
        return media_id

    async def download_media(self, media_id: str, max_size: int) -> tuple[bytes, str | None]:
        """``GET /cgi-bin/media/get``: the bytes and their content type. A video answer
        (JSON with ``video_url``) is followed to the file."""
        response = await self._with_token("GET", "/cgi-bin/media/get", raw=True, params={"media_id": media_id},
                                          stream_limit=max_size)
        if _is_json(response):
            url = self._json(response).get("video_url")
            if not isinstance(url, str) or not url:
                raise APIError("media download answered JSON without video_url", permanent=True, code="bad_response")
            response = await self._send("GET", url, stream_limit=max_size)
        return response.content, response.headers.get("Content-Type")


def _is_json(response: httpx.Response) -> bool:
    ctype = response.headers.get("Content-Type", "")
    return "json" in ctype or "text/plain" in ctype


def _dump(payload: dict[str, Any]) -> bytes:
    # UTF-8 as is, not \uXXXX escapes: WeChat is known to show escapes literally.
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")

