"""Fixtures for the SMS tests: one local HTTP server speaking Twilio's Messages API and
Aliyun's Dysmsapi SendSms (their documented requests and answers, credentials and
signatures checked), and helpers that send what Twilio and Aliyun send to the gateway."""

from __future__ import annotations

import base64
import itertools
import json
import secrets
from collections import deque
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from gateway.testing import free_port, serve_asgi, stream_messages
from gateway.wire import encode, message_decoder
from gateway_plugins.sms._providers import aliyun_signature, tc3_authorization

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-for-tests"
OUR_NUMBER = "+14155550100"
CUSTOMER = "+14155550123"
PUBLIC = "https://sms.example.com"
AK_ID = "testid"
AK_SECRET = "testsecret"
SIGN_NAME = "阿里云短信测试"
PUSH_TOKEN = "push-token-0123456789"
CN_CUSTOMER = "+8613812345678"
TC_ID = "AKIDtestsecretid"
TC_KEY = "tencent-secret-key"
TC_APP = "1400006666"
TC_SIGN = "腾讯云"


class FakeSms:
    """Twilio at ``/twilio`` and Aliyun at ``/aliyun``, on 127.0.0.1. ``fail_next`` scripts
    refusals per provider: an HTTP status with the provider's error body."""

    def __init__(self) -> None:
        self.twilio: list[dict[str, list[str]]] = []
        self.aliyun: list[dict[str, str]] = []
        self.tencent: list[dict[str, Any]] = []
        self.tencent_fee = 1
        self.script: dict[str, deque[tuple[int, Any]]] = {"twilio": deque(), "aliyun": deque(), "tencent": deque()}
        self.calls = {"twilio": 0, "aliyun": 0, "tencent": 0}
        self._ids = itertools.count(1)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = Starlette(routes=[
            Route("/twilio/2010-04-01/Accounts/{sid}/Messages.json", self.twilio_send, methods=["POST"]),
            Route("/aliyun/", self.aliyun_send, methods=["POST"]),
            Route("/tencent/", self.tencent_send, methods=["POST"]),
        ])

    def fail_next(self, provider: str, status: int, code: Any = None, count: int = 1) -> None:
        for _ in range(count):
            self.script[provider].append((status, code))

    async def twilio_send(self, request: Request) -> Response:
        self.calls["twilio"] += 1
        auth = request.headers.get("authorization", "")
        expected = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
        if request.path_params["sid"] != ACCOUNT_SID or auth != expected:
            return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, status_code=401)
        if self.script["twilio"]:
            status, code = self.script["twilio"].popleft()
            headers = {"Retry-After": "0"} if status == 429 else {}
            return JSONResponse({"code": code, "message": "scripted", "status": status}, status_code=status,
                                headers=headers)
        form: dict[str, list[str]] = {}
        for k, v in parse_qsl((await request.body()).decode(), keep_blank_values=True):
            form.setdefault(k, []).append(v)
        if not form.get("To", [""])[0].startswith("+"):
            return JSONResponse({"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400}, status_code=400)
        if "Body" not in form and "ContentSid" not in form and "MediaUrl" not in form:
            return JSONResponse({"code": 21602, "message": "Message body is required.", "status": 400},
                                status_code=400)
        self.twilio.append(form)
        sid = f"SM{next(self._ids):032x}"
        return JSONResponse({"sid": sid, "status": "queued", "to": form["To"][0], "num_segments": "1",
                             "account_sid": ACCOUNT_SID}, status_code=201)

    async def aliyun_send(self, request: Request) -> Response:
        self.calls["aliyun"] += 1
        params = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        given = params.pop("Signature", "")
        if params.get("AccessKeyId") != AK_ID or aliyun_signature(AK_SECRET, "POST", params) != given:
            return JSONResponse({"Code": "SignatureDoesNotMatch", "Message": "Specified signature is not matched",
                                 "RequestId": secrets.token_hex(8)}, status_code=400)
        if params.get("Action") != "SendSms" or params.get("Version") != "2017-05-25":
            return JSONResponse({"Code": "InvalidAction", "Message": "bad action"}, status_code=400)
        if self.script["aliyun"]:
            status, code = self.script["aliyun"].popleft()
            return JSONResponse({"Code": code, "Message": "scripted", "RequestId": secrets.token_hex(8)},
                                status_code=status)
        if not params.get("TemplateCode") or params.get("SignName") != SIGN_NAME:
            return JSONResponse({"Code": "isv.SMS_TEMPLATE_ILLEGAL", "Message": "template"})
        self.aliyun.append(params)
        return JSONResponse({"Code": "OK", "Message": "OK", "BizId": f"{900619746936498440 + len(self.aliyun)}^0",
                             "RequestId": secrets.token_hex(8)})


    async def tencent_send(self, request: Request) -> Response:
        """SendSms 2021-01-11: TC3 signature checked; ``script`` entries are (0, code) for a
        top-level Error or (1, code) for a per-number status Code."""
        self.calls["tencent"] += 1
        raw = await request.body()
        h = request.headers
        rid = secrets.token_hex(8)
        expected = tc3_authorization(TC_ID, TC_KEY, "sms", h["host"], int(h.get("x-tc-timestamp", "0")), raw,
                                     h.get("content-type", ""))
        if h.get("authorization") != expected:
            return JSONResponse({"Response": {"Error": {"Code": "AuthFailure.SignatureFailure",
                                                        "Message": "signature mismatch"}, "RequestId": rid}})
        if h.get("x-tc-action") != "SendSms" or h.get("x-tc-version") != "2021-01-11":
            return JSONResponse({"Response": {"Error": {"Code": "InvalidAction", "Message": "x"}, "RequestId": rid}})
        body = json.loads(raw)
        number = body["PhoneNumberSet"][0]
        if self.script["tencent"]:
            where, code = self.script["tencent"].popleft()
            if where == 0:
                return JSONResponse({"Response": {"Error": {"Code": code, "Message": "scripted"}, "RequestId": rid}})
            return JSONResponse({"Response": {"SendStatusSet": [{"SerialNo": "", "PhoneNumber": number, "Fee": 0,
                                                                 "Code": code, "Message": "scripted"}],
                                              "RequestId": rid}})
        self.tencent.append(body)
        serial = f"2433:{next(self._ids):030d}"
        return JSONResponse({"Response": {"SendStatusSet": [{
            "SerialNo": serial, "PhoneNumber": number, "Fee": self.tencent_fee, "SessionContext": body.get("SessionContext"),
            "Code": "Ok", "Message": "send success", "IsoCode": "CN"}], "RequestId": rid}})


@pytest.fixture
async def fake_sms() -> Any:
    fake = FakeSms()
    async with serve_asgi(fake.app, fake.port):
        yield fake



def twilio_section(fake: FakeSms | None = None, **over: Any) -> dict[str, Any]:
    return {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "from_number": OUR_NUMBER,
            "api_base": f"{fake.url if fake else 'http://127.0.0.1:9'}/twilio", **over}


def aliyun_section(fake: FakeSms | None = None, **over: Any) -> dict[str, Any]:
    return {"access_key_id": AK_ID, "access_key_secret": AK_SECRET, "sign_name": SIGN_NAME,
            "push_token": PUSH_TOKEN, "endpoint": f"{fake.url if fake else 'http://127.0.0.1:9'}/aliyun", **over}


def tencent_section(fake: FakeSms | None = None, **over: Any) -> dict[str, Any]:
    return {"secret_id": TC_ID, "secret_key": TC_KEY, "sdk_app_id": TC_APP, "sign_name": TC_SIGN,
            "push_token": PUSH_TOKEN, "endpoint": f"{fake.url if fake else 'http://127.0.0.1:9'}/tencent", **over}


def tencent_config(fake: FakeSms | None = None, **over: Any) -> dict[str, Any]:
    return {"type": "sms", "provider": "tencent", "tencent": tencent_section(fake), **over}


def twilio_config(fake: FakeSms | None = None, **over: Any) -> dict[str, Any]:
    return {"type": "sms", "provider": "twilio", "public_url": PUBLIC, "default_region": "US",
            "twilio": twilio_section(fake), **over}


def aliyun_config(fake: FakeSms | None = None, **over: Any) -> dict[str, Any]:
    return {"type": "sms", "provider": "aliyun", "aliyun": aliyun_section(fake), **over}


# --- what Twilio sends ---------------------------------------------------------------


def twilio_inbound(sid: str = "SM" + "a" * 32, body: str = "Hello", frm: str = CUSTOMER, to: str = OUR_NUMBER,
                   **extra: str) -> dict[str, str]:
    """The form of Twilio's incoming-message webhook."""
    return {"MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid, "AccountSid": ACCOUNT_SID, "From": frm,
            "To": to, "Body": body, "NumMedia": "0", "NumSegments": "1", "ApiVersion": "2010-04-01", **extra}


async def twilio_post(port: int, path: str, form: dict[str, str], *, channel: str = "sms",
                      signed_url: str | None = None, token: str = AUTH_TOKEN,
                      headers: dict[str, str] | None = None, algorithm: str | None = None) -> httpx.Response:
    """POST ``form`` as Twilio does, signed with twilio's own RequestValidator over
    ``signed_url`` (default: the public URL of the route)."""
    route = f"/channels/{channel}/twilio/{path}"
    url = signed_url if signed_url is not None else PUBLIC + route
    sig = RequestValidator(token).compute_signature(url, form, algorithm)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        return await c.post(route, data=form, headers={"X-Twilio-Signature": sig, **(headers or {})})


async def push(port: int, path: str, records: Any, *, channel: str = "sms", token: str = PUSH_TOKEN) -> httpx.Response:
    """An unsigned JSON push (Aliyun ``aliyun/up``, Tencent ``tencent/reply`` ...)."""
    body = records if isinstance(records, bytes) else json.dumps(records, ensure_ascii=False).encode()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        return await c.post(f"/channels/{channel}/{path}", params={"token": token}, content=body,
                            headers={"Content-Type": "application/json"})


async def aliyun_push(port: int, kind: str, records: list[dict[str, Any]] | bytes, *, channel: str = "sms",
                      token: str = PUSH_TOKEN) -> httpx.Response:
    """An Aliyun HTTP batch push (``up`` or ``report``): a JSON array of records."""
    body = records if isinstance(records, bytes) else json.dumps(records, ensure_ascii=False).encode()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        return await c.post(f"/channels/{channel}/aliyun/{kind}", params={"token": token}, content=body,
                            headers={"Content-Type": "application/json"})


def sms_up(seq: int, content: str = "你好", phone: str = "13812345678") -> dict[str, Any]:
    return {"phone_number": phone, "send_time": "2026-12-01 10:00:00", "content": content, "sign_name": SIGN_NAME,
            "dest_code": "1234", "sequence_id": seq}


def sms_report(biz_id: str, success: bool = True, phone: str = "13812345678", err_code: str = "DELIVERED",
               sms_size: str = "1") -> dict[str, Any]:
    return {"phone_number": phone, "send_time": "2026-12-01 10:00:00", "report_time": "2026-12-01 10:00:05",
            "success": success, "err_code": err_code, "err_msg": "用户接收成功" if success else "失败",
            "sms_size": sms_size, "biz_id": biz_id, "out_id": "x"}


async def inbound(url: str, channel: str = "sms") -> list[Any]:
    return [message_decoder.decode(m.data) for m in await stream_messages(url, "GW_IN", f"gw.in.sms.{channel}")]


async def send(nc: Any, outbound: Any, channel: str = "sms") -> None:
    await nc.jetstream().publish(f"gw.out.sms.{channel}", encode(outbound), headers={"Nats-Msg-Id": outbound.id})


from gateway.testing import statuses, wait_until  # noqa: E402,F401
from gateway.testing import wait_for_status as wait_state  # noqa: E402,F401
