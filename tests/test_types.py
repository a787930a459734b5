"""Type checking is part of the suite: mypy over gateway/ and plugins/ (configured in
pyproject.toml's [tool.mypy], strict on the public API's modules) reports no error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_mypy_reports_no_type_errors():
    # The interpreter running the tests, so the venv's mypy and installed packages are used;
    # .mypy_cache (gitignored) makes later runs incremental.
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mypy found type errors (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
