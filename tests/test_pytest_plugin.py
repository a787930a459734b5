"""The installed package registers a pytest plugin (``pytest11``): it must not break
pytest in a virtualenv that lacks the optional test dependencies."""

from __future__ import annotations

import os
import subprocess
import sys


def test_pytest_runs_where_pytest_asyncio_is_not_installed(tmp_path):
    # This venv has pytest-asyncio; take it away: its own plugin is not loaded
    # (-p no:asyncio) and importing it fails, as in a venv that never installed it.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "pytest_asyncio.py").write_text('raise ImportError("No module named \'pytest_asyncio\'")\n')
    project = tmp_path / "elsewhere"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")  # not this project's settings
    (project / "test_trivial.py").write_text(
        "def test_trivial():\n    assert 1 + 1 == 2\n\n"
        "def test_wants_a_bus(nats_server):\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(shim)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:asyncio", "-p", "no:cacheprovider", "-rA"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert "omnichannel-gateway" in out, out  # our plugin was loaded
    assert "test_trivial.py::test_trivial PASSED" in out or "PASSED test_trivial.py::test_trivial" in out, out
    # A test that needs the fixture says what to install instead of a puzzling error.
    assert "the gateway's nats_server fixture needs pytest-asyncio: pip install 'omnichannel-gateway[test]'" in out, out
    assert "1 passed, 1 error" in out, out
