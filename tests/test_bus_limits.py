"""Size limits as nats-server counts them (payload plus headers, against its max_payload and
the streams' max_msg_size): a message just over is refused with 413 and a reason, the
bus connection stays up, and the next message goes through on it (issue 9.1)."""

from __future__ import annotations

import asyncio
import base64

from gateway.testing import post_inbound, stream_messages, wait_for_status, wait_until


def server_counted_size(m) -> int:
    """The size nats-server checked when it stored ``m``: its header block plus payload."""
    return len(base64.b64decode(m.hdrs) if m.hdrs else b"") + len(m.data)


async def last_stored(url: str) -> int:
    return server_counted_size((await stream_messages(url, "GW_IN"))[-1])


async def test_webhook_just_over_the_servers_limit_gets_413_and_the_bus_connection_stays_up(gateway_factory, nats_server):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    nc = gw.bus.nc
    limit = min(nc.max_payload, gw.config.bus.max_message_size)
    assert limit == 1048576 and gw.config.http.max_body == 1048576

    # Measure what a message of k characters costs on the wire (ids of equal length, so
    # only the text differs), then aim just below and just above the limit.
    assert (await post_inbound(gw.http.port, "demo", text="x" * 1000, id="probe-1")).status_code == 200
    s1 = await last_stored(nats_server.url)
    assert (await post_inbound(gw.http.port, "demo", text="x" * 2000, id="probe-2")).status_code == 200
    s2 = await last_stored(nats_server.url)
    per_char, base = (s2 - s1) / 1000, s1 - 1000 * (s2 - s1) / 1000
    under = int((limit - 40 - base) / per_char)
    over = int((limit + 40 - base) / per_char)

    r = await post_inbound(gw.http.port, "demo", text="x" * over, id="over-01")
    assert r.status_code == 413, r.text
    assert "exceeds the bus limit" in r.text and "xxxx" not in r.text

    # The same connection serves the next message at once: no close, no reconnect.
    r = await post_inbound(gw.http.port, "demo", text="next", id="after-1")
    assert r.status_code == 200, r.text
    assert gw.bus.nc is nc and nc.is_connected and nc.stats["reconnects"] == 0

    r = await post_inbound(gw.http.port, "demo", text="x" * under, id="under-1")
    assert r.status_code == 200, r.text
    stored = await last_stored(nats_server.url)
    assert limit - 200 < stored <= limit
    assert len(await stream_messages(nats_server.url, "GW_IN")) == 4
    assert gw.bus.nc is nc and nc.stats["reconnects"] == 0


async def test_a_smaller_server_max_payload_is_the_limit_not_the_config(tmp_path):
    from gateway.testing import NatsServer, make_config, start_gateway

    server = NatsServer(tmp_path / "nats")
    server.max_payload = 65536  # the server's own limit, below bus.max_message_size (1 MiB)
    await server.start()
    try:
        gw = await start_gateway(make_config(server.url, {"demo": {"type": "mock"}}))
        try:
            assert gw.bus.nc.max_payload == 65536 and gw.bus.max_payload == 65536
            r = await post_inbound(gw.http.port, "demo", text="x" * 70000, id="big")
            assert r.status_code == 413, r.text
            r = await post_inbound(gw.http.port, "demo", text="small", id="small")
            assert r.status_code == 200, r.text
            assert gw.bus.nc.stats["reconnects"] == 0
            assert len(await stream_messages(server.url, "GW_IN")) == 1
        finally:
            await gw.stop()
    finally:
        await server.stop()


async def test_undecodable_outbound_too_large_for_a_dead_letter_is_kept_in_the_object_store(gateway_factory, nats_server, bus):
    from gateway import ObjectRef
    from gateway.wire import dead_letter_decoder

    gw = await gateway_factory({"demo": {"type": "mock"}})
    nc = gw.bus.nc
    # Fits on GW_OUT; as a dead letter its bytes would be base64 (4/3 larger) and would not.
    junk = b"\xff" + b"not json " * 100_000
    await bus.jetstream().publish("gw.out.mock.demo", junk, headers={"Nats-Msg-Id": "junk-1"})
    await wait_until(lambda: stream_messages(nats_server.url, "GW_DEAD"), timeout=15)
    [m] = await stream_messages(nats_server.url, "GW_DEAD")
    dl = dead_letter_decoder.decode(m.data)
    assert dl.payload is None and dl.outbound is None and "undecodable" in dl.reason
    bucket, name = dl.headers["Gw-Dead-Payload"].split("/")
    assert await gw.get_blob(ObjectRef(bucket=bucket, name=name, size=len(junk), sha256=name)) == junk
    assert gw.bus.nc is nc and nc.stats["reconnects"] == 0
    # Consumed (terminated), not redelivered again and again.
    await asyncio.sleep(0.5)
    assert len(await stream_messages(nats_server.url, "GW_DEAD")) == 1


async def test_a_provider_error_too_long_for_a_status_is_shortened_and_the_connection_stays_up(gateway_factory, nats_server, bus):
    from gateway import Outbound, TextPart
    from gateway.wire import encode

    gw = await gateway_factory({"demo": {"type": "mock"}})
    nc = gw.bus.nc
    assert (await post_inbound(gw.http.port, "demo", text="hello", sender="alice")).status_code == 200
    conv = gw.channels["demo"].ctx.conversation_key("alice")
    gw.channels["demo"].channel.fail_next(permanent=True, message="provider says: " + "e" * 1_100_000)
    await bus.jetstream().publish("gw.out.mock.demo", encode(Outbound(id="o-big-error", conversation=conv,
                                                                      parts=[TextPart(text="hi")])),
                                  headers={"Nats-Msg-Id": "o-big-error"})
    [*_, dead] = await wait_for_status(nats_server.url, "o-big-error", "dead", timeout=15)
    assert dead.error is not None and dead.error.message.startswith("provider says: eee")
    assert dead.error.message.endswith("[truncated]")
    assert len(await stream_messages(nats_server.url, "GW_DEAD")) == 1
    assert gw.bus.nc is nc and nc.stats["reconnects"] == 0


async def test_an_outbound_whose_dead_letter_went_to_the_object_store_is_replayed_by_the_cli(tmp_path, capsys):
    from gateway import Outbound, TextPart
    from gateway.cli import main
    from gateway.testing import NatsServer, make_config, start_gateway
    from gateway.wire import dead_letter_decoder, encode

    server = NatsServer(tmp_path / "nats")
    server.max_payload = 65536
    await server.start()
    try:
        gw = await start_gateway(make_config(server.url, {"demo": {"type": "mock"}}))
        try:
            assert (await post_inbound(gw.http.port, "demo", text="hello", sender="alice")).status_code == 200
            conv = gw.channels["demo"].ctx.conversation_key("alice")
            mock = gw.channels["demo"].channel
            # The outbound fits on the bus; with a long provider error beside it, its dead
            # letter does not, so the dead letter names its bytes in the object store.
            mock.fail_next(permanent=True, message="provider says: " + "e" * 20_000)
            big = Outbound(id="o-near-limit", conversation=conv, parts=[TextPart(text="y" * 50_000)])
            js = gw.bus.nc.jetstream()
            await js.publish("gw.out.mock.demo", encode(big), headers={"Nats-Msg-Id": big.id})
            await wait_for_status(server.url, big.id, "dead", timeout=15)
            [m] = await stream_messages(server.url, "GW_DEAD")
            dl = dead_letter_decoder.decode(m.data)
            assert dl.id == big.id and dl.outbound is None and "Gw-Dead-Payload" in dl.headers

            cfg = tmp_path / "gateway.toml"
            cfg.write_text(f'[bus]\nurl = "{server.url}"\n[channels.demo]\ntype = "mock"\n')
            assert await asyncio.to_thread(main, ["-c", str(cfg), "dlq", "replay", big.id]) == 0
            assert f"replayed {big.id}" in capsys.readouterr().out
            [(delivered, _)] = await mock.wait_for_deliveries(1)
            assert delivered == big
            await wait_for_status(server.url, big.id, "sent", timeout=15)
            assert await stream_messages(server.url, "GW_DEAD") == []
        finally:
            await gw.stop()
    finally:
        await server.stop()
