"""The web chat channel over its wire: the widget's WebSocket frames (sent with the websockets
library, as widget.js sends them), uploads and media over HTTP, a real nats-server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sys
import httpx
import pytest
import websockets.exceptions
import websockets.version

from gateway import ChoicePart, ConfigError, ImagePart, Outbound, Survey, TextPart
from gateway.testing import make_config, statuses, wait_for_status, wait_until

from .conftest import SECRET, USER_SECRET, Visitor, inbound, refused, reply, webchat

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def base(gw) -> str:
    return f"http://127.0.0.1:{gw.http.port}/channels/web"


async def test_a_new_visitor_gets_a_token_and_a_retried_message_is_published_once(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    v = await Visitor.connect(gw.http.port)
    subject, _, mac = v.token.rpartition(".")
    assert subject.startswith("v-") and len(mac) == 64 and v.history == []
    first = await v.say("Where is my order?", "c-1")
    again = await v.say("Where is my order?", "c-1")  # the widget's retry after a lost ack
    assert first["type"] == again["type"] == "ack" and first["message"]["id"] == again["message"]["id"]
    [msg] = await inbound(nats_server.url)
    assert msg.sender.id == subject and msg.provider_id == f"{subject}:c-1"
    assert msg.meta == {"visitor": "anonymous", "browser": f"Python/{sys.version_info[0]}.{sys.version_info[1]} websockets/"
                        f"{websockets.version.version}"}
    [entry] = (await Visitor.connect(gw.http.port, f"?token={v.token}")).history
    assert entry["text"] == "Where is my order?" and entry["cid"] == "c-1"


async def test_a_reply_is_pushed_to_every_open_widget_of_the_visitor_and_kept_for_later(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    tab1 = await Visitor.connect(gw.http.port)
    tab2 = await Visitor.connect(gw.http.port, f"?token={tab1.token}")
    await tab1.say("hi", "c-1")
    assert (await tab2.next("message"))["message"]["text"] == "hi"  # the other tab shows it too
    [msg] = await inbound(nats_server.url)
    await reply(nats_server.url, msg.conversation, "r-1", "Hello from the desk")
    for tab in (tab1, tab2):
        shown = (await tab.next("message"))["message"]
        assert (shown["id"], shown["by"], shown["text"]) == ("r-1", "agent", "Hello from the desk")
    await wait_for_status(nats_server.url, "r-1", "sent")
    later = await Visitor.connect(gw.http.port, f"?token={tab1.token}")
    assert [(e["by"], e["text"]) for e in later.history] == [("visitor", "hi"), ("agent", "Hello from the desk")]


async def test_a_forged_token_is_refused_in_band_and_another_visitor_sees_only_their_own(gateway_factory):
    gw = await gateway_factory({"web": webchat()})
    alice = await Visitor.connect(gw.http.port)
    await alice.say("my order 4711", "c-1")
    bob = await Visitor.connect(gw.http.port)
    assert bob.history == []
    forged = alice.token.rpartition(".")[0] + "." + bob.token.rpartition(".")[2]
    for token in (forged, alice.token.rpartition(".")[0], "garbage", alice.token + "0"):
        attempt = await Visitor.connect(gw.http.port, f"?token={token}")
        assert attempt.welcome["type"] == "closed" and attempt.welcome["code"] == 4401, attempt.welcome
    # A token made with another secret is not ours either.
    other = hmac.new(b"another secret", b"webchat-token:" + alice.token.rpartition(".")[0].encode(),
                     hashlib.sha256).hexdigest()
    attempt = await Visitor.connect(gw.http.port, f"?token={alice.token.rpartition('.')[0]}.{other}")
    assert attempt.welcome["code"] == 4401


async def test_a_user_signed_by_the_site_keeps_one_conversation_across_devices(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat(user_secret=USER_SECRET)})
    sig = hmac.new(USER_SECRET.encode(), b"customer-42", hashlib.sha256).hexdigest()
    phone = await Visitor.connect(gw.http.port, f"?user=customer-42&signature={sig}")
    await phone.say("from my phone", "p-1")
    laptop = await Visitor.connect(gw.http.port, f"?user=customer-42&signature={sig}")
    assert [e["text"] for e in laptop.history] == ["from my phone"] and laptop.welcome["user"]
    [msg] = await inbound(nats_server.url)
    assert msg.sender.id == "u-customer-42" and msg.meta["visitor"] == "user"
    wrong = await Visitor.connect(gw.http.port, f"?user=customer-43&signature={sig}")
    assert wrong.welcome["code"] == 4401


async def test_signed_users_are_refused_when_no_user_secret_is_configured(gateway_factory):
    gw = await gateway_factory({"web": webchat()})
    sig = hmac.new(b"", b"customer-42", hashlib.sha256).hexdigest()  # what an empty secret would sign
    attempt = await Visitor.connect(gw.http.port, f"?user=customer-42&signature={sig}")
    assert attempt.welcome["code"] == 4401 and "user_secret" in attempt.welcome["message"]


async def test_only_listed_origins_and_the_gateways_own_may_open_the_socket_or_upload(gateway_factory):
    gw = await gateway_factory({"web": webchat(allowed_origins=["https://shop.example.com"])})
    port = gw.http.port
    assert await refused(port, origin="https://evil.example.net") == 403
    ok = await Visitor.connect(port, origin="https://shop.example.com")
    own = await Visitor.connect(port, origin=f"http://127.0.0.1:{port}")
    assert ok.welcome["type"] == own.welcome["type"] == "welcome"
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        pre = await c.options("/upload", headers={"Origin": "https://shop.example.com",
                                                  "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "https://shop.example.com"
        bad = await c.options("/upload", headers={"Origin": "https://evil.example.net"})
        assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers


async def test_delivered_and_read_are_reported_once_each_and_only_for_the_visitors_own_replies(
        gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    alice, bob = await Visitor.connect(gw.http.port), await Visitor.connect(gw.http.port)
    await alice.say("a", "a-1")
    await bob.say("b", "b-1")
    convs = {m.sender.id: m.conversation for m in await inbound(nats_server.url)}
    await reply(nats_server.url, convs[alice.token.rpartition(".")[0]], "r-a", "for alice")
    await wait_for_status(nats_server.url, "r-a", "sent")
    await bob.send({"type": "seen", "state": "read", "ids": ["r-a"]})  # not Bob's to report
    for _ in range(2):
        await alice.send({"type": "seen", "state": "delivered", "ids": ["r-a"]})
        await alice.send({"type": "seen", "state": "read", "ids": ["r-a"]})
    await wait_for_status(nats_server.url, "r-a", "read")
    await bob.say("sync", "b-2")  # Bob's frames are handled in order: the seen one is done
    await alice.say("sync", "a-2")
    assert [s.state for s in await statuses(nats_server.url, "r-a")] == ["accepted", "sent", "delivered", "read"]


async def test_survey_choices_come_back_once_as_a_choice_part(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    v = await Visitor.connect(gw.http.port)
    await v.say("done, thanks", "c-1")
    [msg] = await inbound(nats_server.url)
    await reply(nats_server.url, msg.conversation, "s-1", "How did we do?", kind="survey",
                survey=Survey(choices=["满意", "一般", "不满意"]))
    shown = (await v.next("message"))["message"]
    assert shown["choices"] == ["满意", "一般", "不满意"] and shown["answered"] is None
    await v.send({"type": "choice", "id": "k-1", "survey": "s-1", "index": 2})
    assert (await v.next("ack"))["message"]["text"] == "不满意"
    await v.send({"type": "choice", "id": "k-2", "survey": "s-1", "index": 0})
    assert (await v.next("error"))["code"] == "answered"
    await v.send({"type": "choice", "id": "k-3", "survey": "no-such", "index": 0})
    assert (await v.next("error"))["code"] == "no_survey"
    answer = (await inbound(nats_server.url))[-1]
    assert [p for p in answer.parts if isinstance(p, ChoicePart)] == [ChoicePart(survey="s-1", choice="不满意", index=2)]
    assert len(await inbound(nats_server.url)) == 2
    again = await Visitor.connect(gw.http.port, f"?token={v.token}")
    assert next(e for e in again.history if e["id"] == "s-1")["answered"] == 2


async def test_an_uploaded_image_is_stored_published_and_served_only_to_its_visitor(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat(max_upload_size=4096)})
    v, other = await Visitor.connect(gw.http.port), await Visitor.connect(gw.http.port)
    auth = {"Authorization": f"Bearer {v.token}"}
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        r = await c.post("/upload?id=i-1", content=PNG, headers={**auth, "Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        view = r.json()["message"]
        assert view["attachments"] == [{"type": "image/png", "name": "", "size": len(PNG), "image": True}]
        [msg] = await inbound(nats_server.url)
        [part] = msg.parts
        assert isinstance(part, ImagePart) and part.ref is not None and part.content_type == "image/png"
        assert part.size == len(PNG)
        got = await c.get(f"/media/{view['id']}/0", headers=auth)
        assert got.content == PNG and got.headers["content-type"] == "image/png"
        assert got.headers["x-content-type-options"] == "nosniff"
        assert (await c.get(f"/media/{view['id']}/0", headers={"Authorization": f"Bearer {other.token}"})
                ).status_code == 404
        assert (await c.get(f"/media/{view['id']}/0")).status_code == 401


@pytest.mark.parametrize(("headers", "body", "status"), [
    ({"Content-Type": "image/png"}, PNG, 401),                                    # no token
    ({"Content-Type": "image/svg+xml"}, b"<svg onload=alert(1)>", 415),           # not an accepted type
    ({"Content-Type": "image/png"}, b"<html>not a png</html>", 415),              # lies about its type
    ({"Content-Type": "image/jpeg"}, b"\xff\xd8\xff" + b"\x00" * 5000, 413),      # over max_upload_size
])
async def test_a_bad_upload_is_refused_with_a_clear_status(gateway_factory, nats_server, headers, body, status):
    gw = await gateway_factory({"web": webchat(max_upload_size=4096)})
    v = await Visitor.connect(gw.http.port)
    if status != 401:
        headers = {**headers, "Authorization": f"Bearer {v.token}"}
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        r = await c.post("/upload?id=i-1", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert v.token not in r.text
    assert await inbound(nats_server.url) == []


async def test_a_visitor_over_the_message_rate_is_told_to_wait_and_nothing_extra_is_published(
        gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat(messages_per_minute=8)})  # bursts of 2
    v = await Visitor.connect(gw.http.port)
    answers = [await v.say(f"m{i}", f"c-{i}") for i in range(4)]
    assert [a["type"] for a in answers[:2]] == ["ack", "ack"]
    assert answers[2]["code"] == "rate_limited" and answers[2]["retry_after"] > 0
    assert len(await inbound(nats_server.url)) == 2


async def test_an_address_opening_too_many_sockets_gets_429(gateway_factory):
    gw = await gateway_factory({"web": webchat(connections_per_minute=3)})  # bursts of 1
    await Visitor.connect(gw.http.port)
    assert await refused(gw.http.port) == 429


async def test_malformed_and_oversized_frames_are_answered_and_the_socket_survives(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat(max_message_chars=100)})
    v = await Visitor.connect(gw.http.port)
    await v.ws.send("{not json")
    assert (await v.next("error"))["code"] == "bad_frame"
    await v.send({"type": "message", "id": "c 1", "text": "bad id"})
    assert (await v.next("error"))["code"] == "bad_frame"
    assert (await v.say("x" * 101, "c-2"))["code"] == "too_long"
    assert (await v.say("   ", "c-3"))["code"] == "empty"
    assert (await v.say("fine", "c-4"))["type"] == "ack"
    await v.ws.send("x" * (100 * 6 + 2048))  # above the socket's frame limit: closed with 1009
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        await v.next(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert [m.parts[0].text for m in await inbound(nats_server.url)] == ["fine"]


async def test_history_keeps_the_newest_entries_and_expires_after_its_ttl(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat(history_size=3, history_ttl="2s", messages_per_minute=600)})
    v = await Visitor.connect(gw.http.port)
    for i in range(5):
        await v.say(f"m{i}", f"c-{i}")
    again = await Visitor.connect(gw.http.port, f"?token={v.token}")
    assert [e["text"] for e in again.history] == ["m2", "m3", "m4"]

    async def forgotten() -> bool:
        return (await Visitor.connect(gw.http.port, f"?token={v.token}")).history == []

    await wait_until(forgotten, 10, 0.5)


async def test_the_offline_notice_is_shown_outside_the_desks_hours(gateway_factory):
    always_closed = {"start": "00:00", "end": "23:59", "tz": "UTC"}
    gw = await gateway_factory({"web": webchat(offline_hours=always_closed, offline_notice="Back at 9.")})
    v = await Visitor.connect(gw.http.port)
    assert v.welcome["online"] is False and v.welcome["notice"] == "Back at 9."
    assert (await v.say("still taken", "c-1"))["type"] == "ack"  # messages are kept all the same


async def test_a_generated_secret_is_shared_by_every_gateway_process(gateway_factory):
    one = await gateway_factory({"web": {"type": "webchat"}})
    two = await gateway_factory({"web": {"type": "webchat"}})
    v = await Visitor.connect(one.http.port)
    await v.say("hello", "c-1")
    same = await Visitor.connect(two.http.port, f"?token={v.token}")
    assert same.welcome["type"] == "welcome" and [e["text"] for e in same.history] == ["hello"]


async def test_the_widget_script_and_demo_page_are_served_with_safe_headers(gateway_factory):
    gw = await gateway_factory({"web": webchat()})
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        js = await c.get("/widget.js")
        page = await c.get("/demo")
    assert js.status_code == 200 and js.headers["content-type"].startswith("application/javascript")
    assert len(js.content) < 60_000 and b"innerHTML" not in js.content  # text only, a few tens of KB at most
    assert js.headers["content-encoding"] == "gzip" and int(js.headers["content-length"]) < 20_000
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert f'src="http://127.0.0.1:{gw.http.port}/channels/web/widget.js"' in page.text
    assert SECRET not in page.text and SECRET.encode() not in js.content


async def test_no_demo_page_when_switched_off(gateway_factory):
    gw = await gateway_factory({"web": webchat(demo=False)})
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        assert (await c.get("/demo")).status_code == 404


@pytest.mark.parametrize(("keys", "where"), [
    ({"allowed_origins": ["https://shop.example.com/path"]}, "web.allowed_origins"),
    ({"offline_hours": {"start": "25:00"}}, "offline_hours.start"),
    ({"history_size": 0}, "web.history_size"),
    ({"offline_hours": {"tz": "Mars/Olympus"}}, "offline_hours.tz"),
])
def test_bad_config_values_are_config_errors_naming_the_key(keys, where):
    with pytest.raises(ConfigError) as info:
        make_config("nats://127.0.0.1:4222", {"web": webchat(**keys)})
    assert where in str(info.value)


async def test_a_socket_left_open_does_not_hold_up_a_stop(gateway_factory):
    gw = await gateway_factory({"web": webchat()})
    v = await Visitor.connect(gw.http.port)
    await asyncio.wait_for(gw.stop(), 8)
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        await v.next(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_a_visitor_who_erases_the_conversation_loses_its_history_and_later_replies_are_dead_letters(
        gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    channel = gw.channels["web"].channel
    tab1 = await Visitor.connect(gw.http.port)
    tab2 = await Visitor.connect(gw.http.port, f"?token={tab1.token}")
    await tab1.send({"type": "profile", "name": "Gus", "email": "gus@example.com"})
    await tab1.next("profile_saved")
    await tab1.say("please forget me", "c-1")
    [msg] = await inbound(nats_server.url)
    conversation = await gw.channels["web"].ctx.get_conversation(msg.conversation)
    assert (await channel.reach(conversation, msg.received_at)).ok
    await tab1.send({"type": "forget"})
    for tab in (tab1, tab2):
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while True:
                await tab.next(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4410
    assert await channel.read_history(msg.conversation) == []
    assert await gw.channels["web"].ctx.state.get("profile." + msg.sender.id) is None
    reach = await channel.reach(conversation, msg.received_at)
    assert not reach.ok and reach.code == "forgotten"
    await reply(nats_server.url, msg.conversation, "r-late", "too late")
    sts = await wait_for_status(nats_server.url, "r-late", "dead")
    assert sts[-1].error.code == "forgotten" and sts[-1].error.permanent


async def test_a_reply_delivered_by_another_gateway_process_reaches_the_open_widget(gateway_factory, nats_server):
    one = await gateway_factory({"web": webchat(sync_interval="200ms")})
    two = await gateway_factory({"web": webchat(sync_interval="200ms")})
    v = await Visitor.connect(two.http.port)
    await v.say("hello", "c-1")
    [msg] = await inbound(nats_server.url)
    conversation = await one.channels["web"].ctx.get_conversation(msg.conversation)
    # Process one delivers (its outbound consumer took the reply); the widget is on two.
    await one.channels["web"].channel.deliver(Outbound(id="r-other", conversation=msg.conversation,
                                                       parts=[TextPart(text="from process one")]), conversation)
    shown = (await v.next("message"))["message"]
    assert (shown["id"], shown["text"]) == ("r-other", "from process one")


async def test_a_history_record_stays_under_its_byte_limit_by_dropping_the_oldest(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat(max_message_chars=20000, messages_per_minute=600)})
    v = await Visitor.connect(gw.http.port)
    for i in range(20):  # 20 x 20000 three-byte characters: far over one record
        assert (await v.say(f"{i:02d}" + "字" * 19998, f"c-{i}"))["type"] == "ack"
    kept = (await Visitor.connect(gw.http.port, f"?token={v.token}")).history
    assert 0 < len(kept) < 20 and kept[-1]["text"].startswith("19")
    assert [e["text"][:2] for e in kept] == [f"{i:02d}" for i in range(20 - len(kept), 20)]
    assert len(await inbound(nats_server.url)) == 20


async def test_the_address_limit_reads_x_forwarded_for_only_when_trusted(gateway_factory):
    trusting = await gateway_factory({"web": webchat(connections_per_minute=3, trust_forwarded=True)})
    await Visitor.connect(trusting.http.port, additional_headers={"X-Forwarded-For": "198.51.100.7"})
    await Visitor.connect(trusting.http.port, additional_headers={"X-Forwarded-For": "198.51.100.8, 10.0.0.1"})
    assert await refused(trusting.http.port, additional_headers={"X-Forwarded-For": "198.51.100.7"}) == 429

    plain = await gateway_factory({"web": webchat(connections_per_minute=3)})
    await Visitor.connect(plain.http.port, additional_headers={"X-Forwarded-For": "198.51.100.7"})
    # Anyone can write that header: without trust_forwarded the socket's address counts.
    assert await refused(plain.http.port, additional_headers={"X-Forwarded-For": "198.51.100.9"}) == 429


def test_an_unknown_key_in_offline_hours_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as info:
        make_config("nats://127.0.0.1:4222", {"web": webchat(offline_hours={"start": "18:00", "ende": "09:00"})})
    assert "offline_hours.ende" in str(info.value)
