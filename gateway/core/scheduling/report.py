"""The desk's contact statistics (``gateway report``): computed from what the bus streams
hold, as plain data, then rendered as a table, JSON, CSV or one self-contained HTML page.

Reading (:func:`load`) is separate from counting (:func:`compute`, a pure function of the
records, the period and the calendars), so the numbers can be checked without a bus."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo

import msgspec
import nats.errors
from nats.js import api

from ..schema import (
    ChoicePart,
    followup_status_decoder,
    message_decoder,
    sla_event_decoder,
    status_decoder,
)
from .calendar import Calendar
from .desk import ACK_PREFIX

By = Literal["channel", "day", "week", "month"]


@dataclass(frozen=True)
class InboundRecord:
    """A customer message, as the report needs it."""

    at: datetime
    channel: str
    conversation: str
    auto: bool
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplyRecord:
    """An outbound's first ``sent`` status."""

    at: datetime
    channel: str
    conversation: str
    outbound_id: str

    @property
    def auto(self) -> bool:
        """The desk's own acknowledgement (everything else came from a backend)."""
        return self.outbound_id.startswith(ACK_PREFIX)


@dataclass(frozen=True)
class SlaRecord:
    at: datetime
    channel: str
    conversation: str
    rule: str
    state: str


@dataclass(frozen=True)
class FollowupRecord:
    """The latest state of one follow-up promise."""

    channel: str
    conversation: str
    resolved_at: datetime
    due_by: datetime
    state: str


@dataclass
class Records:
    """Everything the report counts."""

    inbound: list[InboundRecord] = field(default_factory=list)
    replies: list[ReplyRecord] = field(default_factory=list)
    sla: list[SlaRecord] = field(default_factory=list)
    followups: list[FollowupRecord] = field(default_factory=list)


# --- reading -----------------------------------------------------------------------------


async def _read(js: Any, stream: str, subject: str, since: datetime) -> list[Any]:
    """Every message of ``subject`` stored since ``since`` (an ordered consumer, no state
    left on the server)."""
    try:
        info = await js.stream_info(stream)
    except Exception:
        return []
    if not info.state.messages:
        return []
    start = since.astimezone(timezone.utc)
    sub = await js.subscribe(subject, ordered_consumer=True, stream=stream,
                             config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME,
                                                       opt_start_time=start))
    out = []
    try:
        while True:
            try:
                m = await sub.next_msg(timeout=2)
            except nats.errors.TimeoutError:
                break
            out.append(m)
            if m.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


async def load(js: Any, prefix: str, since: datetime) -> Records:
    """Read the inbound messages, statuses and desk events stored since ``since``."""
    up = prefix.upper().replace("-", "_")
    rec = Records()
    for m in await _read(js, f"{up}_IN", f"{prefix}.in.>", since):
        try:
            msg = message_decoder.decode(m.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        rec.inbound.append(InboundRecord(msg.received_at, msg.channel, msg.conversation, msg.auto,
                                         tuple(p.choice for p in msg.parts if isinstance(p, ChoicePart))))
    seen: set[str] = set()
    for m in await _read(js, f"{up}_STATUS", f"{prefix}.status.>", since):
        try:
            st = status_decoder.decode(m.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if st.state == "sent" and st.outbound_id not in seen:
            seen.add(st.outbound_id)
            rec.replies.append(ReplyRecord(st.at, st.channel, st.conversation, st.outbound_id))
    latest: dict[tuple[str, datetime], FollowupRecord] = {}
    for m in await _read(js, f"{up}_DESK", f"{prefix}.sla.>", since):
        try:
            ev = sla_event_decoder.decode(m.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        rec.sla.append(SlaRecord(ev.at, ev.channel, ev.conversation, ev.rule, ev.state))
    # Follow-ups resolved before ``since`` may fall due inside the period: read a month more.
    for m in await _read(js, f"{up}_DESK", f"{prefix}.desk.followup.>", since - timedelta(days=31)):
        try:
            fu = followup_status_decoder.decode(m.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        latest[(fu.conversation, fu.resolved_at)] = FollowupRecord(fu.channel, fu.conversation, fu.resolved_at,
                                                                   fu.due_by, fu.state)
    rec.followups = list(latest.values())
    return rec


# --- counting ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1): the smallest value with at least ``q`` of
    all values at or below it; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def group_key(at: datetime, channel: str, by: By, tz: ZoneInfo) -> str:
    """The group of a record: its channel, or its local day, ISO week or month."""
    if by == "channel":
        return channel
    local = at.astimezone(tz).date()
    if by == "day":
        return local.isoformat()
    if by == "week":
        y, w, _ = local.isocalendar()
        return f"{y}-W{w:02d}"
    return f"{local.year}-{local.month:02d}"


def _empty() -> dict[str, Any]:
    return {"inbound": 0, "inbound_auto": 0, "inbound_human": 0, "conversations": 0, "replies": 0,
            "replies_auto": 0, "replies_backend": 0,
            "first_response": {"count": 0, "unanswered": 0, "median_s": None, "p90_s": None,
                               "median_business_s": None, "p90_business_s": None},
            "sla": {"warning": 0, "breach": 0},
            "followups": {"due": 0, "sent": 0, "answered": 0, "missed": 0, "missed_conversations": []},
            "survey": {}}


def compute(records: Records, *, since: datetime, until: datetime, by: By = "channel", tz: str = "UTC",
            calendars: Mapping[str, Calendar] | None = None) -> dict[str, Any]:
    """The statistics of ``[since, until)``, grouped ``by`` (days, weeks and months in ``tz``).

    ``calendars`` maps a channel to its calendar, for first-response times in business
    hours. A conversation's first response is the first ``sent`` of a backend's reply after
    its first human message in the period (in that message's group)."""
    zone = ZoneInfo(tz)
    calendars = calendars or {}
    groups: dict[str, dict[str, Any]] = {}
    total = _empty()
    wall: dict[str, list[float]] = {}
    business: dict[str, list[float]] = {}
    conversations: dict[str, set[str]] = {}

    def inside(at: datetime) -> bool:
        return since <= at < until

    def bucket(key: str) -> dict[str, Any]:
        return groups.setdefault(key, _empty())

    replies_by_conv: dict[str, list[ReplyRecord]] = {}
    for r in sorted(records.replies, key=lambda r: r.at):
        if not r.auto:
            replies_by_conv.setdefault(r.conversation, []).append(r)
        if inside(r.at):
            for b in (bucket(group_key(r.at, r.channel, by, zone)), total):
                b["replies"] += 1
                b["replies_auto" if r.auto else "replies_backend"] += 1
    first_seen: set[str] = set()
    for m in sorted(records.inbound, key=lambda m: m.at):
        if not inside(m.at):
            continue
        key = group_key(m.at, m.channel, by, zone)
        for b, name in ((bucket(key), key), (total, "")):
            b["inbound"] += 1
            b["inbound_auto" if m.auto else "inbound_human"] += 1
            conversations.setdefault(name, set()).add(m.conversation)
            for choice in m.choices:
                b["survey"][choice] = b["survey"].get(choice, 0) + 1
        if m.auto or m.conversation in first_seen:
            continue
        first_seen.add(m.conversation)
        reply = next((r for r in replies_by_conv.get(m.conversation, []) if r.at >= m.at), None)
        for b, name in ((bucket(key), key), (total, "")):
            if reply is None:
                b["first_response"]["unanswered"] += 1
                continue
            wall.setdefault(name, []).append((reply.at - m.at).total_seconds())
            cal = calendars.get(m.channel)
            if cal is not None:
                business.setdefault(name, []).append(cal.business_seconds(m.at, reply.at))
    for e in records.sla:
        if inside(e.at) and e.state in ("warning", "breach"):
            for b in (bucket(group_key(e.at, e.channel, by, zone)), total):
                b["sla"][e.state] += 1
    for f in records.followups:
        if not inside(f.due_by) or f.state == "cancelled":
            continue
        for b in (bucket(group_key(f.due_by, f.channel, by, zone)), total):
            fu = b["followups"]
            fu["due"] += 1
            if f.state in ("sent", "answered"):
                fu["sent"] += 1
            if f.state == "answered":
                fu["answered"] += 1
            if f.state in ("missed", "failed", "expired"):
                fu["missed"] += 1
                fu["missed_conversations"].append(f.conversation)
    for name, b in [*groups.items(), ("", total)]:
        b["conversations"] = len(conversations.get(name, ()))
        fr = b["first_response"]
        fr["count"] = len(wall.get(name, []))
        fr["median_s"], fr["p90_s"] = percentile(wall.get(name, []), 0.5), percentile(wall.get(name, []), 0.9)
        fr["median_business_s"] = percentile(business.get(name, []), 0.5)
        fr["p90_business_s"] = percentile(business.get(name, []), 0.9)
        answers = sum(b["survey"].values())
        b["survey"] = {c: {"count": n, "share": round(n / answers, 4)} for c, n in sorted(b["survey"].items(),
                                                                                       key=lambda kv: -kv[1])}
        b["followups"]["missed_conversations"].sort()
    return {"since": _iso(since), "until": _iso(until), "by": by, "tz": tz,
            "groups": [{"key": k, **groups[k]} for k in sorted(groups)], "total": total}


def _iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- rendering ---------------------------------------------------------------------------

COLUMNS: list[tuple[str, str]] = [
    ("inbound", "inbound"), ("inbound_human", "from customers"), ("inbound_auto", "automatic in"),
    ("conversations", "conversations"), ("replies", "replies"), ("replies_backend", "from backends"),
    ("replies_auto", "automatic out"), ("first_response.count", "first responses"),
    ("first_response.unanswered", "unanswered"), ("first_response.median_s", "FRT median"),
    ("first_response.p90_s", "FRT p90"), ("first_response.median_business_s", "FRT median (business)"),
    ("first_response.p90_business_s", "FRT p90 (business)"), ("sla.warning", "SLA warnings"),
    ("sla.breach", "SLA breaches"), ("followups.due", "follow-ups due"), ("followups.sent", "follow-ups sent"),
    ("followups.answered", "follow-ups answered"), ("followups.missed", "follow-ups missed"),
]


def _get(row: Mapping[str, Any], path: str) -> Any:
    value: Any = row
    for p in path.split("."):
        value = value[p]
    return value


def duration_text(secs: float | None) -> str:
    """``5400`` → ``1h30m``; None → ``-``."""
    if secs is None:
        return "-"
    s = int(round(secs))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s and not d else ""]
    return "".join(parts) or "0s"


def _cell(path: str, value: Any) -> str:
    return duration_text(value) if path.endswith("_s") else str(value)


def render_table(report: Mapping[str, Any]) -> str:
    """A plain-text table, one row per group and the total, then survey answers and the
    missed follow-ups."""
    rows = [*report["groups"], {"key": "total", **report["total"]}]
    header = [report["by"], *(label for _, label in COLUMNS)]
    body = [[str(r["key"]), *(_cell(p, _get(r, p)) for p, _ in COLUMNS)] for r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = [f"{report['since']} … {report['until']} ({report['tz']})",
             "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in body]
    survey = report["total"]["survey"]
    if survey:
        lines.append("survey answers: " + ", ".join(f"{c} {v['count']} ({v['share']:.0%})" for c, v in survey.items()))
    missed = report["total"]["followups"]["missed_conversations"]
    if missed:
        lines.append("follow-ups missed: " + ", ".join(missed))
    return "\n".join(lines) + "\n"


def render_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, ensure_ascii=False, indent=2) + "\n"


def render_csv(report: Mapping[str, Any]) -> str:
    """One row per group and one for the total; survey answers as ``survey:<choice>`` columns."""
    rows = [*report["groups"], {"key": "total", **report["total"]}]
    choices = list(report["total"]["survey"])
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow([report["by"], *(p for p, _ in COLUMNS), *(f"survey:{c}" for c in choices)])
    for r in rows:
        w.writerow([r["key"], *("" if _get(r, p) is None else _get(r, p) for p, _ in COLUMNS),
                    *(r["survey"].get(c, {}).get("count", 0) for c in choices)])
    return out.getvalue()


def _bars(title: str, chart_id: str, items: Sequence[tuple[str, float, str]]) -> str:
    """A horizontal bar chart as inline SVG: (label, value, shown text) per bar."""
    width, bar_h, label_w = 640, 22, 160
    top = max((v for _, v, _ in items), default=0) or 1
    h = bar_h * max(1, len(items)) + 10
    rows = []
    for i, (label, value, text) in enumerate(items):
        y = 5 + i * bar_h
        w = (width - label_w - 90) * value / top
        rows.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>'
                    f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{bar_h - 6}" fill="#3b82f6">'
                    f'<title>{html.escape(label)}: {html.escape(text)}</title></rect>'
                    f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" data-label="{html.escape(label)}" '
                    f'class="value">{html.escape(text)}</text>')
    return (f'<figure id="{chart_id}"><figcaption>{html.escape(title)}</figcaption>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" role="img" '
            f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="13">{"".join(rows)}</svg></figure>')


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained page (no script, no external resource): the table, and bar charts
    of inbound messages, first-response medians and survey answers."""
    rows = [*report["groups"], {"key": "total", **report["total"]}]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    body = "".join(
        f'<tr data-key="{html.escape(str(r["key"]))}"><th>{html.escape(str(r["key"]))}</th>'
        + "".join(f'<td data-col="{p}">{html.escape(_cell(p, _get(r, p)))}</td>' for p, _ in COLUMNS) + "</tr>"
        for r in rows)
    groups = report["groups"]
    charts = [
        _bars("Inbound messages", "chart-inbound", [(g["key"], g["inbound"], str(g["inbound"])) for g in groups]),
        _bars("First response, median", "chart-frt",
              [(g["key"], g["first_response"]["median_s"] or 0, duration_text(g["first_response"]["median_s"]))
               for g in groups]),
    ]
    survey = report["total"]["survey"]
    if survey:
        charts.append(_bars("Survey answers", "chart-survey",
                            [(c, v["count"], f"{v['count']} ({v['share']:.0%})") for c, v in survey.items()]))
    missed = report["total"]["followups"]["missed_conversations"]
    missed_html = ("<h2>Follow-ups missed</h2><ul id=\"missed\">" + "".join(f"<li>{html.escape(c)}</li>" for c in missed)
                   + "</ul>") if missed else ""
    title = f"Contact statistics {report['since']} … {report['until']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<style>
body {{ font-family: sans-serif; margin: 2em; color: #111; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 6px; text-align: right; }}
thead th {{ background: #f3f4f6; }}
tbody th {{ text-align: left; }}
figure {{ margin: 1.5em 0; }}
figcaption {{ font-weight: bold; margin-bottom: .3em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Grouped by {html.escape(report['by'])}, times in {html.escape(report['tz'])}; first-response times (FRT) are
nearest-rank percentiles.</p>
<table id="stats"><thead><tr><th>{html.escape(report['by'])}</th>{head}</tr></thead><tbody>{body}</tbody></table>
{''.join(charts)}
{missed_html}
</body></html>
"""


RENDERERS = {"table": render_table, "json": render_json, "csv": render_csv, "html": render_html}


def parse_when(text: str, now: datetime) -> datetime:
    """``7d``/``12h`` before ``now``, a date (``2026-12-01``, UTC midnight) or an RFC 3339 time."""
    import re

    m = re.fullmatch(r"(\d+)([dhm])", text)
    if m:
        return now - timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]: int(m.group(1))})
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=timezone.utc)
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected a period such as 7d or 12h, a date (2026-12-01) or an RFC 3339 time, got {text!r}") \
            from None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)
