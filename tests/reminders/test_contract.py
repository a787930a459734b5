"""docs/reminders.md is a contract for backends in other languages: its tables state the
types' fields, defaults and the headers the gateway and client write."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import pytest

from gateway import DeskTask, Fallback, Outbound, Reminder, ReminderStatus, Subjects
from gateway.client import ReminderStore

DOC = Path(__file__).parent.parent.parent / "docs" / "reminders.md"


def table_after(marker: str) -> dict[str, list[str]]:
    text = DOC.read_text(encoding="utf-8")
    rows: dict[str, list[str]] = {}
    started = False
    for line in text[text.index(marker) + len(marker):].splitlines():
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


def expected(field: msgspec.structs.FieldInfo) -> str:
    if field.required:
        return "required"
    default = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    return f"default `{json.dumps(default, ensure_ascii=False)}`"


@pytest.mark.parametrize(("marker", "struct"), [("## `Reminder`", Reminder), ("`Fallback`:", Fallback),
                                                 ("`DeskTask`:", DeskTask)])
def test_the_reminder_tables_state_every_field_with_its_required_flag_and_default(marker, struct):
    rows = table_after(marker)
    fields = msgspec.structs.fields(struct)
    assert list(rows) == [f.encode_name for f in fields]
    assert {f.encode_name: rows[f.encode_name][1] for f in fields} == {f.encode_name: expected(f) for f in fields}


def test_the_status_table_lists_every_field_and_state():
    rows = table_after("## `ReminderStatus`")
    assert list(rows) == [f.encode_name for f in msgspec.structs.fields(ReminderStatus)]
    states = msgspec.json.schema(ReminderStatus)["$defs"]["ReminderStatus"]["properties"]["state"]["enum"]
    assert all(f"`{s}`" in rows["state"][1] for s in states)


async def test_the_schedule_message_carries_the_documented_subject_and_headers(nats_server, bus):
    from gateway.testing import make_config, start_gateway

    gw = await start_gateway(make_config(nats_server.url))
    try:
        due = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=timezone.utc)
        r = Reminder(id="t-1", conversation="demo.abc", channel_type="mock", channel="demo", due_at=due,
                     outbound=Outbound(id="o-1", conversation="demo.abc"))
        store = ReminderStore(bus, bus.jetstream(), Subjects("gw"), keep_fired=86400)
        seq = await store.schedule(r)
        m = await bus.jetstream().get_msg("GW_SCHED", seq)
        assert m.subject == "gw.sched.at.demo.abc.t-1"
        assert {k: v for k, v in m.headers.items() if k != "Nats-Rollup"} == {
            "Nats-Schedule": "@at 2030-01-02T03:04:05.600000Z", "Nats-Schedule-Target": "gw.sched.fire.mock.demo",
            "Nats-Schedule-TTL": "86400s", "Content-Type": "application/json", "Gw-Schema": "reminder/1"}
    finally:
        await gw.stop()
