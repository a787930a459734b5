"""Quiet hours in a channel's configuration: wrong values are errors naming the key."""

from __future__ import annotations

import pytest

from gateway import ConfigError, PluginManager, parse_config


def _problems(quiet: dict) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config({"channels": {"demo": {"type": "mock", "quiet_hours": quiet}}}, PluginManager().channel_types, env={})
    return exc.value.problems


def test_a_channel_quiet_hours_with_an_unknown_time_zone_names_the_key():
    [problem] = _problems({"start": "22:00", "end": "08:00", "tz": "Asia/Shangai"})
    assert "channels.demo.quiet_hours.tz" in problem and "IANA time zone" in problem


def test_a_channel_quiet_hours_with_an_impossible_time_names_the_key():
    [problem] = _problems({"start": "25:00", "end": "08:00", "tz": "Asia/Shanghai"})
    assert "channels.demo.quiet_hours.start" in problem and "HH:MM" in problem


def test_a_channel_quiet_hours_with_an_unknown_key_names_it():
    [problem] = _problems({"begin": "22:00"})
    assert "channels.demo.quiet_hours.begin" in problem and "unknown key" in problem


def test_valid_quiet_hours_reach_the_channel_config():
    cfg = parse_config({"channels": {"demo": {"type": "mock", "quiet_hours": {"start": "22:00", "end": "08:00",
                                                                              "tz": "America/New_York"}}}},
                       PluginManager().channel_types, env={})
    q = cfg.channels["demo"].quiet_hours
    assert q is not None and (q.start, q.end, q.tz) == ("22:00", "08:00", "America/New_York")
