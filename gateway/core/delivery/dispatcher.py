"""Outbound delivery: one durable JetStream pull consumer per channel, each owned by one
gateway process at a time.

An outbound is acked only after the channel's provider accepted it and its receipt is
stored; transient failures are retried in place with exponential backoff and jitter (the
conversation's later replies wait behind it, so order holds); permanent failures and
exhausted attempts are copied to the dead-letter subject first and terminated second.

Order across crashes, bus restarts and processes comes from the work queue itself: what
is left of a channel's subjects on the outbound stream is exactly what was not acked, in
publish order. Whenever a process starts a *term* of a channel (it took the channel's
lease, or its connection to the server was renewed), it creates the channel's consumer
anew, so that this remainder is delivered again from its start, before anything later of
the same conversation; receipts keep what was sent already from being sent twice. A term
ends (its queued messages are dropped, left to the next term) when the lease was not
renewed in time, the bus reconnected, or the process stops (``owners.py``)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ..channel.api import Channel, Conversation, Receipt
from ..channel.ratelimit import RateLimiter
from ..config import ChannelConfig, OutboundConfig
from ..errors import BusUnavailable, Deferred, DeliveryError
from ..failpoints import failpoint
from ..metrics import Metrics
from ..retry import cancel_and_wait
from ..schema import DeadLetter, DeliveryStatus, ErrorInfo, Outbound, outbound_decoder
from ..bus.codes import CONSUMER_NOT_UNIQUE
from ..bus.services import BusServices
from .owners import Owners


class _Places:
    """A semaphore whose size can change while it is in use (a reload)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._want: tuple[int, asyncio.Future[None]] | None = None

    @property
    def free(self) -> int:
        return max(0, self.limit - self.used)

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # the releaser counted the place for us
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.used -= 1
        self._wake()
        if self._want is not None and self.limit - self.used >= self._want[0] and not self._want[1].done():
            self._want[1].set_result(None)

    async def wait_free(self, n: int, timeout: float) -> None:
        """Wait until ``n`` places are free, or ``timeout`` seconds (one waiter at a time)."""
        if self.free >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._want = (n, fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            self._want = None

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)


class _Fenced(Exception):
    """The term ended before the provider was called: the outbound is left unacked for
    the channel's next term (in this process or another)."""


class _Term:
    """One term of this process's ownership of a channel: its consumer subscription, its
    fetch loop and its buffer (messages taken off the bus and not finished). Deliveries
    start only while the term is valid: not ended and inside the lease's fence."""

    def __init__(self, name: str, places: _Places, buffer: int, deadline: float):
        self.name = name
        self.places = places
        """The channel's delivery places (shared by its terms: one process, one limit)."""
        self.buffer = _Places(buffer)
        self.deadline = deadline
        self.ended = asyncio.Event()
        self.psub: Any = None
        self.task: asyncio.Task[None] | None = None
        self.calls = 0
        self.idle = asyncio.Event()
        """Set while no provider call of this term is in progress."""
        self.idle.set()

    def valid(self) -> bool:
        return not self.ended.is_set() and time.monotonic() < self.deadline


def _oid(e: _Entry) -> str:
    return e.outbound.id if e.outbound is not None else f"(undecodable, stream sequence {e.msg.metadata.sequence.stream})"


class _Entry:
    __slots__ = ("msg", "outbound", "err", "term")

    def __init__(self, msg: Any, outbound: Outbound | None, err: Exception | None, term: _Term):
        self.msg = msg
        self.outbound = outbound
        self.err = err
        self.term = term


# How long a receipt may wait in nats-py's buffer while further deliveries start in the
# same loop turn: what a kill -9 can double is what was delivered in this time.
_RECEIPT_LAG = 0.0005

# ``[outbound]`` keys the dispatcher cannot change while it runs: the consumer's ack_wait
# (keep-alives are paced by it), the receipts bucket's TTL and the lease are set up at start.
_RESTART_KEYS = ("enabled", "ack_wait", "receipt_ttl", "lease")

# A channel's consumer that nobody pulls from for this long is removed by the server; the
# outbounds of a channel no process configures are then dead-lettered by the sweep.
_INACTIVE = 300.0

# The sweep for outbounds of channels nobody configured runs every this many rounds.
_SWEEP_EVERY = 4

_REFILL_WAIT = 0.01
"""At most this long (s) a fetch waits for a batch's worth of free buffer places."""

class Dispatcher:
    """Takes outbound messages off ``<prefix>.out.*.<channel>`` and delivers them.

    ``channel_configs`` returns the configured channels (read per message, so a reload
    applies to the next one); ``channel(name)`` the channel that may deliver now (started,
    running or degraded), or None."""

    def __init__(self, services: BusServices, cfg: OutboundConfig, *,
                 channel_configs: Callable[[], Mapping[str, ChannelConfig]],
                 channel: Callable[[str], Channel | None], metrics: Metrics, log: Any,
                 on_survey_sent: Callable[[Outbound], Awaitable[None]] | None = None):
        self.services = services
        self.on_survey_sent = on_survey_sent
        """Called once an outbound with a survey was sent (its answer is matched from then on)."""
        self.bus = services.bus
        self.cfg = cfg
        self.channel_configs = channel_configs
        self.channel = channel
        self.metrics = metrics
        # The consumers and their keep-alives keep the ack_wait they started with.
        self._ack_wait = self.cfg.ack_wait
        self.log = log.bind(component="outbound")
        self.instance = uuid.uuid4().hex[:20]
        self.owners = Owners(self.bus, instance=self.instance, ttl=cfg.lease, pid=os.getpid())
        self.terms: dict[str, _Term] = {}
        """The channels this process delivers now, by name."""
        self._ending: dict[str, _Term] = {}
        self.lanes: dict[str, deque[_Entry]] = {}
        self.lane_tasks: set[asyncio.Task[None]] = set()
        self.buckets: dict[str, RateLimiter] = {}
        # Each channel's ``places`` bound its deliveries in progress (a message waiting for
        # its retry gives its place back), so a slow or hanging provider holds only its own
        # channel's places; each term's buffer bounds what it took off the bus, and the
        # server's max_ack_pending bounds it per channel: a saturated channel fills only
        # its own.
        self.places: dict[str, _Places] = {}
        # Outbounds this process knows the provider accepted and whose receipt is not
        # stored yet (outbound id -> receipt): never delivered again by this process.
        self.accepted: dict[str, Receipt] = {}
        # Resolved once the receipt writes issued so far were handed to the socket (see
        # _receipts_issued); None when there are none.
        self._receipts_written: asyncio.Future[None] | None = None
        self._receipts_since = 0.0
        self._keeper: asyncio.Task[None] | None = None
        self._owner_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._rounds = 0
        self._stopping = asyncio.Event()
        self.live = 1
        """Gateway processes delivering outbounds, as of the last round."""

    def configure(self, cfg: OutboundConfig) -> list[str]:
        """Apply a reloaded ``[outbound]`` section. Returns the keys that changed but take
        effect only at the next start."""
        later = [f"outbound.{k}" for k in _RESTART_KEYS if getattr(cfg, k) != getattr(self.cfg, k)]
        self.cfg = cfg
        for term in self.terms.values():
            term.buffer.resize(cfg.concurrency * 16)
        self._wake.set()  # channels added or removed: take or give them up now
        return later

    def in_flight(self, channel: str) -> int:
        """Deliveries of ``channel`` in progress in this process."""
        places = self.places.get(channel)
        return places.used if places else 0

    async def start(self) -> None:
        """Start delivering. Called again by the bus after every new connection: the
        subscriptions died with the old connection, so every term ends and the channels
        start again from what the server still holds."""
        self._end_all()
        if self._owner_task is None:
            self._owner_task = asyncio.create_task(self._own_loop(), name="outbound-owners")
            self._keeper = asyncio.create_task(self._keep_held(), name="outbound-keepalive")
            self.bus.on_reconnected.append(self._end_all)
        self._wake.set()
        self.log.info("outbound delivery started", instance=self.instance)

    def _end_all(self) -> None:
        """End every term (a new connection, or nats-py reconnected to a server that may
        have lost what it knew of our deliveries); the next round starts them again."""
        for term in self.terms.values():
            term.ended.set()
        self._wake.set()

    async def stop(self) -> None:
        """Stop fetching, drop what is queued and wait for deliveries in flight (unfinished
        ones are left unacked and are delivered again, by this or another process), then
        give the channels up so that a peer takes them at once."""
        self._stopping.set()
        if self._owner_task is not None:
            await cancel_and_wait(self._owner_task)
        terms = list(self.terms.values()) + list(self._ending.values())
        for term in terms:
            term.ended.set()
            if term.task is not None:
                await cancel_and_wait(term.task)
        if self.lane_tasks:
            done, pending = await asyncio.wait(self.lane_tasks, timeout=20)
            for t in pending:
                t.cancel()
        if self._keeper is not None:  # only now: the lanes kept their messages until here
            self._keeper.cancel()
        if self.accepted:
            self.log.error("stopping with receipts not stored: a redelivery may send these again",
                           outbound_ids=sorted(self.accepted)[:20], count=len(self.accepted))
        if self.bus.connected:
            for name in list(self.terms):
                try:
                    await self.owners.release(name)
                except Exception as exc:  # its TTL frees it
                    self.log.warning("channel lease not released", channel=name, error=f"{type(exc).__name__}: {exc}")
            await self.owners.leave()
        for term in terms:
            await _unsubscribe(term)

    # --- ownership -------------------------------------------------------------------

    async def _own_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            if not self.bus.connected:
                # Started by the bus's on_ready, before it counts as connected: the first
                # round runs the moment it does, not a renewal interval later.
                try:
                    await self.bus.wait_ready(self.owners.ttl / 4)
                except asyncio.TimeoutError:
                    continue
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # While the bus is down the bus logs the outage; the terms end by their
                # deadline, and the next round after it starts them again.
                log = self.log.warning if self.bus.connected else self.log.debug
                log("outbound ownership round failed", error=f"{type(exc).__name__}: {exc}")
            try:
                await asyncio.wait_for(self._wake.wait(), self.owners.ttl / 4)
            except asyncio.TimeoutError:
                pass

    def _rank(self, name: str) -> bytes:
        # Rendezvous hashing: every process prefers other channels, so they rarely race
        # for the same lease, and a channel tends to stay with the same process.
        return hashlib.sha256(f"{self.instance}:{name}".encode()).digest()

    async def _round(self) -> None:
        """Renew what this process holds, end what it lost, give one channel up if it
        holds more than its share, take free ones up to its share."""
        if not self.bus.connected:
            return
        self._rounds += 1
        wanted = sorted(n for n, c in self.channel_configs().items() if c.enabled)
        unable = {n for n in wanted if not self._delivers_here(n)}
        presences = await self.owners.live(unable)
        self.live = len(presences)
        # A channel that some live processes can deliver and others cannot goes to one that
        # can, whatever the shares; the rest are shared out evenly. (When none can, or all
        # can, every process is a candidate.)
        elsewhere = {n for n in unable if any(n not in u for u in presences.values())}
        restricted = {n for n in wanted if n not in unable and any(n in u for u in presences.values())}
        for name in list(self.terms):
            term = self.terms[name]
            if name not in wanted or not term.valid() or name in elsewhere:
                if name in elsewhere and term.valid():
                    self.log.info("channel delivery handed over: it cannot deliver in this process now", channel=name)
                self._end(term)
                if name not in wanted or name in elsewhere:
                    await self._give_up(term)
                continue
            deadline = await self.owners.take(name)
            if deadline is None:
                self.log.warning("channel delivery lost to another process", channel=name)
                self._end(term)
            else:
                term.deadline = deadline
        shared = [n for n in wanted if n not in restricted and n not in elsewhere]
        share = math.ceil(len(shared) / self.live)
        held = [n for n in self.terms if n not in restricted]
        if len(held) > share:
            name = max(held, key=self._rank)
            self.log.info("channel delivery handed over (rebalance)", channel=name, processes=self.live)
            term = self.terms[name]
            self._end(term)
            asyncio.create_task(self._give_up(term))
        for name in sorted(restricted, key=self._rank) + sorted(shared, key=self._rank):
            if name not in restricted and len([n for n in self.terms if n not in restricted]) >= share:
                break
            if name in self.terms:
                continue
            ending = self._ending.get(name)
            if ending is not None:
                if not ending.idle.is_set():
                    continue  # its provider calls first: next round
                del self._ending[name]
            deadline = await self.owners.take(name)
            if deadline is not None:
                await self._begin(name, deadline)
        if self._rounds % _SWEEP_EVERY == 2:
            await self._sweep()

    def _delivers_here(self, name: str) -> bool:
        channel = self.channel(name)
        if channel is None:
            return False  # not running in this process
        try:
            return bool(channel.delivers_here())
        except Exception as exc:  # a plugin bug: deliver as before
            self.log.warning("delivers_here failed", channel=name, error=f"{type(exc).__name__}: {exc}")
            return True

    def _end(self, term: _Term) -> None:
        term.ended.set()
        if self.terms.get(term.name) is term:
            del self.terms[term.name]
        self._ending[term.name] = term
        if term.task is not None:
            term.task.cancel()

    async def _give_up(self, term: _Term) -> None:
        """Release ``term``'s channel once its provider calls returned (a peer that took it
        earlier could send them again)."""
        try:
            await asyncio.wait_for(term.idle.wait(), self.owners.ttl)
        except asyncio.TimeoutError:
            pass
        await _unsubscribe(term)
        if self._ending.get(term.name) is term:
            del self._ending[term.name]
        try:
            await self.owners.release(term.name)
        except Exception as exc:
            self.log.warning("channel lease not released", channel=term.name, error=f"{type(exc).__name__}: {exc}")

    async def _begin(self, name: str, deadline: float) -> None:
        """Start a term: the channel's consumer is created anew, so that everything not
        acked is delivered again from its start, in stream order."""
        js = self.bus.js
        s = self.bus.subjects
        durable = s.delivery_consumer(name)
        try:
            await _remove_consumer(js, s.stream_out, durable)
            if self._rounds == 1:
                # Versions before per-channel consumers had one for every channel; its
                # filter overlaps ours. What it had not acked is still on the stream.
                await _remove_consumer(js, s.stream_out, s.outbound_consumer)
            await js.add_consumer(s.stream_out, api.ConsumerConfig(
                durable_name=durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_wait=self._ack_wait,
                max_deliver=-1,
                # Messages waiting for a retry stay unacked (that keeps their conversation
                # in order), so the server must allow many more pending acks than we work on.
                max_ack_pending=max(10000, self.cfg.concurrency * 64),
                filter_subject=s.channel_outbound(name),
                inactive_threshold=_INACTIVE,
                description=f"gateway outbound delivery of channel {name} (one gateway process at a time)",
            ))
            psub = await js.pull_subscribe_bind(durable=durable, stream=s.stream_out)
        except BaseException:
            await self.owners.release(name)
            raise
        term = _Term(name, self._places(name), self.cfg.concurrency * 16, deadline)
        term.psub = psub
        self.terms[name] = term
        term.task = asyncio.create_task(self._fetch(term), name=f"outbound-{name}")
        self.log.info("channel delivery taken", channel=name, processes=self.live)

    async def _sweep(self) -> None:
        """Dead-letter (``unknown_channel``) the outbounds of channels no process reads:
        named on subjects of channels not configured here and without a consumer of
        another process (the server refuses a second consumer on a subject of a work-queue
        stream, so a channel a peer delivers, or delivered within ``_INACTIVE``, is left
        alone)."""
        js = self.bus.js
        s = self.bus.subjects
        info = await js.stream_info(s.stream_out, subjects_filter=f"{s.prefix}.out.>")
        known = set(self.channel_configs())  # a disabled channel's outbounds wait for it
        orphans = [subj for subj in (info.state.subjects or {})
                   if not ((t := subj.split(".")) and len(t) == 4 and t[3] in known)]
        term = _Term("\x00sweep", _Places(1), 1, math.inf)
        name = f"{s.prefix}_sweep_{self.instance}"
        for subject in orphans[:64]:
            try:
                await js.add_consumer(s.stream_out, api.ConsumerConfig(
                    name=name, ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=self._ack_wait, filter_subject=subject, inactive_threshold=30.0))
            except nats.js.errors.APIError as exc:
                if exc.err_code == CONSUMER_NOT_UNIQUE:
                    continue
                raise
            try:
                psub = await js.pull_subscribe_bind(consumer=name, stream=s.stream_out)
                while True:
                    try:
                        msgs = await psub.fetch(batch=64, timeout=0.5)
                    except (nats.errors.TimeoutError, asyncio.TimeoutError):
                        break
                    for msg in msgs:
                        outbound, err = _decode(msg)
                        await self._process(msg, outbound, err, term)
                await psub.unsubscribe()
            finally:
                await _remove_consumer(js, s.stream_out, name)

    # --- fetching and lanes -----------------------------------------------------------

    async def _fetch(self, term: _Term) -> None:
        while term.valid():
            try:
                await term.buffer.acquire()
                term.buffer.release()
                # A full buffer frees a place per finished delivery: fetch a batch, not a
                # pull request per message, unless the places stay taken (held retries).
                await term.buffer.wait_free(min(64, term.buffer.limit // 4), _REFILL_WAIT)
                if not term.valid():
                    return
                msgs = await term.psub.fetch(batch=min(max(1, term.buffer.free), 256), timeout=1)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, nats.js.errors.APIError) or "consumer" in str(exc).lower():
                    # The consumer is gone (removed by the server after a long stall, or
                    # by a process that took the channel): this term is over.
                    self.log.warning("channel consumer lost; starting again", channel=term.name,
                                     error=f"{type(exc).__name__}: {exc}")
                    term.ended.set()
                    self._wake.set()
                    return
                log = self.log.warning if self.bus.connected else self.log.debug
                log("fetch failed", channel=term.name, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                if not term.valid():
                    return  # left unacked: the next term delivers them again, in order
                await term.buffer.acquire()
                self._enqueue(msg, term)

    def _places(self, cname: str) -> _Places:
        ccfg = self.channel_configs().get(cname)
        limit = (ccfg.concurrency if ccfg and ccfg.concurrency else None) or self.cfg.concurrency
        places = self.places.get(cname)
        if places is None:
            places = self.places[cname] = _Places(limit)
        elif places.limit != limit:
            places.resize(limit)
        return places

    def _enqueue(self, msg: Any, term: _Term) -> None:
        outbound, err = _decode(msg)
        lane = outbound.conversation if outbound is not None else f"\x00undecodable:{msg.metadata.sequence.stream}"
        entry = _Entry(msg, outbound, err, term)
        q = self.lanes.get(lane)
        if q is not None:
            q.append(entry)
            return
        self.lanes[lane] = deque([entry])
        t = asyncio.create_task(self._run_lane(lane))
        self.lane_tasks.add(t)
        t.add_done_callback(self.lane_tasks.discard)

    async def _run_lane(self, lane: str) -> None:
        q = self.lanes[lane]
        try:
            while q:
                e = q[0]
                term = e.term
                try:
                    if term.valid():  # otherwise dropped: the next term delivers it again
                        self._places(term.name)  # a reload may have changed the limit
                        await term.places.acquire()
                        try:
                            await self._process_in_place(e, term)
                        finally:
                            term.places.release()
                finally:
                    q.popleft()
                    term.buffer.release()
        finally:
            del self.lanes[lane]

    async def _process_in_place(self, e: _Entry, term: _Term) -> None:
        """Process one entry until it is done, the term ends or the gateway stops. A failure
        outside the provider call (a bus request timing out while a stream elects its
        leader, or a bug) is tried again here, with backoff: the conversation's later
        replies wait behind it. Left unacked for a redelivery instead, it would come back
        after ``ack_wait``, after them."""
        delay = 0.2
        failures = 0
        while True:
            try:
                await self._process(e.msg, e.outbound, e.err, term)
                if failures:
                    self.log.info("outbound processed after failures", outbound_id=_oid(e), failures=failures)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1:  # once per message: a long outage is logged by the bus
                    log = self.log.warning if isinstance(exc, BusUnavailable | nats.errors.Error) else self.log.error
                    log("outbound processing failed; trying again, its conversation waits", outbound_id=_oid(e),
                        error=f"{type(exc).__name__}: {exc}")
                if not term.valid() or not await self._retry_wait(e.msg, delay):
                    return  # unacked: the channel's next term (or process) delivers it, in order
                delay = min(delay * 2, 5.0)

    # --- one message ---------------------------------------------------------------

    async def _process(self, msg: Any, outbound: Outbound | None, err: Exception | None, term: _Term) -> None:
        services = self.services
        parts = msg.subject.split(".")
        ctype, cname = (parts[-2], parts[-1]) if len(parts) >= 4 else ("?", "?")
        if outbound is None:
            await self._dead(msg, None, ctype, cname, ErrorInfo(message=f"undecodable outbound: {err}", permanent=True,
                                                               code="invalid_message"), 1)
            return
        if outbound.id in self.accepted:
            # A redelivery of what this process already sent and is still recording: the
            # earlier copy stores the receipt and acks; sending it again would double it.
            self.log.info("redelivered while its receipt is being stored; not sent again", outbound_id=outbound.id)
            return
        attempt = msg.metadata.num_delivered
        # Pipelined: the "accepted" status, the receipt lookup and the conversation lookup
        # go out together; the status ack is awaited before the next status. "accepted" is
        # sent on every first processing by a process (a redelivery after a crash too); its
        # Nats-Msg-Id ("<id>:accepted:0") lets JetStream drop the repeats within its
        # duplicate window, and it costs no extra round trip.
        accepted = await services.send_status(self._make_status(outbound, ctype, cname, "accepted", attempt=0))
        conversation, receipt = await services.get_conversation_and_receipt(outbound.conversation, outbound.id)
        await services.await_ack(accepted)
        if receipt is not None:
            # Sent before a crash or by a duplicate publish: do not send twice.
            await self._status(outbound, ctype, cname, "sent", attempt=attempt, provider_id=receipt.provider_id,
                               meta=receipt.meta)
            await msg.ack()
            return
        ccfg = self.channel_configs().get(cname)
        cfg = self.cfg  # read per message: a reload applies to the next one
        backoff = (ccfg.backoff if ccfg and ccfg.backoff else None) or cfg.backoff
        max_attempts = (ccfg.max_attempts if ccfg and ccfg.max_attempts else None) or cfg.max_attempts
        local = 0
        while True:
            t0 = time.perf_counter()
            try:
                receipt, stored = await self._deliver_once(msg, outbound, conversation, ctype, cname, term)
            except _Fenced:
                return  # unacked: the channel's next term delivers it
            except Deferred as exc:
                # Not an attempt: the channel may not send before exc.until (quiet hours).
                # The outbound stays ours (held, kept in progress) and is tried again then.
                delay = max(0.0, (exc.until - datetime.now(timezone.utc)).total_seconds())
                self.log.info("delivery deferred", outbound_id=outbound.id, channel=cname, code=exc.code,
                              retry_in=round(delay, 2))
                await self._status(outbound, ctype, cname, "failed", attempt=attempt,
                                   error=ErrorInfo(message=exc.message, permanent=False, code=exc.code),
                                   next_attempt_at=exc.until)
                if not await self._hold(msg, delay, term):
                    return
                continue
            except DeliveryError as exc:
                # Counted in gateway_outbound_failed_total where the attempt failed
                # (_deliver_once), not here: the gateway's own refusals are no attempt.
                info = ErrorInfo(message=exc.message, permanent=exc.permanent, code=exc.code)
                if exc.permanent or attempt >= max_attempts:
                    if not exc.permanent:
                        info = ErrorInfo(message=f"gave up after {attempt} attempts: {exc.message}", permanent=False, code=exc.code)
                    await self._dead(msg, outbound, ctype, cname, info, attempt)
                    return
                delay = backoff[min(local, len(backoff) - 1)] * random.uniform(0.8, 1.2)
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                nxt = datetime.now(timezone.utc) + timedelta(seconds=delay)
                self.log.info("delivery failed, will retry", outbound_id=outbound.id, channel=cname, attempt=attempt,
                              error=exc.message, retry_in=round(delay, 2))
                await self._status(outbound, ctype, cname, "failed", attempt=attempt, error=info, next_attempt_at=nxt)
                if not await self._hold(msg, delay, term):
                    return  # stopping: left unacked, redelivered later
                attempt += 1
                local += 1
                continue
            self.metrics.delivery_latency.labels(ctype).observe(time.perf_counter() - t0)
            self.metrics.outbound.labels(ctype, cname).inc()
            await self._record_sent(msg, outbound, ctype, cname, attempt, receipt, stored)
            return

    async def _record_sent(self, msg: Any, outbound: Outbound, ctype: str, cname: str, attempt: int, receipt: Receipt,
                           stored: asyncio.Future[Any] | None) -> None:
        """Receipt, then status, then ack, for an outbound the provider accepted; retried
        until the bus takes them (or the gateway stops). A crash in between re-emits
        "sent" on redelivery instead of sending twice; a bus outage only delays them."""
        delay = 0.2
        warned = False
        while True:
            try:
                if stored is None:
                    stored = await self.services.send_receipt(outbound.id, receipt)
                await self.services.await_ack(stored)
                break
            except BusUnavailable as exc:
                stored = None  # publish it again: a KV put of the same value is harmless
                if not warned:
                    self.log.warning("receipt not stored yet; retrying until the bus is back", outbound_id=outbound.id,
                                     error=str(exc))
                    warned = True
                if not await self._retry_wait(msg, delay):
                    return  # stopping: logged by stop() from self.accepted
                delay = min(delay * 2, 5.0)
        self.accepted.pop(outbound.id, None)  # from now on the receipt bucket remembers it
        failpoint("outbound.after_receipt")
        if outbound.survey is not None and self.on_survey_sent is not None:
            await self.on_survey_sent(outbound)  # its answer is matched from now on
        while True:
            try:
                await self._status(outbound, ctype, cname, "sent", attempt=attempt, provider_id=receipt.provider_id,
                                   meta=receipt.meta)
                # A plain ack: if it is lost, the redelivery finds the receipt and sends nothing.
                await msg.ack()
                return
            except (BusUnavailable, nats.errors.Error) as exc:
                self.log.debug("sent status or ack not taken; retrying", outbound_id=outbound.id, error=str(exc))
                if not await self._retry_wait(msg, delay):
                    return  # the receipt is stored: a redelivery re-emits "sent"
                delay = min(delay * 2, 5.0)

    async def _retry_wait(self, msg: Any, delay: float) -> bool:
        """Wait before retrying a bus write, keeping the message ours if the bus lets us;
        False if the gateway stops meanwhile."""
        try:
            await msg.in_progress()
        except Exception:
            pass
        try:
            await asyncio.wait_for(self._stopping.wait(), delay)
            return False
        except asyncio.TimeoutError:
            return True

    async def _deliver_once(self, msg: Any, outbound: Outbound, conversation: Conversation | None,
                            ctype: str, cname: str, term: _Term) -> tuple[Receipt, asyncio.Future[Any] | None]:
        """Deliver once; on success return the receipt and the future of its write, which
        is issued before anything else so that a crash has the least time to double it."""
        ccfg = self.channel_configs().get(cname)
        if ccfg is None or ccfg.type != ctype:
            raise _refused(f"no channel {cname!r} of type {ctype!r} is configured", "unknown_channel")
        channel = self.channel(cname)
        if channel is None:
            raise self._failed(ctype, cname, DeliveryError(f"channel {cname!r} is not running", permanent=False,
                                                           code="channel_down"))
        if conversation is None:
            raise _refused(f"unknown conversation {outbound.conversation!r}", "unknown_conversation")
        if conversation.channel != cname:
            raise _refused(f"conversation {outbound.conversation!r} belongs to channel {conversation.channel!r}, not {cname!r}",
                           "wrong_channel")
        unsupported = sorted({str(p.__struct_config__.tag) for p in outbound.parts} - set(channel.supported_parts))
        if unsupported:
            raise _refused(f"channel type {ctype!r} cannot carry part types: {', '.join(map(str, unsupported))}",
                           "unsupported_content")
        if not outbound.parts and outbound.template is None and not outbound.meta:
            # meta alone may carry channel-specific content (a WeChat mini-program card).
            raise _refused("outbound has no parts, no template and no meta", "empty")
        bucket = self._bucket(cname, ccfg.rate_limit or channel.rate_limit)
        if bucket is not None:
            await bucket.acquire()
        while self._receipts_written is not None and time.monotonic() - self._receipts_since > _RECEIPT_LAG:
            # Receipts of deliveries that finished a while ago in this loop turn are still
            # in nats-py's buffer (a provider call that blocks the loop, or a long turn):
            # let them reach the socket before the next provider call, so that a crash
            # doubles as few deliveries as possible. Within the lag, deliveries go ahead
            # and their receipts share one socket write. (Several deliveries wait here;
            # the first to go may issue a new receipt, so the others check again.)
            await self._receipts_written
        if not term.valid():
            # Fenced: the lease may pass to another process from now on, and that one
            # starts from this outbound. (A call already under way finishes: the window
            # a double send is possible in, bounded by the provider's timeout.)
            raise _Fenced()
        term.calls += 1
        term.idle.clear()
        try:
            receipt = await channel.deliver(outbound, conversation)
        except DeliveryError as exc:
            self._failed(ctype, cname, exc)
            raise
        except Deferred:
            raise  # not a failure: _process waits until the channel may send
        except Exception as exc:  # a plugin bug or an unmapped library error: retryable
            raise self._failed(ctype, cname, DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False,
                                                           code="internal")) from exc
        finally:
            term.calls -= 1
            if not term.calls:
                term.idle.set()
        # The provider accepted it: from here on this process never sends it again.
        self.accepted[outbound.id] = receipt
        try:
            stored = await self.services.send_receipt(outbound.id, receipt)
        except BusUnavailable:
            stored = None  # _record_sent retries it
        else:
            self._receipts_issued()
        failpoint("outbound.after_deliver")
        return receipt, stored

    def _failed(self, ctype: str, cname: str, exc: DeliveryError) -> DeliveryError:
        """Count a failed delivery attempt (``gateway_outbound_failed_total``) and return
        the error to raise."""
        self.metrics.failed.labels(ctype, cname, str(exc.permanent).lower()).inc()
        return exc

    def _receipts_issued(self) -> None:
        # nats-py writes to the socket from its flusher task, which the publish just woke
        # (call_soon); a callback scheduled now runs after that write. Every delivery
        # about to start waits for it: one loop turn, not a round trip.
        if self._receipts_written is None:
            loop = asyncio.get_running_loop()
            self._receipts_since = time.monotonic()
            fut = self._receipts_written = loop.create_future()
            loop.call_soon(self._receipts_flushed, fut)

    def _receipts_flushed(self, fut: asyncio.Future[None]) -> None:
        self._receipts_written = None
        fut.set_result(None)

    def _bucket(self, cname: str, rate: float | None) -> RateLimiter | None:
        if rate is None:
            return None
        b = self.buckets.get(cname)
        if b is None or b.rate != rate:
            b = self.buckets[cname] = RateLimiter(rate)
        return b

    async def _keep_held(self) -> None:
        """Tell the bus every message this process holds is still being worked on: the
        ones in delivery or waiting for a retry, and the ones queued behind them or parked
        (those would otherwise be redelivered after ack_wait, and their delivery count,
        the base of the attempt count, would grow without an attempt)."""
        interval = max(0.5, self._ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            for q in list(self.lanes.values()):
                for e in list(q):
                    try:
                        await e.msg.in_progress()
                    except Exception:
                        pass

    async def _hold(self, msg: Any, delay: float, term: _Term) -> bool:
        """Wait ``delay`` (``_keep_held`` keeps the message ours); False if the term ends
        (the gateway stops, the channel passes to another term) meanwhile.

        The channel's place is given back while waiting: a provider outage must not stop
        the channel's other conversations."""
        term.places.release()
        try:
            await asyncio.wait_for(term.ended.wait(), delay)
            return False
        except asyncio.TimeoutError:
            return True
        finally:
            await term.places.acquire()

    async def _dead(self, msg: Any, outbound: Outbound | None, ctype: str, cname: str, error: ErrorInfo, attempts: int) -> None:
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        dl = DeadLetter(id=outbound.id if outbound else f"seq-{msg.metadata.sequence.stream}", subject=msg.subject,
                        reason=error.message, attempts=attempts, at=datetime.now(timezone.utc), outbound=outbound,
                        payload=None if outbound else msg.data, error=error, headers=headers)
        # Copy first, terminate second: a crash in between leaves a duplicate dead letter,
        # never a lost outbound.
        await self.services.publish_dead_letter(dl, channel_type=ctype, channel=cname,
                                                out_seq=msg.metadata.sequence.stream, raw=msg.data)
        self.metrics.dead.labels(ctype, cname).inc()
        self.log.warning("outbound dead-lettered", outbound_id=dl.id, channel=cname, error=error.message, attempt=attempts)
        if outbound is not None:
            await self._status(outbound, ctype, cname, "dead", attempt=attempts, error=error)
        await msg.term()

    async def _status(self, outbound: Outbound, ctype: str, cname: str, state: Any, *, attempt: int,
                      provider_id: str | None = None, error: ErrorInfo | None = None,
                      next_attempt_at: datetime | None = None, meta: dict[str, Any] | None = None) -> None:
        await self.services.publish_status(self._make_status(outbound, ctype, cname, state, attempt=attempt,
                                                       provider_id=provider_id, error=error,
                                                       next_attempt_at=next_attempt_at, meta=meta))

    @staticmethod
    def _make_status(outbound: Outbound, ctype: str, cname: str, state: Any, *, attempt: int,
                     provider_id: str | None = None, error: ErrorInfo | None = None,
                     next_attempt_at: datetime | None = None, meta: dict[str, Any] | None = None) -> DeliveryStatus:
        return DeliveryStatus(outbound_id=outbound.id, conversation=outbound.conversation, channel_type=ctype,
                              channel=cname, state=state, at=datetime.now(timezone.utc), attempt=attempt,
                              provider_id=provider_id, error=error, next_attempt_at=next_attempt_at,
                              meta=meta or {})


def _refused(message: str, code: str) -> DeliveryError:
    """The gateway's own permanent refusal of an outbound (unknown channel or conversation,
    parts the channel cannot carry, nothing to send): dead-lettered at once like a
    provider's permanent error, but not counted as a failed delivery, since no provider
    was asked."""
    return DeliveryError(message, permanent=True, code=code)


def _decode(msg: Any) -> tuple[Outbound | None, Exception | None]:
    try:
        return outbound_decoder.decode(msg.data), None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return None, exc


async def _remove_consumer(js: Any, stream: str, name: str) -> None:
    try:
        await js.delete_consumer(stream, name)
    except nats.js.errors.NotFoundError:
        pass


async def _unsubscribe(term: _Term) -> None:
    if term.psub is not None:
        try:
            await term.psub.unsubscribe()
        except Exception:  # the connection it belonged to may be gone
            pass
        term.psub = None
