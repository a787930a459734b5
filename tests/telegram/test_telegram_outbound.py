"""Replies out: what the channel sends to the Bot API (quotes, media, survey keyboards),
how Telegram's refusals end (403 dead and visible to reach, 429 after retry_after), and
the pacing per chat."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

from tg_fake import BOT_USER, CUSTOMER, FakeTelegram, group_chat, message, post_update, private_chat, tg_config, update

from gateway import AudioPart, ChoicePart, FilePart, ImagePart, Message, Outbound, Subjects, Survey, TextPart
from gateway.testing import stream_messages, wait_for_status, wait_until
from gateway.wire import encode, message_decoder, outbound_headers

SUBJECTS = Subjects()


async def published(url: str) -> list[Message]:
    msgs = await stream_messages(url, SUBJECTS.stream_in, SUBJECTS.inbound("telegram", "tg"))
    return [message_decoder.decode(m.data) for m in msgs]


async def customer_writes(gw: Any, url: str, mid: int, text: str = "hello", chat: dict[str, Any] | None = None,
                          **extra: Any) -> Message:
    r = await post_update(gw.http.port, update(mid, message=message(mid, text, chat=chat, **extra)))
    assert r.status_code == 200, r.text
    return next(m for m in await published(url) if m.meta["message_id"] == str(mid))


async def send(nc: Any, out: Outbound) -> None:
    await nc.jetstream().publish(SUBJECTS.outbound("telegram", "tg"), encode(out), headers=outbound_headers(out))


async def start(gateway_factory: Any, fake: FakeTelegram, **over: Any) -> Any:
    return await gateway_factory({"tg": tg_config(fake, **over)}, outbound={"backoff": ["100ms"]})


async def test_a_reply_quotes_the_customers_message(gateway_factory, fake_tg, nats_server, nc):
    gw = await start(gateway_factory, fake_tg)
    first = await customer_writes(gw, nats_server.url, 42, "my order")
    await customer_writes(gw, nats_server.url, 43, "hello?")
    await send(nc, Outbound(id="r-last", conversation=first.conversation, parts=[TextPart(text="Looking")]))
    await wait_for_status(nats_server.url, "r-last", "sent")
    await send(nc, Outbound(id="r-first", conversation=first.conversation, in_reply_to=first.id,
                            parts=[TextPart(text="Your order ships today")]))
    sts = await wait_for_status(nats_server.url, "r-first", "sent")
    await send(nc, Outbound(id="n-1", conversation=first.conversation, kind="notice",
                            parts=[TextPart(text="Shop closes at 6")]))
    await wait_for_status(nats_server.url, "n-1", "sent")
    last, quoted, notice = fake_tg.sent("sendMessage")
    assert last["reply_parameters"] == {"message_id": 43, "allow_sending_without_reply": True}
    assert quoted["reply_parameters"]["message_id"] == 42 and quoted["text"] == "Your order ships today"
    assert quoted["chat_id"] == str(CUSTOMER)
    assert "reply_parameters" not in notice
    assert sts[-1].provider_id is not None and sts[-1].provider_id.startswith(f"{CUSTOMER}:")
    assert sts[-1].meta == {"messages": 1}


async def test_quote_reply_off_sends_plain_replies(gateway_factory, fake_tg, nats_server, nc):
    gw = await start(gateway_factory, fake_tg, quote_reply=False)
    msg = await customer_writes(gw, nats_server.url, 42)
    await send(nc, Outbound(id="r-1", conversation=msg.conversation, in_reply_to=msg.id, parts=[TextPart(text="ok")]))
    await wait_for_status(nats_server.url, "r-1", "sent")
    assert "reply_parameters" not in fake_tg.sent("sendMessage")[0]


async def test_survey_choices_are_buttons_and_a_tap_comes_back_as_a_choice_part(gateway_factory, fake_tg,
                                                                                nats_server, nc):
    gw = await start(gateway_factory, fake_tg)
    msg = await customer_writes(gw, nats_server.url, 42, "thanks, solved")
    await send(nc, Outbound(id="sv-1", conversation=msg.conversation, kind="survey", parts=[TextPart(text="满意吗？")],
                            survey=Survey(choices=["满意", "一般", "不满意"])))
    await wait_for_status(nats_server.url, "sv-1", "sent")
    [sent] = fake_tg.sent("sendMessage")
    buttons = [b for row in sent["reply_markup"]["inline_keyboard"] for b in row]
    assert [b["text"] for b in buttons] == ["满意", "一般", "不满意"]
    assert all(len(b["callback_data"].encode()) <= 64 for b in buttons)
    bot_message = message(1000, "满意吗？", sender=BOT_USER, reply_markup=sent["reply_markup"])

    def tap(cq_id: str, index: int) -> dict[str, Any]:
        return update(900 + index, callback_query={"id": cq_id, "from": {"id": CUSTOMER, "is_bot": False,
                                                                          "first_name": "Wang"},
                                                   "message": bot_message, "chat_instance": "-8817",
                                                   "data": buttons[index]["callback_data"]})

    assert (await post_update(gw.http.port, tap("4382bfdwdsb323b2d9", 1))).status_code == 200
    assert (await post_update(gw.http.port, tap("4382bfdwdsb323b2d9", 1))).status_code == 200  # a retry
    assert (await post_update(gw.http.port, tap("4382bfdwdsb323b2e0", 0))).status_code == 200  # a second tap
    msgs = await published(nats_server.url)
    [answer] = [m for m in msgs if any(isinstance(p, ChoicePart) for p in m.parts)]
    assert answer.parts == [TextPart(text="一般"), ChoicePart(survey="sv-1", choice="一般", index=1)]
    assert answer.conversation == msg.conversation and answer.sender.id == str(CUSTOMER)
    assert len(msgs) == 2
    answered = fake_tg.called("answerCallbackQuery")
    assert [a["callback_query_id"] for a in answered] == ["4382bfdwdsb323b2d9"] * 2 + ["4382bfdwdsb323b2e0"]
    assert answered[0]["text"] == "一般" and answered[2]["text"] == "You answered already."
    assert fake_tg.called("editMessageReplyMarkup")[0]["message_id"] == "1000"


async def test_a_tap_on_an_unknown_button_is_answered_and_publishes_nothing(gateway_factory, fake_tg, nats_server):
    gw = await start(gateway_factory, fake_tg)
    cq = {"id": "77", "from": {"id": CUSTOMER, "is_bot": False, "first_name": "Wang"}, "chat_instance": "-1",
          "message": message(5, "old", sender=BOT_USER), "data": "sv:nosuchsurveykey1234:0"}
    assert (await post_update(gw.http.port, update(1, callback_query=cq))).status_code == 200
    assert await published(nats_server.url) == []
    assert fake_tg.called("answerCallbackQuery")[0]["text"] == "This survey is closed."


async def test_blocked_by_the_user_is_dead_lettered_and_visible_to_reach(gateway_factory, fake_tg, nats_server, nc):
    gw = await start(gateway_factory, fake_tg)
    msg = await customer_writes(gw, nats_server.url, 42)
    channel, ctx = gw.channels["tg"].channel, gw.channels["tg"].ctx
    conv = await ctx.get_conversation(msg.conversation)
    assert (await channel.reach(conv, datetime.now(timezone.utc))).ok
    fake_tg.fail_next("blocked")
    await send(nc, Outbound(id="b-1", conversation=msg.conversation, parts=[TextPart(text="hello?")]))
    sts = await wait_for_status(nats_server.url, "b-1", "dead")
    assert [s.state for s in sts] == ["accepted", "dead"]
    assert sts[-1].error.permanent and sts[-1].error.code == "blocked"
    assert "blocked by the user" in sts[-1].error.message
    reach = await channel.reach(conv, datetime.now(timezone.utc))
    assert not reach.ok and reach.code == "blocked"
    # The customer unblocks the bot: Telegram says so with a my_chat_member update.
    member = {"chat": private_chat(), "from": {"id": CUSTOMER, "is_bot": False, "first_name": "Wang"},
              "date": int(time.time()), "old_chat_member": {"status": "kicked", "user": BOT_USER, "until_date": 0},
              "new_chat_member": {"status": "member", "user": BOT_USER}}
    assert (await post_update(gw.http.port, update(60, my_chat_member=member))).status_code == 200
    assert (await channel.reach(conv, datetime.now(timezone.utc))).ok
    # ... and blocks it again: reach knows before any send fails.
    member = {**member, "date": member["date"] + 1, "old_chat_member": member["new_chat_member"],
              "new_chat_member": {"status": "kicked", "user": BOT_USER, "until_date": 0}}
    assert (await post_update(gw.http.port, update(61, my_chat_member=member))).status_code == 200
    assert (await channel.reach(conv, datetime.now(timezone.utc))).code == "blocked"


async def test_flood_control_is_retried_after_retry_after(gateway_factory, fake_tg, nats_server, nc):
    gw = await start(gateway_factory, fake_tg)
    msg = await customer_writes(gw, nats_server.url, 42)
    fake_tg.fail_next("flood")
    await send(nc, Outbound(id="f-1", conversation=msg.conversation, parts=[TextPart(text="hi")]))
    sts = await wait_for_status(nats_server.url, "f-1", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"]
    failed = sts[1]
    assert failed.error.code == "rate_limited" and not failed.error.permanent
    assert (failed.next_attempt_at - failed.at).total_seconds() >= 0.95  # retry_after = 1, backoff 100 ms
    tries = [t for m, p, t in fake_tg.calls if m == "sendMessage"]
    assert len(tries) == 2 and tries[1] - tries[0] >= 0.95


async def test_a_long_text_is_split_and_a_retry_does_not_resend_what_was_sent(gateway_factory, fake_tg,
                                                                              nats_server, nc):
    gw = await start(gateway_factory, fake_tg)
    msg = await customer_writes(gw, nats_server.url, 42)
    text = ("第一段。" * 1000) + "\n" + ("second part " * 100)
    fake_tg.fail_next("ok")
    fake_tg.fail_next("server")
    await send(nc, Outbound(id="long-1", conversation=msg.conversation, parts=[TextPart(text=text)]))
    sts = await wait_for_status(nats_server.url, "long-1", "sent", 15)
    assert [s.state for s in sts] == ["accepted", "failed", "sent"]
    pieces = [p["text"] for p in fake_tg.sent("sendMessage")]
    assert len(pieces) == 2 and "".join(pieces) == text
    assert all(len(p.encode("utf-16-le")) // 2 <= 4096 for p in pieces)
    assert pieces[1].startswith("second part")  # cut at the newline, not inside a word
    assert sts[-1].meta == {"messages": 2}


async def test_media_parts_are_uploaded_or_sent_by_url_or_file_id(gateway_factory, fake_tg, nats_server, nc):
    gw = await start(gateway_factory, fake_tg)
    msg = await customer_writes(gw, nats_server.url, 42)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    await send(nc, Outbound(id="m-1", conversation=msg.conversation, parts=[
        TextPart(text="Here is the label"),
        ImagePart(data=png, content_type="image/png", filename="label.png"),
        FilePart(media_id="BQACAgIAAxkBAAIBZ2"),
        AudioPart(data=b"OggS" * 64, content_type="audio/ogg"),
        ImagePart(url="https://cdn.example.com/map.jpg"),
    ]))
    sts = await wait_for_status(nats_server.url, "m-1", "sent")
    assert sts[-1].meta == {"messages": 5}
    [photo, by_url] = fake_tg.sent("sendPhoto")
    assert photo["photo"]["content"] == png and photo["photo"]["filename"] == "label.png"
    assert by_url["photo"] == "https://cdn.example.com/map.jpg"
    assert fake_tg.sent("sendDocument")[0]["document"] == "BQACAgIAAxkBAAIBZ2"
    assert fake_tg.sent("sendVoice")[0]["voice"]["content"] == b"OggS" * 64
    order = [m for m, p, _ in fake_tg.calls if m.startswith("send")]
    assert order == ["sendMessage", "sendPhoto", "sendDocument", "sendVoice", "sendPhoto"]
    assert "reply_parameters" in fake_tg.sent("sendMessage")[0] and "reply_parameters" not in photo


async def test_messages_into_one_chat_are_paced_one_per_second(gateway_factory, fake_tg, nats_server, nc):
    gw = await start(gateway_factory, fake_tg)
    msg = await customer_writes(gw, nats_server.url, 42)
    for i in range(3):
        await send(nc, Outbound(id=f"p-{i}", conversation=msg.conversation, parts=[TextPart(text=f"{i}")]))
    await wait_for_status(nats_server.url, "p-2", "sent")
    times = [t for m, p, t in fake_tg.calls if m == "sendMessage"]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) == 3 and min(gaps) >= 0.95, gaps


async def test_a_group_that_became_a_supergroup_is_followed(gateway_factory, fake_tg, nats_server, nc):
    gw = await start(gateway_factory, fake_tg, group_messages="all")
    msg = await customer_writes(gw, nats_server.url, 42, chat=group_chat(-4001234567, "group"))
    fake_tg.fail_next("migrated")
    await send(nc, Outbound(id="g-1", conversation=msg.conversation, parts=[TextPart(text="hi all")]))
    await wait_for_status(nats_server.url, "g-1", "sent")
    await send(nc, Outbound(id="g-2", conversation=msg.conversation, parts=[TextPart(text="again")]))
    sts = await wait_for_status(nats_server.url, "g-2", "sent")
    assert [s.state for s in sts] == ["accepted", "sent"]
    chats = [p["chat_id"] for m, p, _ in fake_tg.calls if m == "sendMessage"]
    assert chats == ["-4001234567", "-1002222333444", "-1002222333444"]


async def test_a_reminder_into_a_chat_that_blocked_the_bot_fails_early_with_blocked(gateway_factory, fake_tg,
                                                                                   nats_server, nc):
    from datetime import timedelta

    from gateway.client import Client

    gw = await start(gateway_factory, fake_tg)
    msg = await customer_writes(gw, nats_server.url, 42)
    member = {"chat": private_chat(), "from": {"id": CUSTOMER, "is_bot": False, "first_name": "Wang"},
              "date": int(time.time()), "old_chat_member": {"status": "member", "user": BOT_USER},
              "new_chat_member": {"status": "kicked", "user": BOT_USER, "until_date": 0}}
    assert (await post_update(gw.http.port, update(60, my_chat_member=member))).status_code == 200
    async with Client(nats_server.url) as client:
        await client.remind(msg, "满意吗？", id="tg-followup-1", after=timedelta(hours=2), survey=True)
        async with asyncio.timeout(15):
            async for st in client.reminder_statuses(reminder_id="tg-followup-1", from_start=True):
                if st.state in ("scheduled", "failed"):
                    break
    assert st.state == "failed" and st.reason == "blocked" and st.error.code == "blocked"
    assert fake_tg.sent() == []


async def test_a_forum_topic_is_its_own_conversation_and_replies_go_to_the_topic(gateway_factory, fake_tg,
                                                                                nats_server, nc):
    gw = await start(gateway_factory, fake_tg, group_messages="all")
    forum = {**group_chat(), "is_forum": True}
    in_topic = await customer_writes(gw, nats_server.url, 42, "billing question", chat=forum,
                                     message_thread_id=7, is_topic_message=True)
    general = await customer_writes(gw, nats_server.url, 43, "general question", chat=forum)
    assert in_topic.conversation != general.conversation
    await send(nc, Outbound(id="t-1", conversation=in_topic.conversation, parts=[TextPart(text="answer")]))
    await wait_for_status(nats_server.url, "t-1", "sent")
    [sent] = fake_tg.sent("sendMessage")
    assert sent["message_thread_id"] == "7" and sent["reply_parameters"]["message_id"] == 42


async def test_an_unreachable_bot_api_is_the_toolkits_unreachable(gateway_factory, nats_server, nc):
    from tg_fake import USERNAME

    from gateway.testing import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gw = await gateway_factory({"tg": tg_config(None, api_base=closed, username=USERNAME, max_attempts=1)})
    msg = await customer_writes(gw, nats_server.url, 42)
    await send(nc, Outbound(id="u-1", conversation=msg.conversation, parts=[TextPart(text="hi")]))
    sts = await wait_for_status(nats_server.url, "u-1", "dead")
    assert sts[-1].error.code == "unreachable" and not sts[-1].error.permanent
    assert closed not in sts[-1].error.message and "AAH3kTzq" not in sts[-1].error.message


async def test_after_a_tap_the_customers_next_words_are_not_a_second_answer(gateway_factory, fake_tg,
                                                                            nats_server, nc):
    gw = await start(gateway_factory, fake_tg)
    msg = await customer_writes(gw, nats_server.url, 42, "solved")
    await send(nc, Outbound(id="sv-2", conversation=msg.conversation, kind="survey", parts=[TextPart(text="满意吗？")],
                            survey=Survey(choices=["满意", "一般", "不满意"])))
    await wait_for_status(nats_server.url, "sv-2", "sent")
    [sent] = fake_tg.sent("sendMessage")
    data = sent["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    cq = {"id": "55", "from": {"id": CUSTOMER, "is_bot": False, "first_name": "Wang"}, "chat_instance": "-1",
          "message": message(1000, "满意吗？", sender=BOT_USER), "data": data}
    assert (await post_update(gw.http.port, update(70, callback_query=cq))).status_code == 200
    later = await customer_writes(gw, nats_server.url, 71, "1")
    assert later.parts == [TextPart(text="1")]  # the survey was answered by the tap
