"""Per-conversation order of replies across a gateway kill -9, a nats-server kill -9 and two
gateway processes, and one channel's backlog not delaying another's replies. Real
processes (``gateway run``), a real nats-server, and a provider over HTTP
(:class:`ProviderSink`) that records what arrives, per conversation, in arrival order."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import nats
import nats.js.errors

from gateway import Outbound, TextPart
from gateway.wire import encode
from gateway.testing import GatewayProcess, ProviderSink, post_inbound, wait_until

REPLIES, CONVERSATIONS = 2000, 200

# What one kill may double (docs/bus-contract.md, "After a crash"): the provider calls the
# dead owner had under way (the provider took them; the gateway never heard) and the
# deliveries between the provider's acceptance and their receipt reaching the bus. Each
# holds one of the channel's delivery places, so the bound is `[outbound] concurrency`
# (64). Measured: 4-6 on a quiet machine; 64 once with the test suite's three workers on
# two cores, where every place held a call to the slowed provider when the kill came.
DOUBLES_PER_KILL = 64


def _channels(sink: ProviderSink, *names: str) -> str:
    return "".join(f'[channels.{n}]\ntype = "mock"\nprovider_url = "{sink.url}"\nkeep = 0\n' for n in names)


async def _conversations(gp: GatewayProcess, channel: str, n: int) -> list[str]:
    """Open ``n`` conversations on ``channel`` (one inbound message each); their keys."""
    for i in range(n):
        assert (await post_inbound(gp.http_port, channel, text="hi", sender=f"{channel}-c{i}")).status_code == 200
    nc = await nats.connect(gp.bus_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("GW_IN")
        keys = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await js.get_msg("GW_IN", seq)
            if m.subject.endswith(f".{channel}"):
                keys.append(json.loads(m.data)["conversation"])
    finally:
        await nc.close()
    keys = sorted(set(keys))
    assert len(keys) == n
    return keys


def _replies(channel_of: dict[str, str]) -> list[tuple[str, Outbound]]:
    """REPLIES replies spread round-robin over the conversations, numbered in publish
    order within each (``<conversation index>-<n>``)."""
    convs = sorted(channel_of)
    out = []
    for i in range(REPLIES):
        c = convs[i % len(convs)]
        out.append((f"gw.out.mock.{channel_of[c]}",
                    Outbound(id=f"{i % len(convs)}-{i // len(convs):05d}", conversation=c, parts=[TextPart(text="x")])))
    return out


async def _publish(url: str, items: list[tuple[str, Outbound]]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        futs = [await js.publish_async(subject, encode(o), headers={"Nats-Msg-Id": o.id}) for subject, o in items]
        await asyncio.gather(*futs)
    finally:
        await nc.close()


def _order_breaks(sink: ProviderSink, items: list[tuple[str, Outbound]]) -> list[str]:
    """Conversations whose replies did not first arrive in publish order."""
    published: dict[str, list[str]] = {}
    for _, o in items:
        published.setdefault(o.conversation, []).append(o.id)
    broken = []
    for conv, ids in published.items():
        first = list(dict.fromkeys(sink.order.get(conv, [])))
        if first != ids:
            broken.append(conv)
    return broken


async def _all_delivered(sink: ProviderSink, timeout: float) -> None:
    await wait_until(lambda: len(sink.sends) >= REPLIES, timeout=timeout)


def _stop(*gps: GatewayProcess) -> None:
    for gp in gps:
        if gp.proc is not None and gp.proc.poll() is None:
            gp.signal(signal.SIGTERM)
            gp.wait()


async def test_order_is_kept_in_every_conversation_across_a_gateway_kill_9(tmp_path: Path) -> None:
    async with ProviderSink() as sink:
        gp = GatewayProcess(tmp_path, channels=_channels(sink, "demo"))
        gp.start()
        try:
            convs = await _conversations(gp, "demo", CONVERSATIONS)
            items = _replies({c: "demo" for c in convs})
            await _publish(gp.bus_url, items)
            await wait_until(lambda: sink.count >= 400, timeout=60)
            gp.signal(signal.SIGKILL)
            await asyncio.to_thread(gp.wait)
            at_kill = len(sink.sends)
            t0 = time.monotonic()
            gp.start()
            restarted = time.monotonic() - t0
            await _all_delivered(sink, 120)
        finally:
            _stop(gp)
    broken = _order_breaks(sink, items)
    doubles = sum(c - 1 for c in sink.sends.values())
    print(f"gateway kill -9 after {at_kill} of {REPLIES}: healthy again in {restarted:.2f}s, "
          f"order broken in {len(broken)} of {CONVERSATIONS}, doubles {doubles}")
    assert at_kill < REPLIES - 300, "the kill came after most deliveries: the test proves little"
    assert len(sink.sends) == REPLIES
    assert broken == []
    assert doubles <= DOUBLES_PER_KILL


async def test_order_is_kept_in_every_conversation_across_a_nats_server_kill_9(tmp_path: Path, nats_server) -> None:
    async with ProviderSink(delay=0.005) as sink:
        gp = GatewayProcess(tmp_path, channels=_channels(sink, "demo"), bus_url=nats_server.url)
        gp.start()
        try:
            convs = await _conversations(gp, "demo", CONVERSATIONS)
            items = _replies({c: "demo" for c in convs})
            await _publish(nats_server.url, items)
            await wait_until(lambda: sink.count >= 400, timeout=60)
            nats_server.proc.kill()  # as by kill -9, in the middle of the deliveries
            await nats_server.proc.wait()
            at_kill = len(sink.sends)
            await asyncio.sleep(1)  # an outage, not a blip: fixed on purpose
            await nats_server.start()
            await _all_delivered(sink, 120)
        finally:
            _stop(gp)
    broken = _order_breaks(sink, items)
    doubles = sum(c - 1 for c in sink.sends.values())
    print(f"nats-server kill -9 after {at_kill} of {REPLIES}: order broken in {len(broken)} of {CONVERSATIONS}, "
          f"doubles {doubles}")
    assert at_kill < REPLIES - 300, "the kill came after most deliveries: the test proves little"
    assert len(sink.sends) == REPLIES
    assert broken == []
    assert doubles <= DOUBLES_PER_KILL


async def test_two_gateways_share_the_channels_and_keep_order_when_one_is_killed(tmp_path: Path, nats_server) -> None:
    async with ProviderSink(delay=0.005) as sink:
        chans = _channels(sink, "east", "west")
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = GatewayProcess(tmp_path / "a", channels=chans, bus_url=nats_server.url)
        b = GatewayProcess(tmp_path / "b", channels=chans, bus_url=nats_server.url)
        a.start()
        b.start()
        try:
            # Each process delivers one of the two channels once both are up.
            await wait_until(lambda: "channel delivery taken" in a.logs() and "channel delivery taken" in b.logs(),
                             timeout=30)
            half = CONVERSATIONS // 2
            channel_of = {c: "east" for c in await _conversations(a, "east", half)}
            channel_of.update({c: "west" for c in await _conversations(b, "west", half)})
            items = _replies(channel_of)
            await _publish(nats_server.url, items)
            await wait_until(lambda: sink.count >= 400, timeout=60)
            a.signal(signal.SIGKILL)
            await asyncio.to_thread(a.wait)
            at_kill = len(sink.sends)
            await _all_delivered(sink, 120)
        finally:
            _stop(a, b)
    taken = [json.loads(ln)["channel"] for ln in b.logs().splitlines() if "channel delivery taken" in ln]
    broken = _order_breaks(sink, items)
    doubles = sum(c - 1 for c in sink.sends.values())
    print(f"two gateways, one killed after {at_kill} of {REPLIES}: survivor took {taken}, "
          f"order broken in {len(broken)} of {CONVERSATIONS}, doubles {doubles}")
    assert at_kill < REPLIES - 300, "the kill came after most deliveries: the test proves little"
    assert sorted(set(taken)) == ["east", "west"]  # its own, then the dead one's
    assert len(sink.sends) == REPLIES
    assert broken == []
    assert doubles <= DOUBLES_PER_KILL


async def test_a_saturated_channel_does_not_delay_another_channels_replies(tmp_path: Path) -> None:
    waiting = 3000
    async with ProviderSink() as sink, ProviderSink(delay=2.0) as slow_sink:
        gp = GatewayProcess(tmp_path, channels=_channels(slow_sink, "slow") + _channels(sink, "fast"))
        gp.start()
        try:
            slow = await _conversations(gp, "slow", 100)
            fast = await _conversations(gp, "fast", 20)
            await _publish(gp.bus_url, [("gw.out.mock.slow", Outbound(id=f"s{i}", conversation=slow[i % 100],
                                                                      parts=[TextPart(text="x")]))
                                        for i in range(waiting)])
            await wait_until(lambda: _slow_saturated(gp.bus_url), timeout=30)
            t0 = time.monotonic()
            await _publish(gp.bus_url, [("gw.out.mock.fast", Outbound(id=f"f{i}", conversation=fast[i % 20],
                                                                      parts=[TextPart(text="x")]))
                                        for i in range(100)])
            await wait_until(lambda: sink.count >= 100, timeout=60)
            took = time.monotonic() - t0
        finally:
            _stop(gp)
    print(f"fast channel: 100 replies in {took:.2f}s with {waiting} waiting on a 2 s provider "
          f"({slow_sink.count} of them sent meanwhile)")
    assert slow_sink.count < waiting // 2
    assert took < 5.0, took



async def _slow_saturated(url: str) -> bool:
    """The slow channel's consumer has handed out more than its process can have in
    delivery at once (64 places): its backlog now waits in the process and on the server."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info("GW_OUT", "gw_out_slow")
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await nc.close()
    return info.num_ack_pending > 64


async def test_order_is_kept_when_bus_requests_fail_without_a_disconnect(gateway_factory, nats_server) -> None:
    """A stream leader election (or a stalled server) makes single requests fail while the
    connection stays up, so no reconnect ends the delivery term. A reply whose processing
    failed so must hold its conversation until it is done; before, the conversation's next
    reply went out at once and the failed one came back after ``ack_wait``."""
    gw = await gateway_factory({"demo": {"type": "mock", "deliver_delay": "500ms"}},
                               bus={"publish_timeout": "300ms"}, outbound={"ack_wait": "30s"})
    channel = gw.channels["demo"].channel
    assert (await post_inbound(gw.http.port, "demo", text="hi", sender="alice")).status_code == 200
    conv = gw.channels["demo"].ctx.conversation_key("alice")
    items = [("gw.out.mock.demo", Outbound(id=f"r{i}", conversation=conv, parts=[TextPart(text=str(i))]))
             for i in range(3)]
    # r0's first attempt fails at the provider; its "failed" status is then written while
    # the server stands still, and that write fails.
    channel.fail_next(1)
    nc = await nats.connect(nats_server.url)
    accepted = asyncio.Event()

    async def on_status(msg) -> None:
        if b'"r0"' in msg.data and b'"accepted"' in msg.data:
            accepted.set()

    await nc.subscribe("gw.status.mock.demo", cb=on_status)
    proc = nats_server.proc
    assert proc is not None
    try:
        await _publish(nats_server.url, items)
        await asyncio.wait_for(accepted.wait(), 10)  # r0 is in the provider call (500 ms)
        proc.send_signal(signal.SIGSTOP)
        try:
            # The outage outlasts the call and publish_timeout: a fault's length, not a wait.
            await asyncio.sleep(1.5)
        finally:
            proc.send_signal(signal.SIGCONT)
        await wait_until(lambda: len({o.id for o, _ in channel.deliveries}) >= len(items), timeout=20)
    finally:
        await nc.close()
    first = list(dict.fromkeys(o.id for o, _ in channel.deliveries))
    assert first == [o.id for _, o in items]
