"""Configuration: every problem reported with file, line, key path, expected and found."""

from __future__ import annotations

import copy
import pickle
import textwrap

import msgspec
import pytest

from gateway import ConfigError, ConfigValueError, Duration, PluginManager, load_config, seconds
from gateway.cli import main


def write(tmp_path, text: str):
    p = tmp_path / "gateway.toml"
    p.write_text(textwrap.dedent(text))
    return p


def check(tmp_path, capsys, text: str) -> tuple[int, str]:
    p = write(tmp_path, text)
    code = main(["check-config", str(p)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_wrong_type_names_file_line_key_expected_and_found(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [http]
        port = "80x"
        """)
    assert code == 2
    assert f"{tmp_path / 'gateway.toml'}:3: http.port: expected int, got str \"80x\"" in out


def test_every_problem_is_reported_not_just_the_first(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [bus]
        prefx = "gw"
        replicas = 9
        dedup_ttl = "a week"

        [channels.demo]
        type = "mock"
        deliver_dealy = "1s"
        """)
    assert code == 2
    assert ":3: bus.prefx: unknown key (did you mean 'prefix'?)" in out
    assert ":4: bus.replicas: expected int <= 5, got 9" in out
    assert ':5: bus.dedup_ttl: expected a duration such as 500ms, 30s, 5m, 2h, 7d, got str "a week"' in out
    assert ":9: channels.demo.deliver_dealy: unknown key (did you mean 'deliver_delay'?)" in out
    assert "4 problems in the configuration" in out


def test_unknown_top_level_section_is_an_error(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [buss]
        url = "nats://x"
        """)
    assert code == 2
    assert "buss: unknown key (did you mean 'bus'?)" in out


def test_missing_environment_variable_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GW_TEST_UNSET_TOKEN", raising=False)
    code, out = check(tmp_path, capsys, """
        [bus]
        token = "${GW_TEST_UNSET_TOKEN}"
        """)
    assert code == 2
    assert ":3: bus.token: environment variable GW_TEST_UNSET_TOKEN is not set" in out


def test_value_from_environment_is_never_echoed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GW_TEST_PORT", "s3cr3t-not-a-port")
    code, out = check(tmp_path, capsys, """
        [http]
        port = "${GW_TEST_PORT}"
        """)
    assert code == 2
    assert "http.port: expected int, got str (value hidden)" in out
    assert "s3cr3t" not in out


def test_secret_key_value_is_never_echoed(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [bus]
        password = 12345678
        """)
    assert code == 2
    assert "bus.password: expected str, got int (value hidden)" in out
    assert "12345678" not in out


def test_environment_variables_are_substituted(tmp_path, monkeypatch):
    monkeypatch.setenv("GW_TEST_URL", "nats://10.1.2.3:4222")
    p = write(tmp_path, """
        [bus]
        url = "${GW_TEST_URL}"
        prefix = "${GW_TEST_PREFIX:-acme}"
        """)
    cfg = load_config(p, PluginManager().channel_types)
    assert cfg.bus.url == "nats://10.1.2.3:4222"
    assert cfg.bus.prefix == "acme"


def test_gateway_bus_url_environment_overrides_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_BUS_URL", "nats://127.0.0.1:4999")
    p = write(tmp_path, "[bus]\nurl = 'nats://elsewhere:4222'\n")
    assert load_config(p, PluginManager().channel_types).bus.url == "nats://127.0.0.1:4999"


def test_invalid_toml_reports_line(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [http]
        port = = 8080
        """)
    assert code == 2
    assert "invalid TOML" in out and "line 3" in out


def test_unknown_channel_type_lists_loaded_types(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [channels.support]
        type = "fax"
        """)
    assert code == 2
    assert "channels.support.type: unknown channel type 'fax'; loaded types:" in out
    assert "mock" in out


def test_channel_without_type_is_an_error(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [channels.support]
        required = false
        """)
    assert code == 2
    assert "channels.support.type: missing required key" in out


def test_channel_name_must_be_a_subject_token(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [channels."Support.Mail"]
        type = "mock"
        """)
    assert code == 2
    assert "channels.Support.Mail: channel names are lower-case letters" in out


@pytest.mark.parametrize("name", ["survey", "quiet", "core"])
def test_a_channel_cannot_take_a_name_the_cores_records_live_under(tmp_path, capsys, name):
    # A channel's records are kept under its name in the shared state bucket, beside the
    # core's pending surveys, quiet hours and liveness markers.
    code, out = check(tmp_path, capsys, f"""
        [channels.{name}]
        type = "mock"
        """)
    assert code == 2
    assert f"channels.{name}: the channel name {name!r} is reserved" in out


def test_several_channels_of_one_type_are_allowed(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [channels.support]
        type = "mock"
        [channels.billing]
        type = "mock"
        rate_limit = 5
        """)
    assert code == 0, out
    assert "support (mock), billing (mock)" in out


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    code = main(["check-config", str(tmp_path / "nope.toml")])
    assert code == 2
    assert "nope.toml: file not found" in capsys.readouterr().err


def test_example_configuration_is_valid(capsys):
    from pathlib import Path

    example = Path(__file__).parent.parent / "gateway.example.toml"
    assert main(["check-config", str(example)]) == 0


def test_config_error_lists_problems_programmatically(tmp_path):
    p = write(tmp_path, "[log]\nformat = 'xml'\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, {})
    assert err.value.problems == [f"{p}:2: log.format: expected one of 'console', 'json', got str \"xml\""]


def test_every_core_config_key_is_documented():
    import dataclasses
    import typing
    from pathlib import Path

    import msgspec

    from gateway import ChannelConfig, Config
    from gateway.testing import MockConfig

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    # The sections as the public Config reaches them ([bus], [http], [log], [outbound] ...).
    settings = typing.get_type_hints(Config)["settings"]
    sections = [typing.get_args(f.type)[1] if typing.get_origin(f.type) is dict else f.type
                for f in msgspec.structs.fields(settings)]
    assert len(sections) >= 4
    # Sub-sections reached from them: a channel's `service`, a calendar's closures file.
    service = typing.get_args(typing.get_type_hints(ChannelConfig)["service"])[0]
    calendar = next(s for s in sections if "closures" in {f.name for f in msgspec.structs.fields(s)})
    closures_file = typing.get_args(typing.get_type_hints(calendar, include_extras=False)["loaded"])[0]
    entries = [typing.get_args(f.type)[0] for f in msgspec.structs.fields(closures_file)]
    for section in (*sections, MockConfig, service, *entries):
        for f in msgspec.structs.fields(section):
            assert f"`{f.encode_name}`" in doc, f"{section.__name__}.{f.encode_name} is not in docs/configuration.md"
    for f in dataclasses.fields(ChannelConfig):
        if f.name not in ("name", "options"):
            assert f"`{f.name}`" in doc, f"channel key {f.name} is not in docs/configuration.md"


def test_a_sub_sections_own_check_is_reported_at_its_key_and_line(tmp_path, capsys):
    # The plugin's __post_init__ of [channels.s.twilio] fails: name the key it names (at its
    # section's line, as the key is not written), not the channel.
    code, out = check(tmp_path, capsys, """
        [channels.s]
        type = "sms"
        provider = "twilio"

        [channels.s.twilio]
        account_sid = "AC0123456789abcdef0123456789abcdef"
        auth_token = "t"
        """)
    assert code == 2
    assert (f"{tmp_path / 'gateway.toml'}:6: channels.s.twilio.from_number: expected from_number or "
            f"messaging_service_sid" in out and "$." not in out)


BUS_URL_EXPECTED = "expected nats://, tls://, ws:// or wss:// URLs with a host (comma-separated for a cluster)"


@pytest.mark.parametrize("url", ["not a url s3cr3t", "http://s3cr3t:4222", "nats://", "nats://a:4222,,nats://b:4222",
                                 "nats://a:4222,ws://s3cr3t:8080", "nats://s3cr3t:99999"])
def test_a_bus_url_from_the_environment_is_validated_and_never_printed(tmp_path, capsys, monkeypatch, url):
    monkeypatch.setenv("GW_TEST_BUS", url)
    code, out = check(tmp_path, capsys, """
        [bus]
        url = "${GW_TEST_BUS}"
        """)
    assert code == 2, out
    assert f":3: bus.url: {BUS_URL_EXPECTED}" in out and "(value hidden)" in out
    assert "s3cr3t" not in out and "http://" not in out


def test_a_bus_url_in_the_file_is_validated_and_shown(tmp_path, capsys):
    code, out = check(tmp_path, capsys, """
        [bus]
        url = "localhost:4222"
        """)
    assert code == 2
    assert f':3: bus.url: {BUS_URL_EXPECTED}, got "localhost:4222"' in out


def test_gateway_bus_url_is_validated_and_never_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GATEWAY_BUS_URL", "s3cr3t-host:4222")
    code, out = check(tmp_path, capsys, "[bus]\nurl = 'nats://127.0.0.1:4222'\n")
    assert code == 2
    assert f"$GATEWAY_BUS_URL: {BUS_URL_EXPECTED}, got (value hidden)" in out
    assert "s3cr3t" not in out


@pytest.mark.parametrize("url", ["nats://10.9.8.7:4222", "tls://u:pw@10.9.8.7:4222,tls://10.9.8.6",
                                 "ws://10.9.8.7:8080, wss://10.9.8.6", "nats://10.9.8.7"])
def test_valid_bus_urls_from_the_environment_pass_and_the_ok_line_does_not_print_them(tmp_path, capsys, monkeypatch, url):
    monkeypatch.setenv("GW_TEST_BUS", url)
    code, out = check(tmp_path, capsys, """
        [bus]
        url = "${GW_TEST_BUS}"
        """)
    assert code == 0, out
    assert "10.9.8" not in out and "bus: from the environment" in out


def test_ports_come_from_the_environment_and_a_bad_one_is_named_not_printed(tmp_path, capsys, monkeypatch):
    p = write(tmp_path, "[http]\nport = 8080\n[bus]\nembedded_port = 4222\n")
    monkeypatch.setenv("GATEWAY_HTTP_PORT", "8123")
    monkeypatch.setenv("GATEWAY_BUS_PORT", "0")
    cfg = load_config(p, PluginManager().channel_types)
    assert (cfg.http.port, cfg.bus.embedded_port) == (8123, 0)
    monkeypatch.setenv("GATEWAY_HTTP_PORT", "80s3cr3t")
    monkeypatch.setenv("GATEWAY_BUS_PORT", "70000")
    code = main(["check-config", str(p)])
    out = capsys.readouterr().err
    assert code == 2
    assert "$GATEWAY_HTTP_PORT: expected a port number from 0 to 65535, got (value hidden)" in out
    assert "$GATEWAY_BUS_PORT: expected a port number from 0 to 65535, got (value hidden)" in out
    assert "s3cr3t" not in out and "70000" not in out


# --- durations: a number of seconds once loaded, the text kept for messages -------------


def test_a_duration_key_is_a_number_of_seconds_that_keeps_its_text(tmp_path):
    p = write(tmp_path, """
        [bus]
        dedup_ttl = "1.5d"
        [outbound]
        backoff = ["500ms", "2m"]
        [channels.demo]
        type = "mock"
        deliver_delay = "250ms"
        backoff = ["1s"]
        """)
    cfg = load_config(p, PluginManager().channel_types)
    assert cfg.bus.dedup_ttl == 1.5 * 86400 and str(cfg.bus.dedup_ttl) == "1.5d" and f"{cfg.bus.dedup_ttl}" == "1.5d"
    assert cfg.outbound.backoff == [0.5, 120.0] and [d.text for d in cfg.outbound.backoff] == ["500ms", "2m"]
    assert cfg.channels["demo"].options.deliver_delay == 0.25 and cfg.channels["demo"].backoff == [1.0]
    # What was not written is a Duration too (the defaults), and arithmetic gives plain floats.
    assert isinstance(cfg.bus.connect_timeout, Duration) and cfg.bus.connect_timeout == 5.0
    assert type(cfg.outbound.ack_wait * 2) is float and type(cfg.outbound.ack_wait + 0) is float


def test_seconds_takes_a_duration_a_duration_string_or_a_number():
    assert seconds(Duration("30s")) == 30.0 and type(seconds(Duration("30s"))) is float
    assert seconds("30s") == 30.0 and seconds("500ms") == 0.5 and seconds("7d") == 604800.0
    assert seconds(2) == 2.0 and seconds(0.25) == 0.25
    for bad in ("30", "30 s", "30S", "-1s", "", "1s\n", True):
        with pytest.raises(ValueError, match="not a duration"):
            seconds(bad)  # type: ignore[arg-type]


def test_a_duration_compares_by_value_so_a_reload_sees_only_real_changes(tmp_path):
    def settings(text: str):
        return load_config(write(tmp_path, text), {}).settings

    assert settings('[outbound]\nack_wait = "30s"\n') == settings('[outbound]\nack_wait = "0.5m"\n')
    assert settings('[outbound]\nack_wait = "30s"\n') != settings('[outbound]\nack_wait = "31s"\n')
    assert Duration("2h") == Duration("120m") and hash(Duration("2h")) == hash(7200.0)
    assert pickle.loads(pickle.dumps(Duration("2h"))).text == "2h" and copy.deepcopy(Duration("2h")).text == "2h"


@pytest.mark.parametrize("text, line, key, found", [
    ('[bus]\nconnect_timeout = "5 s"\n', 2, "bus.connect_timeout", 'got str "5 s"'),
    ('[outbound]\nbackoff = ["1s",\n  "2x"]\n', 2, "outbound.backoff.1", 'got str "2x"'),
    ('[calendars.desk]\n[channels.demo]\ntype = "mock"\nservice = { calendar = "desk", first_response = "4 hours" }\n',
     4, "channels.demo.service.first_response", 'got str "4 hours"'),
    ('[channels.demo]\ntype = "mock"\nbackoff = ["1s", "soon"]\n', 3, "channels.demo.backoff.1", 'got str "soon"'),
    ('[channels.demo]\ntype = "mock"\n[channels.demo.websocket]\nidle_timeout = "1y"\n', 4,
     "channels.demo.websocket.idle_timeout", 'got str "1y"'),
])
def test_a_bad_duration_names_file_line_key_and_what_was_expected(tmp_path, capsys, text, line, key, found):
    code, out = check(tmp_path, capsys, text)
    assert code == 2
    assert f"{tmp_path / 'gateway.toml'}:{line}: {key}: expected a duration such as 500ms, 30s, 5m, 2h, 7d, {found}" in out


def test_a_duration_that_is_not_a_string_says_so(tmp_path, capsys):
    code, out = check(tmp_path, capsys, "[reminders]\nack_wait = 30\n")
    assert code == 2 and ":2: reminders.ack_wait: expected str, got int 30" in out


# --- one validation style: msgspec judges, the loader names file, line and key ----------


class _Fax(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = ""
    mode: str = "push"
    api_key: str = ""

    def __post_init__(self) -> None:
        if self.mode == "pull" and not self.url.startswith("https://"):
            raise ConfigValueError("url", "expected an https:// URL in pull mode")
        if self.api_key == "short":
            raise ConfigValueError("api_key", "expected at least 16 characters")


class _Old(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: int = 0

    def __post_init__(self) -> None:
        if self.level > 3:
            raise ValueError("level must be at most 3")


class _FaxChannel:
    config_type = _Fax


class _OldChannel:
    config_type = _Old


def test_a_config_value_error_is_reported_at_its_key_and_line_with_what_was_found(tmp_path, capsys):
    p = write(tmp_path, """
        [channels.fax]
        type = "fax"
        mode = "pull"
        url = "http://fax.example"

        [channels.fax2]
        type = "fax"
        api_key = "short"

        [channels.old]
        type = "old"
        level = 5
        """)
    with pytest.raises(ConfigError) as info:
        load_config(p, {"fax": _FaxChannel, "old": _OldChannel})
    assert info.value.problems == [
        f'{p}:5: channels.fax.url: expected an https:// URL in pull mode, got "http://fax.example"',
        f"{p}:9: channels.fax2.api_key: expected at least 16 characters, got (value hidden)",  # a secret's key
        f"{p}:11: channels.old: level must be at most 3",  # a plain ValueError: the section, as before
    ]


def test_a_config_value_error_is_a_config_error_and_a_value_error():
    with pytest.raises(ConfigError) as info:
        _Fax(mode="pull")
    assert isinstance(info.value, ValueError) and info.value.problems == ["url: expected an https:// URL in pull mode"]
    assert info.value.key == ("url",) and ConfigValueError(("strings", "fr"), "x").key == ("strings", "fr")


def test_a_key_of_a_table_is_named_not_elided(tmp_path, capsys):
    # msgspec locates a problem inside a dict as `$.templates[...]`: the walk names the key.
    code, out = check(tmp_path, capsys, """
        [service]
        templates = { zh = "您好", en = 5 }
        """)
    assert code == 2 and ':3: service.templates.en: expected str, got int 5' in out


def test_independent_sections_are_all_checked(tmp_path, capsys):
    # A type error in the channel does not hide its sub-section's own check (and vice versa).
    code, out = check(tmp_path, capsys, """
        [channels.s]
        type = "sms"
        provider = "twilio"
        max_segments = 99

        [channels.s.twilio]
        account_sid = "AC0123456789abcdef0123456789abcdef"
        auth_token = "t"
        """)
    assert code == 2 and ":5: channels.s.max_segments: expected int <= 50, got 99" in out
    assert ":7: channels.s.twilio.from_number: expected from_number or messaging_service_sid" in out
