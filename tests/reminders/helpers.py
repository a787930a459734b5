"""Helpers of the reminder tests: build, schedule and observe reminders on a real bus."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from gateway import Outbound, Reminder, TextPart
from gateway.testing import stream_messages, wait_until
from gateway.wire import reminder_status_decoder


def soon(seconds: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


def reminder(rid: str, conversation: str, *, due: datetime, channel: str = "demo", text: str = "How was our service?",
             **fields: Any) -> Reminder:
    out = fields.pop("outbound", None) or Outbound(id=f"out-{rid}", conversation=conversation, parts=[TextPart(text=text)],
                                                   kind="followup")
    return Reminder(id=rid, conversation=conversation, channel_type="mock", channel=channel, due_at=due, outbound=out,
                    created_at=fields.pop("created_at", datetime.now(timezone.utc)), **fields)


async def reminder_statuses(url: str, rid: str | None = None, prefix: str = "gw") -> list[Any]:
    msgs = await stream_messages(url, f"{prefix.upper()}_SCHED")
    out = [reminder_status_decoder.decode(m.data) for m in msgs if m.subject.startswith(f"{prefix}.sched.status.")]
    return [s for s in out if rid is None or s.reminder_id == rid]


async def wait_reminder_state(url: str, rid: str, state: str, timeout: float = 10.0) -> list[Any]:
    found: list[Any] = []

    async def check() -> bool:
        found[:] = await reminder_statuses(url, rid)
        return any(s.state == state for s in found)

    await wait_until(check, timeout)
    return found


def quiet_around_now(tz: str) -> tuple[str, str]:
    """Quiet hours from an hour ago to an hour from now, in ``tz``'s wall clock."""
    from zoneinfo import ZoneInfo

    local = datetime.now(ZoneInfo(tz))
    return (local - timedelta(hours=1)).strftime("%H:%M"), (local + timedelta(hours=1)).strftime("%H:%M")
