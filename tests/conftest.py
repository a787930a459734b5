"""Fixtures of the core tests. nats_server and gateway_factory come from
gateway.testing.fixtures (pytest11 entry point); helpers are imported from gateway.testing,
never from a conftest module (several conftest.py files share that module name)."""

from __future__ import annotations

import nats
import pytest


@pytest.fixture
async def bus(nats_server):
    """A raw nats-py connection to the test's server (what a backend in any language does)."""
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


@pytest.fixture
async def nc(bus):
    """The same connection under the name the channel tests use."""
    yield bus


@pytest.fixture(autouse=True)
def _default_logging():
    """Each test starts with structlog's defaults: a test that runs ``gateway.cli.main`` in
    process configures logging at warning level, which would hide the info lines a later
    test captures with ``structlog.testing.capture_logs``."""
    import structlog

    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
