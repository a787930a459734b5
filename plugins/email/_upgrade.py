"""Reading state that the release before the channel toolkit (commit f3660f2) left in the
channel's KV, for a gateway upgraded in place. Read on a miss only; never written.

Remove this module (and its one call in ``_channel.py``) once every gateway of an
installation has run a newer release for ``thread_ttl`` (180 days by default): the old
records carry that TTL, so by then none is left. docs/channels/email.md "Upgrading" lists
every record and what happens to it."""

from __future__ import annotations

import msgspec

from gateway import KeyValue, Sent


class _OldSentRecord(msgspec.Struct):
    """f3660f2 kept our outbound in the thread record of its Message-ID (``mid:<Message-ID>``,
    a ``MessageRecord``): ``o`` the outbound id, ``c`` the conversation key. Its other
    fields are read by :class:`~._threading.ThreadStore` as before (they did not change)."""

    o: str | None = None
    c: str | None = None


async def sent_before_upgrade(state: KeyValue, message_id: str) -> Sent | None:
    """The outbound the previous release sent as ``message_id`` (what ``sent:<Message-ID>``
    says for mail sent since the upgrade), or None."""
    rec = await state.get_record("mid:" + message_id, _OldSentRecord)
    if rec is None or rec.o is None:
        return None
    return Sent(outbound_id=rec.o, conversation=rec.c or "")
