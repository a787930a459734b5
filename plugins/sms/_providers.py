"""The providers behind the SMS channel: one small adapter each, speaking the provider's
documented HTTP API with httpx (async; no SDK thread pools), and the request signing they
need, written against the providers' documented examples (tests/sms/test_signing.py)."""

from __future__ import annotations

import abc
import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from gateway import DeliveryError, ImagePart, Outbound, Template, provider_call, provider_error

from ._config import AliyunConfig, TencentConfig, TwilioConfig
from ._text import national


class Adapter(abc.ABC):
    """One provider's outbound side."""

    name: str
    templates_only = False
    """True when the provider sends approved templates only (mainland China)."""
    supports_templates = True
    templates: dict[str, str] = {}
    """Another provider's template ids → this provider's own (config ``templates``)."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client

    def template_id(self, template: Template) -> str:
        """This provider's id of ``template`` (mapped from the other provider's, if listed)."""
        return self.templates.get(template.id, template.id)

    def can_send(self, outbound: Outbound, text: str) -> bool:
        """Whether this provider can carry ``outbound`` at all (a template-only provider
        cannot send free text)."""
        return outbound.template is not None or (not self.templates_only and bool(text or _media_urls(outbound)))

    @abc.abstractmethod
    async def send(self, to: str, text: str, outbound: Outbound) -> tuple[str, int | None]:
        """Send; return the provider's id and the segments it says it billed (None when
        its answer does not say). Raises :class:`DeliveryError`."""

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        # On `timeout` the provider may have accepted it: SMS APIs have no idempotency key,
        # so a retry can double it; an unanswered request is still the lesser harm retried.
        with provider_call(self.name):
            return await self.client.request(method, url, **kwargs)


def _media_urls(outbound: Outbound) -> list[str]:
    return [p.url for p in outbound.parts if isinstance(p, ImagePart) and p.url]


def _json(r: httpx.Response) -> dict[str, Any]:
    try:
        data = r.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


# --- Twilio ------------------------------------------------------------------------------


class TwilioAdapter(Adapter):
    """Twilio's Messages API (``POST /2010-04-01/Accounts/{sid}/Messages.json``, form-encoded,
    HTTP Basic with the Account SID and Auth Token). Templates go as Content API
    ``ContentSid`` + ``ContentVariables``."""

    name = "twilio"

    def __init__(self, client: httpx.AsyncClient, cfg: TwilioConfig, status_callback: str | None):
        super().__init__(client)
        self.cfg = cfg
        self.status_callback = status_callback

    async def send(self, to: str, text: str, outbound: Outbound) -> tuple[str, int | None]:
        cfg = self.cfg
        form: dict[str, str | list[str]] = {"To": to}
        if cfg.messaging_service_sid:
            form["MessagingServiceSid"] = cfg.messaging_service_sid
        else:
            form["From"] = cfg.from_number
        if text:
            form["Body"] = text
        elif outbound.template is not None:
            form["ContentSid"] = outbound.template.id
            form["ContentVariables"] = json.dumps(outbound.template.data)
        media = _media_urls(outbound)
        if media:
            form["MediaUrl"] = media
        if self.status_callback:
            form["StatusCallback"] = self.status_callback
        url = f"{cfg.api_base.rstrip('/')}/2010-04-01/Accounts/{cfg.account_sid}/Messages.json"
        r = await self._call("POST", url, data=form, auth=(cfg.account_sid, cfg.auth_token))
        body = _json(r)
        err = provider_error(r.status_code, r.headers, provider="Twilio")
        if err is not None:
            code = body.get("code")
            if code is not None:
                # Twilio's own code (21211 invalid To, 21610 the number replied STOP ...).
                err = DeliveryError(f"Twilio refused the message (error {code})", permanent=err.permanent,
                                    code=f"twilio_{code}", retry_after=err.retry_after)
            raise err
        sid = body.get("sid")
        if not isinstance(sid, str) or not sid:
            raise DeliveryError("Twilio's answer has no message sid", permanent=False, code="bad_answer")
        return sid, None  # Twilio's num_segments is ours (GSM-7/UCS-2 rules), counted before sending


# --- Aliyun ------------------------------------------------------------------------------


def _pct(value: str) -> str:
    # Aliyun's percent-encoding: RFC 3986 unreserved characters stay, everything else is
    # %XX of its UTF-8 bytes (so space is %20, "*" is %2A and "~" stays).
    return quote(value, safe="-_.~")


def aliyun_signature(secret: str, method: str, params: dict[str, str]) -> str:
    """The RPC signature (SignatureMethod HMAC-SHA1, SignatureVersion 1.0) of ``params``
    (without ``Signature``): HMAC-SHA1 under ``secret + "&"`` of
    ``METHOD&%2F&percent(canonicalized query)``, base64."""
    canonical = "&".join(f"{_pct(k)}={_pct(v)}" for k, v in sorted(params.items()))
    string_to_sign = f"{method}&{_pct('/')}&{_pct(canonical)}"
    mac = hmac.new(f"{secret}&".encode(), string_to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


# Aliyun answers business errors as HTTP 200 with a Code: these are worth a retry.
_ALIYUN_TRANSIENT_PREFIXES = ("isp.", "Throttling", "ServiceUnavailable", "InternalError")
_ALIYUN_TRANSIENT = {"isv.BUSINESS_LIMIT_CONTROL": 60.0, "isv.DAY_LIMIT_CONTROL": None}


class AliyunAdapter(Adapter):
    """Dysmsapi ``SendSms`` (2017-05-25, RPC style, signed request): approved template
    code + parameters, the sign name from the config. Mainland numbers go as their 11
    national digits, others as country code + number."""

    name = "aliyun"
    templates_only = True

    def __init__(self, client: httpx.AsyncClient, cfg: AliyunConfig):
        super().__init__(client)
        self.cfg = cfg
        self.templates = cfg.templates

    def params(self, to: str, template: Template, out_id: str, *, nonce: str | None = None,
               timestamp: str | None = None) -> dict[str, str]:
        """The signed SendSms parameters."""
        cc, nsn = national(to)
        params = {
            "AccessKeyId": self.cfg.access_key_id, "Action": "SendSms", "Format": "JSON",
            "PhoneNumbers": nsn if cc == 86 else f"{cc}{nsn}", "RegionId": self.cfg.region_id,
            "SignName": self.cfg.sign_name, "SignatureMethod": "HMAC-SHA1",
            "SignatureNonce": nonce or uuid.uuid4().hex, "SignatureVersion": "1.0",
            "TemplateCode": self.template_id(template), "Timestamp": timestamp or datetime.now(timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"), "Version": "2017-05-25", "OutId": out_id[:64],
        }
        if template.data:
            params["TemplateParam"] = json.dumps(template.data, ensure_ascii=False, separators=(",", ":"))
        params["Signature"] = aliyun_signature(self.cfg.access_key_secret, "POST", params)
        return params

    async def send(self, to: str, text: str, outbound: Outbound) -> tuple[str, int | None]:
        if outbound.template is None:
            raise DeliveryError("Aliyun sends approved templates only and the outbound has no template",
                                permanent=True, code="template_required")
        params = self.params(to, outbound.template, outbound.id)
        r = await self._call("POST", self.cfg.endpoint.rstrip("/") + "/", data=params)
        body = _json(r)
        code = body.get("Code")
        if r.status_code == 200 and code == "OK" and body.get("BizId"):
            return str(body["BizId"]), None  # the count comes with the report (sms_size)
        if isinstance(code, str) and code:
            transient = code.startswith(_ALIYUN_TRANSIENT_PREFIXES) or code in _ALIYUN_TRANSIENT or \
                r.status_code >= 500 or r.status_code == 429
            raise DeliveryError(f"Aliyun refused the message ({code})", permanent=not transient,
                                code=f"aliyun_{code}", retry_after=_ALIYUN_TRANSIENT.get(code))
        err = provider_error(r.status_code, r.headers, provider="Aliyun")
        raise err or DeliveryError("Aliyun's answer has no BizId", permanent=False, code="bad_answer")


# --- Tencent Cloud -------------------------------------------------------------------------


def tc3_authorization(secret_id: str, secret_key: str, service: str, host: str, timestamp: int, payload: bytes,
                      content_type: str = "application/json; charset=utf-8") -> str:
    """The ``Authorization`` header of a TencentCloud API v3 request (TC3-HMAC-SHA256,
    signed headers ``content-type;host``, POST to ``/``)."""
    date = datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d")
    canonical = (f"POST\n/\n\ncontent-type:{content_type}\nhost:{host}\n\ncontent-type;host\n"
                 f"{hashlib.sha256(payload).hexdigest()}")
    scope = f"{date}/{service}/tc3_request"
    string_to_sign = f"TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = f"TC3{secret_key}".encode()
    for part in (date, service, "tc3_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return f"TC3-HMAC-SHA256 Credential={secret_id}/{scope}, SignedHeaders=content-type;host, Signature={signature}"


# Tencent's error codes worth a retry (and how long to wait, when it says).
_TENCENT_TRANSIENT_PREFIXES = ("InternalError", "RequestLimitExceeded")
_TENCENT_TRANSIENT = {"LimitExceeded.PhoneNumberThirtySecondLimit": 30.0,
                      "LimitExceeded.PhoneNumberOneHourLimit": 3600.0}


def template_params(template: Template) -> list[str]:
    """Tencent's ``TemplateParamSet``: the values of ``Template.data`` in the order of the
    template's ``{1}``, ``{2}`` ... (numeric keys in numeric order, others after them)."""
    keys = sorted(template.data, key=lambda k: (0, int(k), "") if k.isdigit() else (1, 0, k))
    return [template.data[k] for k in keys]


class TencentAdapter(Adapter):
    """SendSms (API 2021-01-11, JSON POST signed TC3-HMAC-SHA256): approved template id and
    parameters, the sign name and SdkAppId from the config; numbers in E.164."""

    name = "tencent"
    templates_only = True

    def __init__(self, client: httpx.AsyncClient, cfg: TencentConfig):
        super().__init__(client)
        self.cfg = cfg
        self.templates = cfg.templates

    async def send(self, to: str, text: str, outbound: Outbound) -> tuple[str, int | None]:
        if outbound.template is None:
            raise DeliveryError("Tencent Cloud sends approved templates only and the outbound has no template",
                                permanent=True, code="template_required")
        cfg = self.cfg
        payload = json.dumps({"PhoneNumberSet": [to], "SmsSdkAppId": cfg.sdk_app_id, "SignName": cfg.sign_name,
                              "TemplateId": self.template_id(outbound.template), "TemplateParamSet": template_params(outbound.template),
                              "SessionContext": outbound.id}, ensure_ascii=False).encode()
        host = urlsplit(cfg.endpoint).netloc
        ts = int(time.time())
        headers = {"Authorization": tc3_authorization(cfg.secret_id, cfg.secret_key, "sms", host, ts, payload),
                   "Content-Type": "application/json; charset=utf-8", "Host": host, "X-TC-Action": "SendSms",
                   "X-TC-Timestamp": str(ts), "X-TC-Version": "2021-01-11", "X-TC-Region": cfg.region}
        r = await self._call("POST", cfg.endpoint.rstrip("/") + "/", content=payload, headers=headers)
        answer = _json(r).get("Response")
        answer = answer if isinstance(answer, dict) else {}
        error = answer.get("Error")
        statuses = answer.get("SendStatusSet")
        if isinstance(error, dict) or not isinstance(statuses, list) or not statuses:
            code = str(error.get("Code", "")) if isinstance(error, dict) else ""
            if not code:
                err = provider_error(r.status_code, r.headers, provider="Tencent Cloud")
                raise err or DeliveryError("Tencent Cloud's answer has no SendStatusSet", permanent=False,
                                           code="bad_answer")
            raise self._refusal(code, r.status_code)
        status = statuses[0] if isinstance(statuses[0], dict) else {}
        code = str(status.get("Code", ""))
        if code != "Ok":
            raise self._refusal(code or "unknown", r.status_code)
        serial = str(status.get("SerialNo") or "")
        if not serial:
            raise DeliveryError("Tencent Cloud's answer has no SerialNo", permanent=False, code="bad_answer")
        fee = status.get("Fee")
        return serial, fee if isinstance(fee, int) and fee > 0 else None

    @staticmethod
    def _refusal(code: str, http_status: int) -> DeliveryError:
        transient = code.startswith(_TENCENT_TRANSIENT_PREFIXES) or code in _TENCENT_TRANSIENT or http_status >= 500
        return DeliveryError(f"Tencent Cloud refused the message ({code})", permanent=not transient,
                             code=f"tencent_{code}", retry_after=_TENCENT_TRANSIENT.get(code))


def now() -> float:
    """Monotonic seconds (failover windows)."""
    return time.monotonic()
