"""Plugin discovery through entry points, hook validation, and the documented hooks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gateway
from gateway import Channel, PluginError, PluginManager, hookimpl

ROOT = Path(__file__).parent.parent


def make_dist(tmp_path: Path, name: str, module_source: str, ep_name: str | None = None) -> dict[str, str]:
    """Install a third-party plugin the way pip would leave it: a module plus a
    dist-info folder with an entry point in the gateway.plugins group."""
    mod = f"{name}_plugin"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(module_source))
    info = tmp_path / f"{name}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[gateway.plugins]\n{ep_name or name} = {mod}\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    return env


FAX = """
    import msgspec
    from gateway import Channel, hookimpl

    class FaxConfig(msgspec.Struct, forbid_unknown_fields=True):
        number: str

    class FaxChannel(Channel):
        type = "fax"
        config_type = FaxConfig

    @hookimpl
    def register_channel_types():
        return [FaxChannel]
"""


def gateway_cmd(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60)


def test_builtin_plugin_is_loaded_through_its_entry_point():
    r = gateway_cmd("plugins", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["type"]: row for row in json.loads(r.stdout)}
    assert rows["mock"]["source"] == "entry point gateway.plugins:mock = gateway.testing._mock"
    assert rows["mock"]["package"] == "omnichannel-gateway"
    assert rows["mock"]["version"] == gateway.__version__


def test_third_party_plugin_is_discovered_and_its_config_validated(tmp_path):
    env = make_dist(tmp_path, "gwfax", FAX, ep_name="fax")
    r = gateway_cmd("plugins", env=env)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("fax "))
    assert "gwfax 1.2.3" in line and "gwfax_plugin.FaxChannel" in line and "entry point gateway.plugins:fax" in line
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[channels.office-fax]\ntype = "fax"\nnumber = 42\n')
    r = gateway_cmd("check-config", str(cfg), env=env)
    assert r.returncode == 2
    assert f"{cfg}:3: channels.office-fax.number: expected str, got int 42" in r.stderr


def test_misspelled_hook_implementation_is_a_startup_error(tmp_path):
    env = make_dist(tmp_path, "typo", """
        from gateway import hookimpl

        @hookimpl
        def register_channel_type():   # missing "s": matches no hook
            return []
    """)
    r = gateway_cmd("plugins", env=env)
    assert r.returncode == 4
    assert "plugin 'typo'" in r.stderr and "register_channel_type" in r.stderr


def test_plugin_that_fails_to_import_is_named(tmp_path):
    env = make_dist(tmp_path, "broken", "raise RuntimeError('boom at import')\n")
    r = gateway_cmd("plugins", env=env)
    assert r.returncode == 4
    assert "plugin 'broken'" in r.stderr and "boom at import" in r.stderr


def test_gateway_load_plugins_limits_what_is_loaded(tmp_path):
    env = make_dist(tmp_path, "gwfax", FAX, ep_name="fax")
    env["GATEWAY_LOAD_PLUGINS"] = "fax"
    r = gateway_cmd("plugins", "--json", env=env)
    assert [row["type"] for row in json.loads(r.stdout)] == ["fax"]


def test_same_channel_type_from_two_plugins_is_an_error():
    class A(Channel):
        type = "dup"

    class P1:
        @hookimpl
        def register_channel_types(self):
            return [A]

    class P2:
        @hookimpl
        def register_channel_types(self):
            return [A]

    with pytest.raises(PluginError, match="channel type 'dup' is registered twice"):
        PluginManager(load_entry_points=False, extra=[P1(), P2()])


def test_registering_a_non_channel_class_is_an_error():
    class P:
        @hookimpl
        def register_channel_types(self):
            return [dict]

    with pytest.raises(PluginError, match="not a gateway.Channel subclass"):
        PluginManager(load_entry_points=False, extra=[P()])


def test_every_hook_is_documented_and_tested():
    import gateway.hookspecs

    hooks = gateway.hookspecs.__all__
    # gateway.hookspecs lists them by hand: every hook the plugin manager knows is public there.
    known = {n for n in vars(PluginManager(load_entry_points=False).pm.hook) if not n.startswith("_")}
    assert sorted(hooks) == sorted(known), "gateway.hookspecs.__all__ is not every hook"
    assert all(getattr(gateway.hookspecs, n).__doc__ for n in hooks)
    doc = (ROOT / "docs" / "writing-plugins.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    for name in hooks:
        assert f"`{name}" in doc, f"hook {name} is not documented in docs/writing-plugins.md"
        assert re.search(rf"def {name}\(", tests), f"hook {name} is used by no test"


def test_public_api_exports_only_public_names():
    assert all(not n.startswith("_") or n == "__version__" for n in gateway.__all__)
    for name in gateway.__all__:
        assert hasattr(gateway, name), name
    assert "Gateway" in gateway.__all__ and "Channel" in gateway.__all__


def test_channel_plugins_never_import_nats():
    offenders = []
    for path in list((ROOT / "plugins").rglob("*.py")) + [ROOT / "gateway" / "testing" / "_mock.py"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(import nats|from nats)\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, f"plugins must use the context, not NATS: {offenders}"
