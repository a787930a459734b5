"""OneBot v11 by reverse WebSocket: a fake implementation connects to the gateway's real
port with the ``websockets`` library as NapCat does; events go to a real nats-server,
replies come back over the same socket as API calls matched by ``echo``."""

from __future__ import annotations

import json
from typing import Any

import nats
import pytest
import websockets

from gateway import EventPart, Outbound, TextPart
from gateway.testing import statuses, wait_for_status, wait_until
from gateway.wire import encode

from .conftest import (
    SELF_ID,
    FakeOneBot,
    group_message,
    inbound,
    metric,
    onebot_config,
    private_message,
    published,
    ws_url,
)


async def _start(gateway_factory: Any, **onebot: Any) -> tuple[Any, FakeOneBot]:
    gw = await gateway_factory({"qq": onebot_config(**onebot)}, outbound={"backoff": ["100ms"], "ack_wait": "5s"})
    bot = FakeOneBot(ws_url(gw.http.port))
    await bot.connect()
    return gw, bot


async def _reply(url: str, outbound_id: str, conversation: str, parts: list[Any] | None = None,
                 **fields: Any) -> None:
    nc = await nats.connect(url)
    try:
        out = Outbound(id=outbound_id, conversation=conversation, parts=parts or [TextPart(text="您好，已处理")],
                       **fields)
        await nc.jetstream().publish("gw.out.qq.qq", encode(out), headers={"Nats-Msg-Id": outbound_id})
    finally:
        await nc.close()


# --- handshake -------------------------------------------------------------------------


async def test_handshake_without_the_token_or_a_self_id_is_refused(gateway_factory: Any) -> None:
    gw = await gateway_factory({"qq": onebot_config()})
    for token, self_id, status in [("wrong", SELF_ID, 401), (None, SELF_ID, 401), ("onebot-test-token", "", 400),
                                   ("onebot-test-token", "abc", 400)]:
        bot = FakeOneBot(ws_url(gw.http.port), self_id=self_id, token=token)
        with pytest.raises(websockets.InvalidStatus) as info:
            await bot.connect()
        assert info.value.response.status_code == status, (token, self_id)


async def test_access_token_in_the_query_is_accepted(gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": onebot_config()})
    bot = FakeOneBot(ws_url(gw.http.port) + "?access_token=onebot-test-token", token=None)
    await bot.connect()
    await bot.send(private_message("hi"))
    assert len(await published(nats_server.url, 1)) == 1
    await bot.close()


async def test_split_api_or_event_socket_is_refused(gateway_factory: Any) -> None:
    gw = await gateway_factory({"qq": onebot_config()})
    bot = FakeOneBot(ws_url(gw.http.port))
    for role in ("API", "Event"):
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(bot.url, additional_headers={**bot.headers(), "X-Client-Role": role})
        assert info.value.response.status_code == 400, role


async def test_self_id_outside_the_allowed_accounts_is_refused(gateway_factory: Any) -> None:
    gw = await gateway_factory({"qq": onebot_config(self_ids=["1"])})
    with pytest.raises(websockets.InvalidStatus) as info:
        await FakeOneBot(ws_url(gw.http.port)).connect()
    assert info.value.response.status_code == 403


# --- events in -------------------------------------------------------------------------


async def test_group_message_in_array_form_is_published_with_typed_parts(gateway_factory: Any,
                                                                        nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    await bot.send(group_message([{"type": "at", "data": {"qq": SELF_ID}}, {"type": "text", "data": {"text": " 退款"}},
                                  {"type": "image", "data": {"file": "a.image", "url": "https://q/a"}}]))
    [msg] = await published(nats_server.url, 1)
    assert msg.provider_id == f"{SELF_ID}:1001"
    assert msg.sender.id == "10001" and msg.sender.name == "客户小明"
    assert msg.meta["group_id"] == "123456789" and msg.meta["at_bot"] is True
    assert [type(p).__name__ for p in msg.parts] == ["EventPart", "TextPart", "ImagePart"]
    assert msg.parts[1] == TextPart(text=" 退款")
    await bot.close()


async def test_private_message_in_cq_string_form_is_published(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    await bot.send(private_message("&#91;CQ:at,qq=all&#93; 你好[CQ:face,id=14]"))
    [msg] = await published(nats_server.url, 1)
    assert msg.parts == [TextPart(text="[CQ:at,qq=all] 你好"), EventPart(event="face", key="14")]
    assert "at_all" not in msg.meta
    assert msg.meta["message_type"] == "private"
    await bot.close()


async def test_quoted_message_becomes_in_reply_to(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    await bot.send(group_message("[CQ:reply,id=777]还没到账"))
    [msg] = await published(nats_server.url, 1)
    assert msg.in_reply_to == f"{SELF_ID}:777" and msg.meta["reply_to"] == "777"
    await bot.close()


async def test_events_replayed_after_a_reconnect_are_published_once(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    await bot.send(group_message("第一条", message_id=1))
    await bot.send(group_message("第二条", message_id=2))
    await published(nats_server.url, 2)
    await bot.close()
    again = FakeOneBot(ws_url(gw.http.port))
    await again.connect()
    for mid in (1, 2, 3):  # the implementation replays what it had, then goes on
        await again.send(group_message(f"#{mid}", message_id=mid))
    msgs = await published(nats_server.url, 3)

    async def replayed() -> bool:
        return await metric(gw.http.port, "gateway_channel_events_total", event="onebot_replayed") == 2

    await wait_until(replayed)
    assert [m.provider_id for m in msgs] == [f"{SELF_ID}:1", f"{SELF_ID}:2", f"{SELF_ID}:3"]
    assert len(await inbound(nats_server.url)) == 3
    await again.close()


async def test_same_message_id_of_two_accounts_is_two_messages(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    other = FakeOneBot(ws_url(gw.http.port), self_id="3889000002")
    await other.connect()
    await bot.send(group_message("a", message_id=5))
    await other.send(group_message("b", message_id=5, self_id="3889000002"))
    msgs = await published(nats_server.url, 2)
    assert {m.provider_id for m in msgs} == {f"{SELF_ID}:5", "3889000002:5"}
    await bot.close()
    await other.close()


async def test_mention_filter_drops_other_group_messages_and_counts_them(gateway_factory: Any,
                                                                         nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory, filter="mention",
                           groups={"555": {"filter": "keyword", "keywords": ["客服"]}, "666": {"enabled": False}})
    await bot.send(group_message("闲聊", message_id=1))
    await bot.send(group_message(f"[CQ:at,qq={SELF_ID}] 在吗", message_id=2))
    await bot.send(group_message("  客服 在吗", message_id=3, group_id=555))
    await bot.send(group_message("随便说说", message_id=4, group_id=555))
    await bot.send(group_message(f"[CQ:at,qq={SELF_ID}]", message_id=5, group_id=666))
    await bot.send(private_message("私聊总是通过", message_id=6))
    msgs = await published(nats_server.url, 3)
    assert [m.provider_id.split(":")[1] for m in msgs] == ["2", "3", "6"]

    async def counted() -> bool:
        return (await metric(gw.http.port, "gateway_channel_events_total", event="group_filtered") == 2
                and await metric(gw.http.port, "gateway_channel_events_total", event="group_disabled") == 1)

    await wait_until(counted)
    assert len(await inbound(nats_server.url)) == 3
    await bot.close()


async def test_meta_events_publish_nothing_and_notices_are_events(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    await bot.heartbeat()
    await bot.send({"time": 1700000000, "self_id": int(SELF_ID), "post_type": "notice", "notice_type": "group_increase",
                    "sub_type": "approve", "group_id": 123456789, "operator_id": 1, "user_id": 10009})
    await bot.send({"time": 1700000001, "self_id": int(SELF_ID), "post_type": "notice", "notice_type": "group_recall",
                    "group_id": 123456789, "user_id": 10001, "operator_id": 10001, "message_id": 1001})
    await bot.send({"time": 1700000002, "self_id": int(SELF_ID), "post_type": "notice", "notice_type": "group_upload",
                    "group_id": 123456789, "user_id": 10001,
                    "file": {"id": "/abc", "name": "日志.zip", "size": 1024, "busid": 102}})
    msgs = await published(nats_server.url, 3)
    assert [(m.parts[0].event, m.auto) for m in msgs] == [("group_increase", True), ("group_recall", True),
                                                          ("group_upload", True)]
    assert msgs[1].parts[0].data["message_id"] == "1001"
    assert msgs[2].parts[0].data["file_name"] == "日志.zip"
    assert len(await inbound(nats_server.url)) == 3  # the heartbeat and lifecycle events: nothing
    await bot.close()


async def test_missing_heartbeat_marks_the_channel_degraded(gateway_factory: Any) -> None:
    gw, bot = await _start(gateway_factory, heartbeat_timeout="1s")
    await bot.heartbeat(interval_ms=300)
    await wait_until(lambda: gw.health()["channels"]["qq"]["state"] == "running")
    await wait_until(lambda: gw.health()["channels"]["qq"]["state"] == "degraded", timeout=5)
    assert "no heartbeat" in gw.health()["channels"]["qq"]["detail"]
    await bot.heartbeat(interval_ms=300)
    await wait_until(lambda: gw.health()["channels"]["qq"]["state"] == "running")
    await bot.close()
    await wait_until(lambda: "no OneBot implementation connected" in
                     (gw.health()["channels"]["qq"].get("detail") or ""))


# --- replies out -----------------------------------------------------------------------


async def _customer_wrote(bot: FakeOneBot, url: str, event: dict[str, Any]) -> Any:
    before = len(await inbound(url))
    await bot.send(event)
    return (await published(url, before + 1))[-1]


async def test_group_reply_quotes_the_customers_message(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory, mention_sender=True)
    first = await _customer_wrote(bot, nats_server.url, group_message("问题一", message_id=41))
    await _customer_wrote(bot, nats_server.url, group_message("问题二", message_id=42, user_id=10002))
    await _reply(nats_server.url, "r-quote", first.conversation, in_reply_to=first.id,
                 parts=[TextPart(text="[CQ:at,qq=all] 不是代码")])
    sts = await wait_for_status(nats_server.url, "r-quote", "sent")
    [call] = bot.sends()
    assert call["action"] == "send_group_msg" and call["params"]["group_id"] == 123456789
    assert call["params"]["message"] == [
        {"type": "reply", "data": {"id": "41"}}, {"type": "at", "data": {"qq": "10001"}},
        {"type": "text", "data": {"text": " "}}, {"type": "text", "data": {"text": "[CQ:at,qq=all] 不是代码"}}]
    assert sts[-1].provider_id == f"{SELF_ID}:9000"
    await bot.close()


async def test_in_reply_to_from_another_group_neither_quotes_nor_mentions_there(gateway_factory: Any,
                                                                                nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory, mention_sender=True)
    here = await _customer_wrote(bot, nats_server.url, group_message("这里", message_id=61, group_id=111, user_id=10001))
    there = await _customer_wrote(bot, nats_server.url, group_message("别处", message_id=62, group_id=222, user_id=20002))
    await _reply(nats_server.url, "r-cross", here.conversation, in_reply_to=there.id)
    await wait_for_status(nats_server.url, "r-cross", "sent")
    [call] = bot.sends()
    assert call["params"]["group_id"] == 111
    assert call["params"]["message"][:2] == [{"type": "reply", "data": {"id": "61"}},
                                             {"type": "at", "data": {"qq": "10001"}}]
    await bot.close()


async def test_private_reply_goes_by_send_private_msg(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    msg = await _customer_wrote(bot, nats_server.url, private_message("hi"))
    await _reply(nats_server.url, "r-priv", msg.conversation)
    await wait_for_status(nats_server.url, "r-priv", "sent")
    [call] = bot.sends()
    assert call["action"] == "send_private_msg" and call["params"]["user_id"] == 10002
    assert call["params"]["message"] == [{"type": "text", "data": {"text": "您好，已处理"}}]
    await bot.close()


async def test_at_all_is_refused_unless_allowed(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    msg = await _customer_wrote(bot, nats_server.url, group_message("hi"))
    await _reply(nats_server.url, "r-all", msg.conversation, parts=[EventPart(event="at", key="all"),
                                                                    TextPart(text="通知")])
    sts = await wait_for_status(nats_server.url, "r-all", "dead")
    assert sts[-1].error is not None and sts[-1].error.code == "at_all_refused"
    assert bot.sends() == []
    await bot.close()


async def test_at_all_goes_when_the_channel_allows_it(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory, allow_at_all=True, quote_reply=False)
    msg = await _customer_wrote(bot, nats_server.url, group_message("hi"))
    await _reply(nats_server.url, "r-all-ok", msg.conversation, parts=[EventPart(event="at", key="all")])
    await wait_for_status(nats_server.url, "r-all-ok", "sent")
    assert bot.sends()[0]["params"]["message"] == [{"type": "at", "data": {"qq": "all"}}]
    await bot.close()


async def test_retcode_1404_is_permanent_and_implementation_failure_transient(gateway_factory: Any,
                                                                              nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    msg = await _customer_wrote(bot, nats_server.url, private_message("hi"))
    bot.fail_next("send_private_msg", "failed", 1404)
    await _reply(nats_server.url, "r-404", msg.conversation)
    sts = await wait_for_status(nats_server.url, "r-404", "dead")
    assert sts[-1].error is not None and sts[-1].error.code == "unknown_action"
    bot.fail_next("send_private_msg", "failed", 100)
    await _reply(nats_server.url, "r-100", msg.conversation)
    sts = await wait_for_status(nats_server.url, "r-100", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"]
    assert sts[1].error is not None and sts[1].error.code == "retcode_100"
    await bot.close()


async def test_unanswered_api_call_times_out_as_transient(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory, api_timeout="300ms")
    msg = await _customer_wrote(bot, nats_server.url, private_message("hi"))
    bot.silent.add("send_private_msg")
    await _reply(nats_server.url, "r-slow", msg.conversation)
    await wait_for_status(nats_server.url, "r-slow", "failed")
    bot.silent.clear()
    sts = await wait_for_status(nats_server.url, "r-slow", "sent")
    assert sts[1].error is not None and sts[1].error.code == "timeout"
    await bot.close()


async def test_reply_while_the_bot_is_disconnected_waits_for_it(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    msg = await _customer_wrote(bot, nats_server.url, private_message("hi"))
    await bot.close()
    await _reply(nats_server.url, "r-later", msg.conversation)
    sts = await wait_for_status(nats_server.url, "r-later", "failed")
    assert sts[-1].error is not None and sts[-1].error.code == "unreachable"
    again = FakeOneBot(ws_url(gw.http.port))
    await again.connect()
    await wait_for_status(nats_server.url, "r-later", "sent")
    assert len(again.sends()) == 1
    await again.close()


async def test_sends_into_one_group_are_paced(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory, group_interval="400ms", quote_reply=False)
    msg = await _customer_wrote(bot, nats_server.url, group_message("hi"))
    for i in range(3):
        await _reply(nats_server.url, f"r-pace-{i}", msg.conversation)
    for i in range(3):
        await wait_for_status(nats_server.url, f"r-pace-{i}", "sent")
    times = [t for c, t in zip(bot.calls, bot.call_times) if c["action"] == "send_group_msg"]
    assert len(times) == 3
    # 0.4 s apart when sent; unpaced they would arrive milliseconds apart.
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.3
    await bot.close()


async def test_event_while_bus_is_down_is_published_once_it_is_back(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    await bot.heartbeat()
    await nats_server.stop()
    await wait_until(lambda: not gw.bus.connected)
    await bot.send(private_message("断线时的消息", message_id=77))
    await nats_server.start()
    msgs = await published(nats_server.url, 1, timeout=20)
    assert [m.provider_id for m in msgs] == [f"{SELF_ID}:77"]
    assert await statuses(nats_server.url) == []
    await bot.close()


async def test_hostile_socket_messages_are_counted_and_hurt_nothing(gateway_factory: Any, nats_server: Any) -> None:
    gw, bot = await _start(gateway_factory)
    await bot.ws.send("not json {")
    await bot.ws.send("[1, 2]")
    await bot.send({"post_type": "message", "message_type": "group", "message": "no ids"})
    await bot.send(group_message(42, message_id=8))  # message neither string nor segments
    await bot.send({"echo": "gw-unknown", "status": "ok", "retcode": 0, "data": None})  # an answer nobody awaits
    await bot.ws.send("[" * 100_000 + "]" * 100_000)  # deeper than any JSON parser recurses
    await bot.send(private_message("still fine", message_id=9))
    [msg] = await published(nats_server.url, 1)
    assert msg.provider_id == f"{SELF_ID}:9"

    async def counted() -> bool:
        return await metric(gw.http.port, "gateway_channel_events_total", event="onebot_malformed") == 5

    await wait_until(counted)
    await bot.close()


async def test_without_an_access_token_only_loopback_clients_are_accepted(gateway_factory: Any,
                                                                          nats_server: Any) -> None:
    # The documented promise of an empty access_token: a loopback-only listener. A client
    # from elsewhere could otherwise claim any account, inject messages and, replacing the
    # real socket, receive the replies meant for customers.
    from starlette.datastructures import Headers, QueryParams

    from gateway import Handshake, RequestError

    gw = await gateway_factory({"qq": onebot_config(access_token="")})
    headers = Headers({"x-self-id": SELF_ID, "x-client-role": "Universal"})
    onebot = gw.channels["qq"].channel.onebot
    for address in ["192.0.2.7", "::ffff:192.0.2.7", "2001:db8::7"]:
        with pytest.raises(RequestError) as info:
            onebot.authorize(Handshake(path="/onebot", headers=headers, query=QueryParams(""), client=(address, 40000)))
        assert info.value.status == 401 and "access_token" in str(info.value)
    assert onebot.authorize(Handshake(path="/onebot", headers=headers, query=QueryParams(""),
                                      client=("::1", 40000))) == SELF_ID
    bot = FakeOneBot(ws_url(gw.http.port), token=None)  # over 127.0.0.1: accepted
    await bot.connect()
    await bot.send(private_message("hi"))
    assert len(await published(nats_server.url, 1)) == 1
    await bot.close()


async def test_odd_fields_beside_the_message_do_not_lose_it(gateway_factory: Any, nats_server: Any) -> None:
    # A time no datetime holds, a size given as a boolean: the message is still published,
    # without them (a bool size would make the bus's decoders refuse the whole message).
    gw, bot = await _start(gateway_factory)
    await bot.send(group_message("time", message_id=51, time=10**15))
    await bot.send(group_message([{"type": "image", "data": {"file": "a.jpg", "url": "https://x/a.jpg",
                                                             "file_size": True}}], message_id=52))
    first, second = await published(nats_server.url, 2)
    assert first.sent_at is None and first.parts == [TextPart(text="time")]
    assert second.parts[0].url == "https://x/a.jpg" and second.parts[0].size is None
    await bot.close()


async def test_half_an_emoji_in_a_card_or_text_does_not_lose_the_message(gateway_factory: Any,
                                                                          nats_server: Any) -> None:
    # QQ cuts group cards by UTF-16 units and Node implementations write the lone half as
    # "\ud83d": valid JSON, not valid Unicode. The message is published with U+FFFD there.
    gw, bot = await _start(gateway_factory)
    event = group_message("hi\ud83d", message_id=71)
    event["sender"]["card"] = "小明\ud83d"
    await bot.ws.send(json.dumps(event))  # ASCII-escaped, as JSON.stringify writes a lone surrogate
    [msg] = await published(nats_server.url, 1)
    assert msg.parts == [TextPart(text="hi\ufffd")] and msg.sender.name == "小明\ufffd"
    await bot.close()

