"""A wrong ``[channels.<name>]`` section of type telegram is a ConfigError naming the key,
and never repeats the bot token or the secret token."""

from __future__ import annotations

import pytest
from tg_fake import SECRET, TOKEN, tg_config

from gateway import ConfigError
from gateway.testing import make_config

URL = "nats://127.0.0.1:4222"  # parsing only


def problem(**over: object) -> str:
    with pytest.raises(ConfigError) as info:
        make_config(URL, {"tg": tg_config(None, **over)})
    text = str(info.value)
    assert TOKEN.split(":")[1] not in text and SECRET not in text
    return text


def test_the_minimal_webhook_and_polling_sections_are_valid():
    make_config(URL, {"tg": tg_config()})
    make_config(URL, {"tg": {"type": "telegram", "token": TOKEN, "mode": "polling"}})


def test_a_malformed_token_is_named_without_its_value():
    text = problem(token=TOKEN.split(":")[1] + "x")
    assert "channels.tg.token" in text and "value hidden" in text


def test_webhook_mode_needs_a_secret_token_of_at_least_16_safe_characters():
    assert "channels.tg.secret_token: expected a secret token in webhook mode" in problem(secret_token="")
    assert "16 to 256 characters" in problem(secret_token="short")
    assert "16 to 256 characters" in problem(secret_token="with spaces in it, sixteen+")


def test_public_url_must_be_https_and_keys_are_checked():
    assert "https://" in problem(public_url="http://gw.example.com")
    assert "channels.tg.group_messages" in problem(group_messages="some")
    assert "channels.tg.per_chat_per_second" in problem(per_chat_per_second=0)
    assert "channels.tg.mode" in problem(mode="websocket")


def test_the_documentations_example_is_a_valid_config():
    import re
    import tomllib
    from pathlib import Path

    from gateway import PluginManager, parse_config

    doc = (Path(__file__).parents[2] / "docs" / "channels" / "telegram.md").read_text(encoding="utf-8")
    [example] = re.findall(r"```toml\n(.*?)```", doc, re.S)
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_OTHER_BOT_TOKEN": "42:" + "b" * 35, "TELEGRAM_WEBHOOK_SECRET": SECRET}
    config = parse_config({"bus": {"url": URL}, **tomllib.loads(example)}, PluginManager().channel_types,
                          source="telegram.md", env=env)
    assert set(config.channels) == {"tg", "tg-polling"}
    assert config.channels["tg-polling"].options.mode == "polling"
