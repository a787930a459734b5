"""Which conversation a message belongs to.

Every Message-ID we see or send is recorded in the channel's KV state with the native
thread key of its conversation. A new message follows In-Reply-To, then References
(nearest first) to a known message; a thread we never saw the start of is keyed by its
root (the first References entry), so all its later messages meet there. Only mail
without any of those headers falls back to the subject, and then only a reply-looking
subject ("Re: …") of the same customer writing to the same address of ours: two customers
who both write "Help" never share a conversation."""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway import KeyValue, stable_id

from ._parse import ParsedMail

_REPLY_PREFIX = re.compile(
    r"^\s*(?:(?:re|fw|fwd|aw|wg|sv|vs|antw|ref|rif|tr|odp|答复|回复|回覆|转发|轉寄|轉發)\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*)+",
    re.IGNORECASE,
)


def normalize_subject(subject: str | None) -> tuple[str, bool]:
    """(subject without reply/forward prefixes, casefolded and whitespace-collapsed;
    whether it had such a prefix)."""
    s = subject or ""
    m = _REPLY_PREFIX.match(s)
    had = bool(m)
    if m:
        s = s[m.end():]
    return " ".join(s.split()).casefold(), had


def reply_subject(subject: str | None) -> str:
    """``Re: <subject>`` with exactly one ``Re:`` however many the thread piled up."""
    s = subject or ""
    m = _REPLY_PREFIX.match(s)
    if m:
        s = s[m.end():]
    s = " ".join(s.split())
    return f"Re: {s}" if s else "Re:"


def own_message_id(channel: str, outbound_id: str, domain: str) -> str:
    """Our Message-ID for an outbound: deterministic, so a retry after a crash sends the
    same id and receivers see one message."""
    return f"<gw.{stable_id(channel, outbound_id)}@{domain}>"


def is_own_message_id(message_id: str, domain: str) -> bool:
    """True for a Message-ID this channel generated."""
    return bool(re.fullmatch(rf"<gw\.[a-z2-7]{{26}}@{re.escape(domain)}>", message_id, re.IGNORECASE))


class MessageRecord(msgspec.Struct, omit_defaults=True):
    """What is kept per Message-ID (KV key ``mid:<Message-ID>``)."""

    t: str
    """Native thread key of the conversation."""
    g: str | None = None
    """Gateway id of the inbound message."""
    r: list[str] = []
    """References of the message (to build a reply's References)."""
    s: str | None = None
    """Subject."""
    a: bool = False
    """Machine-generated."""


@dataclass
class Thread:
    """Outcome of :meth:`ThreadStore.resolve`."""

    native: str
    how: str
    """``in-reply-to``, ``references``, ``root``, ``subject`` or ``new``."""


class ThreadStore:
    """Message-ID → conversation map in the channel's KV state (shared by processes)."""

    def __init__(self, state: KeyValue, ttl: float | None = None):
        self.state = state
        self.ttl = ttl

    async def get(self, message_id: str) -> MessageRecord | None:
        """The record of ``message_id``, or None."""
        return await self.state.get_record("mid:" + message_id, MessageRecord)

    async def put(self, message_id: str, record: MessageRecord) -> None:
        """Record ``message_id``."""
        await self.state.put_record("mid:" + message_id, record, ttl=self.ttl)

    async def message_id_of(self, gateway_id: str) -> str | None:
        """The Message-ID of an inbound message, by its gateway id."""
        raw = await self.state.get("gid:" + gateway_id)
        return raw.decode() if raw else None

    async def resolve(self, mail: ParsedMail, customer: str, ours: str) -> Thread:
        """The conversation ``mail`` belongs to (see the module docstring)."""
        # One concurrent lookup of every referenced id (the nearest known one wins).
        candidates = list(dict.fromkeys([*mail.in_reply_to, *reversed(mail.references[-20:])]))
        records = await asyncio.gather(*(self.get(mid) for mid in candidates)) if candidates else []
        for mid, rec in zip(candidates, records):
            if rec is not None:
                return Thread(rec.t, "in-reply-to" if mid in mail.in_reply_to else "references")
        if mail.references:
            return Thread("thread:" + mail.references[0], "root")
        if mail.in_reply_to:
            return Thread("thread:" + mail.in_reply_to[0], "root")
        subject, is_reply = normalize_subject(mail.subject)
        if subject and is_reply:
            raw = await self.state.get(_subject_key(subject, customer, ours))
            if raw:
                return Thread(raw.decode(), "subject")
        return Thread("thread:" + mail.message_id, "new")

    async def remember(self, mail: ParsedMail, thread: Thread, *, gateway_id: str,
                       customer: str, ours: str, auto: bool) -> None:
        """Record an inbound message after it was published."""
        refs = (mail.references or mail.in_reply_to)[-20:]
        subject, _ = normalize_subject(mail.subject)
        # Every key and value is built before any coroutine is: one that fails to build
        # must not leave the others created and never awaited.
        subject_key = _subject_key(subject, customer, ours) if subject else None
        writes = [self.put(mail.message_id, MessageRecord(t=thread.native, g=gateway_id, r=refs, s=mail.subject, a=auto)),
                  self.state.put("gid:" + gateway_id, mail.message_id.encode(), ttl=self.ttl)]
        if subject_key is not None:
            writes.append(self.state.put(subject_key, thread.native.encode(), ttl=self.ttl))
        await asyncio.gather(*writes)


def _subject_key(subject: str, customer: str, ours: str) -> str:
    # surrogatepass: a key is a hash, any string must make one (the parser decodes raw
    # 8-bit headers, this is the second line of defence).
    key = f"{subject}\x00{customer.lower()}\x00{ours.lower()}".encode("utf-8", "surrogatepass")
    return "subj:" + hashlib.sha256(key).hexdigest()


def route_record(route: dict[str, Any]) -> MessageRecord:
    """A record built from a conversation's stored route (fallback when the KV has none)."""
    return MessageRecord(t=route.get("thread", ""), r=list(route.get("references", [])), s=route.get("subject"),
                         a=bool(route.get("auto")))
