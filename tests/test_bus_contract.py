"""docs/bus-contract.md is what backends in other languages build against: its tables are
checked against the wire types, and the behaviour it describes (headers, duplicates,
statuses, the work queue) against a real gateway and nats-server."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js import api

from gateway import Outbound, Sender, Template, TextPart
from gateway.wire import encode
from gateway.testing import post_inbound, statuses, stream_messages, wait_for_status, wait_until

DOC = Path(__file__).parent.parent / "docs" / "bus-contract.md"


def table_after(text: str, marker: str) -> dict[str, list[str]]:
    """The first Markdown table after ``marker``: first-column name → the other cells."""
    rest = text[text.index(marker) + len(marker):]
    rows: dict[str, list[str]] = {}
    started = False
    for line in rest.splitlines():
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        m = re.fullmatch(r"`([a-z_]+)`", cells[0])
        if m:
            rows[m.group(1)] = cells[1:]
    return rows


def expected_column(field: msgspec.structs.FieldInfo) -> str:
    if field.required:
        return "required"
    default = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    return f"default `{json.dumps(default, ensure_ascii=False)}`"


@pytest.mark.parametrize(("marker", "struct"), [("## `Outbound`", Outbound), ("`Template`:", Template),
                                                    ("`Sender` (", Sender)])
def test_the_outbound_tables_state_every_field_with_its_required_flag_and_default(marker, struct):
    rows = table_after(DOC.read_text(), marker)
    fields = msgspec.structs.fields(struct)
    assert list(rows) == [f.encode_name for f in fields], "the table lists other fields than the type"
    wrong = {f.encode_name: (rows[f.encode_name][1], expected_column(f)) for f in fields
             if rows[f.encode_name][1] != expected_column(f)}
    assert wrong == {}, "documented (required / default) differs from the type: (doc, type)"


def test_template_data_is_documented_as_strings_and_the_schema_agrees():
    row = table_after(DOC.read_text(), "`Template`:")["data"]
    assert row[0] == "object of string → string"
    schema = json.loads((Path(__file__).parent.parent / "schemas" / "outbound.json").read_text())
    assert schema["$defs"]["Template"]["properties"]["data"] == {"type": "object", "additionalProperties": {"type": "string"},
                                                                 "default": {}}


async def _conversation(gw) -> str:
    await post_inbound(gw.http.port, "demo", text="hi", sender="hana", id="p-1")
    return gw.channels["demo"].ctx.conversation_key("hana")


async def test_status_nats_msg_id_is_outbound_state_attempt_and_accepted_has_attempt_zero(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    conv = await _conversation(gw)
    await bus.jetstream().publish("gw.out.mock.demo", encode(Outbound(id="r-1", conversation=conv, parts=[TextPart(text="x")])),
                                  headers={"Nats-Msg-Id": "r-1"})
    await wait_for_status(nats_server.url, "r-1", "sent")
    got = [(json.loads(m.data)["state"], json.loads(m.data)["attempt"], m.headers["Nats-Msg-Id"])
           for m in await stream_messages(nats_server.url, "GW_STATUS")]
    assert got == [("accepted", 0, "r-1:accepted:0"), ("sent", 1, "r-1:sent:1")]


async def test_republishing_after_the_duplicate_window_gives_a_second_accepted_sent_pair_and_no_second_send(
        gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}}, bus={"duplicate_window": "1s"})
    conv = await _conversation(gw)
    js = bus.jetstream()
    body = encode(Outbound(id="r-2", conversation=conv, parts=[TextPart(text="once")]))
    await js.publish("gw.out.mock.demo", body, headers={"Nats-Msg-Id": "r-2"})
    assert (await js.publish("gw.out.mock.demo", body, headers={"Nats-Msg-Id": "r-2"})).duplicate is True
    await wait_for_status(nats_server.url, "r-2", "sent")
    await asyncio.sleep(1.5)  # past the (shortened) duplicate window
    assert not (await js.publish("gw.out.mock.demo", body, headers={"Nats-Msg-Id": "r-2"})).duplicate

    async def two_pairs() -> bool:
        return len(await statuses(nats_server.url, "r-2")) >= 4

    await wait_until(two_pairs, timeout=10)
    sts = await statuses(nats_server.url, "r-2")
    assert [(s.state, s.provider_id) for s in sts] == [("accepted", None), ("sent", "mock-1")] * 2
    assert len(gw.channels["demo"].channel.deliveries) == 1


async def test_an_outbound_without_nats_msg_id_is_still_delivered_once(gateway_factory, nats_server, bus):
    gw = await gateway_factory({"demo": {"type": "mock"}})
    conv = await _conversation(gw)
    js = bus.jetstream()
    body = encode(Outbound(id="r-3", conversation=conv, parts=[TextPart(text="once")]))
    acks = [await js.publish("gw.out.mock.demo", body) for _ in range(2)]
    assert not any(a.duplicate for a in acks)  # the broker kept both copies
    await wait_for_status(nats_server.url, "r-3", "sent")

    async def queue_empty() -> bool:
        return (await js.stream_info("GW_OUT")).state.messages == 0

    await wait_until(queue_empty, timeout=10)
    assert [o.id for o, _ in gw.channels["demo"].channel.deliveries] == ["r-3"]


async def test_two_outbounds_sharing_one_nats_msg_id_lose_the_second(gateway_factory, nats_server, bus):
    # Why the contract says Nats-Msg-Id = id: the broker drops the second one silently,
    # and only its publish ack tells.
    gw = await gateway_factory({"demo": {"type": "mock"}})
    conv = await _conversation(gw)
    js = bus.jetstream()
    first = await js.publish("gw.out.mock.demo", encode(Outbound(id="r-4a", conversation=conv, parts=[TextPart(text="a")])),
                             headers={"Nats-Msg-Id": "constant"})
    second = await js.publish("gw.out.mock.demo", encode(Outbound(id="r-4b", conversation=conv, parts=[TextPart(text="b")])),
                              headers={"Nats-Msg-Id": "constant"})
    assert not first.duplicate and second.duplicate
    await wait_for_status(nats_server.url, "r-4a", "sent")
    assert await statuses(nats_server.url, "r-4b") == []


async def test_a_backend_consumer_on_gw_out_is_refused_with_error_10100(gateway_factory, bus):
    await gateway_factory({"demo": {"type": "mock"}})
    js = bus.jetstream()

    async def delivering() -> bool:  # the gateway's own consumer of the channel exists
        try:
            return bool(await js.consumer_info("GW_OUT", "gw_out_demo"))
        except nats.js.errors.NotFoundError:
            return False

    await wait_until(delivering, timeout=10)
    with pytest.raises(nats.js.errors.BadRequestError) as err:
        await bus.jetstream().add_consumer("GW_OUT", api.ConsumerConfig(
            durable_name="backend", filter_subject="gw.out.mock.demo", ack_policy=api.AckPolicy.EXPLICIT))
    assert err.value.err_code == 10100


def test_the_contract_headers_are_the_documented_ones():
    # Written in one module (gateway.wire re-exports it); pinned byte for byte here because
    # backends in other languages match on them.
    from datetime import datetime, timezone

    from gateway import DeliveryStatus, Message, Participant
    from gateway import wire as c

    o = Outbound(id="r-1", conversation="demo.k", parts=[TextPart(text="x")])
    assert c.outbound_headers(o) == {"Nats-Msg-Id": "r-1", "Content-Type": "application/json", "Gw-Schema": "outbound/1"}
    assert c.replay_headers(o, 7) == {"Nats-Msg-Id": "r-1:replay:7", "Content-Type": "application/json",
                                      "Gw-Schema": "outbound/1", "Gw-Replay-Of": "7"}
    now = datetime.now(timezone.utc)
    st = DeliveryStatus(outbound_id="r-1", conversation="demo.k", channel_type="mock", channel="demo", state="sent", at=now,
                        attempt=1)
    assert c.status_headers(st) == {"Nats-Msg-Id": "r-1:sent:1", "Content-Type": "application/json",
                                    "Gw-Schema": "delivery-status/1"}
    assert c.dead_letter_headers("r-1", 12) == {"Nats-Msg-Id": "dead:r-1:12", "Content-Type": "application/json",
                                                "Gw-Schema": "dead-letter/1"}
    assert c.dead_inbound_headers("GW_IN", 3) == {"Nats-Msg-Id": "dead-in:GW_IN:3", "Content-Type": "application/json",
                                                  "Gw-Schema": "dead-letter/1"}
    m = Message(id="m-1", conversation="demo.k", channel_type="mock", channel="demo", sender=Participant(id="u"), received_at=now)
    assert c.message_headers(m) == {
        "Nats-Msg-Id": "m-1", "Content-Type": "application/json", "Gw-Schema": "message/1", "Gw-Conversation": "demo.k",
        "ce-specversion": "1.0", "ce-id": "m-1", "ce-type": "gateway.message.v1", "ce-source": "/mock/demo"}


def test_the_delivery_status_table_has_one_header_and_every_state_once():
    text = DOC.read_text()
    section = text[text.index("## `DeliveryStatus`"):]
    table = [line for line in section[section.index("\n|"):].split("\n\n", 1)[0].splitlines() if line.startswith("|")]
    assert table[0] == "| state | when | `attempt` |" and table[1] == "|---|---|---|"
    assert sum(1 for line in table if re.fullmatch(r"\|[-|]+\|", line)) == 1, table
    documented = [s for line in table[2:] for s in re.findall(r"`([a-z]+)`", line.split("|")[1])]
    from typing import get_args

    from gateway import DeliveryState
    assert sorted(documented) == sorted(get_args(DeliveryState))
    assert all(len(line.split("|")) == 5 for line in table), "every row has the three columns"


async def test_a_channel_reports_a_late_failure_as_dead_with_meta_and_cannot_report_a_permanent_failed(
        gateway_factory, nats_server):
    from gateway import ErrorInfo

    gw = await gateway_factory({"demo": {"type": "mock"}})
    ctx = gw.channels["demo"].ctx
    # failed means "someone tries again": a permanent cause there is a channel's bug, refused
    # before anything is published.
    with pytest.raises(ValueError, match="dead"):
        await ctx.report_status("r-9", "failed", error=ErrorInfo(message="undelivered", permanent=True))
    await ctx.report_status("r-9", "dead", provider_id="p-9", meta={"segments": 2},
                            error=ErrorInfo(message="undelivered", permanent=True, code="x_1"))
    [dead] = await statuses(nats_server.url, "r-9")
    assert (dead.state, dead.attempt, dead.meta, dead.next_attempt_at) == ("dead", 0, {"segments": 2}, None)
