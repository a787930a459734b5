"""The wire types of the bus: every message that crosses NATS is one of these.

All are msgspec Structs encoded as JSON. Ids are strings, never JSON numbers: WeChat's
MsgId is above 2**53 and a JavaScript backend would round it. Binary content travels
inline (base64) only below the configured inline limit; above it, it is stored in the
JetStream Object Store and the part carries an :class:`ObjectRef` instead.

Adding a part type is a contract change: a consumer built against an older schema
rejects an unknown ``type`` tag. Such a change raises :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import inspect
import re
from datetime import datetime
from typing import Any, ClassVar, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

SCHEMA_VERSION = 1
"""Version of the wire contract; carried in every message as ``schema_version``."""


class _Wire(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """Base of parts and nested values: immutable, compact JSON (defaults omitted)."""


class _Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """Base of top-level bus types: every field is encoded, ``schema_version`` included,
    so consumers in any language see explicit nulls instead of guessing defaults."""


class ObjectRef(_Wire, frozen=True, kw_only=True):
    """Where a binary payload lives in the JetStream Object Store."""

    bucket: str
    name: str
    size: int
    sha256: str


class Participant(_Wire, frozen=True, kw_only=True):
    """A sender or recipient in the channel's own terms."""

    id: str
    """Channel-native id: an e-mail address, a WeChat openid, a QQ number, an E.164 phone number."""
    name: str | None = None
    """Display name, if the channel gives one."""


# --- message parts (a tagged union on "type") -------------------------------------------


class TextPart(_Wire, frozen=True, tag="text", tag_field="type"):
    """Plain text. For email, ``text`` is the new text of the message and ``quoted`` /
    ``signature`` hold what was trimmed off, so a backend sees both."""

    type: ClassVar[Literal["text"]] = "text"
    """The part's type tag (its ``type`` in JSON)."""

    text: str
    quoted: str | None = None
    signature: str | None = None


class HtmlPart(_Wire, frozen=True, tag="html", tag_field="type"):
    """An HTML body (its plain-text rendering travels as a separate TextPart)."""

    type: ClassVar[Literal["html"]] = "html"
    """The part's type tag (its ``type`` in JSON)."""

    html: str


class _Media(_Wire, frozen=True, tag_field="type", kw_only=True):
    content_type: str | None = None
    filename: str | None = None
    size: int | None = None
    data: bytes | None = None
    """Inline content (base64 in JSON), only when below the inline limit."""
    ref: ObjectRef | None = None
    """Content stored in the object store."""
    url: str | None = None
    """Where the provider serves it, if it does."""
    media_id: str | None = None
    """The provider's own media id (WeChat MediaId, ...)."""
    content_id: str | None = None
    """MIME Content-ID of an inline image (``cid:`` references in HTML)."""


class ImagePart(_Media, frozen=True, tag="image", kw_only=True):
    """An image."""

    type: ClassVar[Literal["image"]] = "image"
    """The part's type tag (its ``type`` in JSON)."""


class FilePart(_Media, frozen=True, tag="file", kw_only=True):
    """Any other attachment."""

    type: ClassVar[Literal["file"]] = "file"
    """The part's type tag (its ``type`` in JSON)."""


class AudioPart(_Media, frozen=True, tag="audio", kw_only=True):
    """Voice or audio; ``recognition`` is the provider's speech-to-text, if given."""

    type: ClassVar[Literal["audio"]] = "audio"
    """The part's type tag (its ``type`` in JSON)."""

    duration: float | None = None
    recognition: str | None = None


class VideoPart(_Media, frozen=True, tag="video", kw_only=True):
    """A video; ``thumb`` references its thumbnail if the provider sends one."""

    type: ClassVar[Literal["video"]] = "video"
    """The part's type tag (its ``type`` in JSON)."""

    duration: float | None = None
    thumb_media_id: str | None = None


class LocationPart(_Wire, frozen=True, tag="location", tag_field="type"):
    """A geographic position."""

    type: ClassVar[Literal["location"]] = "location"
    """The part's type tag (its ``type`` in JSON)."""

    latitude: float
    longitude: float
    label: str | None = None
    scale: float | None = None


class LinkPart(_Wire, frozen=True, tag="link", tag_field="type"):
    """A shared link or article card."""

    type: ClassVar[Literal["link"]] = "link"
    """The part's type tag (its ``type`` in JSON)."""

    url: str
    title: str | None = None
    description: str | None = None


class EventPart(_Wire, frozen=True, tag="event", tag_field="type"):
    """A channel event that is not a message (subscribe, menu click, scan ...)."""

    type: ClassVar[Literal["event"]] = "event"
    """The part's type tag (its ``type`` in JSON)."""

    event: str
    key: str | None = None
    data: dict[str, str] = {}


class ChoicePart(_Wire, frozen=True, tag="choice", tag_field="type"):
    """A survey answer: the customer picked one of an outbound's ``survey.choices``, by a
    button (web chat) or by writing its number or words in their next message."""

    type: ClassVar[Literal["choice"]] = "choice"
    """The part's type tag (its ``type`` in JSON)."""

    survey: str
    """The id of the outbound that asked (for a reminder's survey, its outbound's id)."""
    choice: str
    """The choice as the survey listed it (``满意``)."""
    index: int | None = None
    """Its position in ``survey.choices``, from 0."""
    comment: str | None = None
    """What the customer wrote after the choice (``不满意，太慢了`` → ``太慢了``): the reason a
    desk escalates on; None when the reply was the choice alone."""


class UnknownPart(_Wire, frozen=True, tag="unknown", tag_field="type"):
    """Content the channel plugin could not map; ``raw`` keeps the provider's fields."""

    type: ClassVar[Literal["unknown"]] = "unknown"
    """The part's type tag (its ``type`` in JSON)."""

    raw: dict[str, Any] = {}


Part = Union[
    TextPart,
    HtmlPart,
    ImagePart,
    FilePart,
    AudioPart,
    VideoPart,
    LocationPart,
    LinkPart,
    EventPart,
    ChoicePart,
    UnknownPart,
]
MediaPart = Union[ImagePart, FilePart, AudioPart, VideoPart]


# --- envelopes -----------------------------------------------------------------------


class Message(_Envelope, frozen=True, kw_only=True):
    """An inbound message, published on ``<prefix>.in.<channel_type>.<channel>``."""

    schema_version: int = SCHEMA_VERSION
    id: str
    """Gateway id, derived from (channel, provider_id): a provider retry gets the same id.
    It is also the ``Nats-Msg-Id`` header."""
    channel_type: str
    channel: str
    provider_id: str | None = None
    """The provider's own message id (WeChat MsgId, Message-ID, Twilio MessageSid ...)."""
    conversation: str
    """Stable key of the conversation; a reply names it and the gateway routes."""
    sender: Participant
    recipient: Participant | None = None
    """Our side: the mailbox, official account or number the customer wrote to."""
    received_at: datetime
    """When the gateway received it (UTC)."""
    sent_at: datetime | None = None
    """When the customer sent it, per the provider."""
    subject: str | None = None
    parts: list[Part] = []
    in_reply_to: str | None = None
    """Provider id of the message this one replies to, if the channel says."""
    auto: bool = False
    """Machine-generated (auto-reply, bulk, bounce): never answer automatically (RFC 3834)."""
    meta: dict[str, Any] = {}
    """Channel-specific metadata; documented per plugin."""


class Template(_Wire, frozen=True, kw_only=True):
    """A provider template (WeChat template/subscription message, SMS template) used where
    free text is not allowed, for example outside WeChat's 48-hour window."""

    id: str
    data: dict[str, str] = {}
    url: str | None = None
    kind: Literal["template", "subscription"] = "template"
    """WeChat: a template message (模板消息) or a subscription notification (订阅通知)."""


class Survey(_Wire, frozen=True, kw_only=True):
    """A question whose answer the gateway recognizes: the customer's next message in the
    conversation within ``answer_within`` seconds that names a choice (its number, from 1,
    in ASCII or full-width digits, or its words) comes back with a :class:`ChoicePart`;
    channels with buttons may show the choices as buttons. The question itself is the
    outbound's text."""

    choices: list[str] = msgspec.field(default_factory=lambda: ["满意", "一般", "不满意"])
    answer_within: float = 86400.0
    """Seconds after sending during which a reply is matched against the choices."""


class Sender(_Wire, frozen=True, kw_only=True):
    """Who answers, as the customer should see it (an agent, a bot): shown by channels that
    can show a sender (the web chat widget's name and picture); others ignore it."""

    name: str | None = None
    """Display name (``"Lin from Support"``)."""
    avatar_url: str | None = None
    """An ``https://`` (or ``http://``) URL of a small square picture."""


class Outbound(_Envelope, frozen=True, kw_only=True):
    """A reply or notice, published by a backend on ``<prefix>.out.<channel_type>.<channel>``."""

    schema_version: int = SCHEMA_VERSION
    id: str
    """Chosen by the backend, unique per outbound; also its ``Nats-Msg-Id``. Publishing the
    same id twice delivers once."""
    conversation: str
    parts: list[Part] = []
    kind: Literal["reply", "notice", "followup", "survey"] = "reply"
    in_reply_to: str | None = None
    """Gateway id of the inbound message this answers (threads email, quotes in QQ)."""
    subject: str | None = None
    auto: bool = False
    """An automatic answer: marked so (``Auto-Submitted: auto-replied``) where the channel can."""
    template: Template | None = None
    """Fallback where the channel refuses free text (WeChat outside 48 h)."""
    created_at: datetime | None = None
    survey: Survey | None = None
    """Ask the customer to choose (satisfaction survey); their answer comes back as a
    :class:`ChoicePart` on an inbound message."""
    sender: Sender | None = None
    """The agent's name and picture, where the channel can show them (optional, additive)."""
    meta: dict[str, Any] = {}


class ErrorInfo(_Wire, frozen=True, kw_only=True):
    """Why a delivery failed."""

    message: str
    permanent: bool
    code: str | None = None


DeliveryState = Literal["accepted", "sent", "delivered", "read", "failed", "dead"]


class DeliveryStatus(_Envelope, frozen=True, kw_only=True):
    """The fate of one outbound, on ``<prefix>.status.<channel_type>.<channel>``."""

    schema_version: int = SCHEMA_VERSION
    outbound_id: str
    conversation: str
    channel_type: str
    channel: str
    state: DeliveryState
    at: datetime
    attempt: int = 0
    provider_id: str | None = None
    error: ErrorInfo | None = None
    next_attempt_at: datetime | None = None
    meta: dict[str, Any] = {}
    """Channel facts about the send, on ``sent`` statuses: what the channel's ``Receipt.meta``
    said (SMS: ``segments``, ``encoding``, ``provider``); on statuses a provider reports later,
    what its report adds (SMS: ``provider``, Aliyun's billed ``segments``). Documented per
    channel; ``{}`` when the channel says nothing."""


_CLOCK = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")


class QuietHours(_Wire, frozen=True, kw_only=True):
    """The customer's rest hours, in their time zone: nothing is sent between ``start`` and
    ``end`` (``"21:00"`` to ``"09:00"`` wraps midnight)."""

    start: str = "21:00"
    """A time of day, ``HH:MM`` (00:00 to 23:59)."""
    end: str = "09:00"
    """A time of day, ``HH:MM``; ``start == end`` means no quiet hours."""
    tz: str = "Asia/Shanghai"
    """An IANA time zone."""

    def problems(self) -> dict[str, str]:
        """What is unusable, by field name (``{}`` when all is well). The one check of
        quiet hours: the configuration, the client and the scheduler call it (the wire
        type itself stays lenient so that a reminder with bad quiet hours still decodes
        and can be reported ``failed`` instead of dropped)."""
        out = {}
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _CLOCK.fullmatch(value):
                out[name] = f"must be a time of day as HH:MM (00:00 to 23:59), got {value!r}"
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            out["tz"] = f"must be an IANA time zone such as Asia/Shanghai, got {self.tz!r}"
        return out


class Fallback(_Wire, frozen=True, kw_only=True):
    """What a reminder does when its channel can no longer reach the customer with free
    content at the due time (WeChat's 48 hours, an SMS opt-out): send ``template`` in the
    same conversation, or send the reminder into ``conversation`` (another conversation
    of the same customer, on any channel). With neither, the reminder fails with the
    channel's reach code."""

    template: Template | None = None
    conversation: str | None = None
    channel_type: str | None = None
    """The channel type of ``conversation`` (required with it)."""
    channel: str | None = None
    """The channel of ``conversation`` (required with it)."""


class DeskTask(_Wire, frozen=True, kw_only=True):
    """A reminder addressed to the desk instead of the customer (a follow-up by phone):
    when due it is published as a :class:`Task` on ``<prefix>.task.<channel_type>.<channel>``."""

    action: str = "call"
    """What the desk should do (``call``, ``visit`` ...)."""
    note: str = ""
    """Why, for the agent (no personal data beyond what the desk already has)."""
    assignee: str | None = None
    data: dict[str, str] = {}


class Reminder(_Envelope, frozen=True, kw_only=True):
    """A scheduled callback (回访): a follow-up or survey sent at ``due_at`` through the
    conversation's channel, never inside quiet hours. Published by a backend (or
    ``Client.remind``) on ``<prefix>.sched.at.<conversation>.<id>`` as a JetStream
    scheduled message (``docs/reminders.md``)."""

    schema_version: int = SCHEMA_VERSION
    id: str
    """Chosen by the backend: 1 to 128 characters of ``A-Z a-z 0-9 - _ =`` (it is a
    subject token). Publishing the same id again moves the reminder."""
    conversation: str
    channel_type: str
    channel: str
    due_at: datetime
    outbound: Outbound
    """What is sent when it fires (``kind`` ``followup`` or ``survey``; a ``survey`` field
    makes the customer's next message be matched against its choices). Its ``id`` is the
    outbound's, delivered once."""
    quiet_hours: QuietHours | None = None
    """The customer's rest hours; overrides the channel's ``quiet_hours``."""
    deadline: datetime | None = None
    """Latest acceptable send time (for example three days after service); past it, the
    reminder is dropped with the status ``expired``."""
    cancel_on_reply: bool = True
    """Cancel when the customer writes in the conversation after ``created_at``."""
    created_at: datetime | None = None
    """When the backend created it (cancel on reply counts the customer's messages after
    this); the gateway uses the time it first saw it when absent."""
    fallback: Fallback | None = None
    task: DeskTask | None = None
    """Address the desk instead of the customer: fires as a :class:`Task`, ``outbound``
    is then only its description."""


REMINDER_ID_PATTERN = r"^[-_=A-Za-z0-9]{1,128}$"
"""A reminder id is a subject token: it names the reminder's schedule subject."""
CONVERSATION_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}\.[-_=A-Za-z0-9]{1,128}$"
"""A gateway conversation key, ``<channel>.<key>``: two subject tokens."""


ReminderState = Literal["scheduled", "rescheduled", "cancelled", "fired", "expired", "failed", "unanswered"]


class ReminderStatus(_Envelope, frozen=True, kw_only=True):
    """What happened to a reminder, on ``<prefix>.sched.status.<channel_type>.<channel>``.
    After ``fired`` the outbound's own :class:`DeliveryStatus` events follow on
    ``<prefix>.status.…`` under ``outbound_id``; ``unanswered`` follows when its survey
    got no answer within ``answer_within`` (also for a survey sent by a plain outbound:
    then ``reminder_id`` is the outbound's id)."""

    schema_version: int = SCHEMA_VERSION
    reminder_id: str
    conversation: str
    channel_type: str
    channel: str
    state: ReminderState
    at: datetime
    due_at: datetime | None = None
    """scheduled/rescheduled: when it will fire."""
    reason: str | None = None
    """rescheduled/cancelled/expired/failed: why (``quiet_hours``, ``reply``, ``operator``,
    ``deadline``, a reach code such as ``outside_window``), or the operator's words;
    unanswered: ``no_answer``."""
    outbound_id: str | None = None
    """fired: the outbound sent (its delivery statuses follow), or the task's id."""
    fallback: str | None = None
    """scheduled/fired: ``template`` or ``conversation`` when the fallback is used."""
    error: ErrorInfo | None = None


class Task(_Envelope, frozen=True, kw_only=True):
    """Work for the desk (a callback by phone), published when a reminder with a ``task``
    fires, on ``<prefix>.task.<channel_type>.<channel>``."""

    schema_version: int = SCHEMA_VERSION
    id: str
    """The reminder's outbound id (unique, stable across a redelivery)."""
    reminder_id: str
    conversation: str
    channel_type: str
    channel: str
    action: str
    note: str = ""
    assignee: str | None = None
    data: dict[str, str] = {}
    due_at: datetime
    at: datetime


class DeadLetter(_Envelope, frozen=True, kw_only=True):
    """What the gateway gave up on, on ``<prefix>.dead.<channel_type>.<channel>``."""

    schema_version: int = SCHEMA_VERSION
    id: str
    subject: str
    """The subject it was taken from."""
    reason: str
    attempts: int
    at: datetime
    outbound: Outbound | None = None
    """The decoded outbound, when it could be decoded."""
    payload: bytes | None = None
    """The raw bytes, when it could not be decoded."""
    error: ErrorInfo | None = None
    headers: dict[str, str] = {}


class ConversationMark(_Envelope, frozen=True, kw_only=True):
    """A backend's mark on a conversation, on ``<prefix>.desk.mark.<channel_type>.<channel>``:
    ``complaint`` starts the resolution SLA, ``resolved`` stops it (and starts the follow-up
    promise), ``reopened`` undoes ``resolved``."""

    schema_version: int = SCHEMA_VERSION
    conversation: str
    action: Literal["complaint", "resolved", "reopened"]
    at: datetime | None = None
    """When it happened (default: when the gateway read the mark)."""
    by: str | None = None
    """Who marked it (an agent's id), for the record."""
    note: str | None = None


class SlaEvent(_Envelope, frozen=True, kw_only=True):
    """An SLA timer's warning or breach, on ``<prefix>.sla.<channel_type>.<channel>``."""

    schema_version: int = SCHEMA_VERSION
    conversation: str
    channel_type: str
    channel: str
    rule: Literal["first_response", "next_response", "resolution"]
    state: Literal["warning", "breach"]
    limit: str
    """The rule's limit as configured (``3d``; business hours when ``business_hours``)."""
    business_hours: bool
    started_at: datetime
    """The customer message (or the complaint mark) that started the timer."""
    due_at: datetime
    at: datetime
    """When this event was decided."""
    late: float
    """Seconds past ``due_at`` (negative for a warning: time left)."""


class DeskOpened(_Envelope, frozen=True, kw_only=True):
    """A calendar's desk opened, on ``<prefix>.desk.opened.<calendar>``: who waited."""

    schema_version: int = SCHEMA_VERSION
    calendar: str
    opened_at: datetime
    closed_since: datetime | None
    """When the closed period began (None: not known within the calendar's horizon)."""
    waiting: int
    """Conversations that wrote while it was closed (automatic messages not counted)."""
    waiting_since: datetime | None
    """The earliest of their messages."""
    channels: list[str] = []


class FollowupStatus(_Envelope, frozen=True, kw_only=True):
    """The follow-up (回访) promise of a resolved conversation, on
    ``<prefix>.desk.followup.<channel_type>.<channel>``: each change of its state."""

    schema_version: int = SCHEMA_VERSION
    conversation: str
    channel_type: str
    channel: str
    state: Literal["due", "scheduled", "sent", "answered", "failed", "expired", "cancelled", "missed"]
    """``due``: resolved, nothing scheduled yet; ``scheduled``: a reminder is pending;
    ``sent``: its outbound was sent (a desk task: handed to the desk); ``answered``: the
    customer wrote after it; ``failed``/``expired``/``cancelled``: what the reminder
    reported; ``missed``: nothing was sent within the promise."""
    resolved_at: datetime
    due_by: datetime
    """``resolved_at`` + the channel's ``followup_within``."""
    at: datetime
    reminder_id: str | None = None
    outbound_id: str | None = None
    reason: str | None = None
    task_id: str | None = None
    """When a desk task was raised for it (failed, expired, missed)."""


WIRE_TYPES: dict[str, type[_Envelope]] = {
    "message": Message,
    "outbound": Outbound,
    "delivery-status": DeliveryStatus,
    "reminder": Reminder,
    "reminder-status": ReminderStatus,
    "task": Task,
    "dead-letter": DeadLetter,
    "conversation-mark": ConversationMark,
    "sla-event": SlaEvent,
    "desk-opened": DeskOpened,
    "followup-status": FollowupStatus,
}
"""Every top-level bus type, by the file name of its JSON Schema."""


_encoder = msgspec.json.Encoder()
encode = _encoder.encode
"""Encode any wire struct to JSON bytes (one shared encoder: the fast path)."""

message_decoder = msgspec.json.Decoder(Message)
outbound_decoder = msgspec.json.Decoder(Outbound)
status_decoder = msgspec.json.Decoder(DeliveryStatus)
reminder_decoder = msgspec.json.Decoder(Reminder)
reminder_status_decoder = msgspec.json.Decoder(ReminderStatus)
task_decoder = msgspec.json.Decoder(Task)
dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
mark_decoder = msgspec.json.Decoder(ConversationMark)
sla_event_decoder = msgspec.json.Decoder(SlaEvent)
desk_opened_decoder = msgspec.json.Decoder(DeskOpened)
followup_status_decoder = msgspec.json.Decoder(FollowupStatus)


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every top-level bus type, keyed by file stem.

    Descriptions come from docstrings; msgspec's own handling of their indentation has
    changed between releases, so they are normalized here (``inspect.cleandoc``) and the
    committed files do not depend on the msgspec version."""
    return {name: _clean_descriptions(msgspec.json.schema(tp)) for name, tp in WIRE_TYPES.items()}


def _clean_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _clean_descriptions(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_clean_descriptions(v) for v in node]
    return node
