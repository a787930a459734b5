"""Dead letters in the ``<PREFIX>_DEAD`` stream, as data: list, get, replay, purge. The
``gateway dlq`` command (``gateway/_cli_dlq.py``) prints them and asks before deleting."""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec
import nats.js.errors

from ..bus.connection import Subjects
from ..bus.contract import PAYLOAD_HEADER, replay_headers
from ..schema import DeadLetter, dead_letter_decoder, encode, outbound_decoder


class DeadLetterEntry(NamedTuple):
    """One message of the dead-letter stream."""

    seq: int
    subject: str
    dead_letter: DeadLetter | None
    """None if it could not be decoded."""


async def dead_letters(js: Any, subjects: Subjects, channel: str | None = None) -> list[DeadLetterEntry]:
    """Every dead letter (of ``channel``, if given), oldest first."""
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
            out.append(DeadLetterEntry(seq, m.subject, dl))
        seq += 1
    return out


async def get(js: Any, subjects: Subjects, dead_letter_id: str, channel: str | None = None) -> list[DeadLetterEntry]:
    """The dead letters with this id (more than one if an outbound died twice)."""
    return [e for e in await dead_letters(js, subjects, channel)
            if e.dead_letter is not None and e.dead_letter.id == dead_letter_id]


async def original(js: Any, dead_letter: DeadLetter) -> bytes | None:
    """The dead outbound's original bytes: inline (``outbound`` or ``payload``), or read
    from the object store where a dead letter too large for the bus keeps them; None when
    they are gone (the object store keeps blobs for ``[bus] blob_max_age``)."""
    if dead_letter.outbound is not None:
        return encode(dead_letter.outbound)
    if dead_letter.payload is not None:
        return dead_letter.payload
    where = dead_letter.headers.get(PAYLOAD_HEADER)
    if not where or "/" not in where:
        return None
    bucket, name = where.split("/", 1)
    try:
        store = await js.object_store(bucket)
        result = await store.get(name)
    except (nats.js.errors.NotFoundError, nats.js.errors.ObjectNotFoundError, nats.js.errors.BucketNotFoundError):
        return None
    data: bytes | None = result.data
    return data


async def replay(js: Any, subjects: Subjects, entry: DeadLetterEntry) -> str | None:
    """Publish the dead outbound again on its outbound subject (its bytes from the dead
    letter or, for one too large to carry them, from the object store), then delete the
    dead letter; returns that subject, or None if there is no outbound to replay (it could
    not be decoded, or its stored bytes are gone), in which case nothing changes."""
    dl = entry.dead_letter
    if dl is None:
        return None
    outbound = dl.outbound
    if outbound is None:
        data = await original(js, dl)
        if data is None:
            return None
        try:
            outbound = outbound_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
    _, _, ctype, cname = entry.subject.split(".", 3)
    target = subjects.outbound(ctype, cname)
    await js.publish(target, encode(outbound), headers=replay_headers(outbound, entry.seq))
    await js.delete_msg(subjects.stream_dead, entry.seq)
    return target


async def purge(js: Any, subjects: Subjects, entries: list[DeadLetterEntry]) -> int:
    """Delete these dead letters; returns how many."""
    for e in entries:
        await js.delete_msg(subjects.stream_dead, e.seq)
    return len(entries)
