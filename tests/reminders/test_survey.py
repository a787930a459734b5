"""Survey answers: the matching table, and the customer's next message published with a
choice part (for a reminder's survey and for any outbound carrying one)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway import ChoicePart, Outbound, Survey, TextPart
from gateway.cli import main
from gateway.core.scheduling.survey import match_choice
from gateway.wire import Answer, is_greeting, read_answer
from gateway.testing import post_inbound, stream_messages, wait_for_status
from gateway.wire import encode, message_decoder

from .helpers import reminder, soon, wait_reminder_state
from .helpers import reminder_statuses
from .test_client_and_cli import _cli_config
from .test_scheduling import start, store_of

DEFAULT = ["满意", "一般", "不满意"]


@pytest.mark.parametrize("text,index", [
    ("1", 0), ("2", 1), ("3", 2),
    ("２", 1), ("③", 2), (" 2 ", 1), ("2.", 1), ("2、", 1), ("（2）", 1), ("[1]", 0),
    ("满意", 0), ("满意！", 0), ("满意。", 0), (" 一 般 ", 1), ("不满意", 2), ("不满意!!!", 2),
    ("2 一般", 1), ("1.满意", 0), ("三", 2),
    ("👍", 0), ("👍👍", 0), ("👍🏻", 0), ("❤️", 0), ("👎", 2), ("😡", 2), ("😐", 1),
    # words of the same sense as exactly one choice
    ("非常满意", 0), ("很满意！", 0), ("一般般吧", 1), ("一般般", 1), ("还行", 1), ("不太满意", 2), ("很差", 2),
    ("太差了", 2), ("bad", 2), ("Terrible!", 2), ("great", 0),
    # ordinary messages: nothing is guessed
    ("4", None), ("0", None), ("12", None), ("2 满意", None), ("我满意吗?", None),
    ("👍😡", None), ("谢谢", None), ("", None), ("   ", None), ("1 2", None), ("not bad", None), ("好的", None),
])
def test_survey_matching_table(text, index):
    assert match_choice(text, DEFAULT) == index


# Replies to "1 满意 2 一般 3 不满意" as customers write them: (reply, choice index or None,
# comment). None is an ordinary message; a wrong parse would put words in their mouth.
CORPUS = [
    ("1", 0, None), ("2", 1, None), ("3", 2, None), ("满意", 0, None), ("不满意", 2, None), ("一般", 1, None),
    ("非常满意", 0, None), ("一般般吧", 1, None), ("不太满意", 2, None), ("bad", 2, None), ("terrible", 2, None),
    ("不满意，太慢了", 2, "太慢了"), ("2 but slow delivery", 1, "but slow delivery"), ("满意，谢谢！", 0, "谢谢！"),
    ("3，客服态度差", 2, "客服态度差"), ("不太满意，还有问题", 2, "还有问题"), ("很好", 0, None), ("还可以", 1, None),
    ("Terrible, never again", 2, "never again"), ("一般 物流有点慢", 1, "物流有点慢"), ("👍", 0, None),
    ("👎 太慢", 2, "太慢"), ("3 但是客服很耐心", 2, "但是客服很耐心"), ("1.满意", 0, None), ("（3）", 2, None),
    ("差评", 2, None), ("good", 0, None), ("so-so", 1, None), ("满意的", 0, None), ("２", 1, None),
    ("我满意吗?", None, None), ("2 days ago I ordered a phone", None, None), ("2 满意", None, None),
    ("1 2", None, None), ("好的，谢谢", None, None), ("谢谢", None, None), ("在吗？", None, None),
    ("你好", None, None), ("不好说", None, None), ("not bad", None, None), ("我的订单什么时候到？", None, None),
    ("满意吗", None, None), ("12", None, None), ("4", None, None), ("退款怎么办", None, None),
    ("👍😡", None, None), ("ok thanks", None, None), ("3 个问题还没解决", None, None), ("hello", None, None),
    ("2号发货的", None, None), ("one more question", None, None),
]


def test_a_corpus_of_replies_is_read_without_a_single_wrong_parse():
    wrong = [(text, read_answer(text, DEFAULT)) for text, index, comment in CORPUS
             if read_answer(text, DEFAULT) != (Answer(index, comment) if index is not None else None)]
    assert len(CORPUS) >= 50 and not wrong


def test_a_greeting_alone_is_not_an_answer():
    assert is_greeting("在吗？") and is_greeting("Hello!") and is_greeting("您好")
    assert not is_greeting("1") and not is_greeting("你好，不满意")


def test_custom_choices_match_by_number_words_and_case():
    choices = ["Very good", "OK", "Bad"]
    assert match_choice("very GOOD!", choices) == 0
    assert match_choice("ok", choices) == 1
    assert match_choice("3", choices) == 2
    assert match_choice("😐", ["Yes", "No"]) is None  # no middle of two


async def inbound_of(url: str, conversation: str) -> list:
    return [m for m in (message_decoder.decode(x.data) for x in await stream_messages(url, "GW_IN"))
            if m.conversation == conversation]


async def test_a_reminder_survey_answer_in_full_width_digits_comes_back_with_its_choice(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    out = Outbound(id="out-s1", conversation=conv, parts=[TextPart(text="请评价：1 满意 2 一般 3 不满意")],
                   survey=Survey())
    await store_of(bus).schedule(reminder("s1", conv, due=soon(1), outbound=out))
    await wait_for_status(nats_server.url, "out-s1", "sent")
    [(sent, _)] = [d for d in gw.channels["demo"].channel.deliveries if d[0].id == "out-s1"]
    assert sent.kind == "survey"
    await post_inbound(gw.http.port, "demo", text="２", sender="alice")
    msgs = await inbound_of(nats_server.url, conv)
    assert msgs[-1].parts == [TextPart(text="２"), ChoicePart(survey="out-s1", choice="一般", index=1)]


async def test_any_outbound_with_a_survey_has_its_answer_matched(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    out = Outbound(id="o-survey", conversation=conv, parts=[TextPart(text="How did we do?")],
                   survey=Survey(choices=["Great", "OK", "Poor"]))
    await bus.jetstream().publish("gw.out.mock.demo", encode(out), headers={"Nats-Msg-Id": out.id})
    await wait_for_status(nats_server.url, "o-survey", "sent")
    await post_inbound(gw.http.port, "demo", text="👍", sender="alice")
    msgs = await inbound_of(nats_server.url, conv)
    assert msgs[-1].parts[-1] == ChoicePart(survey="o-survey", choice="Great", index=0)


async def test_only_the_next_message_answers_and_a_non_answer_is_marked_as_the_surveys_reply(
        gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    out = Outbound(id="o-s3", conversation=conv, parts=[TextPart(text="满意吗？")], survey=Survey())
    await bus.jetstream().publish("gw.out.mock.demo", encode(out), headers={"Nats-Msg-Id": out.id})
    await wait_for_status(nats_server.url, "o-s3", "sent")
    await post_inbound(gw.http.port, "demo", text="我的订单什么时候到？", sender="alice")
    await post_inbound(gw.http.port, "demo", text="3", sender="alice")
    first, second = (await inbound_of(nats_server.url, conv))[-2:]
    assert first.parts == [TextPart(text="我的订单什么时候到？")] and first.meta.get("survey_reply") == "o-s3"
    assert second.parts == [TextPart(text="3")] and "survey_reply" not in second.meta  # the survey had ended


async def test_a_dissatisfied_answer_with_a_comment_comes_back_with_both(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    out = Outbound(id="o-s5", conversation=conv, parts=[TextPart(text="满意吗？")], survey=Survey())
    await bus.jetstream().publish("gw.out.mock.demo", encode(out), headers={"Nats-Msg-Id": out.id})
    await wait_for_status(nats_server.url, "o-s5", "sent")
    await post_inbound(gw.http.port, "demo", text="不满意，太慢了", sender="alice")
    msgs = await inbound_of(nats_server.url, conv)
    assert msgs[-1].parts[-1] == ChoicePart(survey="o-s5", choice="不满意", index=2, comment="太慢了")


async def test_a_greeting_before_the_answer_keeps_the_survey_waiting(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    out = Outbound(id="o-s6", conversation=conv, parts=[TextPart(text="满意吗？")], survey=Survey())
    await bus.jetstream().publish("gw.out.mock.demo", encode(out), headers={"Nats-Msg-Id": out.id})
    await wait_for_status(nats_server.url, "o-s6", "sent")
    await post_inbound(gw.http.port, "demo", text="在吗？", sender="alice")
    await post_inbound(gw.http.port, "demo", text="1", sender="alice")
    greeting, answer = (await inbound_of(nats_server.url, conv))[-2:]
    assert greeting.parts == [TextPart(text="在吗？")] and "survey_reply" not in greeting.meta
    assert answer.parts[-1] == ChoicePart(survey="o-s6", choice="满意", index=0)


async def test_a_reminders_survey_nobody_answers_is_reported_unanswered_naming_the_reminder(
        gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    out = Outbound(id="out-s7", conversation=conv, parts=[TextPart(text="满意吗？")], survey=Survey(answer_within=1))
    await store_of(bus).schedule(reminder("s7", conv, due=soon(0.5), outbound=out))
    sts = await wait_reminder_state(nats_server.url, "s7", "unanswered", timeout=15)
    assert sts[-1].outbound_id == "out-s7" and sts[-1].reason == "no_answer" and sts[-1].conversation == conv
    assert [s.state for s in sts] == ["scheduled", "fired", "unanswered"]


async def test_cli_lists_surveys_awaiting_an_answer_and_shows_an_unanswered_one(gateway_factory, nats_server, bus,
                                                                               tmp_path, capsys):
    gw, conv = await start(gateway_factory)
    cli = _cli_config(tmp_path, nats_server.url)
    out = Outbound(id="out-s9", conversation=conv, parts=[TextPart(text="满意吗？")], survey=Survey(answer_within=2))
    await store_of(bus).schedule(reminder("s9", conv, due=soon(0.2), outbound=out))
    await wait_for_status(nats_server.url, "out-s9", "sent")
    capsys.readouterr()
    assert await asyncio.to_thread(main, [*cli, "list", "--surveys", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["survey"] == "out-s9" and row["reminder_id"] == "s9" and row["state"] == "awaiting_answer"
    await wait_reminder_state(nats_server.url, "s9", "unanswered", timeout=15)
    capsys.readouterr()
    assert await asyncio.to_thread(main, [*cli, "show", "s9"]) == 1
    assert "unanswered (no_answer)" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*cli, "list", "--surveys"]) == 0
    assert "no survey awaits an answer" in capsys.readouterr().out


async def test_an_answered_survey_is_not_reported_unanswered(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    for oid in ("o-s8", "o-s8-witness"):
        out = Outbound(id=oid, conversation=conv if oid == "o-s8" else gw.channels["demo"].ctx.conversation_key("bob"),
                       parts=[TextPart(text="满意吗？")], survey=Survey(answer_within=1))
        if oid != "o-s8":
            await post_inbound(gw.http.port, "demo", text="hi", sender="bob")
        await bus.jetstream().publish("gw.out.mock.demo", encode(out), headers={"Nats-Msg-Id": out.id})
        await wait_for_status(nats_server.url, oid, "sent")
        if oid == "o-s8":
            await post_inbound(gw.http.port, "demo", text="2", sender="alice")
    # The witness (bob never answers) is reported after o-s8's time is up too.
    await wait_reminder_state(nats_server.url, "o-s8-witness", "unanswered", timeout=15)
    assert await reminder_statuses(nats_server.url, "o-s8") == []


async def test_an_answer_after_answer_within_is_an_ordinary_message(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    out = Outbound(id="o-s4", conversation=conv, parts=[TextPart(text="满意吗？")], survey=Survey(answer_within=0.001))
    await bus.jetstream().publish("gw.out.mock.demo", encode(out), headers={"Nats-Msg-Id": out.id})
    await wait_for_status(nats_server.url, "o-s4", "sent")
    await post_inbound(gw.http.port, "demo", text="1", sender="alice")
    assert (await inbound_of(nats_server.url, conv))[-1].parts == [TextPart(text="1")]
