"""The QQ channel's configuration: one transport per section, unknown keys named."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import ConfigError
from gateway.testing import make_config

from .conftest import official_config, onebot_config

URL = "nats://127.0.0.1:4222"  # parsing only


@pytest.mark.parametrize("section", [{"type": "qq"}, {**official_config(), **onebot_config()}])
def test_exactly_one_transport_is_required(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(URL, {"qq": section})
    assert "exactly one of [onebot] or [official]" in str(info.value)


@pytest.mark.parametrize("path", [("onebot",), ("onebot", "groups", "123")])
def test_unknown_onebot_key_is_named(path: tuple[str, ...]) -> None:
    cfg = onebot_config(groups={"123": {"filter": "mention"}})
    section = cfg
    for name in path:
        section = section[name]
    section["filtre"] = "all"
    with pytest.raises(ConfigError) as info:
        make_config(URL, {"qq": cfg})
    assert ".".join(("qq", *path, "filtre")) in str(info.value)


def test_unknown_filter_value_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        make_config(URL, {"qq": onebot_config(filter="everything")})
    assert "qq.onebot.filter" in str(info.value)


def test_the_documentations_example_is_a_valid_config() -> None:
    import re
    import tomllib
    from pathlib import Path

    from gateway import PluginManager, parse_config

    doc = (Path(__file__).parents[2] / "docs" / "channels" / "qq.md").read_text(encoding="utf-8")
    [example] = re.findall(r"```toml\n(.*?)```", doc, re.S)
    data = {"bus": {"url": URL}, **tomllib.loads(example)}
    config = parse_config(data, PluginManager().channel_types, source="qq.md",
                          env={"ONEBOT_TOKEN": "t", "QQBOT_SECRET": "s"})
    assert set(config.channels) == {"qq-customers", "qq-bot"}


@pytest.mark.parametrize("section, key", [
    # Both passed check-config, and then the channel failed to start (or never matched).
    (official_config(app_id=""), "qq.official.app_id"),
    (official_config(secret=""), "qq.official.secret"),
    (onebot_config(groups={"客户群": {"filter": "all"}}), "qq.onebot.groups.客户群: expected a group number"),
])
def test_what_cannot_work_is_refused_by_check_config(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(URL, {"qq": section})
    assert key in str(info.value)
