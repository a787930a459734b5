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
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ._bus import wire_size
from ._channel import Conversation, Receipt
from ._config import seconds
from ._errors import BusUnavailable, DeliveryError
from ._failpoints import failpoint
from ._schema import DeadLetter, DeliveryStatus, ErrorInfo, Outbound, encode, outbound_decoder

if TYPE_CHECKING:
    from ._gateway import Gateway

receipt_decoder = msgspec.json.Decoder(Receipt)


class TokenBucket:
    """Paces sends to ``rate`` per second with bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class _Permanent(Exception):
    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message = message
        self.code = code


class Dispatcher:
    """Takes outbound messages off ``<prefix>.out.>`` and delivers them."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.cfg = gw.config.outbound
        self.log = gw.log.bind(component="outbound")
        self.task: asyncio.Task[None] | None = None
        self.lanes: dict[str, deque[Any]] = {}
        self.lane_tasks: set[asyncio.Task[None]] = set()
        self.buckets: dict[str, TokenBucket] = {}
        # Two limits, so that nothing waits in a circle: ``active`` bounds deliveries in
        # progress (a message waiting for its retry gives its place back, so one provider's
        # outage does not stall the others); ``buffered`` bounds messages taken off the bus
        # and not finished (replies queued behind an earlier one of their conversation
        # hold only this, never ``active``).
        self.active = asyncio.Semaphore(self.cfg.concurrency)
        self.buffered = asyncio.Semaphore(self.cfg.concurrency * 16)
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Subscribe and start fetching. Called again by the bus after every new connection:
        the old subscription died with the old connection, so its fetch loop is replaced.
        Deliveries in flight carry on; their acks on the old connection fail, the messages
        are redelivered after ``ack_wait``, and their receipts prevent a second send."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        bus = self.gw.bus
        s = bus.subjects
        cfg = api.ConsumerConfig(
            durable_name=s.outbound_consumer,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=seconds(self.cfg.ack_wait),
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
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        if self.lane_tasks:
            done, pending = await asyncio.wait(self.lane_tasks, timeout=20)
            for t in pending:
                t.cancel()
        try:
            await self.psub.unsubscribe()
        except Exception:
            pass

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.buffered.acquire()
                self.buffered.release()
                free = max(1, self.buffered._value)  # noqa: SLF001 - cheap read of free places
                msgs = await self.psub.fetch(batch=min(free, 256), timeout=1)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # While the bus is down the bus logs the outage; saying it here every
                # second would only repeat it.
                log = self.log.warning if self.gw.bus.connected else self.log.debug
                log("fetch failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                await self.buffered.acquire()
                self._enqueue(msg)

    def _enqueue(self, msg: Any) -> None:
        try:
            outbound = outbound_decoder.decode(msg.data)
            lane = outbound.conversation
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            outbound, lane = None, f"\x00undecodable:{msg.metadata.sequence.stream}"
            err = exc
        else:
            err = None
        q = self.lanes.get(lane)
        if q is not None:
            q.append((msg, outbound, err))
            return
        self.lanes[lane] = deque([(msg, outbound, err)])
        t = asyncio.create_task(self._run_lane(lane))
        self.lane_tasks.add(t)
        t.add_done_callback(self.lane_tasks.discard)

    async def _run_lane(self, lane: str) -> None:
        q = self.lanes[lane]
        try:
            while q:
                msg, outbound, err = q[0]
                await self.active.acquire()
                try:
                    await self._process(msg, outbound, err)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # never lose the lane on a bug: leave unacked
                    self.log.error("outbound processing failed; left for redelivery", error=f"{type(exc).__name__}: {exc}")
                finally:
                    self.active.release()
                    q.popleft()
                    self.buffered.release()
        finally:
            del self.lanes[lane]

    # --- one message ---------------------------------------------------------------

    async def _process(self, msg: Any, outbound: Outbound | None, err: Exception | None) -> None:
        gw = self.gw
        parts = msg.subject.split(".")
        ctype, cname = (parts[-2], parts[-1]) if len(parts) >= 4 else ("?", "?")
        if outbound is None:
            await self._dead(msg, None, ctype, cname, ErrorInfo(message=f"undecodable outbound: {err}", permanent=True,
                                                               code="invalid_message"), 1)
            return
        attempt = msg.metadata.num_delivered
        # Pipelined: the "accepted" status, the receipt lookup and the conversation lookup
        # go out together; the status ack is awaited before the next status.
        accepted = (await gw.send_status(self._make_status(outbound, ctype, cname, "accepted", attempt=0))
                    if attempt == 1 else None)
        receipt, conversation = await asyncio.gather(self._receipt(outbound.id), gw.get_conversation(outbound.conversation))
        if accepted is not None:
            await gw.await_ack(accepted)
        if receipt is not None:
            # Sent before a crash or by a duplicate publish: do not send twice.
            await self._status(outbound, ctype, cname, "sent", attempt=attempt, provider_id=receipt.provider_id)
            await msg.ack()
            return
        ccfg = gw.config.channels.get(cname)
        backoff = [seconds(d) for d in ((ccfg.backoff if ccfg and ccfg.backoff else None) or self.cfg.backoff)]
        max_attempts = (ccfg.max_attempts if ccfg and ccfg.max_attempts else None) or self.cfg.max_attempts
        local = 0
        while True:
            t0 = time.perf_counter()
            try:
                receipt = await self._deliver_once(msg, outbound, conversation, ctype, cname)
            except _Permanent as exc:
                await self._dead(msg, outbound, ctype, cname, ErrorInfo(message=exc.message, permanent=True, code=exc.code), attempt)
                return
            except DeliveryError as exc:
                gw.metrics.failed.labels(ctype, cname, str(exc.permanent).lower()).inc()
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
                if not await self._hold(msg, delay):
                    return  # stopping: left unacked, redelivered later
                attempt += 1
                local += 1
                continue
            failpoint("outbound.after_deliver")
            gw.metrics.delivery_latency.labels(ctype).observe(time.perf_counter() - t0)
            gw.metrics.outbound.labels(ctype, cname).inc()
            # Receipt first, then status, then ack: a crash in between re-emits "sent"
            # on redelivery instead of sending twice.
            await self._store_receipt(outbound.id, receipt)
            failpoint("outbound.after_receipt")
            await self._status(outbound, ctype, cname, "sent", attempt=attempt, provider_id=receipt.provider_id)
            # A plain ack: if it is lost, the redelivery finds the receipt and sends nothing.
            await msg.ack()
            return

    async def _deliver_once(self, msg: Any, outbound: Outbound, conversation: Conversation | None,
                            ctype: str, cname: str) -> Receipt:
        gw = self.gw
        ccfg = gw.config.channels.get(cname)
        if ccfg is None or ccfg.type != ctype:
            raise _Permanent(f"no channel {cname!r} of type {ctype!r} is configured", "unknown_channel")
        running = gw.channels.get(cname)
        if running is None or running.channel is None or running.ctx.health not in ("running", "degraded"):
            raise DeliveryError(f"channel {cname!r} is not running", permanent=False, code="channel_down")
        channel = running.channel
        if conversation is None:
            raise _Permanent(f"unknown conversation {outbound.conversation!r}", "unknown_conversation")
        if conversation.channel != cname:
            raise _Permanent(f"conversation {outbound.conversation!r} belongs to channel {conversation.channel!r}, not {cname!r}",
                             "wrong_channel")
        unsupported = sorted({p.__struct_config__.tag for p in outbound.parts} - set(channel.supported_parts))  # type: ignore[attr-defined]
        if unsupported:
            raise _Permanent(f"channel type {ctype!r} cannot carry part types: {', '.join(map(str, unsupported))}",
                             "unsupported_content")
        if not outbound.parts and outbound.template is None and not outbound.meta:
            # meta alone may carry channel-specific content (a WeChat mini-program card).
            raise _Permanent("outbound has no parts, no template and no meta", "empty")
        bucket = self._bucket(cname, ccfg.rate_limit or channel.rate_limit)
        if bucket is not None:
            await bucket.acquire()
        heartbeat = asyncio.create_task(self._keepalive(msg))
        try:
            return await channel.deliver(outbound, conversation)
        except DeliveryError:
            raise
        except Exception as exc:  # a plugin bug or an unmapped library error: retryable
            raise DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False, code="internal") from exc
        finally:
            heartbeat.cancel()

    def _bucket(self, cname: str, rate: float | None) -> TokenBucket | None:
        if rate is None:
            return None
        b = self.buckets.get(cname)
        if b is None or b.rate != rate:
            b = self.buckets[cname] = TokenBucket(rate)
        return b

    async def _keepalive(self, msg: Any) -> None:
        interval = max(0.5, seconds(self.cfg.ack_wait) / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception:
                pass

    async def _hold(self, msg: Any, delay: float) -> bool:
        """Wait ``delay`` while keeping the message ours; False if the gateway stops.

        The ``active`` place is given back while waiting: a provider outage on one
        channel must not stall deliveries on the others."""
        keep = asyncio.create_task(self._keepalive(msg))
        self.active.release()
        try:
            await asyncio.wait_for(self._stopping.wait(), delay)
            return False
        except asyncio.TimeoutError:
            return True
        finally:
            keep.cancel()
            await self.active.acquire()

    async def _dead(self, msg: Any, outbound: Outbound | None, ctype: str, cname: str, error: ErrorInfo, attempts: int) -> None:
        gw = self.gw
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        dl = DeadLetter(id=outbound.id if outbound else f"seq-{msg.metadata.sequence.stream}", subject=msg.subject,
                        reason=error.message, attempts=attempts, at=datetime.now(timezone.utc), outbound=outbound,
                        payload=None if outbound else msg.data, error=error, headers=headers)
        js = gw.bus.require()
        dl_headers = {"Nats-Msg-Id": f"dead:{dl.id}:{msg.metadata.sequence.stream}",
                      "Content-Type": "application/json", "Gw-Schema": "dead-letter/1"}
        data = encode(dl)
        if wire_size(data, dl_headers) > gw.bus.max_payload:
            # The outbound fitted on the bus, its dead letter does not (an outbound near the
            # limit plus the envelope, or undecodable bytes that base64 makes 4/3 larger).
            # Keep the original bytes in the object store and name them, so nothing is lost
            # and the publish cannot be refused.
            ref = await gw.put_blob(msg.data, content_type="application/json")
            dl = msgspec.structs.replace(
                dl, outbound=None, payload=None, reason=error.message[:4096],
                error=msgspec.structs.replace(error, message=error.message[:4096]),
                headers={**headers, "Gw-Dead-Payload": f"{ref.bucket}/{ref.name}"})
            data = encode(dl)
        # Copy first, terminate second: a crash in between leaves a duplicate dead letter,
        # never a lost outbound.
        await js.publish(gw.bus.subjects.dead(ctype, cname), data, headers=dl_headers)
        gw.metrics.dead.labels(ctype, cname).inc()
        self.log.warning("outbound dead-lettered", outbound_id=dl.id, channel=cname, error=error.message, attempt=attempts)
        if outbound is not None:
            await self._status(outbound, ctype, cname, "dead", attempt=attempts, error=error)
        await msg.term()

    async def _status(self, outbound: Outbound, ctype: str, cname: str, state: Any, *, attempt: int,
                      provider_id: str | None = None, error: ErrorInfo | None = None,
                      next_attempt_at: datetime | None = None) -> None:
        await self.gw.publish_status(self._make_status(outbound, ctype, cname, state, attempt=attempt,
                                                       provider_id=provider_id, error=error,
                                                       next_attempt_at=next_attempt_at))

    @staticmethod
    def _make_status(outbound: Outbound, ctype: str, cname: str, state: Any, *, attempt: int,
                     provider_id: str | None = None, error: ErrorInfo | None = None,
                     next_attempt_at: datetime | None = None) -> DeliveryStatus:
        return DeliveryStatus(outbound_id=outbound.id, conversation=outbound.conversation, channel_type=ctype,
                              channel=cname, state=state, at=datetime.now(timezone.utc), attempt=attempt,
                              provider_id=provider_id, error=error, next_attempt_at=next_attempt_at)

    async def _receipt(self, outbound_id: str) -> Receipt | None:
        kv = self.gw.bus.kv[self.gw.bus.subjects.kv_receipts]
        try:
            entry = await kv.get(_receipt_key(outbound_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        try:
            return receipt_decoder.decode(entry.value)
        except msgspec.DecodeError:
            return Receipt()

    async def _store_receipt(self, outbound_id: str, receipt: Receipt) -> None:
        bus = self.gw.bus
        try:
            fut = await bus.js.publish_async(f"$KV.{bus.subjects.kv_receipts}.{_receipt_key(outbound_id)}", encode(receipt))
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise BusUnavailable(f"receipt not stored: {exc}") from exc
        await self.gw.await_ack(fut)


def _receipt_key(outbound_id: str) -> str:
    from ._pipeline import _token

    return "r-" + _token("outbound", outbound_id, n=40)
