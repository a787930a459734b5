"""Dedup records after a crash (issue 9.5).

The inbound path writes a message's ``gw_dedup`` record right after JetStream's ack. A
process killed in between leaves a message on ``GW_IN`` without a record: a provider
retry inside ``bus.duplicate_window`` is still caught by JetStream, a later one would be
published a second time. GW_IN is the log, so the records can be restored from it.

Which part of the log? Every gateway process keeps a liveness marker in ``gw_state``
(``core.inbound-live.<instance>``), rewritten every ``beat`` seconds and removed by a clean
stop. A marker that stopped being rewritten belongs to a process that died: the only
messages that can lack a record are the ones it had in flight when it died, which JetStream
stored between its last beat minus ``publish_timeout`` and its last beat plus the time it
takes to notice (``stale_after``). That window of GW_IN (seconds, whatever the stream's
size) is replayed with an ordered consumer, and a record is created for every message
with a provider id that has none (looked up first; only missing ones are written).

This works with several processes on one bus, where a checkpoint per process would not
(one process's clean stop says nothing about another's crash): any process repairs any
dead marker, at its own start (in the background, once the bus is up) and on every beat (a peer that crashed
and is never restarted is repaired by the survivors, within ``stale_after``). A marker is
claimed by a compare-and-set write before it is repaired and removed only after, so two
processes do not both repair it and a repairer's own crash leaves it for the next. The
beat is a sixth of the duplicate window (at most 5 s), so a crash is repaired before
JetStream's own window, which covers retries meanwhile, has ended.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ..bus.connection import Bus
from ..bus.state import Dedup, Stored, liveness_key, state_records
from ..retry import cancel_and_wait


class _Marker(msgspec.Struct, kw_only=True, omit_defaults=True):
    instance: str
    pid: int
    host: str
    beat_at: datetime | None = None
    """Set when a repairer claimed the marker: the server time of the dead process's last
    beat (the claim's own write has a newer time). RFC 3339 on the wire; releases before
    this one wrote ``datetime.isoformat()`` (``+00:00`` instead of ``Z``), which decodes
    the same."""
    claimed_by: str | None = None


class _ProviderId(msgspec.Struct):
    """The one field of a ``Message`` the repair needs."""

    provider_id: str | None = None


_marker_decoder = msgspec.json.Decoder(_Marker)

_GONE_TTL = 86400.0
"""How long the purge marker of a removed liveness marker stays (a day: far longer than
any nats-server restart that could bring the removed marker back)."""


def _stored_at(m: api.RawStreamMsg | Stored) -> datetime:
    """When JetStream stored ``m`` (nats-py types it Optional; a message read from a stream
    always has it)."""
    if m.time is None:
        raise ValueError("a stream message read back has no time")
    return m.time

_pid_decoder = msgspec.json.Decoder(_ProviderId)


class DedupRestore:
    """Liveness marker of this process, and repair of the markers of dead ones."""

    def __init__(self, bus: Bus, *, log: Any):
        self.bus = bus
        self.records = state_records(bus)
        self.dedup = Dedup(bus)
        self.log = log.bind(component="dedup-restore")
        self.instance = uuid.uuid4().hex[:20]
        window = float(bus.cfg.duplicate_window)
        self.beat = min(5.0, max(0.1, window / 6))
        self.stale_after = 3 * self.beat
        self.publish_timeout = float(bus.cfg.publish_timeout)
        self.ready = asyncio.Event()
        """Set once the first repair at start finished (or failed and was logged)."""
        self.last_repair: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None

    def _key(self, instance: str | None = None) -> str:
        return liveness_key(self.instance if instance is None else instance)

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Repair what dead processes left, mark this one alive, keep beating: in the
        background, so that serving does not wait for it. Called when the bus is ready
        (again after every new connection; one beat loop whatever the number of calls).

        Serving before the repair is safe: the messages a dead process may have left
        without a record were stored at most ``stale_after`` + ``publish_timeout`` before
        the repair, and JetStream's own duplicate window (which the beat is a sixth of)
        still recognises their retries until the repair has written the records."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="dedup-restore")

    async def _first(self) -> None:
        try:
            now = await self._beat_once()
            await self.repair(now)
        except Exception as exc:  # the beat loop retries
            self.log.error("dedup restore at start failed; retrying in the background",
                           error=f"{type(exc).__name__}: {exc}")
        finally:
            self.ready.set()

    async def stop(self) -> None:
        """A clean stop: every publish of this process finished, so its marker goes."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self.bus.connected:
            try:
                await self._remove(self._key())
            except Exception as exc:  # a leftover marker only costs a peer a short repair
                self.log.warning("liveness marker not removed", error=f"{type(exc).__name__}: {exc}")

    async def _loop(self) -> None:
        await self._first()
        while True:
            await asyncio.sleep(self.beat)
            if not self.bus.connected:
                continue
            try:
                now = await self._beat_once()
                await self.repair(now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("liveness beat failed", error=f"{type(exc).__name__}: {exc}")

    async def _remove(self, key: str) -> None:
        """Remove a marker by appending a purge marker (``KV-Operation: PURGE``, rollup),
        not by purging its subject: nats-server's file store does not keep a removal
        through a kill -9 of the server until it has synced its index (minutes), so a
        purged marker came back, looked dead and was repaired again (17 repeated repairs
        after one kill). An appended message survives, and so the subject's latest
        message says "removed" whatever older ones reappear. The purge marker itself
        goes after ``_GONE_TTL``."""
        self.bus.require(during_setup=True)
        await self.records.purge(key, ttl=_GONE_TTL)

    async def _beat_once(self) -> datetime:
        """Rewrite this process's marker; returns the server's time of that write (every
        age below is in server time, so the processes' clocks do not matter)."""
        self.bus.require(during_setup=True)
        value = msgspec.json.encode(_Marker(instance=self.instance, pid=os.getpid(), host=socket.gethostname()))
        return await self.records.stored_at(await self.records.write(self._key(), value))

    # --- repair --------------------------------------------------------------------

    async def repair(self, now: datetime) -> int:
        """Repair every marker not rewritten for ``stale_after``; returns the number of
        dedup records created."""
        self.bus.require(during_setup=True)
        created = 0
        for key in sorted(await self.records.keys(self._key("*"))):
            if key == self._key():
                continue
            m = await self.records.last(key, leader=True)
            if m is None or m.removed:
                continue  # removed (see _remove)
            stored_at = _stored_at(m)
            age = (now - stored_at).total_seconds()
            if age < self.stale_after:
                continue  # alive (or dead too recently to tell: JetStream's window covers it)
            try:
                marker = _marker_decoder.decode(m.value)
            except msgspec.DecodeError:
                marker = _Marker(instance=key.rsplit(".", 1)[1], pid=0, host="?")
            beat_at = marker.beat_at or stored_at
            claim = msgspec.structs.replace(marker, beat_at=beat_at, claimed_by=self.instance)
            if await self.records.write_if(key, msgspec.json.encode(claim), m.revision) is None:
                continue  # another process claimed it first, or it beat again
            t0 = time.perf_counter()
            start = beat_at - timedelta(seconds=self.publish_timeout + 1)
            end = beat_at + timedelta(seconds=self.stale_after + self.publish_timeout + 1)
            scanned, restored = await self.restore_window(start, end)
            await self._remove(key)
            created += restored
            self.last_repair = {"instance": marker.instance, "scanned": scanned, "restored": restored,
                                "seconds": round(time.perf_counter() - t0, 3)}
            self.log.warning("restored dedup records of a gateway process that stopped uncleanly",
                             dead_instance=marker.instance, dead_pid=marker.pid, dead_host=marker.host,
                             last_beat=beat_at.isoformat(), scanned=scanned, restored=restored,
                             seconds=self.last_repair["seconds"])
        return created

    async def restore_window(self, start: datetime, end: datetime) -> tuple[int, int]:
        """Create the missing dedup record of every message with a provider id that GW_IN
        stored between ``start`` and ``end``; returns (messages scanned, records created)."""
        js = self.bus.require(during_setup=True)
        s = self.bus.subjects
        try:
            state = (await js.stream_info(s.stream_in)).state
            if not state.messages:
                return 0, 0
            # Nothing stored since the window began: the ordered consumer would deliver
            # nothing and this would wait out its timeout (5 s per dead process at start).
            if _stored_at(await js.get_msg(s.stream_in, seq=state.last_seq)) < start:
                return 0, 0
        except nats.js.errors.NotFoundError:
            return 0, 0
        sub = await js.subscribe(f"{s.prefix}.in.>", stream=s.stream_in, ordered_consumer=True,
                                 config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME,
                                                           opt_start_time=start),
                                 pending_msgs_limit=100_000)
        scanned = 0
        wanted: list[tuple[str, int]] = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=max(2.0, self.publish_timeout))
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    break  # nothing more in the stream
                meta = msg.metadata
                if meta.timestamp > end:
                    break
                scanned += 1
                mid = (msg.headers or {}).get("Nats-Msg-Id")
                if mid:
                    try:
                        has_provider_id = _pid_decoder.decode(msg.data).provider_id is not None
                    except msgspec.DecodeError:
                        has_provider_id = False
                    if has_provider_id:
                        wanted.append((f"{msg.subject.rsplit('.', 1)[-1]}.{mid}", meta.sequence.stream))
                if meta.num_pending == 0:
                    break
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        # Look up first, write only what is missing (a create-only write would do both in
        # one, but every refusal of an existing record is reported as a connection error).
        restored = 0
        for i in range(0, len(wanted), 512):
            chunk = wanted[i:i + 512]
            missing = await self.dedup.missing([key for key, _ in chunk])
            futs = [await self.dedup.write(key, seq) for (key, seq), gone in zip(chunk, missing) if gone]
            await asyncio.gather(*futs)
            restored += len(futs)
        return scanned, restored

