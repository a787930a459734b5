"""SMS channel: ``type = "sms"`` with Twilio, Aliyun (阿里云短信) or Tencent Cloud (腾讯云短信)
behind it, delivery receipts as statuses, opt-out keywords, segment counts, quiet hours and
failover to a second provider. See ``docs/channels/sms.md``."""

from __future__ import annotations

from gateway import Channel, hookimpl

from ._channel import SmsChannel
from ._config import AliyunConfig, SmsConfig, TencentConfig, TwilioConfig

__all__ = ["AliyunConfig", "SmsChannel", "SmsConfig", "TencentConfig", "TwilioConfig", "register_channel_types"]


@hookimpl
def register_channel_types() -> list[type[Channel]]:
    """The ``sms`` channel type."""
    return [SmsChannel]
