"""``gateway dlq list | replay | purge``: the printing and the confirmation prompt around
the data functions of :mod:`gateway.core.delivery.dlq`."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

from .core.delivery import dlq as _dlq
from .core.bus.connection import Subjects
from .core.config import Config
from .core.schema import encode


def _age(at: datetime) -> str:
    s = int((datetime.now(timezone.utc) - at).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _row(entry: _dlq.DeadLetterEntry, show_body: bool) -> dict[str, Any]:
    seq, subject, dl = entry
    row: dict[str, Any] = {"seq": seq, "subject": subject}
    if dl is None:
        row["error"] = "undecodable dead letter"
        return row
    row.update(id=dl.id, conversation=dl.outbound.conversation if dl.outbound else None, reason=dl.reason,
               attempts=dl.attempts, age=_age(dl.at))
    if show_body:
        row["body"] = json.loads(encode(dl.outbound)) if dl.outbound else (dl.payload or b"").decode("utf-8", "replace")
    return row


async def run(nc: Any, config: Config, args: Any) -> int:
    js = nc.jetstream()
    subjects = Subjects(config.bus.prefix)
    if args.dlq_command == "list":
        return _list(await _dlq.dead_letters(js, subjects, args.channel), args)
    if args.dlq_command == "replay":
        return await _replay(js, subjects, args)
    if args.dlq_command == "purge":
        return await _purge(js, subjects, args)
    return 2


def _list(items: list[_dlq.DeadLetterEntry], args: Any) -> int:
    rows = [_row(e, args.show_body) for e in items]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    elif not rows:
        print("no dead letters")
    else:
        for r in rows:
            print(f"{r.get('id', '?'):<34} {r['subject'].split('.', 2)[-1]:<24} conv={r.get('conversation')} "
                  f"attempts={r.get('attempts')} age={r.get('age')} reason={r.get('reason') or r.get('error')!r}"
                  + (f"\n    body: {json.dumps(r['body'], ensure_ascii=False)}" if 'body' in r else ""))
    return 0


async def _replay(js: Any, subjects: Subjects, args: Any) -> int:
    if not args.all and not args.id:
        print("give a dead letter id or --all", file=sys.stderr)
        return 2
    if args.all:
        chosen = await _dlq.dead_letters(js, subjects, args.channel)
    else:
        chosen = await _dlq.get(js, subjects, args.id, args.channel)
    if not chosen:
        print(f"no dead letter {args.id!r}" if args.id else "no dead letters", file=sys.stderr)
        return 1 if args.id else 0
    failed = 0
    for entry in chosen:
        target = await _dlq.replay(js, subjects, entry)
        if target is None:
            dl = entry.dead_letter
            print(f"seq {entry.seq}: cannot replay: the original could not be decoded or is no longer in the object store ({dl.reason if dl else 'undecodable'})",
                  file=sys.stderr)
            failed += 1
            continue
        print(f"replayed {entry.dead_letter.id if entry.dead_letter else '?'} on {target}")
    return 1 if failed else 0


async def _purge(js: Any, subjects: Subjects, args: Any) -> int:
    items = await _dlq.dead_letters(js, subjects, args.channel)
    if not items:
        print("no dead letters")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print("refusing to purge without confirmation: add --yes", file=sys.stderr)
            return 2
        answer = input(f"delete {len(items)} dead letter(s)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    print(f"deleted {await _dlq.purge(js, subjects, items)} dead letter(s)")
    return 0
