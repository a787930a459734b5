"""docs/writing-plugins.md runs as written: its walkthrough is pasted into a shell, from an
empty folder to a built package; the code it shows is what the scaffold writes (and that
code's own tests and mypy pass); the signatures it lists are the code's; the excerpts it
quotes from the built-in plugins are their code as it is.

Deviations from pasting, and why: the walkthrough runs in a virtualenv of its own on top of
the test venv (tests/docs_kit.py's PluginVenv), so installing the plugin leaves the test
venv clean; `pip install` and `pip wheel` get `--no-deps --no-build-isolation --no-index`
(the gateway and the build tools are already installed, and the machine may be offline)."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import zipfile

import pytest
from docs_kit import ROOT, PluginVenv, Shell, fenced_blocks

import gateway

GUIDE = ROOT / "docs" / "writing-plugins.md"
OFFLINE = " --no-deps --no-build-isolation --no-index"


def _kind(lang: str, code: str) -> str:
    first = code.splitlines()[0] if code.strip() else ""
    if lang == "sh" and "gateway new-plugin" in code:
        return "generate"
    if lang == "text":
        return "generated-files"
    if lang == "sh" and code.startswith("pip install -e"):
        return "develop"
    if lang == "sh" and code.startswith("pip wheel"):
        return "publish"
    if lang in ("python", "toml") and re.fullmatch(r"# (src|tests)/\S+|# pyproject\.toml", first):
        return "generated"
    if lang == "python" and first.startswith("# the signatures of gateway."):
        return "signatures"
    if lang == "python" and first.startswith("# from plugins/"):
        return "excerpt"
    return f"unknown {lang} block: {code[:60]!r}"


def _blocks(kind: str) -> list[str]:
    return [code for lang, code in fenced_blocks(GUIDE) if _kind(lang, code) == kind]


def test_every_block_of_the_guide_is_covered_by_this_test():
    kinds = [_kind(lang, code) for lang, code in fenced_blocks(GUIDE)]
    assert kinds == ["generate", "generated-files", "develop", "generated", "generated", "generated", "generated",
                     "publish", "signatures", "signatures", "signatures", "excerpt", "excerpt", "excerpt"], kinds


def _normal(text: str) -> str:
    return re.sub(r"\s+", "", text.replace("'", "").replace('"', ""))


def test_the_signatures_shown_are_the_codes_own():
    for block in _blocks("signatures"):
        tree = ast.parse(block)
        [cls_node] = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        cls = getattr(gateway, cls_node.name)
        shown: set[str] = set()
        for node in cls_node.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                real = getattr(cls, node.name)
                assert inspect.iscoroutinefunction(real) == isinstance(node, ast.AsyncFunctionDef), node.name
                documented = f"({ast.unparse(node.args)})->{ast.unparse(node.returns)}" if node.returns else ""
                assert _normal(documented) == _normal(str(inspect.signature(real))), (cls.__name__, node.name)
                shown.add(node.name)
            elif isinstance(node, ast.AnnAssign):
                name = node.target.id  # type: ignore[attr-defined]
                annotations = {k: v for c in reversed(cls.__mro__) for k, v in getattr(c, "__annotations__", {}).items()}
                assert _normal(ast.unparse(node.annotation)) == _normal(str(annotations[name])), (cls.__name__, name)
                shown.add(name)
        public = {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")} | {"__init__"} & set(vars(cls))
        fields = {n for n in cls.__dict__.get("__annotations__", {}) if not n.startswith("_")}
        assert public | fields <= shown, f"{cls.__name__}: not shown: {sorted((public | fields) - shown)}"


def test_the_excerpts_quoted_are_the_plugins_code_as_it_is():
    for block in _blocks("excerpt"):
        head, _, body = block.partition("\n")
        path = ROOT / head.removeprefix("# from ").split(":")[0]
        want = body.rstrip("\n").splitlines()
        lines = path.read_text().splitlines()
        windows = (textwrap.dedent("\n".join(lines[i:i + len(want)])).splitlines() for i in range(len(lines)))
        assert want in windows, f"{head}: this excerpt is not in {path.relative_to(ROOT)} any more:\n{body}"


@pytest.fixture
async def shell(tmp_path):
    venv = PluginVenv(tmp_path / "venv")
    (tmp_path / "work").mkdir()
    s = Shell(tmp_path / "work", prelude=f". {venv.bin}/activate && ", env=venv.env)
    yield s
    await s.close()


async def test_the_walkthrough_goes_from_an_empty_folder_to_a_built_package(shell):
    # 1. generate, and the files it says it writes
    [generate] = _blocks("generate")
    out = await shell.run(generate)
    package = shell.path / "gateway-fax"
    [listing] = _blocks("generated-files")
    assert out.splitlines() == listing.splitlines()
    assert sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()) == sorted(
        listing.splitlines())

    # 2. install beside the gateway; gateway plugins, pytest and mypy as the guide says
    [develop] = _blocks("develop")
    commands = develop.strip().splitlines()
    assert commands == ["pip install -e '.[test]'", "gateway plugins | grep fax", "pytest -q", "mypy"], commands
    await shell.run(commands[0] + OFFLINE, cwd=package, timeout=180)
    listed = await shell.run(commands[1], cwd=package)
    assert listed.startswith("fax ") and "gateway-fax 0.1.0" in listed, listed
    assert "(entry point gateway.plugins:fax = gateway_fax)" in listed, listed
    tests = await shell.run(commands[2], cwd=package, timeout=300)
    assert re.search(r"\b9 passed\b", tests) and "failed" not in tests, tests
    typed = await shell.run(commands[3], cwd=package, timeout=300)
    assert "Success: no issues found in 4 source files" in typed, typed

    # 3, 4. the code shown is the code generated (whole files, or an excerpt of pyproject.toml)
    for block in _blocks("generated"):
        head, _, body = block.partition("\n")
        generated = (package / head.removeprefix("# ")).read_text()
        if head == "# pyproject.toml":
            assert body in generated, body
        else:
            assert body == generated, f"{head} in the guide is not what the scaffold writes"

    # 6. publish: the wheel the guide names, with the entry point and py.typed
    [publish] = _blocks("publish")
    await shell.run(publish.strip() + OFFLINE, cwd=package, timeout=180)
    wheel = package / "dist" / "gateway_fax-0.1.0-py3-none-any.whl"
    assert f"`{wheel.relative_to(package)}`" in GUIDE.read_text()
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert '[gateway.plugins]\nfax = gateway_fax' in z.read(entry_points).decode()
    assert "gateway_fax/py.typed" in names and "gateway_fax/channel.py" in names
