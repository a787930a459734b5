"""Service hours: when a desk is open, as a pure function of time.

A :class:`Calendar` is a weekly schedule in one time zone (several periods a day, periods
that run past midnight, or ``24h``), public holidays and the extra working days that move
them (China's 调休, from ``chinesecalendar``; other countries from ``holidays``), and the
desk's own closures and openings. Every question takes the moment it is about, so nothing
here reads a clock: the service-desk components pass ``now``, tests pass what they need.

Periods are wall-clock times in the calendar's zone: ``09:00-18:00`` is nine to six local
time on the day the clocks change too (a period of 8 or 10 real hours that day). A period
that ends at or before it starts (``22:00-06:00``) belongs to the day it starts on and runs
into the next: a holiday on that day closes all of it, a holiday on the next day none."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from ..config import weekday_range

if TYPE_CHECKING:
    from ..config import CalendarConfig

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

Period = tuple[time, time | None]
"""A period of one day: start, end (``None``: until midnight, so ``24h`` is ``(00:00, None)``)."""

# How far ahead the next opening is looked for: a desk closed longer than this is "closed".
HORIZON_DAYS = 400


class CalendarError(ValueError):
    """A period, weekday or holiday source that cannot be used."""


def parse_period(text: str) -> Period:
    """``"09:00-12:00"``, ``"22:00-06:00"`` (past midnight), ``"00:00-24:00"`` or ``"24h"``."""
    t = text.strip()
    if t == "24h":
        return time(0, 0), None
    try:
        a, b = t.split("-")
        start = _clock(a)
        end = None if b.strip() == "24:00" else _clock(b)
    except ValueError:
        raise CalendarError(f"a period is HH:MM-HH:MM (e.g. 09:00-18:00, 22:00-06:00) or 24h, got {text!r}") from None
    if end == start:
        raise CalendarError(f"a period must not start and end at the same time, got {text!r} (use 24h for all day)")
    return start, end


def _clock(text: str) -> time:
    hh, mm = text.strip().split(":")
    if len(hh) != 2 or len(mm) != 2:
        raise ValueError(text)
    return time(int(hh), int(mm))


@dataclass(frozen=True)
class Holidays:
    """Which local dates are public holidays and which weekend dates are working days.

    ``unknown_years`` collects the years the source could not answer for (chinesecalendar
    knows 2004–2026): those dates count as ordinary days, and the caller warns."""

    holiday: Callable[[date], bool]
    extra_workday: Callable[[date], bool]
    name: str
    unknown_years: set[int] = field(default_factory=set)


def chinese_holidays() -> Holidays:
    """Mainland China's statutory holidays and 调休 working days (``chinesecalendar``)."""
    import chinese_calendar

    unknown: set[int] = set()

    def holiday(d: date) -> bool:
        try:
            is_holiday, name = chinese_calendar.get_holiday_detail(d)
        except NotImplementedError:
            unknown.add(d.year)
            return False
        return bool(is_holiday and name)  # an ordinary weekend has no name

    def extra_workday(d: date) -> bool:
        if d.weekday() < 5:
            return False
        try:
            return bool(chinese_calendar.is_workday(d))
        except NotImplementedError:
            unknown.add(d.year)
            return False

    return Holidays(holiday, extra_workday, "CN (chinesecalendar)", unknown)


def country_holidays(spec: str) -> Holidays:
    """``"US"``, ``"DE-BY"`` (country, subdivision): the ``holidays`` package's calendar."""
    import holidays as holidays_pkg

    country, _, subdiv = spec.partition("-")
    try:
        table = holidays_pkg.country_holidays(country, subdiv=subdiv or None)
    except (NotImplementedError, KeyError) as exc:
        raise CalendarError(f"unknown holiday calendar {spec!r}: {exc}") from None
    return Holidays(lambda d: d in table, lambda d: False, f"{spec} (holidays)")


def holiday_source(spec: str) -> Holidays:
    """``CN`` uses chinesecalendar (holidays and 调休); anything else the ``holidays`` package."""
    return chinese_holidays() if spec.upper() == "CN" else country_holidays(spec)


@dataclass(frozen=True)
class Closure:
    """The desk is closed from ``start`` to ``end`` (local wall time, end excluded)."""

    start: datetime
    end: datetime


@dataclass(frozen=True)
class Opening:
    """On ``day`` the desk keeps these hours instead of the weekly ones (an extra opening
    on a Sunday, short hours on New Year's Eve; empty: closed all day)."""

    day: date
    periods: tuple[Period, ...]


class Calendar:
    """A desk's service hours. ``week`` maps ``mon``…``sun`` to that day's periods; a day
    not named is closed. ``workday`` names the weekday whose hours an extra working day
    (调休) keeps."""

    def __init__(self, name: str, tz: str, week: Mapping[str, Sequence[Period]], *,
                 holidays: Holidays | None = None, workday: str = "mon",
                 closures: Sequence[Closure] = (), openings: Sequence[Opening] = ()):
        self.name = name
        self.tz = ZoneInfo(tz)
        self.tz_name = tz
        for key in week:
            if key not in WEEKDAYS:
                raise CalendarError(f"unknown weekday {key!r}; expected one of {', '.join(WEEKDAYS)}")
        self.week = [tuple(week.get(d, ())) for d in WEEKDAYS]
        self.holidays = holidays
        self.workday = WEEKDAYS.index(workday)
        self.closures = sorted(closures, key=lambda c: c.start)
        self.openings = {o.day: o.periods for o in openings}

    @property
    def always_open(self) -> bool:
        """Open every minute of every day (``24h``, no holidays, no closures)."""
        return (self.holidays is None and not self.closures and not self.openings
                and all(p == ((time(0), None),) for p in self.week))

    # --- one local day -----------------------------------------------------------------

    def day_periods(self, day: date) -> tuple[Period, ...]:
        """The periods that start on local date ``day`` (before closures)."""
        if day in self.openings:
            return self.openings[day]
        if self.holidays is not None:
            if self.holidays.holiday(day):
                return ()
            if self.holidays.extra_workday(day):
                return self.week[self.workday]
        return self.week[day.weekday()]

    def _day_intervals(self, day: date) -> list[tuple[datetime, datetime]]:
        out = []
        for start, end in self.day_periods(day):
            a = datetime.combine(day, start, tzinfo=self.tz)
            if end is None:
                b = datetime.combine(day + timedelta(days=1), time(0), tzinfo=self.tz)
            elif end > start:
                b = datetime.combine(day, end, tzinfo=self.tz)
            else:
                b = datetime.combine(day + timedelta(days=1), end, tzinfo=self.tz)
            # Real instants (UTC): a wall time in a DST gap moves past it.
            a_utc, b_utc = a.astimezone(timezone.utc), b.astimezone(timezone.utc)
            out.extend(self._minus_closures(a_utc, b_utc))
        return out

    def _minus_closures(self, a: datetime, b: datetime) -> list[tuple[datetime, datetime]]:
        pieces = [(a, b)]
        for c in self.closures:
            cs = c.start.replace(tzinfo=self.tz).astimezone(timezone.utc)
            ce = c.end.replace(tzinfo=self.tz).astimezone(timezone.utc)
            nxt = []
            for x, y in pieces:
                if ce <= x or cs >= y:
                    nxt.append((x, y))
                    continue
                if x < cs:
                    nxt.append((x, cs))
                if ce < y:
                    nxt.append((ce, y))
            pieces = nxt
        return pieces

    # --- questions -----------------------------------------------------------------------

    def intervals(self, start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime]]:
        """The open intervals overlapping ``[start, end)``, merged, clipped, in UTC, in order."""
        start, end = _utc(start), _utc(end)
        day = start.astimezone(self.tz).date() - timedelta(days=1)  # yesterday's may run past midnight
        last = end.astimezone(self.tz).date()
        cur: tuple[datetime, datetime] | None = None
        while day <= last:
            for a, b in sorted(self._day_intervals(day)):
                a, b = max(a, start), min(b, end)
                if a >= b:
                    continue
                if cur is not None and a <= cur[1]:
                    cur = (cur[0], max(cur[1], b))
                    continue
                if cur is not None:
                    yield cur
                cur = (a, b)
            day += timedelta(days=1)
        if cur is not None:
            yield cur

    def is_open(self, at: datetime) -> bool:
        """Is the desk open at ``at``?"""
        at = _utc(at)
        return any(True for _ in self.intervals(at, at + timedelta(microseconds=1)))

    def next_open(self, at: datetime) -> datetime | None:
        """``at`` if the desk is open then, else when it opens next; None if not within
        :data:`HORIZON_DAYS`."""
        at = _utc(at)
        for a, _ in self.intervals(at, at + timedelta(days=HORIZON_DAYS)):
            return a
        return None

    def open_until(self, at: datetime) -> datetime | None:
        """If open at ``at``, when it closes (None: not within the horizon); if closed, ``at``."""
        at = _utc(at)
        for a, b in self.intervals(at, at + timedelta(days=HORIZON_DAYS)):
            if a > at:
                return at
            return None if b >= at + timedelta(days=HORIZON_DAYS) else b
        return at

    def closed_since(self, at: datetime) -> datetime | None:
        """If closed at ``at``, when the desk last closed (None: not within the horizon)."""
        at = _utc(at)
        last = None
        for _, b in self.intervals(at - timedelta(days=HORIZON_DAYS), at + timedelta(microseconds=1)):
            last = b
        if last is not None and last > at:
            return None  # open now
        return last

    def business_seconds(self, start: datetime, end: datetime) -> float:
        """Open time between ``start`` and ``end``, in seconds (0 when end <= start)."""
        if end <= start:
            return 0.0
        return sum((b - a).total_seconds() for a, b in self.intervals(start, end))

    def add_business(self, start: datetime, secs: float) -> datetime | None:
        """The moment ``secs`` of open time after ``start`` (None beyond the horizon)."""
        start = _utc(start)
        left = timedelta(seconds=secs)
        if left <= timedelta(0):
            return self.next_open(start) or start
        window = timedelta(days=31)
        frm = start
        while frm < start + timedelta(days=HORIZON_DAYS):
            for a, b in self.intervals(frm, frm + window):
                if b - a >= left:
                    return a + left
                left -= b - a
            frm += window
        return None


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        return at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc)


def calendar_from_config(name: str, cfg: CalendarConfig) -> Calendar:
    """The :class:`Calendar` of a validated ``[calendars.<name>]`` section."""
    if isinstance(cfg.hours, str):
        week: dict[str, list[Period]] = {d: [parse_period("24h")] for d in WEEKDAYS}
    else:
        week = {}
        for key, periods in cfg.hours.items():
            for day in weekday_range(key):
                week[day] = [parse_period(p) for p in periods]
    closures: list[Closure] = []
    openings: list[Opening] = []
    if cfg.loaded is not None:
        closures = [Closure(_local(c.start), _local(c.end)) for c in cfg.loaded.closed]
        openings = [Opening(date.fromisoformat(o.date), tuple(parse_period(p) for p in o.hours))
                    for o in cfg.loaded.open]
    return Calendar(name, cfg.tz, week, holidays=holiday_source(cfg.holidays) if cfg.holidays else None,
                    workday=cfg.workday, closures=closures, openings=openings)


def _local(text: str) -> datetime:
    """A local wall time of a closures file (``2026-12-24`` is its midnight), naive."""
    if "T" in text:
        return datetime.fromisoformat(text).replace(tzinfo=None)
    return datetime.combine(date.fromisoformat(text), time(0))
