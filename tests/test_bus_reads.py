"""Pipelined direct gets (the bus's reads, through the gateway's bus services):
what a read answers for a value, a missing key, a deleted, purged or expired one, a key
that cannot be a subject, and a bucket without a leader, on a real nats-server."""

from __future__ import annotations

import nats
import pytest

from gateway import BusUnavailable, Conversation, Receipt
from gateway.testing import wait_until
from gateway.wire import encode


async def test_reads_answer_what_the_bucket_holds(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    services = gw.services
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("gw_conversations")
        conv = Conversation(key="demo.k1", channel_type="mock", channel="demo", route={"to": "x"})
        await kv.put("demo.k1", encode(conv))
        assert await services.get_conversation("demo.k1") == conv
        assert await services.get_conversation("demo.nobody") is None
        await kv.delete("demo.k1")
        assert await services.get_conversation("demo.k1") is None
        await kv.put("demo.k1", encode(conv))
        await kv.purge("demo.k1")
        assert await services.get_conversation("demo.k1") is None
        # Not a key: never sent (a subject with a space would close the connection).
        for bad in ("demo k1", "demo.*", "demo.>", ".demo", "demo.", ""):
            assert await services.get_conversation(bad) is None
        assert gw.bus.connected
        # Conversation and receipt in one go; a receipt that cannot be read still counts as sent.
        await kv.put("demo.k2", encode(conv))
        await services.await_ack(await services.send_receipt("o-1", Receipt(provider_id="p-1")))
        got_conv, got_receipt = await services.get_conversation_and_receipt("demo.k2", "o-1")
        assert got_conv == conv and got_receipt == Receipt(provider_id="p-1")
        assert await services.get_conversation_and_receipt("demo.k2", "o-2") == (conv, None)
    finally:
        await nc.close()


async def test_an_expired_value_reads_as_missing(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        conv = Conversation(key="demo.t", channel_type="mock", channel="demo")
        await js.publish("$KV.gw_conversations.demo.t", encode(conv), headers={"Nats-TTL": "1s"})
        assert await gw.services.get_conversation("demo.t") == conv
        await wait_until(lambda: _gone(gw, "demo.t"), timeout=10)
    finally:
        await nc.close()


async def _gone(gw, key: str) -> bool:
    return await gw.services.get_conversation(key) is None


async def test_a_bucket_that_cannot_answer_is_bus_unavailable(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    reads = gw.bus.reads
    with pytest.raises(BusUnavailable):
        await (await reads.send("KV_no_such_bucket", "$KV.no_such_bucket.k"))


async def test_a_read_from_the_leader_answers_like_a_direct_one(gateway_factory, nats_server):
    """Receipts are read from the stream's leader (a replica catching up could miss one)."""
    gw = await gateway_factory({"demo": {"type": "mock"}})
    reads = gw.bus.reads
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("gw_state")

        async def both(key: str):
            direct = await (await reads.send("KV_gw_state", f"$KV.gw_state.{key}"))
            leader = await (await reads.send("KV_gw_state", f"$KV.gw_state.{key}", leader=True))
            return direct, leader

        revision = await kv.put("demo.x", "värde".encode())
        direct, leader = await both("demo.x")
        assert (leader.value, leader.revision) == (direct.value, direct.revision) == ("värde".encode(), revision)
        assert await both("demo.missing") == (None, None)
        await kv.delete("demo.x")
        assert await both("demo.x") == (None, None)
        await kv.put("demo.x", b"again")
        await kv.purge("demo.x")
        assert await both("demo.x") == (None, None)
        with pytest.raises(BusUnavailable):
            await (await reads.send("KV_no_such_bucket", "$KV.no_such_bucket.k", leader=True))
    finally:
        await nc.close()
