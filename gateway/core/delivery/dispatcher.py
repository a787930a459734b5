"""Outbound delivery: a durable JetStream pull consumer shared by every gateway process.

An outbound is acked only after the channel's provider accepted it and its receipt is
stored; transient failures are retried in place with exponential backoff and jitter (the
conversation's later replies wait behind it, so order holds); permanent failures and
exhausted attempts are copied to the dead-letter subject first and terminated second."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import nats.errors
from nats.js import api

from ..channel.api import Channel, Conversation, Receipt
from ..channel.ratelimit import RateLimiter
from ..config import ChannelConfig, OutboundConfig, seconds
from ..errors import BusUnavailable, Deferred, DeliveryError
from ..failpoints import failpoint
from ..metrics import Metrics
from ..retry import cancel_and_wait
from ..schema import DeadLetter, DeliveryStatus, ErrorInfo, Outbound, outbound_decoder
from ..bus.services import BusServices


class _Places:
    """A semaphore whose size can change while it is in use (a reload)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

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

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)


class _ChannelLoad:
    """One channel's share of the process: its delivery places and how many of the shared
    buffer's places its messages hold."""

    def __init__(self, concurrency: int):
        self.places = _Places(concurrency)
        self.buffered = 0


class _Entry:
    __slots__ = ("msg", "outbound", "err", "cname", "load", "charged")

    def __init__(self, msg: Any, outbound: Outbound | None, err: Exception | None, cname: str, load: _ChannelLoad,
                 charged: bool):
        self.msg = msg
        self.outbound = outbound
        self.err = err
        self.cname = cname
        self.load = load
        self.charged = charged


# How long a receipt may wait in nats-py's buffer while further deliveries start in the
# same loop turn: what a kill -9 can double is what was delivered in this time.
_RECEIPT_LAG = 0.0005

# ``[outbound]`` keys the dispatcher cannot change while it runs: the consumer's ack_wait
# (keep-alives are paced by it) and the receipts bucket's TTL are set up at start.
_RESTART_KEYS = ("enabled", "ack_wait", "receipt_ttl")


class Dispatcher:
    """Takes outbound messages off ``<prefix>.out.>`` and delivers them.

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
        # The consumer and its keep-alives keep the ack_wait they started with.
        self._ack_wait = seconds(self.cfg.ack_wait)
        self.log = log.bind(component="outbound")
        self.task: asyncio.Task[None] | None = None
        self.lanes: dict[str, deque[_Entry]] = {}
        self.lane_tasks: set[asyncio.Task[None]] = set()
        self.buckets: dict[str, RateLimiter] = {}
        # Limits, so that nothing waits in a circle and no channel waits for another:
        # - each channel's ``places`` bound its deliveries in progress (a message waiting
        #   for its retry gives its place back), so a slow or hanging provider holds only
        #   its own channel's places;
        # - ``buffered`` bounds messages taken off the bus and not finished (replies
        #   queued behind an earlier one of their conversation hold only this). A channel
        #   holds at most its share of it; what it is given beyond that is *parked*: kept,
        #   in order, outside the shared buffer (``parked``, bounded by the same size), so
        #   a saturated channel's backlog does not stop the fetch loop for the others.
        self.channel_loads: dict[str, _ChannelLoad] = {}
        self.buffered = _Places(self.cfg.concurrency * 16)
        self.parked = _Places(self.cfg.concurrency * 16)
        # Outbounds this process knows the provider accepted and whose receipt is not
        # stored yet (outbound id -> receipt): never delivered again by this process.
        self.accepted: dict[str, Receipt] = {}
        # Resolved once the receipt writes issued so far were handed to the socket (see
        # _receipts_issued); None when there are none.
        self._receipts_written: asyncio.Future[None] | None = None
        self._receipts_since = 0.0
        self._keeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def configure(self, cfg: OutboundConfig) -> list[str]:
        """Apply a reloaded ``[outbound]`` section. Returns the keys that changed but take
        effect only at the next start."""
        later = [f"outbound.{k}" for k in _RESTART_KEYS if getattr(cfg, k) != getattr(self.cfg, k)]
        self.cfg = cfg
        self.buffered.resize(cfg.concurrency * 16)
        self.parked.resize(cfg.concurrency * 16)
        return later

    def in_flight(self, channel: str) -> int:
        """Deliveries of ``channel`` in progress in this process."""
        load = self.channel_loads.get(channel)
        return load.places.used if load else 0

    async def start(self) -> None:
        """Subscribe and start fetching. Called again by the bus after every new connection:
        the old subscription died with the old connection, so its fetch loop is replaced.
        Deliveries in flight carry on; their acks on the old connection fail, the messages
        are redelivered after ``ack_wait``, and their receipts prevent a second send."""
        if self.task is not None:
            await cancel_and_wait(self.task)
        bus = self.bus
        s = bus.subjects
        cfg = api.ConsumerConfig(
            durable_name=s.outbound_consumer,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            max_deliver=-1,
            # Messages waiting for a retry stay unacked (that keeps their conversation in
            # order), so the server must allow many more pending acks than we work on.
            max_ack_pending=max(10000, self.cfg.concurrency * 64),
            filter_subject=f"{s.prefix}.out.>",
            description="gateway outbound delivery (shared by every gateway process)",
        )
        self.psub = await bus.js.pull_subscribe(f"{s.prefix}.out.>", durable=s.outbound_consumer, stream=s.stream_out, config=cfg)
        self.task = asyncio.create_task(self._loop(), name="outbound")
        self.log.info("outbound delivery started")

    async def stop(self) -> None:
        """Stop fetching and wait for deliveries in flight (unfinished ones are left unacked
        and are redelivered, to this or another process)."""
        self._stopping.set()
        if self.task is not None:
            await cancel_and_wait(self.task)
        if self.lane_tasks:
            done, pending = await asyncio.wait(self.lane_tasks, timeout=20)
            for t in pending:
                t.cancel()
        if self._keeper is not None:  # only now: the lanes kept their messages until here
            self._keeper.cancel()
        if self.accepted:
            self.log.error("stopping with receipts not stored: a redelivery may send these again",
                           outbound_ids=sorted(self.accepted)[:20], count=len(self.accepted))
        try:
            await self.psub.unsubscribe()
        except Exception:
            pass

    async def _loop(self) -> None:
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_held(), name="outbound-keepalive")
        while not self._stopping.is_set():
            try:
                await self.buffered.acquire()
                self.buffered.release()
                msgs = await self.psub.fetch(batch=min(max(1, self.buffered.free), 256), timeout=1)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # While the bus is down the bus logs the outage; saying it here every
                # second would only repeat it.
                log = self.log.warning if self.bus.connected else self.log.debug
                log("fetch failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                await self._take(msg)

    def _load(self, cname: str) -> _ChannelLoad:
        ccfg = self.channel_configs().get(cname)
        limit = (ccfg.concurrency if ccfg and ccfg.concurrency else None) or self.cfg.concurrency
        load = self.channel_loads.get(cname)
        if load is None:
            load = self.channel_loads[cname] = _ChannelLoad(limit)
        elif load.places.limit != limit:
            load.places.resize(limit)
        return load

    async def _take(self, msg: Any) -> None:
        parts = msg.subject.split(".")
        cname = parts[-1] if len(parts) >= 4 else "?"
        load = self._load(cname)
        # A channel's share of the buffer: enough to keep its places busy with a batch
        # queued behind them, but never so much that one channel fills the buffer (with a
        # single channel there is nobody to protect: all of it).
        share = self.buffered.limit if len(self.channel_configs()) <= 1 else \
            max(1, min(load.places.limit * 4, self.buffered.limit // 2))
        if load.buffered >= share and self.parked.free:
            await self.parked.acquire()
            charged = False
        else:
            await self.buffered.acquire()
            load.buffered += 1
            charged = True
        self._enqueue(msg, cname, load, charged)

    def _enqueue(self, msg: Any, cname: str, load: _ChannelLoad, charged: bool) -> None:
        err: msgspec.DecodeError | msgspec.ValidationError | None
        try:
            outbound = outbound_decoder.decode(msg.data)
            lane = outbound.conversation
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            outbound, lane = None, f"\x00undecodable:{msg.metadata.sequence.stream}"
            err = exc
        else:
            err = None
        entry = _Entry(msg, outbound, err, cname, load, charged)
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
                await e.load.places.acquire()
                try:
                    await self._process(e.msg, e.outbound, e.err, e.load.places)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # never lose the lane on a bug: leave unacked
                    self.log.error("outbound processing failed; left for redelivery", error=f"{type(exc).__name__}: {exc}")
                finally:
                    e.load.places.release()
                    q.popleft()
                    if e.charged:
                        e.load.buffered -= 1
                        self.buffered.release()
                    else:
                        self.parked.release()
                    if e.cname not in self.channel_configs() and not e.load.buffered and not e.load.places.used:
                        # Subjects of channels that are not configured come from backends:
                        # do not keep an entry for each name they ever used.
                        self.channel_loads.pop(e.cname, None)
        finally:
            del self.lanes[lane]

    # --- one message ---------------------------------------------------------------

    async def _process(self, msg: Any, outbound: Outbound | None, err: Exception | None, places: _Places) -> None:
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
        receipt, conversation = await asyncio.gather(services.get_receipt(outbound.id),
                                                     services.get_conversation(outbound.conversation))
        await services.await_ack(accepted)
        if receipt is not None:
            # Sent before a crash or by a duplicate publish: do not send twice.
            await self._status(outbound, ctype, cname, "sent", attempt=attempt, provider_id=receipt.provider_id,
                               meta=receipt.meta)
            await msg.ack()
            return
        ccfg = self.channel_configs().get(cname)
        cfg = self.cfg  # read per message: a reload applies to the next one
        backoff = [seconds(d) for d in ((ccfg.backoff if ccfg and ccfg.backoff else None) or cfg.backoff)]
        max_attempts = (ccfg.max_attempts if ccfg and ccfg.max_attempts else None) or cfg.max_attempts
        local = 0
        while True:
            t0 = time.perf_counter()
            try:
                receipt, stored = await self._deliver_once(msg, outbound, conversation, ctype, cname)
            except Deferred as exc:
                # Not an attempt: the channel may not send before exc.until (quiet hours).
                # The outbound stays ours (held, kept in progress) and is tried again then.
                delay = max(0.0, (exc.until - datetime.now(timezone.utc)).total_seconds())
                self.log.info("delivery deferred", outbound_id=outbound.id, channel=cname, code=exc.code,
                              retry_in=round(delay, 2))
                await self._status(outbound, ctype, cname, "failed", attempt=attempt,
                                   error=ErrorInfo(message=exc.message, permanent=False, code=exc.code),
                                   next_attempt_at=exc.until)
                if not await self._hold(msg, delay, places):
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
                if not await self._hold(msg, delay, places):
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
                            ctype: str, cname: str) -> tuple[Receipt, asyncio.Future[Any] | None]:
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

    async def _hold(self, msg: Any, delay: float, places: _Places) -> bool:
        """Wait ``delay`` (``_keep_held`` keeps the message ours); False if the gateway stops.

        The channel's place is given back while waiting: a provider outage must not stop
        the channel's other conversations."""
        places.release()
        try:
            await asyncio.wait_for(self._stopping.wait(), delay)
            return False
        except asyncio.TimeoutError:
            return True
        finally:
            await places.acquire()

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
