"""The bus's wire format for code that reads or writes it directly (backends, tests): one
encoder for every wire type, a decoder per type, the ids the gateway derives and the
headers of the bus contract (reminders' too), and how the gateway reads a survey answer
(:func:`read_answer`: a backend reading replies on a channel the gateway does not match
can apply the same never-guess rules). Channel
plugins do not need this module: the context encodes and decodes for them."""

from __future__ import annotations

from .core.bus.contract import (
    dead_inbound_headers,
    dead_letter_headers,
    message_headers,
    outbound_headers,
    reminder_status_headers,
    replay_headers,
    schedule_headers,
    status_headers,
    task_headers,
)
from .core.inbound.pipeline import conversation_key, message_id
from .core.scheduling.survey import Answer, is_greeting, read_answer
from .core.schema import (
    dead_letter_decoder,
    desk_opened_decoder,
    followup_status_decoder,
    mark_decoder,
    sla_event_decoder,
    encode,
    message_decoder,
    outbound_decoder,
    reminder_decoder,
    reminder_status_decoder,
    status_decoder,
    task_decoder,
)

__all__ = [
    "Answer",
    "conversation_key",
    "desk_opened_decoder",
    "followup_status_decoder",
    "mark_decoder",
    "sla_event_decoder",
    "dead_inbound_headers",
    "dead_letter_decoder",
    "dead_letter_headers",
    "encode",
    "is_greeting",
    "message_decoder",
    "message_headers",
    "message_id",
    "outbound_decoder",
    "outbound_headers",
    "read_answer",
    "reminder_decoder",
    "reminder_status_decoder",
    "reminder_status_headers",
    "replay_headers",
    "schedule_headers",
    "status_decoder",
    "status_headers",
    "task_decoder",
    "task_headers",
]
