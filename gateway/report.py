"""Contact statistics of the service desk, as data (``gateway report`` prints them):
:func:`load` reads a period from the bus, :func:`compute` counts it, the ``render_*``
functions turn the result into a table, JSON, CSV or one self-contained HTML page."""

from __future__ import annotations

from .core.scheduling.report import (
    FollowupRecord,
    InboundRecord,
    Records,
    ReplyRecord,
    SlaRecord,
    compute,
    duration_text,
    load,
    parse_when,
    percentile,
    render_csv,
    render_html,
    render_json,
    render_table,
)

__all__ = [
    "FollowupRecord",
    "InboundRecord",
    "Records",
    "ReplyRecord",
    "SlaRecord",
    "compute",
    "duration_text",
    "load",
    "parse_when",
    "percentile",
    "render_csv",
    "render_html",
    "render_json",
    "render_table",
]
