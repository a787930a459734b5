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
    offset did meanwhile; an end that falls into a skipped hour ends when the clocks jump
    (quiet hours ending 02:30 end at 03:00 on the spring-forward night), an end that
    occurs twice ends at its first occurrence."""
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
    result = wall.astimezone(timezone.utc)
    if result.astimezone(tz).replace(tzinfo=None) != wall.replace(tzinfo=None):
        result = _end_of_gap(wall, tz)
    return max(result, at.astimezone(timezone.utc))


def _end_of_gap(wall: datetime, tz: ZoneInfo) -> datetime:
    """``wall`` does not exist (the clocks jumped over it): the instant of the jump, the
    first whose wall clock is past it. zoneinfo reads such a time with the offset before
    the change (``fold=0``) or after it (``fold=1``); the jump lies between the two."""
    lo = wall.replace(fold=1).astimezone(timezone.utc)
    hi = wall.replace(fold=0).astimezone(timezone.utc)
    if lo > hi:
        lo, hi = hi, lo
    naive = wall.replace(tzinfo=None)
    while hi - lo > timedelta(seconds=1):  # offsets change on whole seconds
        mid = lo + (hi - lo) / 2
        if mid.astimezone(tz).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    whole = hi.replace(microsecond=0)
    return whole if whole.astimezone(tz).replace(tzinfo=None) >= naive else hi
