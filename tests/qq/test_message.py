"""The OneBot v11 message model: CQ-code strings and segment arrays, CQ escaping, and the
mapping to gateway parts (pure functions, property-tested)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import AudioPart, EventPart, FilePart, ImagePart, TextPart, UnknownPart, VideoPart
from gateway_plugins.qq._message import (
    MessageError,
    Segment,
    cq_escape,
    cq_unescape,
    parse_cq,
    parse_message,
    plain_text,
    to_cq,
    to_parts,
)

# Text with every character that matters to CQ codes, and lookalikes of codes and escapes.
_tricky = st.text(alphabet=st.sampled_from(list("[]&,=#;:CQat91344amp 你好\n")) | st.characters(), max_size=40)
_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True).filter(lambda n: n != "text")
_keys = st.from_regex(r"[a-z_]{1,6}", fullmatch=True)
_segments = st.lists(
    st.one_of(
        st.builds(lambda t: Segment("text", {"text": t}), _tricky),
        st.builds(lambda n, d: Segment(n, d), _names, st.dictionaries(_keys, _tricky, max_size=3)),
    ),
    max_size=6,
)


def _normal(segments: list[Segment]) -> list[Segment]:
    """What a CQ string can say: adjacent texts joined, empty texts gone."""
    out: list[Segment] = []
    for s in segments:
        if s.type == "text":
            if not s.data["text"]:
                continue
            if out and out[-1].type == "text":
                out[-1] = Segment("text", {"text": out[-1].data["text"] + s.data["text"]})
                continue
        out.append(s)
    return out


@given(_tricky, st.booleans())
def test_cq_unescape_undoes_escape_for_any_text(text: str, param: bool) -> None:
    assert cq_unescape(cq_escape(text, param=param)) == text


@given(_tricky)
def test_escaped_text_holds_no_bracket_and_param_no_comma(text: str) -> None:
    assert "[" not in cq_escape(text) and "]" not in cq_escape(text)
    assert "," not in cq_escape(text, param=True)


@settings(max_examples=300)
@given(_segments)
def test_cq_string_round_trips_any_segments(segments: list[Segment]) -> None:
    assert parse_cq(to_cq(segments)) == _normal(segments)


@given(_tricky)
def test_text_that_looks_like_cq_code_stays_text(text: str) -> None:
    typed = "[CQ:at,qq=all]" + text + "[CQ:face,id=1]"
    parsed = parse_cq(cq_escape(typed))  # what the implementation sends for typed text
    assert parsed == [Segment("text", {"text": typed})]
    assert to_parts(parsed).parts == [TextPart(text=typed)]


def test_spec_example_share_with_escaped_comma_and_ampersand() -> None:
    s = "[CQ:share,title=震惊&#44;小伙睡觉前居然...,url=http://baidu.com/?a=1&amp;b=2]"
    assert parse_cq(s) == [Segment("share", {"title": "震惊,小伙睡觉前居然...", "url": "http://baidu.com/?a=1&b=2"})]


def test_spec_example_escaped_text() -> None:
    assert parse_cq("- &#91;x&#93; 使用 `&amp;data` 获取地址") == [Segment("text", {"text": "- [x] 使用 `&data` 获取地址"})]


def test_escaped_escape_is_literal_text() -> None:
    # A customer who typed "&#91;" literally: the implementation sends "&amp;#91;".
    assert parse_cq("&amp;#91;&amp;amp;") == [Segment("text", {"text": "&#91;&amp;"})]


def test_value_with_equals_sign_keeps_it() -> None:
    assert parse_cq("[CQ:share,title=a=b,url=u]") == [Segment("share", {"title": "a=b", "url": "u"})]


def test_nested_bracket_is_text_and_the_inner_code_a_segment() -> None:
    assert parse_cq("[CQ:face,id=1[CQ:at,qq=2]]") == [
        Segment("text", {"text": "[CQ:face,id=1"}), Segment("at", {"qq": "2"}), Segment("text", {"text": "]"})]


def test_unclosed_code_is_text() -> None:
    assert parse_cq("[CQ:image,file=a.jpg") == [Segment("text", {"text": "[CQ:image,file=a.jpg"})]


def test_code_without_parameters() -> None:
    assert parse_cq("[CQ:shake]hi") == [Segment("shake", {}), Segment("text", {"text": "hi"})]


def test_array_form_keeps_numbers_and_one_segment_object_is_accepted() -> None:
    assert parse_message([{"type": "at", "data": {"qq": 10001}}]) == [Segment("at", {"qq": 10001})]
    assert parse_message({"type": "text", "data": {"text": "x"}}) == [Segment("text", {"text": "x"})]
    assert parse_message([{"type": "shake"}]) == [Segment("shake", {})]


@pytest.mark.parametrize("bad", [7, None, [1], [{"data": {}}], [{"type": "text", "data": "x"}]])
def test_malformed_message_is_refused(bad: object) -> None:
    with pytest.raises(MessageError):
        parse_message(bad)


def test_segments_map_to_typed_parts() -> None:
    segs = parse_message([
        {"type": "reply", "data": {"id": "-2147480000"}},
        {"type": "at", "data": {"qq": "3889000001"}},
        {"type": "text", "data": {"text": " 订单"}},
        {"type": "text", "data": {"text": "问题"}},
        {"type": "at", "data": {"qq": "10005", "name": "小王"}},
        {"type": "at", "data": {"qq": "all"}},
        {"type": "face", "data": {"id": 178}},
        {"type": "image", "data": {"file": "abc.image", "url": "https://gchat.qpic.cn/x", "file_size": "2048"}},
        {"type": "record", "data": {"file": "v.amr", "url": "http://r/v"}},
        {"type": "video", "data": {"file": "v.mp4"}},
        {"type": "file", "data": {"file_id": "/f-1", "name": "发票.pdf", "file_size": 99}},
        {"type": "forward", "data": {"id": "fw-1"}},
        {"type": "dice", "data": {"result": 4}},
    ])
    got = to_parts(segs, self_id="3889000001")
    assert got.reply_to == "-2147480000"
    assert got.at_bot and got.at_all and got.mentions == ["3889000001", "10005"]
    assert got.parts == [
        EventPart(event="at", key="3889000001", data={"target": "bot"}),
        TextPart(text=" 订单问题"),
        EventPart(event="at", key="10005", data={"target": "user", "name": "小王"}),
        EventPart(event="at", key="all", data={"target": "all"}),
        EventPart(event="face", key="178"),
        ImagePart(url="https://gchat.qpic.cn/x", media_id="abc.image", size=2048),
        AudioPart(url="http://r/v", media_id="v.amr"),
        VideoPart(media_id="v.mp4"),
        FilePart(media_id="/f-1", filename="发票.pdf", size=99),
        EventPart(event="forward", key="fw-1"),
        UnknownPart(raw={"type": "dice", "data": {"result": 4}}),
    ]


def test_plain_text_reads_only_text_segments() -> None:
    assert plain_text(parse_cq("[CQ:at,qq=1] 退款[CQ:face,id=2]吗")) == " 退款吗"
