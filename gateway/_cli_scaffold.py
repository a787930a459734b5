"""``gateway new-plugin NAME [--webhook|--poller] [--dir DIR]``: a channel plugin package
that installs, type-checks strictly and passes the conformance suite as generated.

The templates are package data in ``gateway/_scaffold/`` (``common/`` for both flavours,
``webhook/`` and ``poller/`` for the rest), rendered with :class:`string.Template`
(``$name``; ``$$`` is a dollar sign), so the generated Python needs no brace escaping."""

from __future__ import annotations

import keyword
import re
import string
import sys
from importlib.resources import files
from pathlib import Path
from typing import Literal

Flavour = Literal["webhook", "poller"]

NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""A channel type: it is a NATS subject token, a config value and part of a Python
package name (``gateway_<name>``), so lower-case letters, digits and ``_``."""


class ScaffoldError(Exception):
    """The name or the target folder cannot be used; the message says why."""


def _layout(name: str, flavour: Flavour) -> dict[str, str]:
    """Target path → template path, relative to the package folder and the template root."""
    package = f"gateway_{name}"
    return {
        "pyproject.toml": "common/pyproject.toml.tmpl",
        "README.md": "common/README.md.tmpl",
        f"src/{package}/__init__.py": "common/__init__.py.tmpl",
        f"src/{package}/channel.py": f"{flavour}/channel.py.tmpl",
        f"src/{package}/py.typed": "",
        f"tests/fake_{name}.py": f"{flavour}/fake.py.tmpl",
        "tests/test_conformance.py": f"{flavour}/test_conformance.py.tmpl",
    }


def check_name(name: str, taken: dict[str, str]) -> None:
    """Raise :class:`ScaffoldError` unless ``name`` can be a new channel type;
    ``taken`` maps the loaded channel types to the package providing each."""
    if not NAME.match(name):
        raise ScaffoldError(f"invalid plugin name {name!r}: a channel type is 1 to 32 lower-case letters, digits "
                            "and '_', starting with a letter (it becomes a NATS subject token and the package "
                            f"gateway_<name>)")
    if keyword.iskeyword(name):
        raise ScaffoldError(f"invalid plugin name {name!r}: a Python keyword")
    if name in taken:
        raise ScaffoldError(f"channel type {name!r} is already provided by {taken[name]} (see `gateway plugins`): "
                            "choose another name")


def render(name: str, flavour: Flavour, target: Path, gateway_version: str) -> list[Path]:
    """Write the package into ``target`` (absent or empty); the files written."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"{target} exists and is not an empty folder: give a new --dir")
    root = files("gateway") / "_scaffold"

    def template(path: str) -> str:
        return root.joinpath(*path.split("/")).read_text(encoding="utf-8")

    title = "".join(part.capitalize() for part in name.split("_"))
    values = {
        "name": name, "package": f"gateway_{name}", "dist": f"gateway-{name.replace('_', '-')}",
        "Class": title, "title": title, "UPPER": name.upper(), "gateway_version": _floor(gateway_version),
    }
    # The README's flavour-specific parts are templates too (they name $UPPER variables).
    for part in ("inbound", "keys"):
        values[part] = string.Template(template(f"{flavour}/{part}.md.tmpl")).substitute(values)
    values["inbound"] = " ".join(values["inbound"].split())
    values["example"] = string.Template(template(f"{flavour}/example.toml.tmpl")).substitute(values)
    written: list[Path] = []
    for rel, source in _layout(name, flavour).items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(string.Template(template(source)).substitute(values) if source else "", encoding="utf-8")
        written.append(path)
    return written


def _floor(version: str) -> str:
    """The release a generated plugin requires at least: this gateway's, without local or
    development suffixes (``0.1.0``)."""
    m = re.match(r"\d+(\.\d+)*", version)
    return m.group(0) if m else "0"


def run(name: str, flavour: Flavour, target: str | None, gateway_version: str, taken: dict[str, str]) -> int:
    """The command: 0 when written, 2 with a one-line reason otherwise."""
    try:
        check_name(name, taken)
        folder = Path(target) if target else Path(f"gateway-{name.replace('_', '-')}")
        written = render(name, flavour, folder, gateway_version)
    except ScaffoldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    cd = "" if folder.resolve() == Path.cwd().resolve() else f"cd {folder} && "
    print(f"\na {flavour} channel plugin for type = \"{name}\" in {folder}/. Next:\n"
          f"  {cd}pip install -e '.[test]' && pytest && mypy", file=sys.stderr)
    return 0
