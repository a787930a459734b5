"""The bus's wire format for code that reads or writes it directly (backends, tests): one
encoder for every wire type, a decoder per type, the ids the gateway derives and the
headers of the bus contract. Channel
plugins do not need this module: the context encodes and decodes for them."""

from __future__ import annotations

from .core.bus.contract import (
    dead_inbound_headers,
    dead_letter_headers,
    message_headers,
    outbound_headers,
    replay_headers,
    status_headers,
)
from .core.inbound.pipeline import conversation_key, message_id
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
    "conversation_key",
    "desk_opened_decoder",
    "followup_status_decoder",
    "mark_decoder",
    "sla_event_decoder",
    "dead_inbound_headers",
    "dead_letter_decoder",
    "dead_letter_headers",
    "encode",
    "message_decoder",
    "message_headers",
    "message_id",
    "outbound_decoder",
    "outbound_headers",
    "reminder_decoder",
    "reminder_status_decoder",
    "replay_headers",
    "status_decoder",
    "status_headers",
    "task_decoder",
]
