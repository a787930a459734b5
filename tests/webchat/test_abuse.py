"""The web chat widget is public: what an attacker of a website's chat box can do with the
wire (several sockets and tokens from one address, floods of cheap frames, spoofed headers,
tokens of another channel) is bounded, and a refusal is readable by the embedding site."""

from __future__ import annotations

import hashlib
import hmac

import httpx
import pytest
import websockets.exceptions

from gateway import ConfigError
from gateway.testing import make_config

from .conftest import USER_SECRET, Visitor, inbound, refused, webchat

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def base(gw, channel: str = "web") -> str:
    return f"http://127.0.0.1:{gw.http.port}/channels/{channel}"


async def test_behind_a_trusted_proxy_the_address_is_the_one_the_proxy_saw_not_one_the_client_wrote(
        gateway_factory):
    # A proxy appends the address it saw; whatever is left of it the client wrote itself.
    gw = await gateway_factory({"web": webchat(connections_per_minute=3, trust_forwarded=True)})  # bursts of 1
    await Visitor.connect(gw.http.port, additional_headers={"X-Forwarded-For": "192.0.2.1, 198.51.100.7"})
    assert await refused(gw.http.port, additional_headers={"X-Forwarded-For": "192.0.2.2, 198.51.100.7"}) == 429


async def test_one_address_cannot_hold_more_than_its_share_of_the_sockets(gateway_factory):
    gw = await gateway_factory({"web": webchat(sockets_per_address=2)})
    first = await Visitor.connect(gw.http.port)
    await Visitor.connect(gw.http.port)
    assert await refused(gw.http.port) == 429
    await first.close()
    # The socket's slot is given back when it closes.
    again = await Visitor.connect(gw.http.port)
    assert again.welcome["type"] == "welcome"


async def test_new_visitors_minted_from_one_address_share_its_message_limit(gateway_factory):
    # Every handshake without a token is a new visitor with a fresh per-visitor budget: the
    # address's budget bounds what one machine can publish and upload.
    gw = await gateway_factory({"web": webchat(messages_per_address_minute=8)})  # bursts of 2
    answers = [await (await Visitor.connect(gw.http.port)).say("hi", "c-1") for _ in range(3)]
    assert [a["type"] for a in answers[:2]] == ["ack", "ack"]
    assert answers[2]["code"] == "rate_limited"
    fresh = await Visitor.connect(gw.http.port)
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        r = await c.post("/upload?id=i-1", content=PNG,
                         headers={"Authorization": f"Bearer {fresh.token}", "Content-Type": "image/png"})
    assert r.status_code == 429, r.text


async def test_a_flood_of_frames_that_read_the_history_is_cut_short(gateway_factory):
    # "seen" and "choice" frames read the conversation's record on the bus: a socket
    # sending them as fast as it can is told to wait instead.
    gw = await gateway_factory({"web": webchat()})
    v = await Visitor.connect(gw.http.port)
    for i in range(120):
        await v.send({"type": "choice", "id": f"k-{i}", "survey": "no-such", "index": 0})
    codes = [(await v.next("error"))["code"] for _ in range(120)]
    assert "rate_limited" in codes and codes[0] == "no_survey"


async def test_a_refused_cross_origin_upload_is_readable_by_the_embedding_site(gateway_factory):
    # Without CORS headers on the error the widget can only say "Failed to fetch".
    gw = await gateway_factory({"web": webchat(allowed_origins=["https://shop.example.com"])})
    v = await Visitor.connect(gw.http.port, origin="https://shop.example.com")
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        r = await c.post("/upload?id=i-1", content=b"<html>", headers={
            "Origin": "https://shop.example.com", "Authorization": f"Bearer {v.token}", "Content-Type": "image/png"})
    assert r.status_code == 415
    assert r.headers.get("access-control-allow-origin") == "https://shop.example.com"


async def test_an_origin_is_matched_as_browsers_write_it_whatever_the_config_spelling(gateway_factory):
    # Browsers send the host in lower case and no default port.
    spelled = ["https://Shop.Example.com:443", "http://A.example:80"]
    gw = await gateway_factory({"web": webchat(allowed_origins=spelled)})
    for origin in ("https://shop.example.com", "http://a.example"):
        ok = await Visitor.connect(gw.http.port, origin=origin)
        assert ok.welcome["type"] == "welcome", origin
    for origin in ("null", "https://shop.example.com:8443", "http://shop.example.com",
                   "https://shop.example.com.evil.net", "https://shop.example.com/"):
        assert await refused(gw.http.port, origin=origin) == 403, origin


async def test_a_token_of_one_channel_is_not_accepted_by_another_with_the_same_secret(gateway_factory):
    gw = await gateway_factory({"web": webchat(), "help": webchat()})
    v = await Visitor.connect(gw.http.port)
    other = await Visitor.connect(gw.http.port, f"?token={v.token}", channel="help")
    assert other.welcome["type"] == "closed" and other.welcome["code"] == 4401
    async with httpx.AsyncClient(base_url=base(gw, "help")) as c:
        r = await c.post("/upload?id=i-1", content=PNG,
                         headers={"Authorization": f"Bearer {v.token}", "Content-Type": "image/png"})
    assert r.status_code == 401


def test_an_upload_type_whose_bytes_cannot_be_checked_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        make_config("nats://127.0.0.1:4222", {"web": webchat(upload_types=["image/png", "image/svg+xml"])})
    assert "upload_types" in str(info.value) and "image/svg+xml" in str(info.value)



async def test_a_signed_in_users_token_stops_working_when_signed_users_are_switched_off(gateway_factory):
    sig = hmac.new(USER_SECRET.encode(), b"customer-42", hashlib.sha256).hexdigest()
    with_users = await gateway_factory({"web": webchat(user_secret=USER_SECRET)})
    token = (await Visitor.connect(with_users.http.port, f"?user=customer-42&signature={sig}")).token
    without = await gateway_factory({"web": webchat()})  # the site removed user_secret
    attempt = await Visitor.connect(without.http.port, f"?token={token}")
    assert attempt.welcome["type"] == "closed" and attempt.welcome["code"] == 4401
    async with httpx.AsyncClient(base_url=base(without)) as c:
        r = await c.post("/upload?id=i-1", content=PNG,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"})
    assert r.status_code == 401


async def test_the_addresses_of_one_ipv6_network_count_as_one_address(gateway_factory):
    # Whoever has one IPv6 address has its whole /64: per-address limits count the /64.
    gw = await gateway_factory({"web": webchat(connections_per_minute=3, trust_forwarded=True)})  # bursts of 1
    await Visitor.connect(gw.http.port, additional_headers={"X-Forwarded-For": "2001:db8:1:2::1"})
    assert await refused(gw.http.port, additional_headers={"X-Forwarded-For": "2001:db8:1:2:ffff::9"}) == 429
    other = await Visitor.connect(gw.http.port, additional_headers={"X-Forwarded-For": "2001:db8:1:3::1"})
    assert other.welcome["type"] == "welcome"


async def test_the_token_of_an_erased_conversation_opens_nothing_any_more(gateway_factory, nats_server):
    # Another tab or gateway process may still hold the old token: writing on in a
    # conversation whose replies are dead-lettered would leave the visitor unanswered.
    one, two = await gateway_factory({"web": webchat()}), await gateway_factory({"web": webchat()})
    v = await Visitor.connect(one.http.port)
    elsewhere = await Visitor.connect(two.http.port, f"?token={v.token}")  # a tab on another process
    await v.say("forget me", "c-1")
    await v.send({"type": "forget"})
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        await v.next("closed", timeout=5)
    again = await Visitor.connect(two.http.port, f"?token={v.token}")
    assert again.welcome["type"] == "closed" and again.welcome["code"] == 4410
    assert (await elsewhere.say("still there?", "c-2"))["code"] == "forgotten"
    assert [m.parts[0].text for m in await inbound(nats_server.url)] == ["forget me"]


async def test_a_long_lived_socket_does_not_make_the_process_remember_more_than_its_history(
        gateway_factory, nats_server):
    # What the open widgets were sent (for the catch-up between processes) is bounded by
    # the history it is compared with, however long a socket stays open.
    gw = await gateway_factory({"web": webchat(history_size=3, messages_per_minute=600)})
    v = await Visitor.connect(gw.http.port)
    for i in range(12):
        assert (await v.say(f"m{i}", f"c-{i}"))["type"] == "ack"
    [key] = {m.conversation for m in await inbound(nats_server.url)}
    assert len(gw.channels["web"].channel._known[key]) <= 2 * 3
