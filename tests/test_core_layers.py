"""The core's shape, checked: its folders follow the flow (in → bus → out → reminders) and
import only downwards, no module imports itself round a circle, and the parts the
``Gateway`` builds are handed what they need and never the ``Gateway`` itself; the bus
services know none of their users; and only the bus touches its buckets (KV) and names
JetStream's error codes."""

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


# --- one owner of the bus's buckets -------------------------------------------------------

BUS = CORE / "bus"
PLUGINS = CORE.parent.parent / "plugins"
# What reaches a bucket itself: nats-py's bucket objects and the gateway's own (``.kv``), a
# bucket's name or stream (``kv_state``, ``kv_stream``), a KV subject or stream spelled out,
# and the headers of KV markers and of compare-and-set.
_KV_CALLS = {"key_value", "create_key_value", "delete_key_value"}
_KV_STRINGS = ("$KV", "KV_")
_KV_HEADERS = {"KV-Operation", "Nats-Expected-Last-Subject-Sequence"}


def _code_names(tree: ast.AST) -> set[str]:
    """The names a module imports from the bus's error codes (``bus/codes.py``)."""
    return {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").split(".")[-2:] == ["bus", "codes"] for a in node.names}


def _is_err_code(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "err_code") or (
        isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value == "err_code" for a in node.args))


def _state_access(source: str) -> list[str]:
    """Every place in ``source`` that touches the bus's key-value state or a JetStream error
    code itself instead of through ``gateway/core/bus/`` (``state.py``, ``codes.py``)."""
    tree = ast.parse(source)
    codes = _code_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (node.attr in ("kv", "kv_stream") or node.attr.startswith("kv_")
                                                 or node.attr in _KV_CALLS):
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in _KV_CALLS:
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value.startswith(_KV_STRINGS) or node.value in _KV_HEADERS):
            found.append(f"{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Compare) and any(_is_err_code(n) for n in (node.left, *node.comparators)):
            # An error code is compared by the name the bus gives it, never as a number
            # or a name of the module's own.
            for operand in (node.left, *node.comparators):
                if _is_err_code(operand):
                    continue
                for part in ast.walk(operand):
                    if isinstance(part, ast.Constant) and isinstance(part.value, int) or (
                            isinstance(part, ast.Name) and part.id not in codes):
                        found.append(f"{node.lineno}: err_code compared with {ast.unparse(part)}")
    return found


def test_only_the_bus_touches_its_buckets_and_names_jetstream_error_codes():
    offenders = []
    for path in sorted([*CORE.parent.rglob("*.py"), *PLUGINS.rglob("*.py")]):
        if path.is_relative_to(BUS):
            continue
        offenders += [f"{path.relative_to(CORE.parent.parent)}:{hit}"
                      for hit in _state_access(path.read_text(encoding="utf-8"))]
    assert not offenders, ("KV state or a JetStream error code outside gateway/core/bus/ (use bus/state.py, "
                           "bus/codes.py):\n" + "\n".join(offenders))


def test_the_state_scan_sees_every_way_of_touching_a_bucket():
    probe = """
from ..bus.codes import WRONG_LAST_SEQUENCE
OVERLAP = 10100
async def f(bus, js, s, exc):
    kv = bus.kv[s.kv_state]
    await js.key_value("gw_conversations")
    await js.publish(s.kv(s.kv_dedup, "k"), b"", headers={"Nats-Expected-Last-Subject-Sequence": "3"})
    await js.get_last_msg(s.kv_stream("gw_state"), f"$KV.gw_state.{exc}")
    await js.publish("$KV.gw_state.k", b"", headers={"KV-Operation": "DEL"})
    await js.stream_info("KV_gw_state")
    return exc.err_code == 10071 or exc.err_code in (OVERLAP, WRONG_LAST_SEQUENCE) \\
        or getattr(exc, "err_code", None) != 10158 or exc.err_code == WRONG_LAST_SEQUENCE
"""
    hits = _state_access(probe)
    for seen in (".kv", ".kv_state", ".key_value", ".kv_dedup", "Nats-Expected-Last-Subject-Sequence",
                 ".kv_stream", "'$KV.gw_state.'", "'$KV.gw_state.k'", "KV-Operation", "'KV_gw_state'",
                 "with 10071", "with OVERLAP", "with 10158"):
        assert any(seen in hit for hit in hits), (seen, hits)
    assert not any("WRONG_LAST_SEQUENCE" in hit for hit in hits), hits
    # The scan covers the core outside the bus, the rest of the package and the plugins.
    assert (CORE / "inbound" / "pipeline.py").exists() and (PLUGINS / "email").is_dir()
