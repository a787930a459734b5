"""``gateway dlq list | replay | purge``: dead letters in the ``<PREFIX>_DEAD`` stream."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

import msgspec
import nats.js.errors

from ._bus import Subjects
from ._config import Config
from ._contract import replay_headers
from ._schema import DeadLetter, dead_letter_decoder, encode


async def dead_letters(js: Any, subjects: Subjects, channel: str | None = None) -> list[tuple[int, str, DeadLetter | None]]:
    """Every dead letter as (stream sequence, subject, decoded or None), oldest first."""
    try:
        info = await js.stream_info(subjects.stream_dead)
    except nats.js.errors.NotFoundError:
        return []
    out = []
    seq, last = info.state.first_seq, info.state.last_seq
    while seq and seq <= last:
        try:
            m = await js.get_msg(subjects.stream_dead, seq)
        except nats.js.errors.NotFoundError:
            seq += 1
            continue
        if channel is None or m.subject.split(".")[-1] == channel:
            try:
                dl: DeadLetter | None = dead_letter_decoder.decode(m.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                dl = None
            out.append((seq, m.subject, dl))
        seq += 1
    return out


def _age(at: datetime) -> str:
    s = int((datetime.now(timezone.utc) - at).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


async def run(nc: Any, config: Config, args: Any) -> int:
    js = nc.jetstream()
    subjects = Subjects(config.bus.prefix)
    items = await dead_letters(js, subjects, args.channel)
    if args.dlq_command == "list":
        rows = []
        for seq, subject, dl in items:
            row: dict[str, Any] = {"seq": seq, "subject": subject}
            if dl is None:
                row["error"] = "undecodable dead letter"
            else:
                row.update(id=dl.id, conversation=dl.outbound.conversation if dl.outbound else None, reason=dl.reason,
                           attempts=dl.attempts, age=_age(dl.at))
                if args.show_body:
                    row["body"] = json.loads(encode(dl.outbound)) if dl.outbound else (dl.payload or b"").decode("utf-8", "replace")
            rows.append(row)
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
    if args.dlq_command == "replay":
        if not args.all and not args.id:
            print("give a dead letter id or --all", file=sys.stderr)
            return 2
        chosen = [(s, subj, dl) for s, subj, dl in items if args.all or (dl is not None and dl.id == args.id)]
        if not chosen:
            print(f"no dead letter {args.id!r}" if args.id else "no dead letters", file=sys.stderr)
            return 1 if args.id else 0
        failed = 0
        for seq, subject, dl in chosen:
            if dl is None or dl.outbound is None:
                print(f"seq {seq}: cannot replay, the original could not be decoded ({dl.reason if dl else 'undecodable'})",
                      file=sys.stderr)
                failed += 1
                continue
            _, _, ctype, cname = subject.split(".", 3)
            target = subjects.outbound(ctype, cname)
            await js.publish(target, encode(dl.outbound), headers=replay_headers(dl.outbound, seq))
            await js.delete_msg(subjects.stream_dead, seq)
            print(f"replayed {dl.id} on {target}")
        return 1 if failed else 0
    if args.dlq_command == "purge":
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
        for seq, _, _ in items:
            await js.delete_msg(subjects.stream_dead, seq)
        print(f"deleted {len(items)} dead letter(s)")
        return 0
    return 2
