"""The public plugin API is closed: plugins, the test kit, examples, docs and tests reach
the gateway through ``gateway`` (and ``gateway.wire``, ``gateway.hookspecs``,
``gateway.testing``), never through the private ``gateway.core`` package."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import gateway

ROOT = Path(__file__).parent.parent
PRIVATE = re.compile(r"gateway\.core\.|(from|import) gateway\.core\b|from \.+core\b")
# Where authors read about plugins: no "see gateway/core/..." either.
AUTHOR_DOCS = re.compile(r"gateway/core/")
# The test kit's nats-server runner is infrastructure, not plugin API: its one import.
ALLOWED = {("gateway/testing/__init__.py", "from ..core.bus.embedded import LOCK_FILE, EmbeddedServer, free_port")}


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
                 "get_record", "put_record", "channel_type", "gateway.wire", "gateway.hookspecs", "body_problem"):
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
