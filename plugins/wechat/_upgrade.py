"""Reading state that the release before the channel toolkit (commit f3660f2) left in the
channel's KV, for a gateway upgraded in place. Read on a miss only; never written.

Remove this module (and its one call in ``_channel.py``) once every gateway of an
installation has run a newer release for a week: WeChat reports a template's result
within minutes, and the new index keeps its records for 7 days. docs/channels/wechat.md
"Upgrading" lists every record and what happens to it."""

from __future__ import annotations

import msgspec

from gateway import KeyValue, Sent


class _OldTemplateSent(msgspec.Struct, kw_only=True):
    """f3660f2's record of a template message it sent, under ``tmpl-<msgid>`` (the new
    release keeps the same fields as a :class:`gateway.Sent` under ``tmpl:<msgid>``)."""

    outbound_id: str
    conversation: str


async def template_sent_before_upgrade(state: KeyValue, msgid: str) -> Sent | None:
    """The outbound the previous release sent as template message ``msgid``, or None."""
    rec = await state.get_record(f"tmpl-{msgid}", _OldTemplateSent)
    return None if rec is None else Sent(outbound_id=rec.outbound_id, conversation=rec.conversation)
