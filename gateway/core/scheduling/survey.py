"""Satisfaction surveys: an outbound with a ``survey`` asks the customer to choose; their next
message in the conversation within ``answer_within`` is matched against the choices and,
if it names one, published with a :class:`ChoicePart` attached.

Matching (:func:`match_choice`) is pure and forgiving about form, strict about meaning: the
number of a choice (``2``, ``２``, ``②``, ``2.``, ``（2）``), its words (``满意``, ``满意！``,
`` 一 般 ``), both (``2 一般``), or an emoji whose sense is unambiguous (👍 the first
choice, 👎 the last, 😐 the middle of three). Anything else (``不太满意``, ``我满意吗?``)
is an ordinary message: a wrong guess would put words in the customer's mouth."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import msgspec
import nats.js.errors

from ..bus.state import survey_key
from ..schema import ChoicePart, Message, Outbound, TextPart

if TYPE_CHECKING:
    from ..bus.connection import Bus

_POSITIVE = frozenset("👍👌👏💯😀😃😄😁😊🙂😍🥰❤♥✅")
_NEGATIVE = frozenset("👎😡😠😞😢😭🙁☹💢❌")
_NEUTRAL = frozenset("😐😑😶🤔")
_NUMERALS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}
_LEADING_NUMBER = re.compile(r"^(\d{1,3})(.*)$", re.S)


def _core(text: str) -> str:
    """NFKC (full-width digits and letters, circled numbers), case-folded, without spaces,
    punctuation, controls and emoji modifiers (skin tones, variation selectors, joiners)."""
    out = []
    for c in unicodedata.normalize("NFKC", text).casefold():
        cat = unicodedata.category(c)
        if cat[0] in "PZC" or cat in ("Sk", "Mn", "Me"):
            continue
        out.append(c)
    return "".join(out)


def match_choice(text: str, choices: Sequence[str]) -> int | None:
    """The index (from 0) of the choice ``text`` names, or None. Choices are listed best
    first (the emoji rule relies on it)."""
    n = len(choices)
    core = _core(text)
    if not core or not n:
        return None
    names = [_core(c) for c in choices]
    if core in names:
        return names.index(core)
    m = _LEADING_NUMBER.match(core)
    if m is not None:
        k = int(m.group(1))
        rest = m.group(2)
        if 1 <= k <= n and (not rest or rest == names[k - 1]):
            return k - 1
        return None
    if len(core) == 1 and core in _NUMERALS and _NUMERALS[core] <= n:
        return _NUMERALS[core] - 1
    if all(unicodedata.category(c) == "So" for c in core):
        senses = {0 if c in _POSITIVE else n - 1 if c in _NEGATIVE else -1 if c in _NEUTRAL else -2 for c in core}
        if len(senses) != 1:
            return None
        sense = senses.pop()
        if sense == -1:
            return n // 2 if n % 2 == 1 and n >= 3 else None
        return sense if sense >= 0 and n >= 2 else None
    return None


class PendingSurvey(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway keeps per conversation while a survey waits for its answer."""

    outbound_id: str
    choices: list[str]
    until: datetime


_pending_decoder = msgspec.json.Decoder(PendingSurvey)


class Surveys:
    """Remembers sent surveys (KV ``<prefix>_state``, key ``survey.<conversation>``) and
    attaches the answer to the customer's next message."""

    def __init__(self, bus: Bus, *, log: Any):
        self.bus = bus
        self.log = log.bind(component="surveys")

    def _key(self, conversation: str) -> str:
        return survey_key(conversation)

    def _kv(self) -> Any:
        return self.bus.kv[self.bus.subjects.kv_state]

    async def sent(self, outbound: Outbound) -> None:
        """An outbound with a survey was sent: its conversation's next message is matched.
        (A later survey in the same conversation replaces an earlier one.)"""
        if outbound.survey is None:
            return
        until = datetime.now(timezone.utc) + timedelta(seconds=outbound.survey.answer_within)
        record = PendingSurvey(outbound_id=outbound.id, choices=list(outbound.survey.choices), until=until)
        try:
            await self._kv().put(self._key(outbound.conversation), msgspec.json.encode(record))
        except Exception as exc:  # the send itself succeeded; the answer will be an ordinary message
            self.log.warning("survey not recorded; its answer will not be matched", outbound_id=outbound.id,
                             error=f"{type(exc).__name__}: {exc}")

    async def attach(self, message: Message) -> tuple[Message, bool]:
        """``message`` with a :class:`ChoicePart` if it answers the conversation's pending
        survey (unchanged otherwise), and whether a survey was pending: then call
        :meth:`answered` once the message is on the bus (not before, so a publish that
        fails and is retried by the provider is matched again)."""
        if message.auto or not any(isinstance(p, TextPart) for p in message.parts) \
                or any(isinstance(p, ChoicePart) for p in message.parts):
            return message, False
        pending = await self._pending(message.conversation)
        if pending is None:
            return message, False
        if message.received_at > pending.until:
            return message, True
        text = " ".join(p.text for p in message.parts if isinstance(p, TextPart))
        index = match_choice(text, pending.choices)
        if index is None:
            return message, True
        choice = ChoicePart(survey=pending.outbound_id, choice=pending.choices[index], index=index)
        return msgspec.structs.replace(message, parts=[*message.parts, choice]), True

    async def answered(self, message: Message) -> None:
        """After the customer's next message reached the bus: the survey of its
        conversation is over, matched or not (only the *next* message answers it)."""
        try:
            await self._kv().delete(self._key(message.conversation))
        except nats.js.errors.KeyNotFoundError:
            pass

    async def _pending(self, conversation: str) -> PendingSurvey | None:
        try:
            entry = await self._kv().get(self._key(conversation))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            return None
        try:
            return _pending_decoder.decode(entry.value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
