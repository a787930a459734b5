"""The bus's wire format for code that reads or writes it directly (backends, tests): one
encoder for every wire type, a decoder per type, and the ids the gateway derives. Channel
plugins do not need this module: the context encodes and decodes for them."""

from __future__ import annotations

from .core._pipeline import conversation_key, message_id
from .core._schema import (
    dead_letter_decoder,
    encode,
    message_decoder,
    outbound_decoder,
    reminder_decoder,
    status_decoder,
)

__all__ = [
    "conversation_key",
    "dead_letter_decoder",
    "encode",
    "message_decoder",
    "message_id",
    "outbound_decoder",
    "reminder_decoder",
    "status_decoder",
]
