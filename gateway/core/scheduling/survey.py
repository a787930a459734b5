"""Satisfaction surveys: an outbound with a ``survey`` asks the customer to choose; their next
message in the conversation within ``answer_within`` is matched against the choices and,
if it names one, published with a :class:`ChoicePart` attached.

Matching (:func:`match_choice`) is pure and forgiving about form, strict about meaning: the
number of a choice (``2``, ``２``, ``②``, ``2.``, ``（2）``), its words (``满意``, ``满意！``,
`` 一 般 ``), both (``2 一般``), an emoji whose sense is unambiguous (👍 the first
choice, 👎 the last, 😐 the middle of three), or words of the same sense as exactly one
choice (非常满意, 一般般吧, 不太满意, bad, terrible); a comment may follow the answer
(``不满意，太慢了``, ``2 but slow delivery``) and is published with the choice. Anything
else (``我满意吗?``, ``2 days ago``) is an ordinary message, marked as the survey's reply:
a wrong guess would put words in the customer's mouth. A greeting alone (``在吗？``) leaves
the survey waiting for the answer that follows."""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import msgspec
import nats.js.errors

from ..bus.contract import JSON, rfc3339
from ..bus.reads import Entry, valid_key
from ..bus.state import channel_of, state_records, survey_key
from ..schema import ChoicePart, Message, Outbound, TextPart

if TYPE_CHECKING:
    from ..bus.connection import Bus

_POSITIVE = frozenset("👍👌👏💯😀😃😄😁😊🙂😍🥰❤♥✅")
_NEGATIVE = frozenset("👎😡😠😞😢😭🙁☹💢❌")
_NEUTRAL = frozenset("😐😑😶🤔")
_NUMERALS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}
_LEADING_NUMBER = re.compile(r"^(\d{1,3})(.*)$", re.S)

# What customers write for a satisfaction answer, by sense (+1, 0, -1), as _core() leaves
# it (no spaces, case-folded, trailing particles removed). A word counts only if the whole
# answer is that word: "我满意吗" or "不好说" are not in here and stay ordinary messages.
_SENSES: dict[str, int] = {
    **dict.fromkeys(("满意", "很满意", "非常满意", "挺满意", "十分满意", "特别满意", "比较满意", "超满意", "满意满意",
                     "很好", "非常好", "挺好", "不错", "很不错", "挺不错", "非常不错", "好评", "五星", "赞",
                     "good", "verygood", "great", "excellent", "satisfied", "verysatisfied", "perfect", "awesome",
                     "happy", "verygoodthanks"), 1),
    **dict.fromkeys(("一般", "一般般", "还行", "还可以", "凑合", "马马虎虎", "还好", "中等", "普通", "中评",
                     "soso", "average", "neutral", "meh", "mediocre"), 0),
    **dict.fromkeys(("不满意", "不太满意", "很不满意", "非常不满意", "特别不满意", "极不满意", "不满", "差", "很差",
                     "太差", "非常差", "差评", "不好", "很不好", "太不好", "失望", "很失望", "太失望", "垃圾",
                     "bad", "verybad", "terrible", "awful", "horrible", "poor", "verypoor", "unsatisfied",
                     "dissatisfied", "notsatisfied", "notgood", "disappointed", "disappointing"), -1),
}
_PARTICLES = "吧啊呀哦呢了的嘛哈啦噢呐哇咯"
# A message that only greets or checks someone is there ("在吗？") is not an answer: the
# survey keeps waiting for the one that follows.
_GREETINGS = frozenset(("在吗", "在不在", "在么", "有人吗", "有人在吗", "在", "你好", "您好", "你们好", "哈喽", "嗨", "喂",
                        "早", "早上好", "上午好", "中午好", "下午好", "晚上好", "亲", "客服", "客服在吗", "hi", "hello",
                        "hey", "helloo", "anyonethere", "isanyonethere", "goodmorning", "goodafternoon", "goodevening"))
# Words that open a comment after a bare number ("2 but slow delivery"); after a number a
# space alone does not ("2 days ago ..." is not an answer).
_CONNECTIVES = re.compile(r"^(?:(?:but|though|although|however|because|except|only|yet|since|as)(?![a-z])"
                          r"|但是|但|不过|就是|只是|因为|可是|然而)", re.I)
_SEPARATOR = re.compile(r"[\s\u3000]+|[,，.。!！?？;；:：、~～…\-—]+")


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


def _bare(core: str) -> str:
    """``core`` without trailing particles (一般般吧 → 一般般, 太差了 → 太差)."""
    return core.rstrip(_PARTICLES) or core


def _sense(core: str) -> int | None:
    return _SENSES.get(_bare(core))


def is_greeting(text: str) -> bool:
    """True if ``text`` only greets or asks whether someone is there (在吗？, hello)."""
    core = _core(text)
    return bool(core) and _bare(core) in _GREETINGS


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
    if _bare(core) in names:
        return names.index(_bare(core))
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
    meaning = _sense(core)
    if meaning is not None:
        # The one choice that means the same (满意 / 一般 / 不满意 are +1 / 0 / -1): "bad"
        # answers 不满意. Two choices of that sense (a five-point scale) or none: no guess.
        same = [i for i, name in enumerate(names) if _sense(name) == meaning]
        return same[0] if len(same) == 1 else None
    return None


class Answer(msgspec.Struct, frozen=True):
    """A reply read as a survey answer: the choice and what the customer added."""

    index: int
    comment: str | None = None


def read_answer(text: str, choices: Sequence[str]) -> Answer | None:
    """The choice ``text`` names and the comment after it (``不满意，太慢了`` →
    不满意 with ``太慢了``; ``2 but slow delivery``), or None: never a guess. The whole
    text must name a choice (:func:`match_choice`), or its first phrase must and the rest
    must not name another one; after a bare number, a comment needs punctuation or a
    word such as "but" (``2 days ago …`` is not an answer)."""
    index = match_choice(text, choices)
    if index is not None:
        return Answer(index)
    text = text.strip()  # the comment is published as the customer wrote it
    for sep in _SEPARATOR.finditer(text):
        head, tail = text[:sep.start()], text[sep.end():].strip()
        if not _core(head):
            continue  # leading punctuation ("（2）…"): look further
        index = match_choice(head, choices)
        if index is None or not _core(tail):
            return None
        other = match_choice(tail, choices)
        if other is not None and other != index:
            return None  # "2 满意", "1 2": two answers, no guess
        number = _LEADING_NUMBER.match(_core(head)) is not None or _core(head) in _NUMERALS
        if number and not sep.group().strip() and not _CONNECTIVES.match(tail):
            return None
        return Answer(index, tail)
    return None


class PendingSurvey(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway keeps per conversation while a survey waits for its answer (KV
    ``survey.<conversation>``), and the body of the schedule that reports it unanswered.
    Internal to the gateway: backends see the answers and the ``unanswered`` status."""

    outbound_id: str
    choices: list[str]
    until: datetime
    conversation: str = ""
    channel_type: str = ""
    channel: str = ""
    reminder_id: str | None = None
    """The reminder that sent the survey, if one did."""


pending_survey_decoder = msgspec.json.Decoder(PendingSurvey)

SURVEY_REPLY = "survey_reply"
"""``Message.meta`` key: the id of the survey outbound this message replied to, when the
reply named no choice (the survey is over; the desk reads the reply itself)."""
REMINDER_ID_META = "reminder_id"
"""``Outbound.meta`` key the scheduler sets on a reminder's survey: its unanswered status
names the reminder."""


def _decode_pending(data: bytes) -> PendingSurvey | None:
    try:
        return pending_survey_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class Surveys:
    """Remembers sent surveys (KV ``<prefix>_state``, key ``survey.<conversation>``),
    attaches the answer to the customer's next message, and schedules the report of a
    survey nobody answered (a JetStream schedule on ``<prefix>.sched.survey.<conversation>``
    that the reminder scheduler takes when ``answer_within`` has passed)."""

    def __init__(self, bus: Bus, *, log: Any, keep_fired: float = 30 * 86400):
        self.bus = bus
        self.records = state_records(bus)
        self.log = log.bind(component="surveys")
        self.keep_fired = keep_fired

    def _key(self, conversation: str) -> str:
        return survey_key(conversation)

    async def sent(self, outbound: Outbound) -> None:
        """An outbound with a survey was sent: its conversation's next message is matched.
        (A later survey in the same conversation replaces an earlier one.)"""
        if outbound.survey is None:
            return
        until = datetime.now(timezone.utc) + timedelta(seconds=outbound.survey.answer_within)
        rid = outbound.meta.get(REMINDER_ID_META)
        record = PendingSurvey(outbound_id=outbound.id, choices=list(outbound.survey.choices), until=until,
                               conversation=outbound.conversation, reminder_id=rid if isinstance(rid, str) else None)
        try:
            record = await self._with_channel(record)
            await self.records.put(self._key(outbound.conversation), msgspec.json.encode(record))
        except Exception as exc:  # the send itself succeeded; the answer will be an ordinary message
            self.log.warning("survey not recorded; its answer will not be matched", outbound_id=outbound.id,
                             error=f"{type(exc).__name__}: {exc}")
            return
        if not record.channel:
            return
        s = self.bus.subjects
        try:
            await self.bus.js.publish(s.survey_watch(record.conversation), msgspec.json.encode(record), headers={
                "Nats-Schedule": f"@at {rfc3339(until)}", "Nats-Schedule-Target": s.unanswered(record.channel_type,
                                                                                               record.channel),
                "Nats-Schedule-TTL": f"{int(self.keep_fired)}s", "Content-Type": JSON})
        except Exception as exc:
            self.log.warning("survey expiry not scheduled; an unanswered survey will not be reported",
                             outbound_id=outbound.id, error=f"{type(exc).__name__}: {exc}")

    async def _with_channel(self, record: PendingSurvey) -> PendingSurvey:
        found = await channel_of(self.bus.js, self.bus.subjects, record.conversation)
        if found is None:
            return record
        return msgspec.structs.replace(record, channel_type=found[0], channel=found[1])

    def candidate(self, message: Message) -> bool:
        """Whether ``message`` could answer a survey (worth reading the pending one)."""
        return not message.auto and any(isinstance(p, TextPart) for p in message.parts)

    async def ask_pending(self, conversation: str) -> asyncio.Future[Entry | None] | None:
        """Send the read of ``conversation``'s pending survey; its future for :meth:`attach`
        (the inbound path sends it beside its dedup read: one round trip for both). None
        when the key cannot be read."""
        key = self._key(conversation)
        if not valid_key(key):
            return None
        return await self.records.ask(key)

    async def attach(self, message: Message, asked: asyncio.Future[Entry | None] | None = None) -> tuple[Message, bool]:
        """``message`` with a :class:`ChoicePart` (and the customer's comment) if it answers
        the conversation's pending survey, marked as the survey's reply
        (``meta["survey_reply"]``) if it names no choice, unchanged otherwise; and whether it
        ended the survey: then call :meth:`answered` once the message is on the bus (not
        before, so a publish that fails and is retried by the provider is matched again).
        A greeting alone (在吗？) does not end it: the answer usually follows. A message
        that carries the survey's choice already (a button) ends it."""
        if not self.candidate(message):
            return message, False
        if asked is not None:
            entry = await asked
            pending = _decode_pending(entry.value) if entry is not None else None
        else:
            pending = await self._pending(message.conversation)
        chosen = {p.survey for p in message.parts if isinstance(p, ChoicePart)}
        if chosen:
            # Answered with a button (web chat, Telegram): that survey is over, so the
            # customer's next words are not taken for a second answer.
            return message, pending is not None and pending.outbound_id in chosen
        if pending is None or message.received_at > pending.until:
            return message, False  # an expired one is left for its unanswered report
        text = " ".join(p.text for p in message.parts if isinstance(p, TextPart))
        if is_greeting(text):
            return message, False
        answer = read_answer(text, pending.choices)
        if answer is None:
            return msgspec.structs.replace(message, meta={**message.meta, SURVEY_REPLY: pending.outbound_id}), True
        choice = ChoicePart(survey=pending.outbound_id, choice=pending.choices[answer.index], index=answer.index,
                            comment=answer.comment)
        return msgspec.structs.replace(message, parts=[*message.parts, choice]), True

    async def answered(self, message: Message) -> None:
        """After the customer's reply reached the bus: the survey of its conversation is
        over, matched or not."""
        await self.records.delete(self._key(message.conversation))

    async def _pending(self, conversation: str) -> PendingSurvey | None:
        found = await self.pending(conversation)
        return found[0] if found else None

    async def pending(self, conversation: str) -> tuple[PendingSurvey, int] | None:
        """The survey waiting in ``conversation`` and its KV revision, or None."""
        found = await self.records.get_revision(self._key(conversation))
        if found is None:
            return None
        try:
            return pending_survey_decoder.decode(found[0]), found[1]
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def expire(self, record: PendingSurvey) -> bool:
        """The survey's time is up: True if it was still waiting (and now is not), False
        if it was answered or replaced meanwhile (the KV revision decides a race with an
        answer arriving at the same moment)."""
        found = await self.pending(record.conversation)
        if found is None or found[0].outbound_id != record.outbound_id:
            return False
        try:
            return await self.records.delete_if(self._key(record.conversation), found[1])
        except nats.js.errors.APIError:
            return False
