"""The report's arithmetic on a known set of records: counts, first-response percentiles in
wall time and business hours, survey shares, SLA and follow-up figures, grouping by day in
a time zone, and every output format carrying the same numbers."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone

from gateway import Calendar, parse_period
from gateway.report import (
    FollowupRecord,
    InboundRecord,
    Records,
    ReplyRecord,
    SlaRecord,
    compute,
    parse_when,
    percentile,
    render_csv,
    render_json,
    render_table,
)

UTC = timezone.utc
DESK = Calendar("desk", "Asia/Shanghai", {d: [parse_period("09:00-18:00")] for d in ("mon", "tue", "wed", "thu", "fri")})


def sh(text: str) -> datetime:
    """Shanghai wall time → UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC) - timedelta(hours=8)


def records() -> Records:
    r = Records()
    r.inbound = [
        InboundRecord(sh("2026-12-04T09:00"), "demo", "a", False),
        InboundRecord(sh("2026-12-04T12:00"), "demo", "c", False),
        InboundRecord(sh("2026-12-04T17:00"), "demo", "b", False),
        InboundRecord(sh("2026-12-04T17:30"), "demo", "b", False, ("满意",)),
        InboundRecord(sh("2026-12-04T18:00"), "demo", "d", False),
        InboundRecord(sh("2026-12-04T19:00"), "demo", "e", True),  # an auto-reply
        InboundRecord(sh("2026-12-07T09:30"), "demo", "a", False, ("满意",)),
        InboundRecord(sh("2026-12-07T09:40"), "demo", "c", False, ("一般",)),
    ]
    r.replies = [
        ReplyRecord(sh("2026-12-04T10:00"), "demo", "a", "r-a"),
        ReplyRecord(sh("2026-12-04T12:30"), "demo", "c", "r-c"),
        ReplyRecord(sh("2026-12-04T18:30"), "demo", "d", "desk-ack-d-1"),  # the desk's own: not a response
        ReplyRecord(sh("2026-12-07T10:00"), "demo", "b", "r-b"),
    ]
    r.sla = [SlaRecord(sh("2026-12-05T10:00"), "demo", "d", "first_response", "warning"),
             SlaRecord(sh("2026-12-06T10:00"), "demo", "d", "first_response", "breach")]
    r.followups = [
        FollowupRecord("demo", "a", sh("2026-12-04T11:00"), sh("2026-12-07T11:00"), "answered"),
        FollowupRecord("demo", "c", sh("2026-12-04T13:00"), sh("2026-12-07T13:00"), "missed"),
        FollowupRecord("demo", "b", sh("2026-12-04T13:00"), sh("2026-12-07T13:00"), "cancelled"),
        FollowupRecord("demo", "z", sh("2026-11-01T13:00"), sh("2026-11-04T13:00"), "missed"),  # due before the period
    ]
    return r


def test_totals_percentiles_shares_sla_and_followups_of_a_known_week():
    rep = compute(records(), since=sh("2026-12-01T00:00"), until=sh("2026-12-08T00:00"), by="channel",
                  calendars={"demo": DESK})
    t = rep["total"]
    assert (t["inbound"], t["inbound_human"], t["inbound_auto"], t["conversations"]) == (8, 7, 1, 5)
    assert (t["replies"], t["replies_backend"], t["replies_auto"]) == (4, 3, 1)
    fr = t["first_response"]
    # a: 1 h; c: 30 min; b: Friday 17:00 → Monday 10:00 = 65 h wall, 2 business hours; d: unanswered.
    assert (fr["count"], fr["unanswered"]) == (3, 1)
    assert (fr["median_s"], fr["p90_s"]) == (3600, 65 * 3600)
    assert (fr["median_business_s"], fr["p90_business_s"]) == (3600, 7200)
    assert t["sla"] == {"warning": 1, "breach": 1}
    assert t["followups"] == {"due": 2, "sent": 1, "answered": 1, "missed": 1, "missed_conversations": ["c"]}
    assert t["survey"] == {"满意": {"count": 2, "share": 0.6667}, "一般": {"count": 1, "share": 0.3333}}
    assert [g["key"] for g in rep["groups"]] == ["demo"]


def test_grouping_by_day_uses_the_time_zone():
    rep = compute(records(), since=sh("2026-12-01T00:00"), until=sh("2026-12-08T00:00"), by="day", tz="Asia/Shanghai")
    days = {g["key"]: g for g in rep["groups"]}
    assert sorted(days) == ["2026-12-04", "2026-12-05", "2026-12-06", "2026-12-07"]
    assert days["2026-12-04"]["inbound"] == 6 and days["2026-12-07"]["inbound"] == 2
    assert days["2026-12-05"]["sla"]["warning"] == 1 and days["2026-12-06"]["sla"]["breach"] == 1
    assert days["2026-12-07"]["followups"]["due"] == 2
    # The first responses belong to the day of the message answered.
    assert days["2026-12-04"]["first_response"]["count"] == 3


def test_the_period_excludes_its_end_and_what_came_before():
    rep = compute(records(), since=sh("2026-12-04T12:00"), until=sh("2026-12-07T09:30"))
    assert rep["total"]["inbound"] == 5  # 12:00 … 19:00 on Friday; Monday 09:30 is the end, excluded


def test_every_format_carries_the_same_numbers():
    rep = compute(records(), since=sh("2026-12-01T00:00"), until=sh("2026-12-08T00:00"), calendars={"demo": DESK})
    assert json.loads(render_json(rep)) == rep
    rows = list(csv.DictReader(io.StringIO(render_csv(rep))))
    total = rows[-1]
    assert (total["channel"], total["inbound"], total["first_response.p90_business_s"], total["survey:满意"]) == \
        ("total", "8", "7200.0", "2")
    table = render_table(rep)
    assert "2d17h" in table  # the 65 h p90
    assert "满意 2 (67%)" in table and "follow-ups missed: c" in table


def test_percentile_is_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([5], 0.9) == 5
    assert percentile(list(range(1, 11)), 0.9) == 9
    assert percentile(list(range(1, 11)), 0.5) == 5


def test_periods_are_read_as_durations_dates_or_times():
    now = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    assert parse_when("7d", now) == now - timedelta(days=7)
    assert parse_when("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_when("2026-12-01T08:00:00+08:00", now) == datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
