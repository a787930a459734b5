"""`gateway new-plugin` writes a plugin package that works as generated, seen from the
outside: installed as a separate package beside the gateway, listed by `gateway plugins`
through its entry point, clean under `mypy --strict` against the installed gateway, and
passing its own conformance tests. And the gateway's wheel ships what that needs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
from docs_kit import ROOT, PluginVenv

from gateway.cli import main


@pytest.mark.parametrize("flavour", ["webhook", "poller"])
def test_a_generated_plugin_installs_lists_type_checks_and_passes_its_conformance_tests(flavour, tmp_path, capsys):
    name = f"acme_{flavour}"
    package = tmp_path / "plugin"
    assert main(["new-plugin", name, f"--{flavour}", "--dir", str(package)]) == 0
    written = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    assert written == {"pyproject.toml", "README.md", f"src/gateway_{name}/__init__.py",
                       f"src/gateway_{name}/channel.py", f"src/gateway_{name}/py.typed",
                       f"tests/fake_{name}.py", "tests/test_conformance.py"}
    assert str(package / "pyproject.toml") in capsys.readouterr().out

    venv = PluginVenv(tmp_path / "venv")
    venv.run([venv.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
              "--no-build-isolation", "--no-index", "--no-cache-dir", str(package)], tmp_path)

    rows = json.loads(venv.run([venv.python, "-m", "gateway", "plugins", "--json"], tmp_path))
    [row] = [r for r in rows if r["type"] == name]
    assert row["package"] == f"gateway-{name.replace('_', '-')}" and row["version"] == "0.1.0", row
    assert row["source"] == f"entry point gateway.plugins:{name} = gateway_{name}", row
    assert row["class"] == f"gateway_{name}.channel.Acme{flavour.capitalize()}Channel", row

    # The generated pyproject asks for strict; the flag is repeated so a template change cannot drop it.
    out = venv.run([venv.python, "-m", "mypy", "--strict", "--no-incremental", "src", "tests"], package)
    assert "Success: no issues found" in out, out

    out = venv.run([venv.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA"], package)
    passed = [line for line in out.splitlines() if line.startswith("PASSED ")]
    checks = [line for line in passed if "Conformance::test_" in line]
    assert len(checks) == 8 and len(passed) == 9, out


def test_the_test_venv_does_not_see_the_generated_plugin():
    # The installs above went into their own venvs.
    from gateway import PluginManager

    assert not [t for t in PluginManager().channel_types if t.startswith("acme_")]


@pytest.mark.parametrize("name, reason", [
    ("Fax", "lower-case letters"), ("fax-2", "lower-case letters"), ("2fax", "starting with a letter"),
    ("x" * 33, "1 to 32"), ("class", "Python keyword"), ("email", "already provided by omnichannel-gateway"),
])
def test_new_plugin_refuses_a_name_that_cannot_be_a_channel_type(name, reason, tmp_path, capsys):
    assert main(["new-plugin", name, "--dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and reason in err, err
    assert not (tmp_path / "p").exists()


def test_new_plugin_writes_into_an_empty_folder_but_never_over_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["new-plugin", "fax", "--dir", str(tmp_path / "empty")]) == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["new-plugin", "fax", "--dir", str(tmp_path / "busy")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]


def test_new_plugin_flavours_are_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["new-plugin", "fax", "--webhook", "--poller"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_the_gateway_wheel_ships_py_typed_and_the_scaffold_templates(tmp_path):
    # Built from a copy: setuptools leaves build/ in the source folder, and a stale
    # build/lib there would hide a file the package data no longer lists.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "node_modules")
    for folder in ("gateway", "plugins"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--no-cache-dir", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("omnichannel_gateway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway" / "_scaffold").rglob("*.tmpl")}
    assert "gateway/py.typed" in names
    assert templates and templates <= names, sorted(templates - names)
