"""Survey answers: the matching table, and the customer's next message published with a
choice part (for a reminder's survey and for any outbound carrying one)."""

from __future__ import annotations

import pytest

from gateway import ChoicePart, Outbound, Survey, TextPart
from gateway.core.scheduling.survey import match_choice
from gateway.testing import post_inbound, stream_messages, wait_for_status
from gateway.wire import encode, message_decoder

from .helpers import reminder, soon
from .test_scheduling import start, store_of

DEFAULT = ["满意", "一般", "不满意"]


@pytest.mark.parametrize("text,index", [
    ("1", 0), ("2", 1), ("3", 2),
    ("２", 1), ("③", 2), (" 2 ", 1), ("2.", 1), ("2、", 1), ("（2）", 1), ("[1]", 0),
    ("满意", 0), ("满意！", 0), ("满意。", 0), (" 一 般 ", 1), ("不满意", 2), ("不满意!!!", 2),
    ("2 一般", 1), ("1.满意", 0), ("三", 2),
    ("👍", 0), ("👍👍", 0), ("👍🏻", 0), ("❤️", 0), ("👎", 2), ("😡", 2), ("😐", 1),
    # ordinary messages: nothing is guessed
    ("4", None), ("0", None), ("12", None), ("2 满意", None), ("不太满意", None), ("我满意吗?", None),
    ("一般般", None), ("👍😡", None), ("谢谢", None), ("", None), ("   ", None), ("1 2", None),
])
def test_survey_matching_table(text, index):
    assert match_choice(text, DEFAULT) == index


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


async def test_only_the_next_message_answers_and_a_non_answer_is_an_ordinary_message(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    out = Outbound(id="o-s3", conversation=conv, parts=[TextPart(text="满意吗？")], survey=Survey())
    await bus.jetstream().publish("gw.out.mock.demo", encode(out), headers={"Nats-Msg-Id": out.id})
    await wait_for_status(nats_server.url, "o-s3", "sent")
    await post_inbound(gw.http.port, "demo", text="不太满意，还有问题", sender="alice")
    await post_inbound(gw.http.port, "demo", text="3", sender="alice")
    first, second = (await inbound_of(nats_server.url, conv))[-2:]
    assert first.parts == [TextPart(text="不太满意，还有问题")]
    assert second.parts == [TextPart(text="3")]  # the survey ended with the message before


async def test_an_answer_after_answer_within_is_an_ordinary_message(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    out = Outbound(id="o-s4", conversation=conv, parts=[TextPart(text="满意吗？")], survey=Survey(answer_within=0.001))
    await bus.jetstream().publish("gw.out.mock.demo", encode(out), headers={"Nats-Msg-Id": out.id})
    await wait_for_status(nats_server.url, "o-s4", "sent")
    await post_inbound(gw.http.port, "demo", text="1", sender="alice")
    assert (await inbound_of(nats_server.url, conv))[-1].parts == [TextPart(text="1")]
