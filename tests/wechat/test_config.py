"""Configuration errors of a wechat channel are reported with their key path."""

from __future__ import annotations

import pytest

from gateway import ConfigError, PluginManager, parse_config

from .conftest import AES_KEY, channel_config


def _parse(**overrides):
    return parse_config({"channels": {"wx": channel_config(**overrides)}}, PluginManager().channel_types,
                        source="gw.toml", env={})


def test_valid_config_in_every_mode_parses():
    assert _parse().channels["wx"].options.mode == "plaintext"
    assert _parse(mode="safe", encoding_aes_key=AES_KEY).channels["wx"].options.encoding_aes_key == AES_KEY


def test_encrypted_mode_without_aes_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"channels\.wx\.encoding_aes_key: expected the EncodingAESKey in safe mode"):
        _parse(mode="safe")


def test_bad_aes_key_and_unknown_key_are_config_errors():
    with pytest.raises(ConfigError) as info:
        _parse(mode="compatible", encoding_aes_key="tooshort", tokn="x")
    text = str(info.value)
    assert "channels.wx.encoding_aes_key" in text and "43-character" in text
    assert "channels.wx.tokn: unknown key (did you mean 'token'?)" in text
    assert "tooshort" not in text  # secrets are not echoed


def test_every_config_key_is_documented():
    from pathlib import Path

    import msgspec

    from gateway_plugins.wechat import WeChatConfig

    doc = (Path(__file__).parents[2] / "docs" / "channels" / "wechat.md").read_text(encoding="utf-8")
    missing = [f.encode_name for f in msgspec.structs.fields(WeChatConfig) if f"| `{f.encode_name}` |" not in doc]
    assert missing == []
