"""docs/operations.md is what an operator deploys from: its configuration parses, its
alerts name metrics the gateway exports, and its state table names every stream, bucket
and consumer a gateway creates (and nothing else)."""

from __future__ import annotations

import re
from pathlib import Path

import nats
import nats.js.errors

from gateway import PluginManager, parse_config
from gateway.testing import wait_until

DOC = (Path(__file__).parent.parent / "docs" / "operations.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end > 0 else None]


def test_the_cluster_configuration_block_is_valid():
    blocks = re.findall(r"```toml\n(.*?)```", DOC, re.S)
    assert blocks
    import tomllib

    for block in blocks:
        cfg = parse_config(tomllib.loads(block), PluginManager().channel_types, source="docs/operations.md",
                           env={"GATEWAY_NATS_CREDS": "/etc/gateway/nats.creds"})
        assert cfg.settings.bus.replicas == 3
        assert len(cfg.settings.bus.url.split(",")) == 3


def test_every_metric_in_the_alerts_is_exported():
    # Labelled metrics have no samples before their first use: the names are read where
    # they are defined (a histogram is queried through its _bucket series).
    source = (Path(__file__).parent.parent / "gateway" / "core" / "metrics.py").read_text(encoding="utf-8")
    defined = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(gateway_[a-z_]+)"', source))
    assert len(defined) >= 10
    named = {re.sub(r"_bucket$", "", n) for n in re.findall(r"\bgateway_[a-z_]+", _section("Prometheus alerts worth having"))}
    assert named
    assert named <= defined, sorted(named - defined)


async def test_the_state_table_names_every_stream_bucket_and_consumer(gateway_factory, nats_server):
    await gateway_factory({"demo": {"type": "mock"}})
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        # every consumer exists once the channel's delivery was taken
        await wait_until(lambda: _has_consumer(js, "GW_OUT", "gw_out_demo"), timeout=10)
        streams = {s.config.name for s in await js.streams_info()}
        consumers = {c.name for s in streams for c in await js.consumers_info(s)}
    finally:
        await nc.close()
    table = _section("What state lives where")
    documented = set(re.findall(r"^\| `([A-Za-z_]+)`", table, re.M))
    as_streams = {n if n.isupper() else ("OBJ_" if n.endswith("_blobs") else "KV_") + n for n in documented}
    assert as_streams == streams
    assert "gw_out_demo" in consumers
    for consumer in consumers:
        assert f"`{consumer.replace('gw_out_demo', 'gw_out_<channel>')}`" in table, consumer


async def _has_consumer(js, stream: str, name: str) -> bool:
    try:
        await js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError:
        return False
    return True
