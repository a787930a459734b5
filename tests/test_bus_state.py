"""The bus's key-value state (the bus's ``state`` module, the one owner of its buckets):
compare-and-set writes with a per-message TTL, deletes and purges, key listing and the
server's time, on the gateway's connection and on a backend's bare one, against a real
nats-server."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import msgspec
import nats
import nats.js.errors
import pytest

from gateway import GatewayError, QuietHours
from gateway.client import Client
from gateway.testing import post_inbound, wait_until


async def test_compare_and_set_writes_lose_to_a_newer_revision(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    records = gw.restore.records  # the state bucket on the gateway's connection
    key = "core.probe.cas"
    assert await records.last(key) is None
    first = await records.write_if(key, b"one", 0)
    assert first is not None
    assert await records.write_if(key, b"again", 0) is None  # not absent any more
    second = await records.write_if(key, b"two", first)
    assert second is not None and second > first
    assert await records.write_if(key, b"stale", first) is None
    found = await records.last(key)
    assert found is not None and (found.value, found.revision, found.removed) == (b"two", second, False)
    assert abs(found.time - datetime.now(timezone.utc)) < timedelta(seconds=5)
    assert await records.stored_at(second) == found.time
    assert not await records.delete_if(key, first)
    assert await records.read(key) == b"two"
    assert await records.delete_if(key, second)
    gone = await records.last(key)
    assert gone is not None and gone.removed and await records.read(key) is None
    # A compare-and-set against the delete marker's revision writes again.
    assert await records.write_if(key, b"three", gone.revision) is not None


async def test_a_purge_leaves_a_marker_and_an_erase_leaves_nothing(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    records = gw.restore.records
    for name in ("a", "b", "c"):
        await records.write(f"core.probe-keys.{name}", name.encode())
    assert sorted(await records.keys("core.probe-keys.*")) == ["core.probe-keys.a", "core.probe-keys.b",
                                                                "core.probe-keys.c"]
    await records.purge("core.probe-keys.a")
    marker = await records.last("core.probe-keys.a", leader=True)
    assert marker is not None and marker.removed and await records.read("core.probe-keys.a") is None
    await records.erase("core.probe-keys.b")
    assert await records.last("core.probe-keys.b") is None
    assert sorted(await records.keys("core.probe-keys.*")) == ["core.probe-keys.a", "core.probe-keys.c"]


async def test_a_write_with_a_ttl_is_removed_by_the_server(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    records = gw.restore.records
    await records.write("core.probe.ttl", b"x", ttl=1)
    assert await records.read("core.probe.ttl") == b"x"
    await wait_until(lambda: _gone(records, "core.probe.ttl"), timeout=10)


async def _gone(records, key: str) -> bool:
    return await records.read(key) is None


async def test_a_key_that_cannot_be_a_subject_is_never_sent(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    records = gw.restore.records
    for bad in ("core.probe x", "core.*", "core.>", ".core", "core.", ""):
        assert await records.last(bad) is None and await records.read(bad) is None
    assert gw.bus.connected


async def test_a_bare_connection_reads_and_writes_what_the_gateway_does(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    await post_inbound(gw.http.port, "demo", text="hi", sender="frank")
    key = gw.channels["demo"].ctx.conversation_key("frank")
    quiet = QuietHours(start="22:00", end="07:00", tz="Europe/Berlin")
    async with Client(nats_server.url) as client:
        for unknown in ("demo.nobody", "demo nobody", "demo.*"):
            with pytest.raises(GatewayError, match="unknown conversation"):
                await client.reply(unknown, text="for nobody")
        assert client.nc.is_connected  # no subject with a space or a wildcard was sent
        await client.set_quiet_hours(key, quiet)
        assert msgspec.json.decode(await gw.restore.records.read(f"quiet.{key}"), type=QuietHours) == quiet
        assert await client.reminders.conversation_quiet_hours(key) == quiet
        await client.set_quiet_hours(key, None)
        assert await client.reminders.conversation_quiet_hours(key) is None
    nc = await nats.connect(nats_server.url)
    try:  # the delete is a KV delete marker, as nats-py's own KV reads it
        kv = await nc.jetstream().key_value("gw_state")
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(f"quiet.{key}")
    finally:
        await nc.close()
