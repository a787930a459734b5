"""The conformance suite fails a channel that breaks its promises: a deliberately broken
adapter of the mock channel runs the suite in a separate pytest."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BROKEN = '''
from typing import Any

from gateway.testing import MockChannel, post_inbound
from gateway.testing.conformance import ChannelConformance, InboundAnswer


class TestBrokenConformance(ChannelConformance[None]):
    """Drops the provider id (retries are published again), makes every refusal
    transient (nothing is dead-lettered) and documents no key."""

    channel_type = "mock"
    doc = "empty.md"
    status_timeout = 3.0

    async def start_provider(self) -> None:
        return None

    def channel_config(self, provider: None) -> dict[str, Any]:
        return {"type": "mock"}

    async def send_inbound(self, gw, provider, provider_id, *, attempt=1):
        r = await post_inbound(gw.http.port, self.channel_name, text="hi", sender="alice")
        return InboundAnswer("accepted" if r.status_code == 200 else "try_again" if r.status_code == 503 else "refused")

    def fail_next_delivery(self, gw, provider, *, permanent):
        gw.channels[self.channel_name].channel.fail_next(permanent=False)

    def delivered(self, gw, provider):
        return gw.channels[self.channel_name].channel.delivered_count
'''


def test_a_channel_that_breaks_its_promises_fails_those_checks(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    (tmp_path / "empty.md").write_text("# mock\n")
    (tmp_path / "test_broken.py").write_text(textwrap.dedent(BROKEN))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", "-k",
                        "published_once or dead_lettered or documented or unknown_config"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    for check in ("test_retried_inbound_is_published_once", "test_permanent_refusal_is_dead_lettered",
                  "test_every_config_key_is_documented"):
        assert f"FAILED test_broken.py::TestBrokenConformance::{check}" in out, out
    assert "PASSED test_broken.py::TestBrokenConformance::test_unknown_config_keys_are_refused_naming_the_key" in out, out
    assert "3 failed, 1 passed" in out, out


STRICT = '''
from typing import Any

from gateway.testing import MockChannel, post_inbound
from gateway.testing.conformance import ChannelConformance, InboundAnswer


class TestMockConformance(ChannelConformance[None]):
    channel_type = "mock"

    async def start_provider(self) -> None:
        return None

    def channel_config(self, provider: None) -> dict[str, Any]:
        return {"type": "mock"}

    async def send_inbound(self, gw, provider, provider_id, *, attempt=1):
        r = await post_inbound(gw.http.port, self.channel_name, text="hi", sender="alice", id=provider_id)
        return InboundAnswer("accepted" if r.status_code == 200 else "try_again" if r.status_code == 503 else "refused")

    def fail_next_delivery(self, gw, provider, *, permanent):
        gw.channels[self.channel_name].channel.fail_next(permanent=permanent)

    def delivered(self, gw, provider):
        return gw.channels[self.channel_name].channel.delivered_count
'''


def test_the_suite_runs_in_pytest_asyncios_default_strict_mode(tmp_path):
    # An integrator's fresh project: no asyncio_mode anywhere (strict is pytest-asyncio's default).
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    (tmp_path / "test_mock.py").write_text(textwrap.dedent(STRICT))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q",
                        "-k", "published_once or dead_lettered"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for check in ("test_retried_inbound_is_published_once", "test_permanent_refusal_is_dead_lettered"):
        assert f"PASSED test_mock.py::TestMockConformance::{check}" in out, out
