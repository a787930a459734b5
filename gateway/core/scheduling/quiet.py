"""Quiet hours: when a customer must not be contacted, in their own time zone.

Shared by every channel that defers sending (SMS) and by callback reminders: computed with
``zoneinfo`` so windows that span midnight (22:00–08:00) and days when the clocks change
come out right."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from ..schema import QuietHours


def _clock(value: str) -> time:
    hh, mm = value.split(":")
    return time(int(hh), int(mm))


def check_quiet_hours(quiet: QuietHours) -> None:
    """Raise ValueError naming the field when ``start``, ``end`` or ``tz`` is not usable."""
    for field, problem in quiet.problems().items():
        raise ValueError(f"quiet hours {field} {problem}")


def quiet_until(quiet: QuietHours | None, at: datetime) -> datetime | None:
    """If ``at`` falls inside ``quiet`` (read in ``quiet.tz``), the first moment after the
    quiet hours, in UTC; None when ``at`` is allowed (or there are no quiet hours).

    ``start == end`` means no quiet hours. The end is a wall-clock time in the customer's
    zone: on the night the clocks change it is still "08:00 local", whatever the UTC
    offset did meanwhile; an end that falls into a skipped hour maps to the first real
    instant after the gap, an end that occurs twice to its first occurrence."""
    if quiet is None:
        return None
    check_quiet_hours(quiet)
    start, end = _clock(quiet.start), _clock(quiet.end)
    if start == end:
        return None
    tz = ZoneInfo(quiet.tz)
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    local = at.astimezone(tz)
    now = local.time().replace(tzinfo=None)
    if start < end:
        inside = start <= now < end
        end_day = local.date()
    else:  # spans midnight
        inside = now >= start or now < end
        end_day = local.date() + timedelta(days=1) if now >= start else local.date()
    if not inside:
        return None
    wall = datetime.combine(end_day, end, tzinfo=tz)
    # A wall time inside a spring-forward gap does not exist; round-tripping through UTC
    # moves it past the gap (zoneinfo reads it with the offset before the change).
    result = wall.astimezone(timezone.utc)
    return max(result, at.astimezone(timezone.utc))
