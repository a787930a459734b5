"""What the web chat keeps, all of it in the channel's state on the bus (no second
database): visitor tokens, a bounded history per conversation, visitor profiles. And the
per-process rate limiter."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Literal

import msgspec

from gateway import KeyValue, ObjectRef, SignatureError, verify_hmac

VISITOR = "v-"
USER = "u-"
_USER_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


# --- identity ----------------------------------------------------------------------


def new_visitor() -> str:
    """A fresh anonymous visitor id: 128 random bits, nobody can guess another's."""
    return VISITOR + secrets.token_urlsafe(16)


def issue_token(secret: bytes, subject: str) -> str:
    """``<subject>.<hex HMAC-SHA256>``: proves the holder was given ``subject`` by us."""
    mac = hmac.new(secret, b"webchat-token:" + subject.encode(), hashlib.sha256).hexdigest()
    return f"{subject}.{mac}"


def check_token(secret: bytes, token: str | None) -> str:
    """The subject (``v-...`` or ``u-...``) of a token we issued; SignatureError otherwise."""
    if not token or len(token) > 300:
        raise SignatureError("missing or malformed visitor token")
    subject, _, mac = token.rpartition(".")
    if not subject.startswith((VISITOR, USER)):
        raise SignatureError("malformed visitor token")
    verify_hmac(secret, b"webchat-token:" + subject.encode(), mac)
    return subject


def check_user(user_secret: str, user_id: str, signature: str | None) -> str:
    """The subject of a logged-in user whose id the site's server signed (hex
    HMAC-SHA256 of the id with ``user_secret``); SignatureError otherwise."""
    if not user_secret:
        raise SignatureError("signed user ids are not enabled on this channel (user_secret)")
    if not _USER_ID.match(user_id):
        raise SignatureError("user id must be 1 to 128 printable ASCII characters")
    verify_hmac(user_secret, user_id.encode(), signature)
    return USER + user_id


# --- history ---------------------------------------------------------------------------


class Image(msgspec.Struct, frozen=True, kw_only=True):
    """An image of a history entry: where its bytes are (never inline in the record)."""

    ref: ObjectRef
    content_type: str


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message of a conversation's history."""

    id: str
    """Gateway message id (visitor) or outbound id (agent)."""
    by: Literal["visitor", "agent"]
    at: datetime
    text: str = ""
    cid: str | None = None
    """The widget's own id of a visitor message (its retries carry it again)."""
    images: list[Image] = []
    choices: list[str] = []
    """A survey's choices, shown as buttons."""
    answer_until: datetime | None = None
    answered: int | None = None
    """Index of the choice the visitor picked."""
    state: Literal["", "delivered", "read"] = ""
    """How far the widget confirmed an agent message."""


class History(msgspec.Struct, kw_only=True):
    """The record at ``hist.<conversation>``: the last ``history_size`` entries, oldest first."""

    entries: list[Entry] = []


class Contention(Exception):
    """Other writers kept changing a history record: try again later."""


class TooLarge(Exception):
    """One entry alone is larger than a history record may be."""


MAX_RECORD = 256 * 1024
"""Bytes a history record may take (NATS refuses messages over its max_payload, 1 MiB by
default); the oldest entries go first when the newest would not fit."""


class HistoryStore:
    """Bounded per-conversation histories as KV records with a retention TTL, updated by
    compare-and-set so several gateway processes (a visitor's message on one, a reply
    delivered by another) never lose each other's entries."""

    def __init__(self, state: KeyValue, size: int, ttl: float) -> None:
        self.state, self.size, self.ttl = state, size, ttl
        self._decoder = msgspec.json.Decoder(History)

    @staticmethod
    def key(conversation: str) -> str:
        return "hist." + conversation

    def decode(self, raw: bytes | None) -> list[Entry]:
        """The entries of a stored record ([] for none or one of an older shape)."""
        if not raw:
            return []
        try:
            return self._decoder.decode(raw).entries
        except msgspec.DecodeError:  # a record of an older shape: start again
            return []

    async def read(self, conversation: str) -> list[Entry]:
        """The entries, oldest first ([] when none or expired)."""
        return self.decode(await self.state.get(self.key(conversation)))

    async def change(self, conversation: str, edit: Callable[[list[Entry]], bool]) -> list[Entry]:
        """Apply ``edit`` (which changes the list in place and says whether it did) and store
        the result, trimmed to the newest ``size``; retried on a concurrent write."""
        key = self.key(conversation)
        for _ in range(20):
            current = await self.state.get_revision(key)
            entries = self.decode(current[0] if current else None)
            if not edit(entries):
                return entries
            del entries[:-self.size]
            raw = msgspec.json.encode(History(entries=entries))
            while len(raw) > MAX_RECORD:
                if len(entries) == 1:
                    raise TooLarge(f"one message of {len(raw)} bytes is over the history's {MAX_RECORD}")
                # Drop enough of the oldest at once: each re-encoding costs the whole record.
                del entries[:max(1, len(entries) * (len(raw) - MAX_RECORD) // len(raw))]
                raw = msgspec.json.encode(History(entries=entries))
            stored = (await self.state.create(key, raw, ttl=self.ttl) if current is None
                      else await self.state.update(key, raw, current[1], ttl=self.ttl))
            if stored:
                return entries
        raise Contention("history record kept changing")


def append(entry: Entry) -> Callable[[list[Entry]], bool]:
    """An edit that appends ``entry`` unless an entry with its id is there (retries)."""

    def edit(entries: list[Entry]) -> bool:
        if any(e.id == entry.id for e in entries):
            return False
        entries.append(entry)
        return True

    return edit


class Profile(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the pre-chat form told us (state key ``profile.<subject>``, same TTL as history)."""

    name: str
    email: str = ""
    phone: str = ""
