"""The keys of a ``type = "sms"`` channel section (``docs/channels/sms.md``)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import phonenumbers

from gateway import ConfigValueError, Duration

Provider = Literal["twilio", "aliyun", "tencent"]
_SECRET = msgspec.Meta(min_length=1)


class TwilioConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>.twilio]``: a Twilio account and the number (or Messaging
    Service) that sends."""

    account_sid: Annotated[str, msgspec.Meta(pattern=r"^AC[0-9a-fA-F]{32}$")]
    """The Account SID (``AC`` + 32 hex digits)."""
    auth_token: Annotated[str, _SECRET]
    """The Auth Token: authenticates API calls and signs Twilio's webhooks."""
    from_number: str = ""
    """Our number (E.164) messages are sent from; or set ``messaging_service_sid``."""
    messaging_service_sid: str = ""
    """A Messaging Service (``MG...``) to send through instead of ``from_number``."""
    api_base: str = "https://api.twilio.com"
    """Where Twilio's REST API is (a local fake in tests)."""
    webhook_shared_key: str = ""
    """The SharedKey secret of a Twilio Webhooks Rule: webhooks that carry
    ``X-Twilio-Webhooks-Signature-Settings`` are signed with it (and the algorithm the
    header names, HMAC-SHA1 or HMAC-SHA256) instead of the Auth Token."""
    status_callback: bool = True
    """Ask Twilio for status callbacks (delivered / undelivered / failed) at
    ``/channels/<name>/twilio/status``; needs ``public_url``."""

    def __post_init__(self) -> None:
        if not self.from_number and not self.messaging_service_sid:
            raise ConfigValueError("from_number", "expected from_number or messaging_service_sid (the number or "
                                                  "Messaging Service messages are sent from)")


class AliyunConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>.aliyun]``: Alibaba Cloud SMS (阿里云短信, Dysmsapi 2017-05-25)."""

    access_key_id: Annotated[str, _SECRET]
    access_key_secret: Annotated[str, _SECRET]
    sign_name: Annotated[str, _SECRET]
    """The approved signature (短信签名) every message is sent with."""
    push_token: Annotated[str, msgspec.Meta(min_length=16)]
    """Aliyun's HTTP batch pushes are not signed: configure the push URLs in the console
    with ``?token=<push_token>``; a push without it is refused (403)."""
    endpoint: str = "https://dysmsapi.aliyuncs.com"
    region_id: str = "cn-hangzhou"
    templates: dict[str, str] = {}
    """Failover between two template-only providers: the other provider's template ids
    mapped to this provider's own (``{"SMS_123" = "1234567"}``). Their ids never match,
    so as the failover this provider sends only templates listed here."""


class TencentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>.tencent]``: Tencent Cloud SMS (腾讯云短信, API 2021-01-11)."""

    secret_id: Annotated[str, _SECRET]
    secret_key: Annotated[str, _SECRET]
    sdk_app_id: Annotated[str, _SECRET]
    """The SMS application's SdkAppId (``1400...``)."""
    sign_name: Annotated[str, _SECRET]
    """The approved signature (短信签名) every message is sent with."""
    push_token: Annotated[str, msgspec.Meta(min_length=16)]
    """Tencent's callbacks are not signed: configure the callback URLs in the console with
    ``?token=<push_token>``; a callback without it is refused (403)."""
    endpoint: str = "https://sms.tencentcloudapi.com"
    region: str = "ap-guangzhou"
    templates: dict[str, str] = {}
    """Failover between two template-only providers: the other provider's template ids
    mapped to this provider's own (``{"SMS_123" = "1234567"}``). Their ids never match,
    so as the failover this provider sends only templates listed here."""


class SmsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>]`` keys of an SMS channel."""

    provider: Provider
    """Which provider sends (its sub-section must be present)."""
    failover: Provider | None = None
    """A second provider (its sub-section must be present), used after ``failover_after``
    transient failures of the first in a row."""
    failover_after: Annotated[int, msgspec.Meta(ge=1)] = 3
    failover_for: Duration = Duration("5m")
    """How long sends go to the second provider before the first is tried again."""
    twilio: TwilioConfig | None = None
    aliyun: AliyunConfig | None = None
    tencent: TencentConfig | None = None
    default_region: str = "CN"
    """Region (ISO 3166 alpha-2) for numbers written without a country code."""
    max_segments: Annotated[int, msgspec.Meta(ge=1, le=50)] = 5
    """A longer text is refused permanently (``too_long``) instead of billed."""
    opt_out_keywords: list[str] = msgspec.field(default_factory=lambda: ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL",
                                                                         "END", "QUIT", "REVOKE", "OPTOUT",
                                                                         "TD", "退订"])
    opt_in_keywords: list[str] = msgspec.field(default_factory=lambda: ["START", "UNSTOP", "YES"])
    public_url: str = ""
    """The gateway's public base URL (``https://gw.example.com``): what Twilio signs and
    where status callbacks are sent."""
    trust_forwarded: bool = False
    """Without ``public_url``, read the signed URL from ``X-Forwarded-Proto``/``-Host``."""
    api_timeout: Duration = Duration("10s")
    max_body: Annotated[int, msgspec.Meta(ge=1024)] = 1 << 20
    """Largest webhook or push body accepted (413 beyond)."""

    def __post_init__(self) -> None:
        for key in ("provider", "failover"):
            name = getattr(self, key)
            if name is not None and getattr(self, name) is None:
                raise ConfigValueError(name, f"missing required table ({key} = {name!r} sends through it)")
        if self.failover == self.provider:
            raise ConfigValueError("failover", "expected another provider than provider")
        # phonenumbers reads regions in upper case only: "us" would refuse every national number.
        self.default_region = self.default_region.upper()
        if self.default_region not in phonenumbers.SUPPORTED_REGIONS:
            raise ConfigValueError("default_region", "expected an ISO 3166 alpha-2 region such as CN or US")
        if self.public_url and not self.public_url.startswith(("https://", "http://")):
            # Twilio signs the full URL it called: without a scheme no signature could match.
            raise ConfigValueError("public_url", "expected the full base URL with its scheme, such as "
                                                 "https://gw.example.com")
