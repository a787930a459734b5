"""The keys of a ``type = "wechat"`` channel section."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

import msgspec

from gateway import ConfigValueError, Duration

_AES_KEY = msgspec.Meta(pattern=r"^[A-Za-z0-9+/]{43}$",
                        description="the 43-character EncodingAESKey from the official account's settings")


class WeChatConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[channels.<name>]`` keys of a WeChat official account (公众号)."""

    appid: str
    """The account's AppID (``wx...``): gets the access_token, checked in encrypted messages."""
    secret: str
    """The AppSecret, used only to get the access_token."""
    token: str
    """The webhook Token set in 服务器配置: signs every callback."""
    mode: Literal["plaintext", "compatible", "safe"] = "plaintext"
    """Message encryption mode (明文 / 兼容 / 安全), as set in the account's settings."""
    encoding_aes_key: Annotated[str, _AES_KEY] | Literal[""] = ""
    """EncodingAESKey; required in ``compatible`` and ``safe`` mode."""
    api_base: str = "https://api.weixin.qq.com"
    """Where the WeChat API is (a proxy, or a local fake in tests)."""
    api_timeout: Duration = Duration("10s")
    timestamp_tolerance: Duration = Duration("5m")
    """A callback whose ``timestamp`` differs from our clock by more is refused (replay guard)."""
    max_body: Annotated[int, msgspec.Meta(ge=1024)] = 65536
    """Largest callback body accepted (WeChat's are a few KB); larger ones get 413."""
    window: Duration = Duration("48h")
    """Customer-service messages are allowed this long after the customer's last interaction."""
    token_refresh_margin: Duration = Duration("5m")
    """Refresh the access_token this long before WeChat says it expires."""
    download_media: bool = True
    """Copy inbound images, voice and video into the object store (in the background)."""
    max_media_size: Annotated[int, msgspec.Meta(ge=1)] = 20 * 1024 * 1024
    """Inbound media larger than this are not copied."""
    media_cache_ttl: Duration = Duration("70h")
    """How long an uploaded temporary media id is reused (WeChat keeps it 3 days)."""

    def __post_init__(self) -> None:
        if self.mode != "plaintext" and not self.encoding_aes_key:
            raise ConfigValueError("encoding_aes_key", f"expected the EncodingAESKey in {self.mode} mode (43 "
                                                       f"characters, from the official account's settings)")
        if self.encoding_aes_key:
            try:
                base64.b64decode(self.encoding_aes_key + "=", validate=True)
            except binascii.Error:
                raise ConfigValueError("encoding_aes_key", "expected valid base64 (the EncodingAESKey from the "
                                                           "official account's settings)") from None
