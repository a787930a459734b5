"""The rules of reminders, as pure functions (no bus, no clock of their own): what makes a
reminder valid, when it may be sent (due time, deadline, quiet hours) and which fallback a
channel's reach leaves. The store checks them before it publishes (so the caller hears
the problem), the scheduler again when a schedule arrives and when it fires (a backend in
another language publishes without the store)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec

from ..errors import ReminderError
from ..schema import CONVERSATION_PATTERN, REMINDER_ID_PATTERN, QuietHours, Reminder
from .quiet import check_quiet_hours, quiet_until

REMINDER_ID = re.compile(REMINDER_ID_PATTERN)
CONVERSATION = re.compile(CONVERSATION_PATTERN)

PAST_SLACK = timedelta(seconds=5)
"""A due time this far in the past still counts as "now" (the caller's clock, the trip to
the server); further back it is refused unless asked for explicitly."""


class Unsendable(Exception):
    """The reminder cannot be sent: ``code`` is the status reason (a reach code such as
    ``outside_window``, or ``invalid_quiet_hours``)."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def utc(at: datetime) -> datetime:
    """``at`` in UTC (a naive time is taken as UTC): what the bus carries (docs/bus-contract.md)."""
    if at.tzinfo is None:
        return at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc)


def in_utc(reminder: Reminder) -> Reminder:
    """The reminder with every time in UTC, whatever offset the caller gave: bodies and
    statuses say ``Z``."""
    changes: dict[str, Any] = {"due_at": utc(reminder.due_at)}
    if reminder.deadline is not None:
        changes["deadline"] = utc(reminder.deadline)
    if reminder.created_at is not None:
        changes["created_at"] = utc(reminder.created_at)
    if reminder.outbound.created_at is not None:
        changes["outbound"] = msgspec.structs.replace(reminder.outbound, created_at=utc(reminder.outbound.created_at))
    return msgspec.structs.replace(reminder, **changes)


def check_quiet(quiet: QuietHours | None) -> None:
    """Raise :class:`ReminderError` naming the field when ``quiet`` is unusable."""
    if quiet is None:
        return
    try:
        check_quiet_hours(quiet)
    except ValueError as exc:
        raise ReminderError(str(exc)) from None


def check_reminder(reminder: Reminder) -> None:
    """Raise :class:`ReminderError` for what would break its subject or can never fire."""
    if not REMINDER_ID.match(reminder.id):
        raise ReminderError("reminder id must be 1 to 128 characters of A-Z a-z 0-9 - _ = (it is a subject token)")
    if not CONVERSATION.match(reminder.conversation):
        raise ReminderError("reminder conversation is not a gateway conversation key (<channel>.<key>)")
    if reminder.deadline is not None and reminder.due_at > reminder.deadline:
        raise ReminderError(f"reminder due_at {_z(reminder.due_at)} is after its deadline {_z(reminder.deadline)}")
    check_quiet(reminder.quiet_hours)


def check_move(reminder: Reminder, due_at: datetime, now: datetime, *, allow_past: bool = False) -> None:
    """Raise :class:`ReminderError` when ``reminder`` cannot be moved to ``due_at``: after
    its deadline, or in the past (where it would fire at once without a word) unless
    ``allow_past``."""
    if reminder.deadline is not None and due_at > reminder.deadline:
        raise ReminderError(f"cannot move reminder {reminder.id!r} to {_z(due_at)}: after its deadline "
                            f"{_z(reminder.deadline)}")
    if not allow_past and due_at < now - PAST_SLACK:
        raise ReminderError(f"cannot move reminder {reminder.id!r} to {_z(due_at)}: that is in the past "
                            f"(now {_z(now)}); to send it now, move it to now")


def header_due(value: str | None) -> datetime | None:
    """The time of a ``Nats-Schedule: @at <RFC 3339>`` header, or None if it is not one."""
    if not value or not value.startswith("@at "):
        return None
    try:
        at = datetime.fromisoformat(value[4:].strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return utc(at)


def check_header(reminder: Reminder, schedule_header: str | None) -> None:
    """The server fires at the header's ``@at``: a body whose ``due_at`` says otherwise
    would report one time and fire at another, so it is refused."""
    at = header_due(schedule_header)
    if at is None:
        raise ReminderError(f"Nats-Schedule header must be '@at <RFC 3339 time>', got {schedule_header!r}")
    if at != utc(reminder.due_at):
        raise ReminderError(f"body due_at {_z(reminder.due_at)} differs from the Nats-Schedule header's @at {_z(at)} "
                            "(the server fires at the header): publish both with the same time")


def next_allowed(quiet: QuietHours | None, at: datetime) -> datetime | None:
    """When the reminder may go instead of ``at`` (the end of the quiet hours), or None if
    ``at`` is allowed; :class:`Unsendable` (``invalid_quiet_hours``) if ``quiet`` is unusable."""
    try:
        return quiet_until(quiet, at)
    except ValueError as exc:
        raise Unsendable("invalid_quiet_hours", str(exc)) from None


def past_deadline(reminder: Reminder, at: datetime) -> bool:
    """True if sending at ``at`` would be after the reminder's deadline."""
    return reminder.deadline is not None and at > reminder.deadline


def choose_fallback(reminder: Reminder, code: str, detail: str, template_allowed: bool) -> str:
    """The channel cannot send the reminder as is (reach ``code``): ``"template"`` or
    ``"conversation"``, the fallback to use; :class:`Unsendable` when there is none."""
    fb = reminder.fallback
    has_template = (fb is not None and fb.template is not None) or reminder.outbound.template is not None
    if template_allowed and has_template:
        return "template"
    if fb is not None and fb.conversation:
        return "conversation"
    raise Unsendable(code, detail)


def _z(at: datetime) -> str:
    return utc(at).strftime("%Y-%m-%dT%H:%M:%SZ")
