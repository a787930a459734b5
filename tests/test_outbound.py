"""Outbound delivery against a real nats-server: statuses, retries, dead letters, dlq
commands, idempotency, ordering, pacing, and kill -9 safety."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import nats
import pytest

from gateway.testing import post_inbound, wait_until
from gateway import LocationPart, Outbound, TextPart
from gateway.cli import main
from gateway.wire import dead_letter_decoder, encode
from gateway.testing import statuses, stream_messages, wait_for_status as wait_state
from gateway.testing import GatewayProcess


async def publish(nc, outbound: Outbound, channel: str = "demo", msg_id: str | None = None) -> None:
    await nc.jetstream().publish(f"gw.out.mock.{channel}", encode(outbound), headers={"Nats-Msg-Id": msg_id or outbound.id})


async def conversation_of(gw, sender: str = "alice") -> str:
    r = await post_inbound(gw.http.port, "demo", text="hello", sender=sender)
    assert r.status_code == 200
    return gw.channels["demo"].ctx.conversation_key(sender)


async def test_reply_is_delivered_in_the_conversation_with_accepted_and_sent(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    conv = await conversation_of(gw, "alice")
    await publish(bus, Outbound(id="o-1", conversation=conv, parts=[TextPart(text="We are on it")]))
    mock = gw.channels["demo"].channel
    [(out, convo)] = await mock.wait_for_deliveries(1)
    assert out.id == "o-1" and convo.route == {"thread": "alice", "to": "alice"}
    sts = await wait_state(nats_server.url, "o-1", "sent")
    assert [s.state for s in sts] == ["accepted", "sent"]
    assert sts[1].provider_id == "mock-1" and sts[1].conversation == conv and sts[1].attempt == 1
    assert (await bus.jetstream().stream_info("GW_OUT")).state.messages == 0  # acked off the work queue


async def test_transient_failures_are_retried_with_backoff_visible_in_statuses(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}}, outbound={"backoff": ["200ms", "400ms"]})
    mock = gw.channels["demo"].channel
    mock.fail_next(2, message="provider timeout")
    conv = await conversation_of(gw)
    t0 = time.monotonic()
    await publish(bus, Outbound(id="o-2", conversation=conv, parts=[TextPart(text="x")]))
    sts = await wait_state(nats_server.url, "o-2", "sent")
    elapsed = time.monotonic() - t0
    assert [(s.state, s.attempt) for s in sts] == [("accepted", 0), ("failed", 1), ("failed", 2), ("sent", 3)]
    assert sts[1].error.message == "provider timeout" and sts[1].error.permanent is False
    assert sts[1].next_attempt_at is not None and sts[1].next_attempt_at > sts[1].at
    assert elapsed >= 0.2 * 0.8 + 0.4 * 0.8
    assert len(mock.deliveries) == 1


async def test_retry_after_from_the_provider_is_respected(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}}, outbound={"backoff": ["50ms"]})
    gw.channels["demo"].channel.fail_next(1, message="rate limited", retry_after=1.0)
    conv = await conversation_of(gw)
    t0 = time.monotonic()
    await publish(bus, Outbound(id="o-ra", conversation=conv, parts=[TextPart(text="x")]))
    await wait_state(nats_server.url, "o-ra", "sent")
    assert time.monotonic() - t0 >= 1.0


async def test_permanent_failure_is_dead_lettered_then_replayed_and_delivered(gateway_factory, nats_server, bus, capsys):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    mock = gw.channels["demo"].channel
    mock.fail_next(1, permanent=True, message="recipient blocked us")
    conv = await conversation_of(gw)
    await publish(bus, Outbound(id="o-3", conversation=conv, parts=[TextPart(text="secret body text")]))
    sts = await wait_state(nats_server.url, "o-3", "dead")
    assert [s.state for s in sts] == ["accepted", "dead"] and sts[-1].error.permanent
    [dl_msg] = await stream_messages(nats_server.url, "GW_DEAD")
    dl = dead_letter_decoder.decode(dl_msg.data)
    assert dl_msg.subject == "gw.dead.mock.demo" and dl.outbound.id == "o-3" and dl.reason == "recipient blocked us"
    assert (await bus.jetstream().stream_info("GW_OUT")).state.messages == 0

    cli = ["-c", str(_cli_config(nats_server.url, gw)), "dlq"]
    assert await asyncio.to_thread(main, [*cli, "list"]) == 0
    out = capsys.readouterr().out
    assert "o-3" in out and "recipient blocked us" in out and "attempts=1" in out
    assert "secret body text" not in out
    assert await asyncio.to_thread(main, [*cli, "list", "--show-body"]) == 0
    assert "secret body text" in capsys.readouterr().out

    assert await asyncio.to_thread(main, [*cli, "replay", "o-3"]) == 0
    await mock.wait_for_deliveries(1)
    assert mock.deliveries[0][0].id == "o-3"
    await wait_state(nats_server.url, "o-3", "sent")
    assert await stream_messages(nats_server.url, "GW_DEAD") == []


def _cli_config(url: str, gw) -> object:
    import tempfile
    from pathlib import Path

    p = Path(tempfile.mkdtemp()) / "gateway.toml"
    p.write_text(f'[bus]\nurl = "{url}"\n[channels.demo]\ntype = "mock"\n')
    return p


async def test_exhausted_attempts_are_dead_lettered(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock", "max_attempts": 3, "backoff": ["10ms"]}})
    gw.channels["demo"].channel.fail_next(5, message="503 from provider")
    conv = await conversation_of(gw)
    await publish(bus, Outbound(id="o-4", conversation=conv, parts=[TextPart(text="x")]))
    sts = await wait_state(nats_server.url, "o-4", "dead")
    assert [(s.state, s.attempt) for s in sts] == [("accepted", 0), ("failed", 1), ("failed", 2), ("dead", 3)]
    assert sts[-1].error.message == "gave up after 3 attempts: 503 from provider"
    assert gw.metrics.registry.get_sample_value("gateway_outbound_failed_total",
                                                {"channel_type": "mock", "channel": "demo", "permanent": "false"}) == 3


async def test_dlq_purge_needs_confirmation(gateway_factory, nats_server, bus, capsys):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    await publish(bus, Outbound(id="o-p", conversation="demo.nope", parts=[TextPart(text="x")]))
    await wait_state(nats_server.url, "o-p", "dead")
    cli = ["-c", str(_cli_config(nats_server.url, gw)), "dlq", "purge"]
    assert await asyncio.to_thread(main, cli) == 2  # no terminal to confirm on
    assert len(await stream_messages(nats_server.url, "GW_DEAD")) == 1
    assert await asyncio.to_thread(main, [*cli, "--yes"]) == 0
    assert await stream_messages(nats_server.url, "GW_DEAD") == []


@pytest.mark.parametrize("outbound, reason", [
    (Outbound(id="u1", conversation="demo.unknownconversation", parts=[TextPart(text="x")]), "unknown conversation"),
    (Outbound(id="u2", conversation="CONV", parts=[LocationPart(latitude=1, longitude=2)]), "cannot carry part types: location"),
    (Outbound(id="u3", conversation="CONV", parts=[]), "no parts, no template and no meta"),
])
async def test_undeliverable_outbound_fails_permanently_with_the_reason(gateway_factory, nats_server, bus, outbound, reason):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    conv = await conversation_of(gw)
    if outbound.conversation == "CONV":
        import msgspec

        outbound = msgspec.structs.replace(outbound, conversation=conv)
    await publish(bus, outbound)
    sts = await wait_state(nats_server.url, outbound.id, "dead")
    assert reason in sts[-1].error.message and sts[-1].error.permanent
    assert gw.channels["demo"].channel.deliveries == []
    # The gateway's own refusal, not a provider failure: dead-lettered, not counted as failed.
    assert gw.metrics.registry.get_sample_value("gateway_outbound_failed_total",
                                                {"channel_type": "mock", "channel": "demo", "permanent": "true"}) is None
    assert gw.metrics.registry.get_sample_value("gateway_outbound_dead_total", {"channel_type": "mock", "channel": "demo"}) == 1


async def test_outbound_for_a_channel_that_is_not_configured_is_dead_lettered(gateway_factory, nats_server, bus):
    await gateway_factory({"demo": {"type": "mock"}})
    await publish(bus, Outbound(id="o-5", conversation="x.y", parts=[TextPart(text="x")]), channel="ghost")
    sts = await wait_state(nats_server.url, "o-5", "dead")
    assert "no channel 'ghost' of type 'mock' is configured" in sts[-1].error.message


async def test_undecodable_outbound_is_dead_lettered_and_the_consumer_keeps_going(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    js = bus.jetstream()
    await js.publish("gw.out.mock.demo", b'{"this is": not json', headers={"Nats-Msg-Id": "bad-1"})
    await js.publish("gw.out.mock.demo", b'{"id": 5}', headers={"Nats-Msg-Id": "bad-2"})
    conv = await conversation_of(gw)
    await publish(bus, Outbound(id="good", conversation=conv, parts=[TextPart(text="x")]))
    await gw.channels["demo"].channel.wait_for_deliveries(1)

    async def two_dead() -> bool:
        return len(await stream_messages(nats_server.url, "GW_DEAD")) == 2

    await wait_until(two_dead)
    dls = [dead_letter_decoder.decode(m.data) for m in await stream_messages(nats_server.url, "GW_DEAD")]
    assert dls[0].payload == b'{"this is": not json' and "undecodable outbound" in dls[0].reason
    assert "Expected `str`, got `int`" in dls[1].reason


async def test_same_outbound_id_published_twice_is_delivered_once(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}}, bus={"duplicate_window": "1s"})
    conv = await conversation_of(gw)
    o = Outbound(id="o-dup", conversation=conv, parts=[TextPart(text="once")])
    await publish(bus, o)
    await publish(bus, o)  # inside JetStream's window: dropped by the broker
    mock = gw.channels["demo"].channel
    await mock.wait_for_deliveries(1)
    await asyncio.sleep(1.5)
    await publish(bus, o)  # after the window: caught by the stored receipt
    await wait_state(nats_server.url, "o-dup", "sent")
    await wait_until(lambda: _count(statuses(nats_server.url, "o-dup"), "sent", 2))
    assert len(mock.deliveries) == 1


async def _count(coro, state: str, n: int) -> bool:
    return sum(s.state == state for s in await coro) >= n


@pytest.mark.parametrize("concurrency", [2, 64])
async def test_replies_to_one_conversation_keep_their_order(gateway_factory, nats_server, bus, concurrency):
    # With few delivery places, replies queued behind a retried one must not take the
    # place it needs to come back (that was a deadlock once).
    gw = await gateway_factory({"demo": {"type": "mock"}}, outbound={"concurrency": concurrency, "backoff": ["100ms"]})
    mock = gw.channels["demo"].channel
    mock.fail_next(1, message="hiccup on the first one")  # a retry must not let later ones overtake
    conv = await conversation_of(gw, "alice")
    other = await conversation_of(gw, "bob")
    js = bus.jetstream()
    futs = []
    for i in range(100):
        futs.append(await js.publish_async("gw.out.mock.demo", encode(Outbound(id=f"a{i}", conversation=conv, parts=[TextPart(text=str(i))])),
                                           headers={"Nats-Msg-Id": f"a{i}"}))
        futs.append(await js.publish_async("gw.out.mock.demo", encode(Outbound(id=f"b{i}", conversation=other, parts=[TextPart(text=str(i))])),
                                           headers={"Nats-Msg-Id": f"b{i}"}))
    await asyncio.gather(*futs)
    await mock.wait_for_deliveries(200, timeout=30)
    a = [o.id for o, _ in mock.deliveries if o.conversation == conv]
    b = [o.id for o, _ in mock.deliveries if o.conversation == other]
    assert a == [f"a{i}" for i in range(100)]
    assert b == [f"b{i}" for i in range(100)]


async def test_rate_limit_paces_a_burst_instead_of_failing_it(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock", "rate_limit": 20}})
    mock = gw.channels["demo"].channel
    convs = [await conversation_of(gw, f"c{i}") for i in range(5)]
    t0 = time.monotonic()
    for i in range(40):
        await publish(bus, Outbound(id=f"r{i}", conversation=convs[i % 5], parts=[TextPart(text="x")]))
    await mock.wait_for_deliveries(40, timeout=30)
    elapsed = time.monotonic() - t0
    # 20/s with a burst of 20: 40 sends need at least ~1 s, and none failed.
    assert elapsed >= 0.9, elapsed
    assert not [s for s in await statuses(nats_server.url) if s.state in ("failed", "dead")]


async def _start_process_with_conversation(tmp_path, env: dict[str, str] | None = None):
    record = tmp_path / "deliveries.jsonl"
    gp = GatewayProcess(tmp_path, channels=f'[channels.demo]\ntype = "mock"\nrecord_file = "{record}"\n', env=env)
    gp.start()
    r = await post_inbound(gp.http_port, "demo", text="hi", sender="alice")
    assert r.status_code == 200
    nc = await nats.connect(gp.bus_url)
    msg = await nc.jetstream().get_last_msg("GW_IN", "gw.in.mock.demo")
    conv = json.loads(msg.data)["conversation"]
    return gp, nc, conv, record


def _deliveries(record) -> list[str]:
    return [json.loads(ln)["outbound"]["id"] for ln in record.read_text().splitlines()] if record.exists() else []


async def test_kill_9_after_provider_accept_before_ack_delivers_exactly_once(tmp_path):
    gp, nc, conv, record = await _start_process_with_conversation(
        tmp_path, env={"GATEWAY_FAILPOINTS": "outbound.after_receipt"})
    try:
        await publish(nc, Outbound(id="k-1", conversation=conv, parts=[TextPart(text="once")]))
    finally:
        await nc.close()
    assert await asyncio.to_thread(gp.wait) == -signal.SIGKILL  # died between receipt and ack
    assert _deliveries(record) == ["k-1"]
    gp.env.pop("GATEWAY_FAILPOINTS")
    gp.start()
    try:
        await wait_until(lambda: _has_state(gp.bus_url, "k-1", "sent"), timeout=20)
        assert _deliveries(record) == ["k-1"]  # redelivered, recognized by its receipt, not sent again
    finally:
        gp.signal(signal.SIGTERM)
        gp.wait()


async def test_kill_9_during_delivery_delivers_after_restart(tmp_path):
    gp, nc, conv, record = await _start_process_with_conversation(tmp_path)
    gp.write(f'[channels.demo]\ntype = "mock"\nrecord_file = "{record}"\ndeliver_delay = "3s"\n')
    gp.signal(signal.SIGHUP)
    await asyncio.sleep(1)
    try:
        await publish(nc, Outbound(id="k-2", conversation=conv, parts=[TextPart(text="later")]))
        await wait_until(lambda: _has_state(gp.bus_url, "k-2", "accepted"), timeout=10)
    finally:
        await nc.close()
    gp.signal(signal.SIGKILL)  # the provider never accepted it
    gp.wait()
    assert _deliveries(record) == []
    gp.write(f'[channels.demo]\ntype = "mock"\nrecord_file = "{record}"\n')
    gp.start()
    try:
        await wait_until(lambda: _deliveries(record) == ["k-2"], timeout=20)
        await wait_until(lambda: _has_state(gp.bus_url, "k-2", "sent"), timeout=10)
    finally:
        gp.signal(signal.SIGTERM)
        gp.wait()
    assert _deliveries(record) == ["k-2"]


async def _has_state(url: str, outbound_id: str, state: str) -> bool:
    return any(s.state == state for s in await statuses(url, outbound_id))


async def test_a_provider_outage_on_one_channel_does_not_stall_the_others(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}, "other": {"type": "mock"}},
                               outbound={"concurrency": 2, "backoff": ["30s"]})
    gw.channels["demo"].channel.fail_next(10, message="provider down")
    convs = [await conversation_of(gw, f"s{i}") for i in range(4)]
    for i, conv in enumerate(convs):
        await publish(bus, Outbound(id=f"down-{i}", conversation=conv, parts=[TextPart(text="x")]))
    for i in range(4):
        await wait_state(nats_server.url, f"down-{i}", "failed")
    assert (await post_inbound(gw.http.port, "other", text="hi", sender="zed")).status_code == 200
    other_conv = gw.channels["other"].ctx.conversation_key("zed")
    t0 = time.monotonic()
    await publish(bus, Outbound(id="fine", conversation=other_conv, parts=[TextPart(text="x")]), channel="other")
    await gw.channels["other"].channel.wait_for_deliveries(1, timeout=10)
    assert time.monotonic() - t0 < 5


async def test_a_deferred_delivery_waits_until_allowed_and_is_not_counted_as_an_attempt(gateway_factory, nats_server, bus):
    from datetime import datetime, timedelta, timezone
    gw = await gateway_factory({"demo": {"type": "mock", "max_attempts": 1}})
    mock = gw.channels["demo"].channel
    until = datetime.now(timezone.utc) + timedelta(seconds=1)
    mock.defer_next(until, code="quiet_hours", message="customer's quiet hours until 09:00")
    conv = await conversation_of(gw)
    await publish(bus, Outbound(id="o-defer", conversation=conv, parts=[TextPart(text="x")]))
    sts = await wait_state(nats_server.url, "o-defer", "sent")
    assert [(s.state, s.attempt) for s in sts] == [("accepted", 0), ("failed", 1), ("sent", 1)]
    assert sts[1].error.code == "quiet_hours" and not sts[1].error.permanent
    assert sts[1].next_attempt_at == until
    assert sts[2].at >= until
    assert len(mock.deliveries) == 1
