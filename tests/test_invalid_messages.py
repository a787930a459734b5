"""Nothing is published that the gateway's own decoder rejects (the check sits in the
publish path, after every channel and enrich hook), and a backend never loses a message
it cannot decode: it is logged with its sequence, handed to a callback, dead-lettered and
only then terminated (issue 9.8)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway import LocationPart, Participant, RequestError, TextPart
from gateway.client import Client, Undecodable
from gateway.wire import dead_letter_decoder
from gateway.testing import post_inbound, stream_messages


async def test_a_message_the_decoder_would_reject_is_refused_with_the_field_named(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    ctx = gw.channels["demo"].ctx
    bad = ctx.message(conversation="alice", sender=Participant(id="alice"), provider_id="loc-1",
                      parts=[LocationPart(latitude=float("nan"), longitude=113.3)])
    with pytest.raises(RequestError) as info:
        await ctx.publish(bad)
    assert info.value.status == 400
    assert "$.parts[0].latitude" in info.value.reason and "null" in info.value.reason
    assert await stream_messages(nats_server.url, "GW_IN") == []
    # The refusal left no dedup record: a corrected retry of the same provider id goes through.
    good = ctx.message(conversation="alice", sender=Participant(id="alice"), provider_id="loc-1",
                       parts=[LocationPart(latitude=23.1, longitude=113.3)])
    assert (await ctx.publish(good)).duplicate is False


async def test_text_that_is_not_valid_unicode_is_refused_not_a_500(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    ctx = gw.channels["demo"].ctx
    bad = ctx.message(conversation="bob", sender=Participant(id="bob"), parts=[TextPart(text="a\ud800b")])
    with pytest.raises(RequestError) as info:
        await ctx.publish(bad)
    assert "Unicode" in info.value.reason and "\ud800" not in info.value.reason
    r = await post_inbound(gw.http.port, "demo", text="a\ud800b")  # JSON escapes a lone surrogate
    assert 400 <= r.status_code < 500
    assert await stream_messages(nats_server.url, "GW_IN") == []


async def test_backend_client_dead_letters_an_undecodable_message_with_its_sequence(gateway_factory, nats_server, bus,
                                                                                 caplog):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    # What an older gateway published for a WeChat location of "nan".
    raw = (b'{"schema_version":1,"id":"x1","channel_type":"mock","channel":"demo","provider_id":"p","conversation":"demo.k",'
           b'"sender":{"id":"s"},"recipient":null,"received_at":"2026-01-01T00:00:00Z","sent_at":null,"subject":null,'
           b'"parts":[{"type":"location","latitude":null,"longitude":1.0}],"in_reply_to":null,"auto":false,"meta":{}}')
    ack = await bus.jetstream().publish("gw.in.mock.demo", raw, headers={"Nats-Msg-Id": "x1", "Gw-Conversation": "demo.k"})
    assert (await post_inbound(gw.http.port, "demo", text="after it", id="ok-1")).status_code == 200
    seen: list[Undecodable] = []
    caplog.set_level(logging.ERROR, logger="gateway.client")
    async with Client(nats_server.url) as client:
        async for msg in client.inbound(durable="desk", on_undecodable=seen.append, ack_wait=2):
            assert msg.provider_id == "ok-1"  # the bad one is not yielded, the next one is
            break
        [bad] = seen
        assert bad.sequence == ack.seq and bad.data == raw and "$.parts[0].latitude" in bad.error
        assert any(str(ack.seq) in r.getMessage() and "undecodable" in r.getMessage() for r in caplog.records)
        [m] = await stream_messages(nats_server.url, "GW_DEAD")
        dl = dead_letter_decoder.decode(m.data)
        assert m.subject == "gw.dead.mock.demo" and dl.subject == "gw.in.mock.demo"
        assert dl.payload == raw and dl.outbound is None and dl.error.code == "undecodable_inbound"
        assert dl.headers["Gw-Inbound-Sequence"] == str(ack.seq) and dl.headers["Gw-Conversation"] == "demo.k"
        # Terminated (counts as acknowledged): the consumer's ack floor is past it.
        info = await client.js.consumer_info("GW_IN", "desk")
        assert info.ack_floor.stream_seq >= ack.seq and info.num_redelivered == 0


async def test_a_failing_undecodable_callback_leaves_the_message_for_redelivery(gateway_factory, nats_server, bus):
    await gateway_factory({"demo": {"type": "mock"}})
    await bus.jetstream().publish("gw.in.mock.demo", b"not json", headers={"Nats-Msg-Id": "x2"})
    calls = 0

    def flaky(bad: Undecodable) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("backend store down")

    async with Client(nats_server.url) as client:
        async def consume() -> None:
            async for _ in client.inbound(durable="desk2", on_undecodable=flaky, ack_wait=1):
                pass

        task = asyncio.create_task(consume())
        try:
            for _ in range(100):
                if calls >= 2 and await stream_messages(nats_server.url, "GW_DEAD"):
                    break
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
    assert calls == 2  # came back once after the failure, then was dead-lettered
    assert len(await stream_messages(nats_server.url, "GW_DEAD")) == 1
