"""The public plugin API is closed: plugins, the test kit, examples, docs and tests reach
the gateway through ``gateway`` (and ``gateway.wire``, ``gateway.hookspecs``,
``gateway.testing``), never through the private ``gateway.core`` package."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import gateway

ROOT = Path(__file__).parent.parent
PRIVATE = re.compile(r"gateway\.core\.|(from|import) gateway\.core\b|from \.+core\b")
# Where authors read about plugins: no "see gateway/core/..." either.
AUTHOR_DOCS = re.compile(r"gateway/core/")
# The test kit's nats-server runner is infrastructure, not plugin API: its one import.
ALLOWED = {("gateway/testing/__init__.py", "from ..core.bus.embedded import LOCK_FILE, EmbeddedServer, free_port"),
           # The core's survey matcher is no plugin API (the core applies it); its unit tests.
           ("tests/reminders/test_survey.py", "from gateway.core.scheduling.survey import match_choice")}


def _sources() -> list[Path]:
    files: list[Path] = []
    for folder, patterns in (("plugins", ("*.py", "*.md")), ("gateway/testing", ("*.py",)),
                             ("examples", ("*.py", "*.md", "*.js", "*.mjs", "*.ts")),
                             ("docs", ("*.md",)), ("tests", ("*.py",))):
        for pattern in patterns:
            files += (ROOT / folder).rglob(pattern)
    return sorted(set(files) - {Path(__file__)})


def test_nothing_outside_the_core_imports_private_core_modules():
    offenders = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if PRIVATE.search(line) and (rel, line.strip()) not in ALLOWED:
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "use the public API (gateway, gateway.wire, gateway.testing):\n" + "\n".join(offenders)


def test_plugin_author_docs_do_not_send_authors_into_the_core():
    docs = [ROOT / "docs" / "writing-plugins.md", *(ROOT / "docs" / "channels").glob("*.md")]
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in docs
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if AUTHOR_DOCS.search(line)]
    assert not offenders, offenders


def test_the_scan_catches_each_form_of_private_import():
    for line in ("from gateway.core.schema import encode", "import gateway.core.errors",
                 "from gateway.core import _hookspecs", "from ..core._channel import Channel",
                 "x = gateway.core.inbound.pipeline.message_id"):
        assert PRIVATE.search(line), line
    assert not PRIVATE.search("from gateway import Channel")


def test_every_public_name_has_a_docstring_and_is_documented_for_authors():
    doc = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    undocumented, missing = [], []
    for name in gateway.__all__:
        obj = getattr(gateway, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not inspect.getdoc(obj):
                undocumented.append(name)
    for name in ("Lease", "SharedValue", "ProviderIndex", "Supervised", "provider_error", "parse_retry_after",
                 "verify_hmac", "verify_ed25519", "check_timestamp", "public_url", "stable_id", "part_bytes",
                 "get_record", "put_record", "channel_type", "gateway.wire", "gateway.hookspecs", "RequestError.from_decode"):
        if f"`{name}" not in doc:
            missing.append(name)
    assert not undocumented, f"public names without a docstring: {undocumented}"
    assert not missing, f"not described in docs/writing-plugins.md: {missing}"


def test_wechat_and_email_import_only_gateway():
    offenders = []
    for path in (ROOT / "plugins").rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = re.match(r"\s*(?:from|import)\s+(gateway[\w.]*)", line)
            if m and m.group(1) != "gateway":
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_a_channel_that_still_sets_type_keeps_working_and_new_ones_still_read_as_type():
    from gateway import Channel, PluginManager

    class Legacy(Channel):
        type = "legacy"

    class Current(Channel):
        channel_type = "current"

    assert Legacy.channel_type == "legacy" and Current.type == "current"  # type: ignore[attr-defined]

    class P:
        @gateway.hookimpl
        def register_channel_types(self):
            return [Legacy, Current]

    assert {"legacy", "current"} <= set(PluginManager(load_entry_points=False, extra=[P()]).channel_types)


def test_all_is_one_sorted_list_without_duplicates():
    assert gateway.__all__ == sorted(set(gateway.__all__)), "gateway.__all__: keep it sorted, each name once"


def test_every_exported_name_is_in_the_authors_guide_and_nothing_else_is_exported():
    doc = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    missing = [n for n in gateway.__all__ if not re.search(rf"`{re.escape(n)}\b", doc)]
    assert not missing, f"exported but not described in docs/writing-plugins.md: {missing}"
    # A public attribute of the package that is not in __all__ is exported all the same.
    stray = [n for n, v in vars(gateway).items()
             if not n.startswith("_") and n not in gateway.__all__ and not inspect.ismodule(v)]
    assert not stray, f"public names of gateway outside __all__ (import them as _name): {stray}"


def test_internal_helpers_are_not_public():
    # The core's survey matcher and its body-error wording: plugins use ChoicePart and
    # RequestError.from_decode instead.
    for name in ("match_choice", "body_problem"):
        assert name not in gateway.__all__ and not hasattr(gateway, name), name


def test_every_public_error_is_a_gateway_error_defined_in_one_module():
    import gateway.client
    import gateway.testing

    errors = {obj for module in (gateway, gateway.client, gateway.testing) for name, obj in vars(module).items()
              if not name.startswith("_") and inspect.isclass(obj) and issubclass(obj, BaseException)}
    assert len(errors) >= 10, errors
    outside = sorted(e.__name__ for e in errors if not issubclass(e, gateway.GatewayError))
    assert not outside, f"public errors outside the GatewayError tree: {outside}"
    homes = {e.__module__ for e in errors}
    assert len(homes) == 1, f"public errors are defined in several modules: {homes}"


def test_errors_keep_the_bases_their_callers_may_catch():
    from gateway.client import ReminderError

    assert issubclass(ReminderError, ValueError) and issubclass(ReminderError, gateway.GatewayError)
    assert issubclass(gateway.WebSocketClosed, gateway.GatewayError)
    err = gateway.DeliveryError("refused", permanent=True, code="api_45015", provider_code=45015)
    assert err.provider_code == 45015 and err.code == "api_45015"
    assert gateway.DeliveryError("x", permanent=False).provider_code is None


async def test_an_oversized_publish_is_refused_with_ours_and_nats_pys_error(gateway_factory):
    import nats.errors

    gw = await gateway_factory({})
    nc = gw.bus.nc
    with pytest.raises(gateway.GatewayError) as info:
        await nc.publish("gw.test.oversized", b"x" * nc.max_payload, headers={"X-Pad": "y" * 256})
    assert isinstance(info.value, nats.errors.MaxPayloadError), type(info.value).__mro__
    assert "exceeds the server's max_payload" in str(info.value)


def test_request_error_from_decode_names_the_field_but_never_the_senders_words():
    import msgspec

    class Body(msgspec.Struct, forbid_unknown_fields=True):
        id: str

    decoder = msgspec.json.Decoder(Body)
    for raw, reason in ((b'{"id": 5}', "Expected `str`, got `int` at $.id"),
                        (b'{"id": "x", "s3cret-key": 1}', "unknown field"), (b"{not json", "malformed")):
        with pytest.raises(msgspec.DecodeError) as info:
            decoder.decode(raw)
        err = gateway.RequestError.from_decode("not a fax event", info.value)
        assert err.status == 400 and err.reason.startswith("not a fax event: ") and reason in err.reason, err.reason
        assert "s3cret" not in err.reason


def test_channel_context_config_and_log_are_typed():
    import typing

    hints = typing.get_type_hints(gateway.ChannelContext)
    assert hints["log"] is gateway.Logger
    assert hints["config"] is not typing.Any and isinstance(hints["config"], typing.TypeVar)


def test_plugins_carry_the_providers_code_on_delivery_error_not_on_their_own_classes():
    own = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in (ROOT / "plugins").rglob("*.py")
           for m in re.finditer(r"^class \w+\(DeliveryError\)", p.read_text(encoding="utf-8"), re.M)]
    assert not own, f"use DeliveryError(..., provider_code=) instead of a class of its own: {own}"
