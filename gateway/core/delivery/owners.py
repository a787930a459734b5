"""Which gateway process delivers which channel: one owner per channel at a time.

Each channel's outbounds are read by one durable consumer (``<prefix>_out_<channel>``),
and one process at a time owns it: it holds the channel's lease, a record in the state
bucket (``core.delivery.<channel>``) written with a per-message TTL. The server removes
the record when the TTL runs out, so expiry is the server's clock alone; the holder
renews it (compare-and-set on the record's revision) every quarter of the TTL and stops
delivering on its own clock at 0.8 TTL after it *sent* its last successful renewal, which
is before the server can have removed it. A process that may not renew (bus gone, paused,
overloaded) therefore stops before another can start.

Every live process also keeps a presence record (``core.delivery-live.<instance>``, same
TTL), so each knows how many share the channels and takes its fair part of them. The record
names the channels the process cannot deliver now (its channel says so, or does not run
there), so that such a channel goes to a process that can.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import msgspec

from ..bus.connection import Bus
from ..bus.state import delivery_live_key, delivery_owner_key, state_records

FENCE = 0.8
"""The holder delivers until this fraction of the TTL after it sent its last renewal."""


class _Owner(msgspec.Struct, kw_only=True):
    instance: str
    pid: int = 0


_owner_decoder = msgspec.json.Decoder(_Owner)


class _Presence(msgspec.Struct, kw_only=True, omit_defaults=True):
    unable: list[str] = []
    """Channels this process cannot deliver now."""


_presence_encoder = msgspec.json.Encoder()
_presence_decoder = msgspec.json.Decoder(_Presence)


class Owners:
    """The leases and presence records of one process (``instance``), TTL ``ttl`` seconds."""

    def __init__(self, bus: Bus, *, instance: str, ttl: float, pid: int = 0):
        self.bus = bus
        self.records = state_records(bus)
        self.instance = instance
        self.ttl = max(2.0, ttl)
        self._value = msgspec.json.encode(_Owner(instance=instance, pid=pid))
        self.revisions: dict[str, int] = {}
        """Channel -> revision of our lease record, for the next renewal."""

    async def _write(self, key: str, expected: int) -> int | None:
        """Write our record at ``key`` if its revision is still ``expected`` (0: absent);
        the new revision, or None if another writer won."""
        return await self.records.write_if(key, self._value, expected, ttl=self.ttl)

    async def live(self, unable: Iterable[str] = ()) -> dict[str, frozenset[str]]:
        """Write this process's presence, naming the channels it cannot deliver now
        (``Channel.delivers_here``); every live process (this one included) → the channels
        it cannot deliver. A presence written by a version without the list is read as
        able to deliver everything."""
        mine = frozenset(unable)
        own = delivery_live_key(self.instance)
        await self.records.write(own, _presence_encoder.encode(_Presence(unable=sorted(mine))), ttl=self.ttl)
        keys = [key for key in await self.records.keys(delivery_live_key("*")) if key != own]
        asked = [(key, await self.records.ask(key)) for key in keys]
        found = {self.instance: mine}
        for key, fut in asked:
            entry = await asyncio.wait_for(fut, self.ttl / 4)
            if entry is None:
                continue  # expired meanwhile: that process is gone
            try:
                found[key.rsplit(".", 1)[1]] = frozenset(_presence_decoder.decode(entry.value).unable) \
                    if entry.value else frozenset()
            except msgspec.DecodeError:
                found[key.rsplit(".", 1)[1]] = frozenset()
        return found

    async def take(self, channel: str) -> float | None:
        """Take (or renew) ``channel``'s lease; the monotonic time until which this process
        may deliver, or None when another process holds it."""
        key = delivery_owner_key(channel)
        sent = time.monotonic()
        expected = self.revisions.get(channel)
        if expected is None:
            found = await self.records.last(key)
            if found is None:
                expected = 0
            else:
                try:
                    holder = _owner_decoder.decode(found.value).instance
                except msgspec.DecodeError:
                    holder = ""
                if holder and holder != self.instance:
                    return None  # held: the server removes it when its holder stops renewing
                expected = found.revision
        revision = await self._write(key, expected)
        if revision is None:
            self.revisions.pop(channel, None)
            return None
        self.revisions[channel] = revision
        return sent + FENCE * self.ttl

    async def release(self, channel: str) -> None:
        """Give ``channel`` up (only if we still hold it) so that a peer takes it at once.
        The record stays, marked free (no holder), until its TTL removes it."""
        expected = self.revisions.pop(channel, None)
        if expected is None:
            return
        await self.records.write_if(delivery_owner_key(channel), b"{\"instance\":\"\"}", expected, ttl=self.ttl)

    async def leave(self) -> None:
        """Remove this process's presence (a clean stop)."""
        try:
            await self.records.erase(delivery_live_key(self.instance))
        except Exception:  # noqa: BLE001 - its TTL removes it anyway
            pass

