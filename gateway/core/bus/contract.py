"""The headers of the bus contract (``docs/bus-contract.md``, "Headers"), written in one
place: the gateway, ``gateway send``, ``gateway dlq replay`` and the client publish the
same names and ids, and a change to the contract is a change here.

Each function returns a fresh dict built from one literal (no merging, no loops): the
inbound and delivery paths call them once per message."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..schema import DeliveryStatus, Message, Outbound, Reminder, ReminderStatus, Task

JSON = "application/json"
SCHEMA_MESSAGE = "message/1"
SCHEMA_OUTBOUND = "outbound/1"
SCHEMA_STATUS = "delivery-status/1"
SCHEMA_DEAD_LETTER = "dead-letter/1"
SCHEMA_REMINDER = "reminder/1"
SCHEMA_REMINDER_STATUS = "reminder-status/1"
SCHEMA_TASK = "task/1"

EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
"""Makes a publish a compare-and-set: JetStream stores it only if the last message on its
subject still has this sequence (``"0"``: there is none), and answers
:data:`.codes.WRONG_LAST_SEQUENCE` otherwise."""


def message_headers(message: Message) -> dict[str, str]:
    """An inbound message: its id is the broker's de-duplication id; the conversation and
    the CloudEvents binary-mode attributes let consumers filter without decoding."""
    return {
        "Nats-Msg-Id": message.id,
        "Content-Type": JSON,
        "Gw-Schema": SCHEMA_MESSAGE,
        "Gw-Conversation": message.conversation,
        "ce-specversion": "1.0",
        "ce-id": message.id,
        "ce-type": "gateway.message.v1",
        "ce-source": f"/{message.channel_type}/{message.channel}",
    }


def outbound_headers(outbound: Outbound) -> dict[str, str]:
    """An outbound as a backend publishes it: ``Nats-Msg-Id`` is its id, so a repeated
    publish within the duplicate window is dropped by the broker."""
    return {"Nats-Msg-Id": outbound.id, "Content-Type": JSON, "Gw-Schema": SCHEMA_OUTBOUND}


PAYLOAD_HEADER = "Gw-Dead-Payload"
"""In ``DeadLetter.headers`` (the body, not NATS headers): ``<bucket>/<name>`` of the
original bytes in the object store, for a dead letter that would not have fitted on the bus
with them inside."""


def replay_headers(outbound: Outbound, dead_seq: int) -> dict[str, str]:
    """An outbound republished from the dead-letter stream (``gateway dlq replay``): a new
    ``Nats-Msg-Id``, since the original one may still be inside the duplicate window."""
    return {"Nats-Msg-Id": f"{outbound.id}:replay:{dead_seq}", "Content-Type": JSON,
            "Gw-Schema": SCHEMA_OUTBOUND, "Gw-Replay-Of": str(dead_seq)}


def status_headers(status: DeliveryStatus) -> dict[str, str]:
    """A status event: ``<outbound_id>:<state>:<attempt>`` lets the broker drop the repeat
    of a status a restarted process emits again (``accepted`` has attempt 0)."""
    return {"Nats-Msg-Id": f"{status.outbound_id}:{status.state}:{status.attempt}",
            "Content-Type": JSON, "Gw-Schema": SCHEMA_STATUS}


def dead_letter_headers(dead_letter_id: str, out_seq: int) -> dict[str, str]:
    """A dead outbound: ``dead:<id>:<outbound stream sequence>``, so a copy published again
    after a crash (copy first, terminate second) is dropped by the broker."""
    return {"Nats-Msg-Id": f"dead:{dead_letter_id}:{out_seq}", "Content-Type": JSON, "Gw-Schema": SCHEMA_DEAD_LETTER}


def dead_inbound_headers(stream_in: str, in_seq: int) -> dict[str, str]:
    """An inbound message a client could not decode, dead-lettered by that client: named
    by its place in the inbound stream (``dead-in:<stream>:<sequence>``)."""
    return {"Nats-Msg-Id": f"dead-in:{stream_in}:{in_seq}", "Content-Type": JSON, "Gw-Schema": SCHEMA_DEAD_LETTER}


def rfc3339(at: datetime) -> str:
    """UTC, with microseconds: what ``@at`` takes (``2026-12-01T08:00:00.250000Z``)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def schedule_headers(reminder: Reminder, target: str, *, keep_fired: float, reason: str | None = None,
                     expected_seq: int | None = None) -> dict[str, str]:
    """A reminder's schedule message (docs/reminders.md): the server fires it at ``@at``
    onto ``target`` (``<prefix>.sched.fire.<type>.<channel>``) and keeps the fired copy for
    ``keep_fired`` seconds. No ``Nats-Msg-Id``: a move republishes on the same subject, and
    the duplicate window would drop it."""
    h = {
        "Nats-Schedule": f"@at {rfc3339(reminder.due_at)}",
        "Nats-Schedule-Target": target,
        "Nats-Schedule-TTL": f"{int(keep_fired)}s",
        "Content-Type": JSON,
        "Gw-Schema": SCHEMA_REMINDER,
    }
    if reason:
        h["Gw-Reason"] = reason
    if expected_seq is not None:
        h[EXPECTED_LAST_SEQUENCE] = str(expected_seq)
    return h


def reminder_status_headers(status: ReminderStatus, seq: int, ttl: float) -> dict[str, str]:
    """``<reminder id>:<state>:<stream sequence of the message that caused it>``: a repeat
    after a crash is dropped by JetStream within its duplicate window."""
    return {"Nats-Msg-Id": f"{status.reminder_id}:{status.state}:{seq}", "Nats-TTL": f"{int(ttl)}s",
            "Content-Type": JSON, "Gw-Schema": SCHEMA_REMINDER_STATUS}


def task_headers(task: Task) -> dict[str, str]:
    """A desk task: ``task:<id>`` (the reminder's outbound id), published once."""
    return {"Nats-Msg-Id": f"task:{task.id}", "Content-Type": JSON, "Gw-Schema": SCHEMA_TASK}
