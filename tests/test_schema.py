"""The wire schema: generated JSON Schema is committed and current; ids are strings."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import pytest

from gateway import (
    AudioPart,
    EventPart,
    ImagePart,
    LinkPart,
    LocationPart,
    Message,
    Outbound,
    Participant,
    TextPart,
    UnknownPart,
)
from gateway.cli import main
from gateway.wire import encode, message_decoder, outbound_decoder

ROOT = Path(__file__).parent.parent


def test_committed_schemas_match_what_gateway_schema_generates(tmp_path, capsys):
    assert main(["schema", "--out", str(tmp_path)]) == 0
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    committed = {p.name: p.read_text() for p in (ROOT / "schemas").glob("*.json")}
    assert set(generated) == {"message.json", "outbound.json", "delivery-status.json", "reminder.json",
                              "reminder-status.json", "task.json", "dead-letter.json",
                              "conversation-mark.json", "sla-event.json", "desk-opened.json", "followup-status.json"}
    stale = sorted(n for n in generated if committed.get(n) != generated[n])
    assert not stale, f"schemas/ is stale for {stale}: run `gateway schema --out schemas` and commit"
    assert set(committed) == set(generated), "schemas/ has files gateway schema does not generate"


def test_ids_are_strings_on_the_wire():
    schema = json.loads((ROOT / "schemas" / "message.json").read_text())
    props = schema["$defs"]["Message"]["properties"]
    assert props["id"]["type"] == "string"
    assert {"type": "string"} in props["provider_id"]["anyOf"]
    big = "6918340117829758977"  # a real-sized WeChat MsgId, above 2**53
    m = Message(id="x", channel_type="wechat", channel="oa", provider_id=big, conversation="oa.c",
                sender=Participant(id="o"), received_at=datetime.now(timezone.utc))
    assert f'"provider_id":"{big}"'.encode() in encode(m)


def test_message_with_every_part_type_round_trips():
    parts = [TextPart(text="你好", quoted="> earlier"), ImagePart(data=b"\x89PNG", content_type="image/png"),
             AudioPart(media_id="m1", recognition="你好", duration=2.5), LocationPart(latitude=31.2, longitude=121.5),
             LinkPart(url="https://example.com", title="t"), EventPart(event="subscribe"), UnknownPart(raw={"MsgType": "x"})]
    m = Message(id="x", channel_type="t", channel="c", conversation="c.k", sender=Participant(id="u", name="U"),
                received_at=datetime(2026, 1, 1, tzinfo=timezone.utc), parts=parts, meta={"k": 1})
    assert message_decoder.decode(encode(m)) == m


def test_every_message_carries_its_schema_version():
    m = Message(id="x", channel_type="t", channel="c", conversation="c.k", sender=Participant(id="u"),
                received_at=datetime.now(timezone.utc))
    assert json.loads(encode(m))["schema_version"] == 1


def test_unknown_part_type_is_rejected_by_a_consumer():
    raw = b'{"id":"o1","conversation":"c.k","parts":[{"type":"hologram"}]}'
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'hologram'"):
        outbound_decoder.decode(raw)


def test_outbound_minimal_json_from_another_language_decodes():
    o = outbound_decoder.decode(b'{"id":"o1","conversation":"c.k","parts":[{"type":"text","text":"hi"}]}')
    assert o == Outbound(id="o1", conversation="c.k", parts=[TextPart(text="hi")])


def test_derived_ids_never_change_between_releases():
    # Dedup across restarts and upgrades depends on these being the same forever: a
    # change here makes every provider retry after an upgrade a new message.
    from gateway.wire import conversation_key, message_id

    assert message_id("demo", "p-1") == "2xlw676q26dzc5nd7hovexk5zb"
    assert conversation_key("demo", "alice") == "demo.j5jubarhqc37lcqsupgkeysqig"


def test_every_part_type_reads_its_tag_as_type_and_json_keeps_it_once():
    import typing

    from gateway import Part

    for cls in typing.get_args(Part):
        assert cls.type == cls.__struct_config__.tag, cls  # the attribute is the wire tag
    part = ImagePart(data=b"x", content_type="image/png")
    assert part.type == "image"
    assert json.loads(encode(part)) == {"type": "image", "content_type": "image/png", "data": "eA=="}
    assert message_decoder.decode(encode(Message(
        id="x", channel_type="t", channel="c", conversation="c.k", sender=Participant(id="u"),
        received_at=datetime(2026, 1, 1, tzinfo=timezone.utc), parts=[TextPart(text="hi")]))).parts[0].type == "text"
