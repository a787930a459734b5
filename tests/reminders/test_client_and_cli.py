"""``Client.remind`` / ``cancel_reminder`` / ``move_reminder`` and ``gateway reminders
list | show | cancel | move`` against a real gateway and nats-server."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from gateway.cli import main
from gateway.client import Client, ReminderError
from gateway.testing import wait_for_status

from .helpers import reminder_statuses, soon, wait_reminder_state
from .test_scheduling import start


async def test_remind_three_days_after_an_event_with_a_survey_fires_as_a_survey(gateway_factory, nats_server):
    gw, conv = await start(gateway_factory)
    async with Client(nats_server.url) as client:
        resolved_at = datetime.now(timezone.utc) - timedelta(days=3) + timedelta(seconds=1)
        r = await client.remind(conv, "您对本次服务满意吗？回复 1 满意 2 一般 3 不满意", id="t-1234-followup",
                                after=timedelta(days=3), since=resolved_at, survey=True)
        assert r.due_at == resolved_at + timedelta(days=3) and r.channel == "demo" and r.channel_type == "mock"
    await wait_for_status(nats_server.url, "reminder-t-1234-followup", "sent")
    [(out, _)] = [d for d in gw.channels["demo"].channel.deliveries if d[0].id == "reminder-t-1234-followup"]
    assert out.kind == "survey" and out.survey is not None and out.survey.choices == ["满意", "一般", "不满意"]


async def test_client_cancel_and_move_answer_whether_something_was_pending(gateway_factory, nats_server):
    gw, conv = await start(gateway_factory)
    async with Client(nats_server.url) as client:
        await client.remind(conv, "call back", id="t-2", due_at=soon(3600))
        await client.remind(conv, "call back", id="t-3", due_at=soon(3600))
        await wait_reminder_state(nats_server.url, "t-3", "scheduled")
        assert await client.cancel_reminder("t-2", reason="ticket reopened") is True
        assert await client.cancel_reminder("t-2") is False
        assert await client.move_reminder("t-3", soon(7200), reason="customer on holiday") is True
        assert await client.move_reminder("nope", soon(60)) is False
        with pytest.raises(ReminderError, match="subject token"):
            await client.remind(conv, "x", id="has.dots", due_at=soon(60))
    sts = await wait_reminder_state(nats_server.url, "t-3", "rescheduled")
    assert sts[-1].reason == "customer on holiday"
    assert [s.reason for s in await reminder_statuses(nats_server.url, "t-2")][-1] == "ticket reopened"


def _cli_config(tmp_path, url: str) -> list[str]:
    p = tmp_path / "gateway.toml"
    p.write_text(f'[bus]\nurl = "{url}"\n[channels.demo]\ntype = "mock"\n')
    return ["-c", str(p), "reminders"]


async def test_cli_lists_shows_moves_and_cancels_pending_reminders(gateway_factory, nats_server, tmp_path, capsys):
    gw, conv = await start(gateway_factory)
    cli = _cli_config(tmp_path, nats_server.url)
    async with Client(nats_server.url) as client:
        await client.remind(conv, "second", id="op-2", due_at=soon(7200))
        await client.remind(conv, "first", id="op-1", due_at=soon(3600))
    await wait_reminder_state(nats_server.url, "op-2", "scheduled")
    capsys.readouterr()  # the in-process gateway's own log lines so far
    assert await asyncio.to_thread(main, [*cli, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["op-1", "op-2"] and rows[0]["conversation"] == conv

    assert await asyncio.to_thread(main, [*cli, "show", "op-1"]) == 0
    assert json.loads(capsys.readouterr().out)["outbound"]["parts"] == [{"type": "text", "text": "first"}]

    assert await asyncio.to_thread(main, [*cli, "move", "op-1", "--to", "3h", "--reason", "asked by phone"]) == 0
    assert "moved op-1" in capsys.readouterr().out
    sts = await wait_reminder_state(nats_server.url, "op-1", "rescheduled")
    assert sts[-1].reason == "asked by phone"

    assert await asyncio.to_thread(main, [*cli, "cancel", "op-2"]) == 0
    assert "cancelled op-2" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [*cli, "cancel", "op-2"]) == 1
    assert "nothing cancelled" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*cli, "move", "op-1", "--to", "tomorrow"]) == 2
    assert "RFC 3339" in capsys.readouterr().err

    assert await asyncio.to_thread(main, [*cli, "list"]) == 0
    out = capsys.readouterr().out
    assert "op-1" in out and "op-2" not in out and "1 pending" in out
