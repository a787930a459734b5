"""Service hours as a pure function of time: split shifts, shifts past midnight, 24h,
China's holidays and 调休 working days, another country's holidays, the desk's own
closures and openings; and what the configuration says about each."""

from __future__ import annotations

import textwrap
from datetime import date, datetime, time, timedelta, timezone

import chinese_calendar
from hypothesis import given, settings, strategies as st

from gateway import (
    Calendar,
    PluginManager,
    load_config,
    Closure,
    Opening,
    calendar_from_config,
    chinese_holidays,
    country_holidays,
    parse_period,
)
from gateway.cli import main

UTC = timezone.utc
SPLIT = {d: [parse_period("09:00-12:00"), parse_period("13:00-18:00")] for d in ("mon", "tue", "wed", "thu", "fri")}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def shanghai(text: str) -> datetime:
    """A Shanghai wall time as UTC (UTC+8, no DST)."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC) - timedelta(hours=8)


def test_split_shift_is_closed_at_lunch_and_opens_after_it():
    cal = Calendar("desk", "Asia/Shanghai", SPLIT)
    assert cal.is_open(shanghai("2026-12-04T11:59"))  # a Friday
    assert not cal.is_open(shanghai("2026-12-04T12:30"))
    assert cal.next_open(shanghai("2026-12-04T12:30")) == shanghai("2026-12-04T13:00")
    assert cal.closed_since(shanghai("2026-12-04T12:30")) == shanghai("2026-12-04T12:00")
    assert cal.open_until(shanghai("2026-12-04T14:00")) == shanghai("2026-12-04T18:00")


def test_friday_evening_opens_on_monday_morning():
    cal = Calendar("desk", "Asia/Shanghai", SPLIT)
    assert cal.next_open(shanghai("2026-12-04T19:00")) == shanghai("2026-12-07T09:00")


def test_a_period_past_midnight_belongs_to_the_day_it_starts():
    cal = Calendar("night", "Asia/Shanghai", {"sat": [parse_period("22:00-02:00")]})
    assert cal.is_open(shanghai("2026-12-05T23:00"))  # Saturday night
    assert cal.is_open(shanghai("2026-12-06T01:59"))  # Sunday, the same shift
    assert not cal.is_open(shanghai("2026-12-06T02:00"))
    assert not cal.is_open(shanghai("2026-12-06T23:00"))  # Sunday has no shift
    assert cal.open_until(shanghai("2026-12-05T23:00")) == shanghai("2026-12-06T02:00")


def test_24h_is_always_open_and_never_closes():
    cal = Calendar("all", "Europe/Berlin", {d: [parse_period("24h")] for d in
                                             ("mon", "tue", "wed", "thu", "fri", "sat", "sun")})
    assert cal.always_open
    assert cal.is_open(utc("2026-03-29T01:30"))  # the night Berlin's clocks jump
    assert cal.open_until(utc("2026-03-29T01:30")) is None
    assert cal.business_seconds(utc("2026-03-28T00:00"), utc("2026-03-30T00:00")) == 2 * 86400


def test_chinese_holiday_is_closed_and_tiaoxiu_weekend_keeps_workday_hours():
    cal = Calendar("desk", "Asia/Shanghai", SPLIT, holidays=chinese_holidays())
    # 2026-10-01 (Thursday): National Day.
    assert chinese_calendar.get_holiday_detail(date(2026, 10, 1))[1] is not None
    assert not cal.is_open(shanghai("2026-10-01T10:00"))
    # 2026-02-14 is a Saturday and a 调休 working day: open with Monday's hours.
    assert date(2026, 2, 14).weekday() == 5 and chinese_calendar.is_workday(date(2026, 2, 14))
    assert cal.is_open(shanghai("2026-02-14T10:00"))
    assert not cal.is_open(shanghai("2026-02-14T12:30"))
    # An ordinary Saturday stays closed.
    assert not cal.is_open(shanghai("2026-12-05T10:00"))


def test_a_year_chinesecalendar_does_not_know_counts_as_ordinary_days_and_is_reported():
    source = chinese_holidays()
    cal = Calendar("desk", "Asia/Shanghai", SPLIT, holidays=source)
    assert cal.is_open(shanghai("2099-10-01T10:00"))  # a Thursday: weekly hours, no crash
    assert 2099 in source.unknown_years


def test_other_countries_come_from_the_holidays_package():
    cal = Calendar("us", "America/New_York", SPLIT, holidays=country_holidays("US"))
    assert not cal.is_open(utc("2026-11-26T15:00"))  # Thanksgiving, a Thursday, 10:00 in New York
    assert cal.is_open(utc("2026-11-25T15:00"))


def test_desk_closures_and_openings_override_the_week():
    cal = Calendar("desk", "Asia/Shanghai", SPLIT,
                   closures=[Closure(datetime(2026, 12, 24, 12, 0), datetime(2026, 12, 26, 0, 0))],
                   openings=[Opening(date(2026, 12, 27), (parse_period("10:00-16:00"),))])
    assert cal.is_open(shanghai("2026-12-24T11:00"))
    assert not cal.is_open(shanghai("2026-12-24T14:00"))
    assert not cal.is_open(shanghai("2026-12-25T10:00"))
    assert cal.next_open(shanghai("2026-12-24T14:00")) == shanghai("2026-12-27T10:00")  # a Sunday opening


def test_business_time_counts_only_open_hours():
    cal = Calendar("desk", "Asia/Shanghai", SPLIT)
    assert cal.business_seconds(shanghai("2026-12-04T00:00"), shanghai("2026-12-05T00:00")) == 8 * 3600
    # Friday 17:00 + 3 business hours: one on Friday, two on Monday.
    assert cal.add_business(shanghai("2026-12-04T17:00"), 3 * 3600) == shanghai("2026-12-07T11:00")


# --- properties --------------------------------------------------------------------

_periods = st.lists(st.tuples(st.integers(0, 23), st.sampled_from([0, 30]), st.integers(1, 16)), max_size=3)
_weeks = st.fixed_dictionaries({d: _periods for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")})
_moments = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2026, 12, 31)).map(
    lambda d: d.replace(tzinfo=UTC))


def _calendar(raw: dict[str, list[tuple[int, int, int]]], tz: str) -> Calendar:
    week = {}
    for day, periods in raw.items():
        week[day] = []
        for h, m, length in periods:
            start = time(h, m)
            end_min = (h * 60 + m + length * 30) % 1440
            week[day].append((start, time(end_min // 60, end_min % 60)))
    return Calendar("p", tz, week, holidays=chinese_holidays())


@settings(max_examples=150, deadline=None)
@given(_weeks, st.sampled_from(["Asia/Shanghai", "Europe/Berlin", "America/New_York"]), _moments)
def test_next_open_is_now_when_open_and_an_open_moment_after_it_when_closed(raw, tz, at):
    cal = _calendar(raw, tz)
    nxt = cal.next_open(at)
    if cal.is_open(at):
        assert nxt == at
    elif nxt is not None:
        assert nxt > at and cal.is_open(nxt)
        assert cal.business_seconds(at, nxt) == 0


@settings(max_examples=150, deadline=None)
@given(_weeks, st.sampled_from(["Asia/Shanghai", "Europe/Berlin"]), _moments,
       st.integers(1, 40 * 3600), st.integers(0, 10 * 86400))
def test_business_time_adds_up(raw, tz, start, secs, split):
    cal = _calendar(raw, tz)
    end = cal.add_business(start, secs)
    if end is None:
        assert not any(raw.values())
        return
    assert abs(cal.business_seconds(start, end) - secs) < 1e-6
    mid = start + timedelta(seconds=split)
    assert abs(cal.business_seconds(start, mid) + cal.business_seconds(mid, end) - cal.business_seconds(start, end)) < 1e-6 \
        or mid > end


# --- configuration -----------------------------------------------------------------


def _write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def test_calendar_config_errors_name_file_line_and_key(tmp_path, capsys):
    _write(tmp_path, "closures.toml", """\
        [[closed]]
        from = "2026-12-24T12:00"
        to = "2026-12-2x"
        """)
    cfg = _write(tmp_path, "gateway.toml", """\
        [calendars.desk]
        tz = "Asia/Shanghia"
        closures = "closures.toml"
        hours = {mon-fry = ["09:00-17:00"], tue = ["9:00-17:00"], wed = ["10:00-10:00"]}
        [channels.m]
        type = "mock"
        service = {calendar = "dsk"}
        """)
    assert main(["check-config", str(cfg)]) == 2
    out = capsys.readouterr().err
    assert f"{cfg}:2: calendars.desk.tz: expected an IANA time zone" in out
    assert f"{cfg}:4: calendars.desk.hours.mon-fry: expected a weekday" in out
    assert f"{cfg}:4: calendars.desk.hours.tue.0: expected a period as HH:MM-HH:MM" in out
    assert f"{cfg}:4: calendars.desk.hours.wed.0: a period must not start and end at the same time" in out
    assert f"{tmp_path / 'closures.toml'}:3: closed.0.to: expected a local date or date-time" in out
    assert f"{cfg}:7: channels.m.service.calendar: no [calendars.dsk]; defined: desk" in out


def test_a_year_chinesecalendar_does_not_know_is_a_warning_not_an_error(tmp_path, capsys):
    cfg = _write(tmp_path, "gateway.toml", """\
        [calendars.desk]
        holidays = "CN"
        hours = {mon-fri = ["09:00-18:00"]}
        """)
    this_year = datetime.now(UTC).year
    unknown = []
    for year in (this_year, this_year + 1):
        try:
            chinese_calendar.is_holiday(date(year, 1, 1))
        except NotImplementedError:
            unknown.append(year)
    assert main(["check-config", str(cfg)]) == 0
    err = capsys.readouterr().err
    config = load_config(cfg, PluginManager().channel_types)
    assert len(config.warnings) == len(unknown)
    for year in unknown:
        assert f"{cfg}:2: calendars.desk.holidays: chinesecalendar" in err and str(year) in err


def test_calendar_from_config_applies_the_closures_file(tmp_path):
    _write(tmp_path, "closures.toml", """\
        [[closed]]
        from = "2026-12-24T12:00"
        to = "2026-12-26"
        [[open]]
        date = "2026-12-27"
        hours = ["10:00-16:00"]
        """)
    cfg = _write(tmp_path, "gateway.toml", """\
        [calendars.desk]
        closures = "closures.toml"
        hours = {mon-fri = ["09:00-12:00", "13:00-18:00"], sat = ["22:00-02:00"]}
        """)
    config = load_config(cfg, PluginManager().channel_types)
    cal = calendar_from_config("desk", config.settings.calendars["desk"])
    assert not cal.is_open(shanghai("2026-12-24T14:00"))
    assert cal.next_open(shanghai("2026-12-24T14:00")) == shanghai("2026-12-26T22:00")
    assert cal.is_open(shanghai("2026-12-27T10:30"))
