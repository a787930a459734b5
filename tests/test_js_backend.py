"""The bus contract followed from another language: examples/js/backend.mjs (NATS.js, no
code of ours) runs with node against a real ``gateway run``, answers a customer and
follows its reply's statuses.

It needs node and the example's node_modules (``npm ci`` in examples/js; .ci/run does it,
and this test does it once if they are missing). Without node the test fails: the
contract's non-Python promise is then untested."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from gateway.testing import GatewayProcess, post_inbound, wait_until

EXAMPLE = Path(__file__).parent.parent / "examples" / "js"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's exact dependencies installed (package-lock)."""
    binary = shutil.which("node")
    if binary is None:
        pytest.fail("node is not installed: the JavaScript backend test needs Node.js 18+ "
                    "(Debian: apt-get install nodejs npm; .ci/run installs it)", pytrace=False)
    if not (EXAMPLE / "node_modules" / "@nats-io" / "jetstream").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("examples/js/node_modules is missing and npm is not installed", pytrace=False)
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            pytest.fail(f"npm ci in examples/js failed:\n{r.stdout}\n{r.stderr}", pytrace=False)
    return binary


def events(out: str) -> list[list[str]]:
    return [line.split(" ") for line in out.splitlines() if line.strip()]


async def test_a_javascript_backend_built_from_the_contract_replies_and_follows_the_statuses(node, tmp_path):
    record = tmp_path / "deliveries.jsonl"
    gp = GatewayProcess(tmp_path, channels=f'[channels.demo]\ntype = "mock"\nrecord_file = "{record}"\n')
    await asyncio.to_thread(gp.start)
    proc = None
    try:
        # Sent while no backend runs: the backend's first consumer starts with --deliver all
        # to see it (the choice for a first deployment that must answer what waited).
        r = await post_inbound(gp.http_port, "demo", text="Where is my parcel?", sender="gina", id="wx-6918340117829758977")
        assert r.status_code == 200
        proc = await asyncio.create_subprocess_exec(
            node, str(EXAMPLE / "backend.mjs"), gp.bus_url, "--deliver", "all", "--count", "1",
            cwd=EXAMPLE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NODE_OPTIONS": ""})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        lines = events(out.decode())
        [inbound] = [ln for ln in lines if ln[0] == "inbound"]
        [replied] = [ln for ln in lines if ln[0] == "replied"]
        statuses = [ln for ln in lines if ln[0] == "status"]
        gid = inbound[1]
        assert inbound[2:4] == ["mock", "demo"] and replied[1] == f"js-reply-{gid}" and replied[2].startswith("seq=")
        # accepted (attempt 0), then sent on the first attempt with the provider's id.
        assert [(s[2], s[3]) for s in statuses] == [("accepted", "0"), ("sent", "1")]
        assert statuses[-1][4] == "mock-1"
        # The customer got it, in the right conversation, answering the right message.
        await wait_until(lambda: record.exists() and record.read_text().strip(), timeout=10)
        [delivery] = [json.loads(x) for x in record.read_text().splitlines()]
        assert delivery["outbound"]["id"] == f"js-reply-{gid}"
        assert delivery["outbound"]["in_reply_to"] == gid
        assert delivery["outbound"]["parts"] == [{"type": "text", "text": "Thanks, we received: Where is my parcel?"}]
        assert delivery["route"]["to"] == "gina"
        # What it builds on is a NATS client and the documented JSON: no other import.
        imports = re.findall(r'^import .* from "([^"]+)";', (EXAMPLE / "backend.mjs").read_text(), re.MULTILINE)
        assert sorted(imports) == ["@nats-io/jetstream", "@nats-io/transport-node"]
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        gp.signal(signal.SIGTERM)
        await asyncio.to_thread(gp.wait)
