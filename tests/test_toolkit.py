"""The channel toolkit (gateway.Lease, SharedValue, ProviderIndex, provider_error, the
webhook checks, typed KV records, ctx.part_bytes, stable_id, Supervised), each against a
real nats-server through a running gateway's channel context."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from datetime import datetime, timezone
from email.utils import format_datetime

import httpx
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from gateway.testing import free_port

from gateway import (
    Backoff,
    ChannelContext,
    DeliveryError,
    FilePart,
    ImagePart,
    Lease,
    ObjectRef,
    ProviderIndex,
    SharedValue,
    SignatureError,
    Supervised,
    check_timestamp,
    parse_retry_after,
    provider_error,
    public_url,
    stable_id,
    verify_ed25519,
    verify_hmac,
)
from gateway.testing import wait_until
from gateway.wire import message_id


@pytest.fixture
async def ctx(gateway_factory) -> ChannelContext:
    gw = await gateway_factory({"demo": {"type": "mock"}}, http={"port": 0})
    ctx = gw.channels["demo"].ctx
    ctx.test_gateway = gw  # the HTTP port, for the public-URL tests
    return ctx


# --- leases ----------------------------------------------------------------------------


async def test_of_two_contenders_for_a_lease_one_wins(ctx):
    a, b = Lease(ctx.state, "reader", ttl=30), Lease(ctx.state, "reader", ttl=30)
    won = await asyncio.gather(a.acquire(), b.acquire())
    assert sorted(won) == [False, True]
    holder, other = (a, b) if won[0] else (b, a)
    assert await holder.acquire(), "the holder renews its own lease"
    assert not await other.acquire()


async def test_lease_is_taken_over_after_it_expires_not_before(ctx):
    a, b = Lease(ctx.state, "reader", ttl=1.0), Lease(ctx.state, "reader", ttl=1.0)
    assert await a.acquire()
    t0 = time.time()
    assert not await b.acquire()
    await wait_until(b.acquire, timeout=5)
    assert time.time() - t0 >= 0.9
    assert not await a.acquire(), "the old holder lost it"


async def test_a_lease_runs_out_on_the_servers_clock_not_the_holders(ctx):
    # The holder's clock runs an hour fast or slow: the wall-clock expiry it writes (kept for
    # readers of the previous release) decides nothing; the record's TTL on the server does.
    a, b = Lease(ctx.state, "reader", ttl=1.0), Lease(ctx.state, "reader", ttl=1.0)
    assert await a.acquire()
    _, revision = await ctx.state.get_revision("reader")
    skewed = msgspec.json.encode({"holder": a.holder, "expires": time.time() - 3600, "ttl": 1.0})
    assert await ctx.state.update("reader", skewed, revision, ttl=1.0)
    t0 = time.monotonic()
    assert not await b.acquire(), "an expiry in the past on a live record does not free it"
    await wait_until(b.acquire, timeout=5)
    assert time.monotonic() - t0 >= 0.5


async def test_released_lease_is_taken_at_once(ctx):
    a, b = Lease(ctx.state, "reader", ttl=60), Lease(ctx.state, "reader", ttl=60)
    assert await a.acquire()
    await a.release()
    assert await b.acquire()
    await a.release()  # not the holder any more: changes nothing
    assert not await a.acquire()


async def test_shared_value_refresh_is_single_flight_under_50_concurrent_callers(ctx):
    fetched: list[int] = []

    async def fetch() -> tuple[str, float]:
        fetched.append(1)
        await asyncio.sleep(0.2)  # a slow token endpoint: everybody else arrives meanwhile
        return f"token-{len(fetched)}", 3600.0

    # Two objects stand for two gateway processes sharing the KV.
    procs = [SharedValue(ctx.state, "token", str, fetch), SharedValue(ctx.state, "token", str, fetch)]
    values = await asyncio.gather(*(procs[i % 2].get() for i in range(50)))
    assert set(values) == {"token-1"} and len(fetched) == 1
    refreshed = await asyncio.gather(*(procs[i % 2].get(stale="token-1") for i in range(50)))
    assert set(refreshed) == {"token-2"} and len(fetched) == 2


async def test_shared_value_refreshes_before_it_expires(ctx):
    n = 0

    async def fetch() -> tuple[int, float]:
        nonlocal n
        n += 1
        return n, 10.0

    value = SharedValue(ctx.state, "v", int, fetch, margin=5.0)
    assert await value.get() == 1 and await value.get() == 1
    value.margin = 11.0  # now inside the margin: refreshed early
    assert await value.get() == 2


async def test_failed_refresh_releases_the_lease_for_the_next_caller(ctx):
    calls = 0

    async def fetch() -> tuple[str, float]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise DeliveryError("token endpoint down", permanent=False)
        return "ok", 60.0

    value = SharedValue(ctx.state, "t", str, fetch, lease_ttl=60)
    with pytest.raises(DeliveryError):
        await value.get()
    assert await SharedValue(ctx.state, "t", str, fetch, lease_ttl=60).get() == "ok"


# --- typed records, part bytes, provider index, ids ---------------------------------------


class Checkpoint(msgspec.Struct):
    uidvalidity: int
    last_uid: int
    at: datetime
    seen: list[str] = []


async def test_typed_record_round_trips_and_garbage_reads_as_missing(ctx):
    cp = Checkpoint(7, 42, datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), ["a"])
    await ctx.state.put_record("cp", cp)
    assert await ctx.state.get_record("cp", Checkpoint) == cp
    assert await ctx.state.get_record("absent", Checkpoint) is None
    await ctx.state.put("cp", b"not json")
    assert await ctx.state.get_record("cp", Checkpoint) is None


async def test_compare_and_set_with_a_ttl_keeps_the_check_and_the_retention(ctx):
    assert await ctx.state.create("ring", b"1", ttl=1)
    assert not await ctx.state.create("ring", b"again", ttl=1)
    value, rev = await ctx.state.get_revision("ring")
    assert await ctx.state.update("ring", b"2", rev, ttl=1)
    assert not await ctx.state.update("ring", b"stale", rev, ttl=1)  # the revision moved on
    assert await ctx.state.get("ring") == b"2"

    async def expired() -> bool:
        return await ctx.state.get("ring") is None

    await wait_until(expired, 5, 0.2)
    assert await ctx.state.create("ring", b"3", ttl=60)  # created again after it expired


async def test_part_bytes_reads_inline_data_and_the_object_store(ctx):
    ref = await ctx.put_blob(b"stored" * 1000, content_type="image/png")
    assert await ctx.part_bytes(ImagePart(data=b"inline")) == b"inline"
    assert await ctx.part_bytes(ImagePart(ref=ref)) == b"stored" * 1000
    with pytest.raises(DeliveryError) as err:
        await ctx.part_bytes(FilePart(url="https://example.com/x.pdf"))
    assert err.value.permanent and err.value.code == "unsupported_content"
    assert isinstance(ref, ObjectRef)


async def test_provider_index_finds_the_outbound_until_its_ttl(ctx):
    index = ProviderIndex(ctx.state, "sms", ttl=1.0)
    await index.put("SM123", "o-1", "demo.conv")
    sent = await index.get("SM123")
    assert sent is not None and (sent.outbound_id, sent.conversation) == ("o-1", "demo.conv")
    assert await index.get("SM999") is None
    await wait_until(lambda: _is_none(index.get("SM123")), timeout=10)


async def _is_none(coro) -> bool:
    return await coro is None


def test_stable_id_is_the_gateway_message_id_and_stable_across_releases():
    assert stable_id("demo", "p-1") == message_id("demo", "p-1") == "2xlw676q26dzc5nd7hovexk5zb"
    assert len(stable_id("x", n=40)) == 40 and stable_id("a", "b") != stable_id("a\x00b", "")


# --- provider answers ----------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(("status", "headers", "permanent", "retry_after"), [
    (429, {"Retry-After": "30"}, False, 30.0),
    (503, {"retry-after": "Sun, 01 Mar 2026 12:02:00 GMT"}, False, 120.0),
    (500, {}, False, None),
    (502, {"Retry-After": "soon"}, False, None),
    (408, {}, False, None),
    (400, {"Retry-After": "30"}, True, None),
    (401, {}, True, None),
    (403, {}, True, None),
    (404, {}, True, None),
    (422, {}, True, None),
])
def test_provider_answer_maps_to_transient_or_permanent(status, headers, permanent, retry_after):
    err = provider_error(status, headers, provider="Twilio", now=NOW)
    assert err is not None and err.permanent is permanent and err.retry_after == retry_after
    assert err.code == f"http_{status}" and "Twilio" in err.message


def test_success_is_no_error_and_httpx_headers_work():
    assert provider_error(200) is None and provider_error(302) is None
    err = provider_error(429, httpx.Headers({"RETRY-AFTER": "5"}))
    assert err is not None and err.retry_after == 5.0


def test_retry_after_date_in_the_past_is_zero():
    assert parse_retry_after(format_datetime(datetime(2020, 1, 1, tzinfo=timezone.utc), usegmt=True), now=NOW) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("") is None


# --- webhook checks --------------------------------------------------------------------------

BODY = b'{"event":"message","text":"hi"}'


def test_hmac_hex_and_base64_good_bad_missing():
    mac = hmac.new(b"s3cret", BODY, hashlib.sha256).digest()
    verify_hmac("s3cret", BODY, mac.hex())
    verify_hmac("s3cret", BODY, "sha256=" + mac.hex().upper(), prefix="sha256=")
    verify_hmac(b"s3cret", BODY, base64.b64encode(mac).decode(), encoding="base64")
    sha1 = hmac.new(b"s3cret", BODY, hashlib.sha1).digest()
    verify_hmac("s3cret", BODY, base64.b64encode(sha1).decode(), digest="sha1", encoding="base64")
    for bad in (hmac.new(b"other", BODY, hashlib.sha256).hexdigest(), "zz", "", None, mac.hex()[:-2]):
        with pytest.raises(SignatureError):
            verify_hmac("s3cret", BODY, bad)
    with pytest.raises(SignatureError):
        verify_hmac("s3cret", BODY + b" ", mac.hex())
    with pytest.raises(SignatureError):
        verify_hmac("s3cret", BODY, mac.hex(), prefix="sha256=")


def test_ed25519_good_bad_tampered():
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    message = b"1700000000" + BODY  # QQ's official bot signs timestamp + body
    sig = key.sign(message)
    verify_ed25519(public, message, sig)
    verify_ed25519(public.hex(), message, sig.hex())
    with pytest.raises(SignatureError):
        verify_ed25519(public, message + b"x", sig)
    with pytest.raises(SignatureError):
        verify_ed25519(Ed25519PrivateKey.generate().public_key().public_bytes_raw(), message, sig)
    for bad in ("nothex", "", None, sig[:-1]):
        with pytest.raises(SignatureError):
            verify_ed25519(public, message, bad)


def test_timestamp_inside_the_window_passes_stale_and_future_ones_do_not():
    now = 1_700_000_000
    assert check_timestamp(str(now - 299), 300, now=now) == now - 299
    assert check_timestamp(now + 299, 300, now=now) == now + 299
    for bad in (str(now - 301), str(now + 301), "", None, "12ab", "1" * 13, "-5"):
        with pytest.raises(SignatureError):
            check_timestamp(bad, 300, now=now)
    assert check_timestamp("5", 0, now=now) == 5.0  # tolerance 0: only the form is checked


@pytest.mark.parametrize(("kwargs", "headers", "expected"), [
    ({}, {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}, "http://127.0.0.1:{port}{path}"),
    ({"trust_forwarded": True}, {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "gw.example.com"},
     "https://gw.example.com{path}"),
    ({"trust_forwarded": True}, {}, "http://127.0.0.1:{port}{path}"),
    ({"base_url": "https://public.example.com/"}, {"X-Forwarded-Host": "evil.example"},
     "https://public.example.com{path}"),
])
async def test_public_url_behind_a_proxy(ctx, kwargs, headers, expected):
    async def echo(request: Request) -> Response:
        return PlainTextResponse(public_url(request, **kwargs))

    path = ctx.add_route("/sms", echo)
    port = ctx.test_gateway.http.port
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{port}{path}?a=1&b=%20", content=b"x", headers=headers)
    assert r.status_code == 200
    assert r.text == expected.format(port=port, path=path + "?a=1&b=%20")


# --- supervised tasks ---------------------------------------------------------------------------


async def test_supervised_task_restarts_with_backoff_and_reports_health(ctx):
    states: list[tuple[str, str | None]] = []
    runs = 0
    working = asyncio.Event()

    async def run(task: Supervised) -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ConnectionError("server gone")
        task.running()
        working.set()
        await asyncio.Event().wait()

    task = Supervised("poller", run, set_state=lambda s, d: states.append((s, d)), log=ctx.log,
                      backoff=Backoff(0.01, 0.05))
    task.start()
    await asyncio.wait_for(working.wait(), 10)
    await task.stop()
    assert runs == 3
    assert [s for s, _ in states] == ["degraded", "degraded", "running"]
    assert "ConnectionError: server gone" in (states[0][1] or "")


async def test_supervised_tasks_under_one_lease_run_one_at_a_time_and_hand_over_on_stop(ctx):
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    def make(name: str) -> Supervised:
        async def run(task: Supervised) -> None:
            started[name].set()
            task.running()
            await asyncio.Event().wait()

        return Supervised(name, run, set_state=lambda s, d: None, log=ctx.log,
                          lease=Lease(ctx.state, "poller-lease", ttl=1.0))

    a, b = make("a"), make("b")
    a.start()
    await asyncio.wait_for(started["a"].wait(), 10)
    b.start()
    # a renews its lease while it runs: b does not start even after several TTLs.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(started["b"].wait(), 3.0)
    await a.stop()
    await asyncio.wait_for(started["b"].wait(), 5)
    await b.stop()


async def test_context_count_adds_to_the_channel_events_metric(ctx):
    ctx.count("group_filtered")
    ctx.count("group_filtered", 2)
    ctx.count("onebot_replayed")
    registry = ctx.metrics.registry
    labels = {"channel_type": "mock", "channel": "demo"}
    assert registry.get_sample_value("gateway_channel_events_total", {**labels, "event": "group_filtered"}) == 3
    assert registry.get_sample_value("gateway_channel_events_total", {**labels, "event": "onebot_replayed"}) == 1


# --- provider calls that get no answer: one function, two codes, for every channel ------


async def _silent_server(answer: bool) -> tuple[asyncio.base_events.Server, int]:
    """A TCP server that reads the request and then either never answers or hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer:
            writer.close()  # hang up after the request was read: it reached the "provider"
            return
        await asyncio.Event().wait()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_call_that_never_reached_the_provider_is_unreachable():
    from gateway import UNREACHABLE, provider_call

    port = free_port()  # nothing listens there
    async with httpx.AsyncClient(timeout=2) as client:
        with pytest.raises(DeliveryError) as err:
            with provider_call("Acme SMS"):
                await client.post(f"http://127.0.0.1:{port}/send", json={"to": "x"})
    assert err.value.code == UNREACHABLE and not err.value.permanent
    assert "Acme SMS unreachable" in err.value.message and str(port) not in err.value.message


@pytest.mark.parametrize("hang_up", [False, True])
async def test_a_call_that_went_out_without_an_answer_is_a_timeout(hang_up):
    # Timeout or a dropped connection after the request was written: the provider may have
    # acted on it, which a backend must be able to tell from "never got there".
    from gateway import TIMEOUT, provider_call

    server, port = await _silent_server(answer=hang_up)
    try:
        async with httpx.AsyncClient(timeout=0.5) as client:
            with pytest.raises(DeliveryError) as err:
                with provider_call("Acme SMS"):
                    await client.post(f"http://127.0.0.1:{port}/send", json={"to": "x"})
    finally:
        server.close()
    assert err.value.code == TIMEOUT and not err.value.permanent


def test_a_websocket_provider_without_a_connection_is_unreachable_and_other_errors_pass():
    from gateway import UNREACHABLE, not_connected, provider_call

    assert not_connected("OneBot bot 12***").code == UNREACHABLE
    with pytest.raises(ValueError):
        with provider_call("Acme"):
            raise ValueError("a bug is not an outage")
