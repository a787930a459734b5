"""Helpers of the service-desk tests: calendars that open and close within a test."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from gateway.testing import stream_messages
from gateway.wire import desk_opened_decoder, sla_event_decoder

TZ = "Asia/Shanghai"


def local(at: datetime) -> str:
    """``at`` as a Shanghai wall time with seconds, as a closures file takes it."""
    return at.astimezone(ZoneInfo(TZ)).replace(tzinfo=None).isoformat(timespec="seconds")


def closures(path: Path, *periods: tuple[datetime, datetime]) -> str:
    """Write a closures file closing the desk in each (start, end) and return its path."""
    text = "".join(f'[[closed]]\nfrom = "{local(a)}"\nto = "{local(b)}"\n' for a, b in periods)
    path.write_text(text, encoding="utf-8")
    return str(path)


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def seconds_from_now(s: float) -> datetime:
    return now() + timedelta(seconds=s)


async def sla_events(url: str) -> list:
    return [sla_event_decoder.decode(m.data) for m in await stream_messages(url, "GW_DESK")
            if m.subject.startswith("gw.sla.")]


async def opened_events(url: str) -> list:
    return [desk_opened_decoder.decode(m.data) for m in await stream_messages(url, "GW_DESK")
            if m.subject.startswith("gw.desk.opened.")]


async def followup_events(url: str) -> list:
    from gateway.wire import followup_status_decoder

    return [followup_status_decoder.decode(m.data) for m in await stream_messages(url, "GW_DESK")
            if m.subject.startswith("gw.desk.followup.")]


async def tasks(url: str) -> list:
    from gateway.wire import task_decoder

    return [task_decoder.decode(m.data) for m in await stream_messages(url, "GW_TASKS")]
