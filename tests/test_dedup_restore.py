"""A crash between the bus ack and the dedup record (failpoint ``inbound.after_ack``) must not
let a provider retry after JetStream's duplicate window be published twice: the gateway
restores the missing records from GW_IN (issue 9.5). Real processes: the gateway as a
subprocess that kills itself at the failpoint, a real nats-server."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import nats

from gateway.wire import message_decoder
from gateway.testing import GatewayProcess, post_inbound, start_gateway, make_config, stream_messages, wait_until

WINDOW = 1.0  # [bus] duplicate_window of these tests, in seconds


def short_window(gp: GatewayProcess) -> None:
    gp.config.write_text(gp.config.read_text().replace("[bus]\n", f'[bus]\nduplicate_window = "{WINDOW:g}s"\n', 1))


async def crash_on_publish(gp: GatewayProcess, provider_id: str) -> float:
    """POST one message to a gateway that dies right after the bus stored it; returns when."""
    async with httpx.AsyncClient(timeout=10) as c:
        try:
            r = await c.post(f"http://127.0.0.1:{gp.http_port}/channels/demo/inbound",
                             content=json.dumps({"text": "hello", "id": provider_id}).encode())
        except httpx.HTTPError:
            pass  # the process died before answering: the provider will retry
        else:
            raise AssertionError(f"expected the gateway to die, got {r.status_code}")
    crashed_at = time.monotonic()
    assert await asyncio.to_thread(gp.wait) == -signal.SIGKILL
    return crashed_at


async def wait_past_the_window(since: float) -> None:
    # The point of the test is a retry JetStream no longer recognizes: its window must be
    # over (the server sweeps expired ids once per window, so an id can live up to two).
    left = since + 2 * WINDOW + 0.5 - time.monotonic()
    if left > 0:
        await asyncio.sleep(left)


async def test_retry_after_a_crash_between_ack_and_dedup_record_is_recognized_after_restart(tmp_path):
    gp = GatewayProcess(tmp_path, env={"GATEWAY_FAILPOINTS": "inbound.after_ack"})
    short_window(gp)
    gp.start()
    crashed_at = await crash_on_publish(gp, "wx-crash-1")
    del gp.env["GATEWAY_FAILPOINTS"]
    gp.start()  # same store: the message is on GW_IN, its dedup record is not
    try:
        await wait_past_the_window(crashed_at)
        retry = await post_inbound(gp.http_port, "demo", text="hello", id="wx-crash-1")
        assert retry.status_code == 200
        assert retry.json()["duplicate"] is True
        stored = [message_decoder.decode(m.data) for m in await stream_messages(gp.bus_url, "GW_IN")]
        assert [m.provider_id for m in stored] == ["wx-crash-1"]
        assert "restored dedup records" in gp.logs()
    finally:
        gp.signal(signal.SIGTERM)
        gp.wait()


async def test_a_peer_repairs_a_crashed_process_that_is_not_restarted(tmp_path, nats_server):
    # Two gateways share one bus; one dies at the failpoint and stays dead. The retry
    # reaches the survivor, later than JetStream's window.
    survivor = await start_gateway(make_config(nats_server.url, {"demo": {"type": "mock"}},
                                               bus={"duplicate_window": f"{WINDOW:g}s"}))
    try:
        gp = GatewayProcess(tmp_path, env={"GATEWAY_FAILPOINTS": "inbound.after_ack"}, bus_url=nats_server.url)
        short_window(gp)
        gp.start()
        crashed_at = await crash_on_publish(gp, "wx-crash-2")
        await wait_until(lambda: survivor.restore.last_repair is not None, timeout=20)
        assert survivor.restore.last_repair["restored"] == 1
        await wait_past_the_window(crashed_at)
        retry = await post_inbound(survivor.http.port, "demo", text="hello", id="wx-crash-2")
        assert retry.json()["duplicate"] is True
        assert len(await stream_messages(nats_server.url, "GW_IN")) == 1
    finally:
        await survivor.stop()


async def test_a_clean_stop_leaves_nothing_to_repair(nats_server):
    cfg = make_config(nats_server.url, {"demo": {"type": "mock"}}, bus={"duplicate_window": f"{WINDOW:g}s"})
    first = await start_gateway(cfg)
    assert (await post_inbound(first.http.port, "demo", text="x", id="clean-1")).status_code == 200
    await first.stop()
    await asyncio.sleep(3 * first.restore.stale_after)  # long enough for a leftover marker to look dead
    second = await start_gateway(make_config(nats_server.url, {"demo": {"type": "mock"}},
                                             bus={"duplicate_window": f"{WINDOW:g}s"}))
    try:
        assert second.restore.last_repair is None
    finally:
        await second.stop()


async def test_a_repaired_marker_stays_removed_after_a_nats_server_kill_9(nats_server):
    # nats-server's file store loses removals on a kill -9 (until it synced its index): a
    # marker removed by purging its subject came back and was repaired again and again.
    gw = await start_gateway(make_config(nats_server.url, {"demo": {"type": "mock"}},
                                         bus={"duplicate_window": f"{WINDOW:g}s"}))
    try:
        js = gw.bus.js
        for i in range(5):  # five dead processes' markers
            await js.publish(f"$KV.gw_state.core.inbound-live.dead{i}", b'{"instance":"dead%d","pid":1,"host":"h"}' % i)
        await wait_until(lambda: _repaired(nats_server.url, 5), timeout=20)
        nats_server.proc.kill()
        await nats_server.proc.wait()
        await nats_server.start()
        await wait_until(lambda: gw.bus.connected, timeout=30)
        seen = gw.restore.last_repair
        await asyncio.sleep(4 * gw.restore.stale_after)  # beats that would repair a marker that came back
        assert gw.restore.last_repair is seen
    finally:
        await gw.stop()


async def _repaired(url: str, n: int) -> bool:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        gone = 0
        for i in range(n):
            m = await js.get_msg("KV_gw_state", subject=f"$KV.gw_state.core.inbound-live.dead{i}")
            gone += (m.headers or {}).get("KV-Operation") == "PURGE"
        return gone == n
    finally:
        await nc.close()


async def test_a_marker_claimed_by_the_previous_release_is_repaired_from_its_beat_time(nats_server):
    # Releases before beat_at was a datetime field wrote it with isoformat() ("+00:00", not
    # "Z"). A repairer that crashed after such a claim leaves it for this release: its
    # restore window must be built round that time, not round the claim's own write.
    gw = await start_gateway(make_config(nats_server.url, {"demo": {"type": "mock"}},
                                         bus={"duplicate_window": f"{WINDOW:g}s", "publish_timeout": "1s"}))
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        first = await post_inbound(gw.http.port, "demo", text="hello", id="wx-old-claim")
        assert first.status_code == 200
        await (await js.key_value("gw_dedup")).purge(f"demo.{first.json()['id']}")  # as if killed after the ack
        stored = await js.get_msg("GW_IN", seq=(await js.stream_info("GW_IN")).state.last_seq)
        # Long enough that a window round the claim's write would miss the message.
        await asyncio.sleep(gw.restore.stale_after + gw.restore.publish_timeout + 2)
        claim = {"instance": "deadold", "pid": 7, "host": "h", "beat_at": stored.time.isoformat(),
                 "claimed_by": "a-repairer-that-crashed"}
        assert claim["beat_at"].endswith("+00:00")
        await js.publish("$KV.gw_state.core.inbound-live.deadold", json.dumps(claim).encode())
        await wait_until(lambda: (gw.restore.last_repair or {}).get("instance") == "deadold", timeout=20)
        assert gw.restore.last_repair["restored"] == 1
        retry = await post_inbound(gw.http.port, "demo", text="hello", id="wx-old-claim")
        assert retry.json()["duplicate"] is True
        assert len(await stream_messages(nats_server.url, "GW_IN")) == 1
    finally:
        await nc.close()
        await gw.stop()
