"""The core's shape, checked: its folders follow the flow (in → bus → out → reminders) and
import only downwards, no module imports itself round a circle, and the parts the
``Gateway`` builds are handed what they need and never the ``Gateway`` itself; the bus
services know none of their users."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).parent.parent / "gateway" / "core"
PKG = "gateway" + ".core"  # spelled apart: test_public_api scans this file for private imports

# Lowest first. An area may import from areas before it, never from one after it. The
# foundation (errors, config, wire types, logs, metrics, fault points, retry) is shared by
# all; ``channel`` is the vocabulary every stage speaks (a plugin's API: ``Conversation``,
# ``Receipt``, the toolkit); ``bus`` stores it; ``scheduling`` (reminders, quiet hours,
# surveys) is below ``inbound`` because an inbound message answers a pending survey;
# ``context`` narrows the stages to one channel; ``process`` builds them all.
LAYERS: list[set[str]] = [
    {"errors", "failpoints", "retry", "logs", "metrics", "schema", "config"},
    {"http"},
    {"channel"},
    {"bus"},
    {"scheduling"},
    {"inbound"},
    {"delivery"},
    {"context"},
    {"hookspecs"},
    {"registry"},
    {"process"},
]


def _module(path: Path) -> str:
    parts = ["gateway", *path.relative_to(CORE.parent).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every core module ``path`` imports, absolute, at any depth (``if TYPE_CHECKING:``
    blocks and function bodies included)."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith(PKG):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names if (CORE.parent / (f"{target}.{a.name}".split(".", 1)[1].replace(".", "/") + ".py")).exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PKG + "."))
    return found


def _area(module: str) -> str:
    """``<core>.bus.services`` → ``bus``; ``<core>.config`` → ``config``."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else ""


def _rank(area: str) -> int:
    for i, layer in enumerate(LAYERS):
        if area in layer:
            return i
    raise AssertionError(f"gateway/core/{area} is in no layer of tests/test_core_layers.py: place it")


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in CORE.rglob("*.py")}


def test_every_core_area_imports_only_areas_below_it():
    offenders = []
    for module, targets in _graph().items():
        if not _area(module):
            continue
        for target in targets:
            a, b = _area(module), _area(target)
            if b and a != b and _rank(b) >= _rank(a) and not (_rank(a) == 0 and _rank(b) == 0):
                offenders.append(f"{module} -> {target}")
    assert not offenders, "imports against the flow:\n" + "\n".join(sorted(offenders))


def test_no_core_module_imports_itself_round_a_circle():
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.endswith(tuple(f".{a}" for a in ("core",))) or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


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


def test_the_parts_the_gateway_builds_neither_import_nor_name_it():
    offenders = {}
    for path in CORE.rglob("*.py"):
        module = _module(path)
        if _area(module) in ("process", ""):
            continue
        bad = sorted({t for t in _imports(path) if t == f"{PKG}.process"}
                     | (_names(path.read_text(encoding="utf-8")) & {"Gateway"}))
        if bad:
            offenders[module] = bad
    assert not offenders, offenders


def test_bus_services_know_none_of_the_parts_they_serve():
    users = {"inbound", "delivery", "http", "scheduling", "context", "process"}
    assert not {_area(t) for t in _imports(CORE / "bus" / "services.py")} & users


def test_the_scans_see_every_way_of_importing(tmp_path):
    pkg = PKG
    probe = CORE / "inbound" / "_probe_for_layers_test.py"
    probe.write_text(f"from ..process import Gateway\nfrom .. import context\nif TYPE_CHECKING:\n"
                     f"    from {pkg}.delivery.dispatcher import Dispatcher\ndef f():\n    import {pkg}.bus.services\n",
                     encoding="utf-8")
    try:
        found = _imports(probe)
    finally:
        probe.unlink()
    assert {f"{pkg}.process", f"{pkg}.context", f"{pkg}.delivery.dispatcher", f"{pkg}.bus.services"} <= found
    assert _rank("process") > _rank("inbound") > _rank("bus") > _rank("errors")
    assert "Gateway" in _names("def f(gw: 'Gateway') -> None: ...")
