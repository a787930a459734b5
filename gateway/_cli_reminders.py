"""``gateway reminders list | show | cancel | move``: the printing around
:class:`ReminderStore` (which decides nothing on its own: the server answers every race)."""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

from .core.bus.connection import Subjects
from .core.config import Config, seconds
from .core.errors import ReminderError
from .core.scheduling.store import ReminderStore
from .core.schema import Reminder, encode

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _store(nc: Any, config: Config) -> ReminderStore:
    return ReminderStore(nc, nc.jetstream(), Subjects(config.bus.prefix), keep_fired=config.reminders.keep_fired,
                         status_ttl=config.bus.status_max_age)


def _when(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _row(r: Reminder) -> dict[str, Any]:
    return {"id": r.id, "due_at": _when(r.due_at), "conversation": r.conversation, "channel": r.channel,
            "kind": "task" if r.task is not None else r.outbound.kind, "cancel_on_reply": r.cancel_on_reply,
            "deadline": _when(r.deadline) if r.deadline else None}


def parse_due(text: str, now: datetime | None = None) -> datetime:
    """``2026-12-01T08:00:00+08:00`` (RFC 3339) or a delay from now (``90s``, ``2h``, ``3d``)."""
    now = now or datetime.now(timezone.utc)
    if re.fullmatch(r"\d+(\.\d+)?(ms|s|m|h|d)", text):
        return now + timedelta(seconds=seconds(text))
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected an RFC 3339 time (2026-12-01T08:00:00+08:00) or a delay (90s, 2h, 3d), got {text!r}") \
            from None
    if at.tzinfo is None:
        raise ValueError(f"the time {text!r} has no UTC offset: add Z or +08:00")
    return at


async def run(nc: Any, config: Config, args: Any) -> int:
    """One ``gateway reminders`` action; the exit code (2: the request cannot be done as asked)."""
    try:
        return await _run(_store(nc, config), args)
    except ReminderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _history_line(st: Any) -> str:
    line = f"{_when(st.at)}  {st.state}"
    if st.reason:
        line += f" ({st.reason})"
    if st.error is not None:
        line += f": {st.error.message}"
    return line


async def _run(store: ReminderStore, args: Any) -> int:
    cmd = args.reminders_command
    if cmd == "list" and args.surveys:
        now = datetime.now(timezone.utc)
        surveys = [{"survey": p.outbound_id, "reminder_id": p.reminder_id, "conversation": p.conversation,
                    "channel": p.channel or None, "answer_until": _when(p.until),
                    "state": "awaiting_answer" if p.until > now else "unanswered"}
                   for p in await store.surveys()
                   if (args.channel is None or p.channel == args.channel)
                   and (args.conversation is None or p.conversation == args.conversation)]
        if args.json:
            print(json.dumps(surveys, indent=2, ensure_ascii=False))
        elif not surveys:
            print("no survey awaits an answer")
        else:
            for r in surveys:
                print(f"{r['survey']:<32} {r['state']:<16} until {r['answer_until']}  conv={r['conversation']}"
                      + (f"  reminder={r['reminder_id']}" if r["reminder_id"] else ""))
            print(f"{len(surveys)} awaiting an answer")
        return EXIT_OK
    if cmd == "list":
        rows = []
        filt = store.subjects.schedules_of_conversation(args.conversation) if args.conversation else None
        async for reminder, raw in store.pending(filt):
            if reminder is None:
                rows.append({"id": raw.subject.rsplit(".", 1)[-1], "error": "undecodable schedule"})
            elif args.channel is None or reminder.channel == args.channel:
                rows.append(_row(reminder))
        rows.sort(key=lambda r: r.get("due_at") or "")
        if args.json:
            print(json.dumps(rows, indent=2, ensure_ascii=False))
        elif not rows:
            print("no pending reminders")
        else:
            for r in rows:
                print(f"{r['id']:<32} due {r.get('due_at', '?')}  {r.get('kind', '?'):<8} channel={r.get('channel')} "
                      f"conv={r.get('conversation')}" + (f"  {r['error']}" if "error" in r else ""))
            print(f"{len(rows)} pending")
        return EXIT_OK
    if cmd == "show":
        found = await store.get(args.id, args.conversation)
        if found is None:
            history = await store.history(args.id, args.conversation)
            if not history:
                print(f"no pending reminder {args.id!r} and no status of it (unknown, or older than the statuses kept)",
                      file=sys.stderr)
                return EXIT_FAIL
            print(f"reminder {args.id!r} is not pending; its statuses:", file=sys.stderr)
            for st in history:
                print(_history_line(st), file=sys.stderr)
            return EXIT_FAIL
        print(json.dumps(json.loads(encode(found[0])), indent=2, ensure_ascii=False))
        return EXIT_OK
    if cmd == "cancel":
        cancelled = await store.cancel(args.id, reason=args.reason, conversation=args.conversation)
        if cancelled is None:
            print(f"no pending reminder {args.id!r} (fired, cancelled or unknown): nothing cancelled", file=sys.stderr)
            return EXIT_FAIL
        print(f"cancelled {args.id} (was due {_when(cancelled.due_at)})")
        return EXIT_OK
    if cmd == "move":
        try:
            due = datetime.now(timezone.utc) if args.now else parse_due(args.to)
        except ValueError as exc:
            print(f"error: --to: {exc}", file=sys.stderr)
            return EXIT_USAGE
        moved = await store.move(args.id, due, reason=args.reason, conversation=args.conversation, allow_past=args.now)
        if moved is None:
            print(f"no pending reminder {args.id!r} (fired, cancelled or unknown): nothing moved", file=sys.stderr)
            return EXIT_FAIL
        print(f"moved {args.id} to {_when(due)} (the gateway re-checks quiet hours and reach: see its statuses)")
        return EXIT_OK
    return EXIT_USAGE
