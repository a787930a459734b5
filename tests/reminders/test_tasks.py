"""Reminders addressed to the desk (a follow-up by phone): a Task event when due, under the
customer's quiet hours, nothing sent to the customer."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from gateway import DeskTask, QuietHours
from gateway.client import Client
from gateway.testing import stream_messages, wait_until
from gateway.wire import task_decoder

from .helpers import quiet_around_now, reminder, soon, wait_reminder_state
from .test_scheduling import start, store_of


async def tasks(url: str) -> list:
    return [(m.subject, task_decoder.decode(m.data)) for m in await stream_messages(url, "GW_TASKS")]


async def test_a_desk_reminder_fires_as_a_task_and_nothing_reaches_the_customer(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    async with Client(nats_server.url) as client:
        await client.remind(conv, "回访：确认安装是否正常", id="call-1", due_at=soon(1),
                            task=DeskTask(action="call", note="installation follow-up", data={"ticket": "T-88"}))
    await wait_until(lambda: _has_task(nats_server.url), timeout=10)
    [(subject, task)] = await tasks(nats_server.url)
    assert subject == "gw.task.mock.demo"
    assert (task.reminder_id, task.conversation, task.action, task.note, task.data) == \
        ("call-1", conv, "call", "installation follow-up", {"ticket": "T-88"})
    sts = await wait_reminder_state(nats_server.url, "call-1", "fired")
    assert sts[-1].outbound_id == task.id
    assert not [d for d in gw.channels["demo"].channel.deliveries if d[0].id == task.id]


async def test_a_desk_reminder_in_the_customers_quiet_hours_is_moved_like_any_other(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    start_, end = quiet_around_now("Asia/Shanghai")
    await store_of(bus).schedule(reminder("call-2", conv, due=soon(1), task=DeskTask(note="call back"),
                                          quiet_hours=QuietHours(start=start_, end=end, tz="Asia/Shanghai")))
    sts = await wait_reminder_state(nats_server.url, "call-2", "rescheduled")
    assert sts[-1].due_at.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%H:%M") == end
    assert await tasks(nats_server.url) == []


async def _has_task(url: str) -> bool:
    return bool(await tasks(url))
