"""The NATS JetStream bus: connection (with retry while the server is down), the streams and
buckets of the bus contract (created or updated at start-up), and subject names."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue as NatsKV
from nats.js.object_store import ObjectStore

from ..config import BusConfig
from ..errors import BusUnavailable, MessageTooLarge, PayloadTooLarge
from ..retry import Backoff, Supervised
from .reads import Reads

_HEADER_LINE = len("NATS/1.0\r\n")
_BLOCK_END = len("\r\n")


def wire_size(payload: bytes, headers: dict[str, str] | None = None) -> int:
    """What nats-server counts against ``max_payload`` (and JetStream against a stream's
    ``max_msg_size``): the payload plus, for an HPUB, the header block
    ``NATS/1.0\r\n`` + ``k: v\r\n`` per header + ``\r\n``. nats-py checks only the
    payload: a message whose headers push it over the limit is sent, and the server
    answers by closing the connection (issue 9.1)."""
    if headers is None:
        return len(payload)
    n = _HEADER_LINE + _BLOCK_END
    for k, v in headers.items():
        # ASCII is the common case and len() is its byte count; nats-py strips what it
        # sends, so this counts at most a few bytes too many, never too few.
        n += (len(k) if k.isascii() else len(k.encode())) + (len(v) if v.isascii() else len(v.encode())) + 4
    return len(payload) + n


class _GuardedNATS(NATS):
    """nats-py's client with the size check nats-server applies: every publish of the
    process (messages, KV writes, object store chunks, statuses, dead letters) is refused
    here, with an exception, instead of making the server drop the whole connection."""

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        if headers is not None:
            size = wire_size(payload, headers)
            if size > self._max_payload:
                raise MessageTooLarge(size, self._max_payload)
        await super().publish(subject, payload, reply, headers)


class _JetStream(JetStreamContext):
    """nats-py's JetStream context, with the error answer to a ``publish_async`` handed to
    its future. nats-py 2.16 raises it inside the reply callback instead
    (``APIError.from_error`` raises rather than returns), so the error went to ``error_cb``
    and the publisher waited for its timeout: on a cluster, a provider's retry racing its
    first attempt in another process (409, :data:`.codes.DUPLICATE_IN_PROCESS`) cost 5 s and a 503."""

    async def _handle_async_reply(self, msg: Any) -> None:
        if b'"error"' in msg.data:
            token = msg.subject[len(self._nc._inbox_prefix) + 22 + 2:]
            future = self._publish_async_futures.get(token)
            if future is not None and not future.done():
                try:
                    err = json.loads(msg.data).get("error")
                except (ValueError, AttributeError):
                    err = None
                if isinstance(err, dict) and "code" in err:
                    try:
                        nats.js.errors.APIError.from_error(err)
                    except nats.js.errors.APIError as exc:
                        future.set_exception(exc)
                        return
        await super()._handle_async_reply(msg)


class Subjects:
    """Subject and stream names of the bus contract, for one prefix."""

    def __init__(self, prefix: str = "gw"):
        self.prefix = prefix
        up = prefix.upper().replace("-", "_")
        self.stream_in = f"{up}_IN"
        self.stream_out = f"{up}_OUT"
        self.stream_status = f"{up}_STATUS"
        self.stream_dead = f"{up}_DEAD"
        self.kv_dedup = f"{prefix}_dedup"
        self.kv_conversations = f"{prefix}_conversations"
        self.kv_state = f"{prefix}_state"
        self.kv_receipts = f"{prefix}_receipts"
        self.object_store = f"{prefix}_blobs"
        self.outbound_consumer = f"{prefix}_delivery"
        """The one shared outbound consumer of versions before per-channel consumers
        (removed at start: its filter overlaps theirs)."""
        self.stream_sched = f"{up}_SCHED"
        """Reminder schedules, their fired copies and reminder statuses (docs/reminders.md)."""
        self.stream_tasks = f"{up}_TASKS"
        self.reminders_new_consumer = f"{prefix}_reminders_new"
        """The gateway's early check of every schedule as it is published."""
        self.reminders_consumer = f"{prefix}_reminders"
        """The gateway's consumer of fired reminders."""
        self.all_schedules = f"{prefix}.sched.at.>"
        self.all_fired = f"{prefix}.sched.fire.>"
        self.all_unanswered = f"{prefix}.sched.unanswered.>"
        self.surveys_consumer = f"{prefix}_surveys"
        """The gateway's consumer of surveys whose answer time is up."""

    def delivery_consumer(self, channel: str) -> str:
        """The durable consumer of ``channel``'s outbounds on the outbound stream."""
        return f"{self.prefix}_out_{channel}"

    def channel_outbound(self, channel: str) -> str:
        """The filter of ``channel``'s outbounds, whatever type a backend named."""
        return f"{self.prefix}.out.*.{channel}"

    def inbound(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.in.{channel_type}.{channel}"

    def outbound(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.out.{channel_type}.{channel}"

    def status(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.status.{channel_type}.{channel}"

    def dead(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.dead.{channel_type}.{channel}"

    def all(self) -> str:
        return f"{self.prefix}.>"

    def schedule(self, conversation: str, reminder_id: str) -> str:
        """The subject of a reminder's schedule (one message: the latest schedule)."""
        return f"{self.prefix}.sched.at.{conversation}.{reminder_id}"

    def schedule_of(self, reminder_id: str) -> str:
        """A filter matching the schedules of ``reminder_id`` in any conversation."""
        return f"{self.prefix}.sched.at.*.*.{reminder_id}"

    def schedules_of_conversation(self, conversation: str) -> str:
        """A filter matching every schedule of one conversation."""
        return f"{self.prefix}.sched.at.{conversation}.*"

    def fire(self, channel_type: str, channel: str) -> str:
        """Where the server copies a schedule when it is due (``Nats-Schedule-Target``)."""
        return f"{self.prefix}.sched.fire.{channel_type}.{channel}"

    def survey_watch(self, conversation: str) -> str:
        """The schedule that reports the conversation's survey if nobody answers it."""
        return f"{self.prefix}.sched.survey.{conversation}"

    def unanswered(self, channel_type: str, channel: str) -> str:
        """Where a survey's watch fires when its ``answer_within`` has passed."""
        return f"{self.prefix}.sched.unanswered.{channel_type}.{channel}"

    def reminder_status(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.sched.status.{channel_type}.{channel}"

    def task(self, channel_type: str, channel: str) -> str:
        return f"{self.prefix}.task.{channel_type}.{channel}"

    @staticmethod
    def kv(bucket: str, key: str) -> str:
        """The subject a KV put of ``key`` in ``bucket`` is published on (for pipelined
        writes with ``publish_async`` and per-message TTLs, which nats-py's KV lacks)."""
        return f"$KV.{bucket}.{key}"

    @staticmethod
    def kv_stream(bucket: str) -> str:
        """The stream that holds ``bucket``."""
        return f"KV_{bucket}"


class Bus:
    """One NATS connection with JetStream, shared by the whole process."""

    def __init__(self, cfg: BusConfig, url: str, *, log: Any, name: str = "gateway", receipt_ttl: float = 7 * 86400,
                 schedules: bool = True):
        self.cfg = cfg
        self.schedules = schedules
        """Lay out the reminder streams too (they need nats-server 2.12+: message schedules)."""
        self.url = url
        self.log = log
        self.name = name
        self.receipt_ttl = receipt_ttl
        """TTL of the receipts bucket (``[outbound] receipt_ttl``)."""
        self.subjects = Subjects(cfg.prefix)
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self.kv: dict[str, NatsKV] = {}
        self._reads: Reads | None = None
        self._objects: ObjectStore | None = None
        self._ready = asyncio.Event()
        self._supervisor: Supervised | None = None
        self.on_ready: list[Callable[[], Awaitable[None] | None]] = []
        self.on_reconnected: list[Callable[[], None]] = []
        """Called when nats-py connected again by itself (a server restart): what the server
        knew of our consumers' deliveries may have been lost with it."""
        self.error: str | None = "not connected yet"
        self._closing = False

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context of the current connection (:class:`BusUnavailable` before
        the first one). Unlike :meth:`require`, it does not wait for ``on_ready``."""
        if self._js is None:
            raise BusUnavailable(f"bus not connected ({self.error or 'disconnected'})")
        return self._js

    @property
    def reads(self) -> Reads:
        """Pipelined direct gets on the current connection (:class:`BusUnavailable` before
        the first one)."""
        if self._reads is None:
            raise BusUnavailable(f"bus not connected ({self.error or 'disconnected'})")
        return self._reads

    @property
    def objects(self) -> ObjectStore:
        """The object store of the current connection (:class:`BusUnavailable` before the
        first one)."""
        if self._objects is None:
            raise BusUnavailable(f"bus not connected ({self.error or 'disconnected'})")
        return self._objects

    # --- lifecycle -----------------------------------------------------------------

    @property
    def max_payload(self) -> int:
        """The largest message (payload plus headers) this bus takes: the smaller of
        ``bus.max_message_size`` (the streams' ``max_msg_size``) and the server's
        ``max_payload`` from its INFO."""
        limit = self.cfg.max_message_size
        if self.nc is not None and self.nc.max_payload:
            limit = min(limit, self.nc.max_payload)
        return limit

    def check_size(self, what: str, payload: bytes, headers: dict[str, str] | None) -> int:
        """Raise :class:`PayloadTooLarge` (413 / SMTP 552) if ``payload`` with ``headers``
        exceeds :attr:`max_payload`; returns its size on the wire."""
        size = wire_size(payload, headers)
        limit = self.max_payload
        if size > limit:
            raise PayloadTooLarge(f"{what} of {size} bytes (with its bus headers) exceeds the bus limit of {limit} bytes")
        return size

    @property
    def connected(self) -> bool:
        """True when the connection is up and the streams exist."""
        return self._ready.is_set() and self.nc is not None and self.nc.is_connected

    def start(self) -> None:
        """Connect in the background and stay connected: retry with backoff while the server
        is down, and connect again whenever nats-py gives a connection up for good."""
        # A connection that lived 30 s starts the backoff over: reconnect quickly after it.
        self._supervisor = Supervised(
            "bus", self._session, set_state=self._health, log=self.log, backoff=Backoff(first=0.2, cap=10.0),
            stable_after=30.0,
            describe=lambda exc: str(exc) if isinstance(exc, BusUnavailable) else f"{type(exc).__name__}: {exc}")
        self._supervisor.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the bus is connected and every ``on_ready`` callback ran."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    def _health(self, state: str, detail: str | None) -> None:
        self.error = None if state == "running" else detail

    async def _session(self, supervisor: Supervised) -> None:
        # nats-py reconnects by itself after a dropped socket, but it closes the connection
        # for good after a server error (a payload over max_payload, an authorization
        # error) and then nothing would ever publish again: the supervisor starts over.
        lost = asyncio.Event()
        try:
            await self._connect_once(lost)
            for cb in self.on_ready:
                r = cb()
                if asyncio.iscoroutine(r):
                    await r
            supervisor.running()
            self._ready.set()
            self.log.info("bus connected", url=self._safe_url(), prefix=self.cfg.prefix)
            await self._until_closed(lost)
            reason = self.nc.last_error if self.nc is not None else None
            raise BusUnavailable(f"connection closed ({type(reason).__name__}: {reason})" if reason
                                 else "connection closed")
        except asyncio.CancelledError:
            raise  # close() flushes and closes the connection
        except BaseException:
            self._ready.clear()
            await self._discard()
            raise

    async def _until_closed(self, lost: asyncio.Event) -> None:
        # closed_cb is the signal; the poll covers a close that skipped the callbacks
        # (nats-py does so for errors that arrive while it is connecting).
        while not lost.is_set() and self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(lost.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def _discard(self) -> None:
        """Close the current connection, whatever state it is in."""
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            await _close_quietly(nc, self.log)

    def _safe_url(self) -> str:
        from ..logs import mask_secrets  # one masking function for logs and CLI output

        return mask_secrets(self.url)

    async def _connect_once(self, lost: asyncio.Event) -> None:
        async def closed() -> None:
            lost.set()

        opts: dict[str, Any] = dict(
            servers=[u.strip() for u in self.url.split(",") if u.strip()],
            name=self.name,
            connect_timeout=max(1, int(self.cfg.connect_timeout)),
            allow_reconnect=True,
            # One pass over the servers: while the bus is down at start, our own loop
            # retries with backoff (nats-py would otherwise spin inside connect()).
            max_reconnect_attempts=1,
            reconnect_time_wait=1,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=closed,
        )
        if self.cfg.user:
            opts["user"], opts["password"] = self.cfg.user, self.cfg.password
        if self.cfg.token:
            opts["token"] = self.cfg.token
        if self.cfg.creds_file:
            opts["user_credentials"] = self.cfg.creds_file
        self.nc = _GuardedNATS()
        await self.nc.connect(**opts)
        # Once connected, never give up reconnecting (nats-py reads this option live).
        self.nc.options["max_reconnect_attempts"] = -1
        self._js = _JetStream(self.nc, timeout=self.cfg.publish_timeout, publish_async_max_pending=20000)
        self._reads = Reads(self.nc)
        await self._reads.start()
        # Also after a reconnect: the KV and object store handles hold the JetStream
        # context they were made with, so they are made again on the new one.
        await self.ensure_layout()

    async def _on_error(self, exc: Exception) -> None:
        self.log.warning("bus error", error=f"{type(exc).__name__}: {exc}")

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self.error = "disconnected; reconnecting"
            self.log.warning("bus disconnected")

    async def _on_reconnected(self) -> None:
        self.error = None
        self.log.info("bus reconnected")
        for cb in self.on_reconnected:
            cb()

    async def close(self) -> None:
        """Stop the supervisor and close the connection (what is buffered is flushed)."""
        self._closing = True
        if self._supervisor is not None:
            await self._supervisor.stop()
        self._ready.clear()
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            if nc.is_connected:
                # Every publish was awaited by its caller; flush what is buffered and close.
                # (drain() would wait on the pull subscription's internal queue.)
                try:
                    await nc.flush(timeout=2)
                except Exception:
                    pass
            await _close_quietly(nc, self.log)

    # --- layout --------------------------------------------------------------------

    def stream_configs(self) -> list[api.StreamConfig]:
        """The streams of the bus contract, as the ``[bus]`` section configures them."""
        s, c = self.subjects, self.cfg
        common: dict[str, Any] = dict(storage=api.StorageType.FILE, num_replicas=c.replicas, max_msg_size=c.max_message_size,
                      duplicate_window=c.duplicate_window)
        return [
            api.StreamConfig(name=s.stream_in, subjects=[f"{s.prefix}.in.>"], retention=api.RetentionPolicy.LIMITS,
                             max_age=c.inbound_max_age, description="inbound customer messages", **common),
            api.StreamConfig(name=s.stream_out, subjects=[f"{s.prefix}.out.>"], retention=api.RetentionPolicy.WORK_QUEUE,
                             description="outbound replies awaiting delivery", **common),
            api.StreamConfig(name=s.stream_status, subjects=[f"{s.prefix}.status.>"], retention=api.RetentionPolicy.LIMITS,
                             max_age=c.status_max_age, description="delivery status events", **common),
            api.StreamConfig(name=s.stream_dead, subjects=[f"{s.prefix}.dead.>"], retention=api.RetentionPolicy.LIMITS,
                             max_age=c.dead_max_age, description="dead letters", **common),
        ] + (self._schedule_streams(common) if self.schedules else [])

    def _schedule_streams(self, common: dict[str, Any]) -> list[api.StreamConfig]:
        s, c = self.subjects, self.cfg
        return [
            # No max_age: schedules wait as long as they must; fired copies and statuses carry
            # their own TTL (Nats-Schedule-TTL, Nats-TTL).
            api.StreamConfig(name=s.stream_sched, subjects=[f"{s.prefix}.sched.>"], retention=api.RetentionPolicy.LIMITS,
                             allow_msg_schedules=True, allow_msg_ttl=True,
                             description="reminder schedules, fired reminders and reminder statuses", **common),
            api.StreamConfig(name=s.stream_tasks, subjects=[f"{s.prefix}.task.>"], retention=api.RetentionPolicy.LIMITS,
                             max_age=c.status_max_age, description="tasks for the desk (callbacks by phone)",
                             **common),
        ]

    async def ensure_layout(self) -> None:
        """Create or update every stream, KV bucket and the object store."""
        for cfg in self.stream_configs():
            try:
                await self.js.add_stream(cfg)
            except nats.js.errors.BadRequestError as exc:
                # Exists with another configuration: update what may be updated.
                try:
                    await self.js.update_stream(cfg)
                except nats.js.errors.APIError as exc2:
                    self.log.warning("stream config could not be updated", stream=cfg.name, error=str(exc2), first=str(exc))
        s, c = self.subjects, self.cfg
        buckets = [
            api.KeyValueConfig(bucket=s.kv_dedup, ttl=c.dedup_ttl, history=1, replicas=c.replicas, direct=True,
                               storage=api.StorageType.FILE, description="seen provider message ids"),
            api.KeyValueConfig(bucket=s.kv_conversations, history=1, replicas=c.replicas, direct=True,
                               storage=api.StorageType.FILE, description="conversation routes"),
            api.KeyValueConfig(bucket=s.kv_state, history=1, replicas=c.replicas, direct=True,
                               storage=api.StorageType.FILE, description="channel state"),
            api.KeyValueConfig(bucket=s.kv_receipts, history=1, replicas=c.replicas, direct=True,
                               ttl=self.receipt_ttl, storage=api.StorageType.FILE,
                               description="provider receipts by outbound id"),
        ]
        for b in buckets:
            self.kv[b.bucket] = await self._ensure_kv(b)
        try:
            self._objects = await self.js.object_store(s.object_store)
        except nats.js.errors.BucketNotFoundError:
            self._objects = await self.js.create_object_store(
                s.object_store, config=api.ObjectStoreConfig(bucket=s.object_store, replicas=c.replicas,
                                                             storage=api.StorageType.FILE, ttl=c.blob_max_age))
        else:
            # Retention may change with the config: apply it to the existing bucket.
            stream = f"OBJ_{s.object_store}"
            info = await self.js.stream_info(stream)
            if info.config.max_age != c.blob_max_age or info.config.num_replicas != c.replicas:
                info.config.max_age = c.blob_max_age
                info.config.num_replicas = c.replicas
                await self.js.update_stream(info.config)

    async def _ensure_kv(self, cfg: api.KeyValueConfig) -> NatsKV:
        try:
            return await self.js.create_key_value(cfg)
        except nats.js.errors.BadRequestError:
            await self._ensure_replicas(self.subjects.kv_stream(cfg.bucket))
            return await self.js.key_value(cfg.bucket)

    async def _ensure_replicas(self, stream: str) -> None:
        """Give an existing bucket's stream ``[bus] replicas`` (a single-node bus moved to a
        cluster: its streams are updated by ``update_stream``, the buckets here)."""
        info = await self.js.stream_info(stream)
        if info.config.num_replicas != self.cfg.replicas:
            info.config.num_replicas = self.cfg.replicas
            try:
                await self.js.update_stream(info.config)
            except nats.js.errors.APIError as exc:
                self.log.warning("bucket replicas could not be changed", stream=stream, error=str(exc))

    # --- helpers -------------------------------------------------------------------

    def require(self, *, during_setup: bool = False) -> JetStreamContext:
        """The JetStream context, or :class:`BusUnavailable`.

        The bus counts as connected only after every ``on_ready`` callback ran (so webhooks
        wait for the dedup restore); those callbacks themselves pass ``during_setup=True``
        to use the connection that is already up."""
        if during_setup and self.nc is not None and self.nc.is_connected and self._js is not None:
            return self._js
        if not self.connected:
            raise BusUnavailable(f"bus not connected ({self.error or 'disconnected'})")
        return self.js


async def _close_quietly(nc: NATS, log: Any) -> None:
    # While nats-py is between reconnect attempts its socket is already gone, and close()
    # raises (RuntimeError from the transport, when it tries to flush what is pending).
    # What was pending was never acknowledged, so its callers were told so already.
    try:
        await nc.close()
    except Exception as exc:
        log.debug("bus connection closed with an error", error=f"{type(exc).__name__}: {exc}")
