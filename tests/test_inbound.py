"""The inbound path against a real nats-server: ack before 200, dedup beyond JetStream's
window, binaries in the object store, conversations, HTTP limits and bus outages."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgspec
import nats
import pytest

from gateway.testing import post_inbound
from gateway import Channel, ImagePart, Participant, PluginManager, hookimpl
from gateway.wire import message_decoder
from gateway.testing import NatsServer, make_config, start_gateway, stream_messages


async def test_webhook_answers_200_only_when_the_message_is_on_the_bus(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    r = await post_inbound(gw.http.port, "demo", text="Where is my parcel?", sender="alice", id="p-1")
    assert r.status_code == 200
    # No waiting: by the time the provider got its 200, JetStream had stored the message.
    msgs = await stream_messages(nats_server.url, "GW_IN")
    assert len(msgs) == 1
    m = message_decoder.decode(msgs[0].data)
    assert msgs[0].subject == "gw.in.mock.demo"
    assert msgs[0].headers["Nats-Msg-Id"] == m.id == r.json()["id"]
    assert m.provider_id == "p-1" and m.sender.id == "alice" and m.parts[0].text == "Where is my parcel?"
    assert m.conversation.startswith("demo.") and "alice" not in m.conversation


async def test_provider_retry_after_the_jetstream_window_is_not_published_again(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}}, bus={"duplicate_window": "1s"})
    first = await post_inbound(gw.http.port, "demo", text="hi", id="late-retry")
    await asyncio.sleep(1.6)  # JetStream's own dedup window is over; the KV still remembers
    again = await post_inbound(gw.http.port, "demo", text="hi", id="late-retry")
    assert first.json() == {"id": first.json()["id"], "duplicate": False}
    assert again.json() == {"id": first.json()["id"], "duplicate": True}
    assert len(await stream_messages(nats_server.url, "GW_IN")) == 1


async def test_concurrent_retries_of_one_message_publish_once(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    rs = await asyncio.gather(*[post_inbound(gw.http.port, "demo", text="dup", id="same") for _ in range(20)])
    assert all(r.status_code == 200 for r in rs)
    assert sum(not r.json()["duplicate"] for r in rs) == 1
    assert len(await stream_messages(nats_server.url, "GW_IN")) == 1


async def test_retry_reaching_another_gateway_process_is_published_once(gateway_factory, nats_server):
    a = await gateway_factory({"demo": {"type": "mock"}})
    b = await gateway_factory({"demo": {"type": "mock"}})
    ra = await post_inbound(a.http.port, "demo", text="x", id="across")
    rb = await post_inbound(b.http.port, "demo", text="x", id="across")
    assert (ra.json()["duplicate"], rb.json()["duplicate"]) == (False, True)
    assert len(await stream_messages(nats_server.url, "GW_IN")) == 1


async def test_messages_without_provider_id_are_all_published(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    for _ in range(3):
        assert (await post_inbound(gw.http.port, "demo", text="same text")).status_code == 200
    assert len(await stream_messages(nats_server.url, "GW_IN")) == 3


async def test_large_binary_goes_to_the_object_store_small_stays_inline(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}}, bus={"inline_limit": 1024})
    ctx = gw.channels["demo"].ctx
    big, small = bytes(range(256)) * 400, b"tiny"
    msg = ctx.message(conversation="alice", sender=Participant(id="alice"), provider_id="img-1",
                      parts=[ImagePart(data=big, content_type="image/png"), ImagePart(data=small)])
    await ctx.publish(msg)
    stored = message_decoder.decode((await stream_messages(nats_server.url, "GW_IN"))[0].data)
    ref_part, inline_part = stored.parts
    assert ref_part.data is None and ref_part.ref is not None and ref_part.ref.size == len(big) == ref_part.size
    assert inline_part.data == small and inline_part.ref is None
    assert await ctx.get_blob(ref_part.ref) == big


async def test_conversation_route_is_stored_for_replies(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    r = await post_inbound(gw.http.port, "demo", text="hi", sender="bob", thread="ticket-7")
    key = (await gw.get_conversation(gw.channels["demo"].ctx.conversation_key("ticket-7")))
    assert key is not None and key.route == {"thread": "ticket-7", "to": "bob"}
    assert key.last_message_id == r.json()["id"] and key.channel == "demo" and key.last_inbound_at is not None


async def test_oversized_body_gets_413_and_the_server_keeps_serving(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}}, http={"max_body": 2048})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}") as c:
        r = await c.post("/channels/demo/inbound", content=json.dumps({"text": "x" * 5000}))
        assert r.status_code == 413 and "exceeds 2048 bytes" in r.text

        async def chunks():  # no Content-Length: the limit still holds while streaming
            for _ in range(10):
                yield b"x" * 1000

        r = await c.post("/channels/demo/inbound", content=chunks())
        assert r.status_code == 413
        assert (await c.post("/channels/demo/inbound", content=b'{"text":"ok"}')).status_code == 200


async def test_malformed_body_gets_400_with_a_short_reason(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}") as c:
        r = await c.post("/channels/demo/inbound", content=b'{"text": 5}')
        assert r.status_code == 400 and r.text.startswith("invalid JSON: Expected `str`, got `int`")
        assert (await c.post("/channels/nope/inbound", content=b"{}")).status_code == 404
        assert (await c.get("/channels/demo/inbound")).status_code == 405
    assert await stream_messages(nats_server.url, "GW_IN") == []


async def test_bus_down_at_start_answers_503_then_recovers(tmp_path):
    from gateway.testing import free_port

    port = free_port()
    cfg = make_config(f"nats://127.0.0.1:{port}", {"demo": {"type": "mock"}}, bus={"connect_timeout": "1s"})
    from gateway import Gateway

    gw = Gateway(cfg)
    await gw.start()  # does not fail: the bus is retried in the background
    server = NatsServer(tmp_path / "nats", port=port)
    try:
        r = await post_inbound(gw.http.port, "demo", text="while down", id="d-1")
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        async with httpx.AsyncClient() as c:
            h = await c.get(f"http://127.0.0.1:{gw.http.port}/healthz")
        assert h.status_code == 503 and h.json()["bus"]["connected"] is False
        await server.start()
        await gw.bus.wait_ready(15)
        r = await post_inbound(gw.http.port, "demo", text="while down", id="d-1")
        assert r.status_code == 200 and r.json()["duplicate"] is False
        async with httpx.AsyncClient() as c:
            h = await c.get(f"http://127.0.0.1:{gw.http.port}/healthz")
        assert h.status_code == 200 and h.json()["channels"]["demo"]["state"] == "running"
    finally:
        await gw.stop()
        await server.stop()


async def test_bus_lost_while_running_answers_503_not_200(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}}, bus={"publish_timeout": "1s"})
    await nats_server.stop()
    r = await post_inbound(gw.http.port, "demo", text="lost?", id="x-1")
    assert r.status_code == 503


async def test_metrics_count_inbound_duplicates_and_latency(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    await post_inbound(gw.http.port, "demo", text="a", id="m1")
    await post_inbound(gw.http.port, "demo", text="a", id="m1")
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"http://127.0.0.1:{gw.http.port}/metrics")).text
    assert 'gateway_inbound_total{channel="demo",channel_type="mock"} 1.0' in text
    assert 'gateway_inbound_duplicates_total{channel="demo",channel_type="mock"} 1.0' in text
    assert 'gateway_publish_seconds_count{channel_type="mock"} 1.0' in text
    assert "gateway_bus_connected 1.0" in text


class _Boom(Channel):
    type = "boom"

    async def start(self) -> None:
        raise RuntimeError("cannot reach provider")


class _BoomPlugin:
    @hookimpl
    def register_channel_types(self):
        return [_Boom]


class _Tagger:
    @hookimpl
    def enrich_message(self, message, channel):
        return msgspec.structs.replace(message, meta={**message.meta, "tagged_by": "enricher", "channel": channel})


def _pm(*extra):
    return PluginManager(extra=list(extra))


async def test_optional_channel_that_fails_to_start_is_skipped(nats_server):
    pm = _pm(_BoomPlugin())
    cfg = make_config(nats_server.url, {"demo": {"type": "mock"}, "flaky": {"type": "boom", "required": False}}, plugins=pm)
    gw = await start_gateway(cfg, pm)
    try:
        health = gw.health()
        assert health["channels"]["flaky"]["state"] == "failed"
        assert "cannot reach provider" in health["channels"]["flaky"]["detail"]
        assert health["status"] == "ok"  # optional channels do not make the gateway unhealthy
        assert (await post_inbound(gw.http.port, "demo", text="still works")).status_code == 200
    finally:
        await gw.stop()


async def test_required_channel_that_fails_to_start_fails_start_and_is_named(nats_server):
    pm = _pm(_BoomPlugin())
    cfg = make_config(nats_server.url, {"flaky": {"type": "boom"}}, plugins=pm)
    from gateway import Gateway, PluginError

    gw = Gateway(cfg, pm)
    with pytest.raises(PluginError, match=r"channel 'flaky' \(type 'boom', plugin .*\) failed to start: RuntimeError: cannot reach provider"):
        await gw.start()


async def test_enrich_message_hook_amends_inbound_messages(nats_server):
    pm = _pm(_Tagger())
    gw = await start_gateway(make_config(nats_server.url, {"demo": {"type": "mock"}}, plugins=pm), pm)
    try:
        await post_inbound(gw.http.port, "demo", text="x")
        m = message_decoder.decode((await stream_messages(nats_server.url, "GW_IN"))[0].data)
        assert m.meta == {"tagged_by": "enricher", "channel": "demo"}
    finally:
        await gw.stop()


async def test_streams_and_buckets_follow_the_configured_prefix(gateway_factory, nats_server):
    await gateway_factory({"demo": {"type": "mock"}}, bus={"prefix": "acme"})
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        names = {s.config.name for s in await js.streams_info()}
        assert {"ACME_IN", "ACME_OUT", "ACME_STATUS", "ACME_DEAD", "KV_acme_dedup", "KV_acme_conversations"} <= names
        assert (await js.stream_info("ACME_IN")).config.subjects == ["acme.in.>"]
    finally:
        await nc.close()


async def test_the_test_kit_status_helpers_follow_the_prefix(gateway_factory, nats_server):
    from gateway import Outbound, TextPart
    from gateway.testing import statuses, wait_for_status
    from gateway.wire import encode, outbound_headers

    await gateway_factory({"demo": {"type": "mock"}}, bus={"prefix": "acme"})
    o = Outbound(id="acme-1", conversation="demo.nope", parts=[TextPart(text="x")])
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().publish("acme.out.mock.demo", encode(o), headers=outbound_headers(o))
    finally:
        await nc.close()
    sts = await wait_for_status(nats_server.url, "acme-1", "dead", prefix="acme")
    assert [s.state for s in sts] == ["accepted", "dead"]
    assert await statuses(nats_server.url, "acme-1", prefix="acme") == sts


async def test_an_event_that_is_not_an_interaction_keeps_the_conversation_time(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    ctx = gw.channels["demo"].ctx
    first = ctx.message(conversation="u1", sender=Participant(id="u1"), provider_id="a")
    await ctx.publish(first, route={"to": "u1"})
    later = ctx.message(conversation="u1", sender=Participant(id="u1"), provider_id="b")
    await ctx.publish(later, interaction=False)
    conv = await ctx.get_conversation(ctx.conversation_key("u1"))
    assert conv.last_inbound_at == first.received_at and conv.last_message_id == later.id
    assert conv.route == {"to": "u1"}  # no route given: the stored one is kept


async def test_channel_state_entries_with_a_ttl_expire(gateway_factory):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    state = gw.channels["demo"].ctx.state
    await state.put("thread:<a@b>", b"kept", ttl=1)
    await state.put("forever", b"kept")
    assert await state.get("thread:<a@b>") == b"kept"
    await asyncio.sleep(2.5)
    assert await state.get("thread:<a@b>") is None
    assert await state.get("forever") == b"kept"


async def test_binary_content_retention_follows_blob_max_age(gateway_factory, nats_server, bus):
    await gateway_factory({"demo": {"type": "mock"}}, bus={"blob_max_age": "30d"})
    info = await bus.jetstream().stream_info("OBJ_gw_blobs")
    assert info.config.max_age == 30 * 86400
    await gateway_factory({"demo": {"type": "mock"}}, bus={"blob_max_age": "7d"})  # a changed config is applied
    assert (await bus.jetstream().stream_info("OBJ_gw_blobs")).config.max_age == 7 * 86400
