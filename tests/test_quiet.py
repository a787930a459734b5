"""Quiet hours in the customer's time zone (gateway.quiet_until): windows across midnight,
the days the clocks change, and clear errors for unusable settings."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from gateway import QuietHours, check_quiet_hours, quiet_until

SH = ZoneInfo("Asia/Shanghai")
NY = ZoneInfo("America/New_York")


def local(tz: ZoneInfo, *args: int) -> datetime:
    return datetime(*args, tzinfo=tz)


def test_inside_a_window_across_midnight_ends_at_the_next_morning():
    q = QuietHours(start="22:00", end="08:00", tz="Asia/Shanghai")
    assert quiet_until(q, local(SH, 2026, 12, 2, 23, 30)) == local(SH, 2026, 12, 3, 8, 0)
    assert quiet_until(q, local(SH, 2026, 12, 3, 7, 59)) == local(SH, 2026, 12, 3, 8, 0)
    assert quiet_until(q, local(SH, 2026, 12, 3, 22, 0)) == local(SH, 2026, 12, 4, 8, 0)


def test_outside_the_window_is_allowed():
    q = QuietHours(start="22:00", end="08:00", tz="Asia/Shanghai")
    assert quiet_until(q, local(SH, 2026, 12, 3, 8, 0)) is None
    assert quiet_until(q, local(SH, 2026, 12, 3, 21, 59)) is None
    assert quiet_until(None, local(SH, 2026, 12, 3, 23, 0)) is None
    assert quiet_until(QuietHours(start="09:00", end="09:00"), local(SH, 2026, 12, 3, 9, 0)) is None


def test_a_daytime_window_and_the_result_is_utc():
    q = QuietHours(start="12:00", end="13:30", tz="Asia/Shanghai")
    end = quiet_until(q, datetime(2026, 12, 3, 4, 15, tzinfo=timezone.utc))  # 12:15 in Shanghai
    assert end == datetime(2026, 12, 3, 5, 30, tzinfo=timezone.utc) and end.tzinfo == timezone.utc


def test_the_customer_zone_decides_not_the_server_zone():
    q = QuietHours(start="21:00", end="09:00", tz="America/New_York")
    # 14:00 UTC is 22:00 in Shanghai but 09:00 in New York (EST): allowed for this customer.
    assert quiet_until(q, datetime(2026, 12, 3, 14, 0, tzinfo=timezone.utc)) is None
    assert quiet_until(q, datetime(2026, 12, 3, 13, 59, tzinfo=timezone.utc)) == local(NY, 2026, 12, 3, 9, 0)


def test_the_night_the_clocks_go_forward_ends_at_local_morning():
    # 2026-03-08 02:00 EST jumps to 03:00 EDT: the night is an hour shorter in UTC.
    q = QuietHours(start="22:00", end="08:00", tz="America/New_York")
    end = quiet_until(q, local(NY, 2026, 3, 7, 23, 0))
    assert end == local(NY, 2026, 3, 8, 8, 0)
    assert end.astimezone(timezone.utc) == datetime(2026, 3, 8, 12, 0, tzinfo=timezone.utc)


def test_the_night_the_clocks_go_back_ends_at_local_morning():
    q = QuietHours(start="22:00", end="08:00", tz="America/New_York")
    end = quiet_until(q, local(NY, 2026, 10, 31, 23, 0))
    assert end.astimezone(timezone.utc) == datetime(2026, 11, 1, 13, 0, tzinfo=timezone.utc)


def test_an_end_inside_the_skipped_hour_ends_when_the_clocks_jump():
    # 2026-03-08: 01:59:59 EST is followed by 03:00 EDT; 02:30 never happens. The quiet
    # hours are over at 03:00 EDT (the first instant whose wall clock is past 02:30), not
    # an hour later at 03:30 EDT.
    q = QuietHours(start="01:00", end="02:30", tz="America/New_York")
    end = quiet_until(q, local(NY, 2026, 3, 8, 1, 30))
    assert end == datetime(2026, 3, 8, 7, 0, tzinfo=timezone.utc)  # 03:00 EDT
    assert quiet_until(q, end) is None
    assert quiet_until(q, end - timedelta(seconds=1)) == end  # 01:59:59 EST: still quiet


def test_a_window_across_midnight_ending_in_the_skipped_hour_ends_at_the_jump():
    q = QuietHours(start="22:00", end="02:30", tz="America/New_York")
    assert quiet_until(q, local(NY, 2026, 3, 7, 23, 0)) == datetime(2026, 3, 8, 7, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("field, value, expected", [
    ("start", "9:00", "quiet hours start must be a time of day as HH:MM"),
    ("end", "24:00", "quiet hours end must be a time of day as HH:MM"),
    ("tz", "Mars/Olympus", "quiet hours tz must be an IANA time zone"),
])
def test_unusable_settings_are_named(field, value, expected):
    with pytest.raises(ValueError, match=expected):
        check_quiet_hours(QuietHours(**{field: value}))
