"""The suite runs with the versions in requirements.lock, and the lock covers everything
installed from pyproject.toml's dependencies (so a fresh machine gets the same set)."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            assert ver, f"requirements.lock line {line!r} is not an exact pin (name==version)"
            pins[_norm(name)] = ver
    return pins


def test_installed_versions_are_the_locked_ones():
    pins = _lock()
    wrong = {}
    for name, ver in pins.items():
        try:
            got = version(name)
        except PackageNotFoundError:
            continue  # a platform-specific pin (uvloop on Windows)
        if got != ver:
            wrong[name] = f"locked {ver}, installed {got}"
    assert not wrong, f"run `bash .ci/run` (it installs from requirements.lock) or refresh the lock: {wrong}"


def test_every_direct_dependency_is_locked():
    pins = _lock()
    direct = [Requirement(r) for r in requires("omnichannel-gateway") or []]
    missing = sorted(_norm(r.name) for r in direct
                     if _norm(r.name) not in pins and (r.marker is None or r.marker.evaluate({"extra": "test"})))
    assert not missing, f"not in requirements.lock (run bash .ci/lock): {missing}"
