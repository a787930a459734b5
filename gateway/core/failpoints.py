"""Crash points for fault tests: ``GATEWAY_FAILPOINTS=outbound.after_receipt`` makes the
process SIGKILL itself exactly there, so a test can show what a kill -9 at that point
does. Read once at import; costs one set lookup when unset."""

from __future__ import annotations

import os
import signal

_ACTIVE = frozenset(n.strip() for n in os.environ.get("GATEWAY_FAILPOINTS", "").split(",") if n.strip())


def failpoint(name: str) -> None:
    """Die here, as by kill -9, if ``name`` is enabled."""
    if _ACTIVE and name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
