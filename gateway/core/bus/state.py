"""The bus's key-value state, owned here: which namespaces the shared state bucket holds,
the key of everything the core and the channels keep there, reads, writes with a
per-message TTL, compare-and-set, the dedup bucket, and the reading of a conversation's
channel. No module outside ``gateway/core/bus/`` touches a bucket itself
(``tests/test_core_layers.py`` fails if one does).

The state bucket (``<prefix>_state``) is shared by the core and every channel. Its keys are
``<namespace>.<rest>``: a channel's own records live under its name, the core's under the
names in ``config.CORE_NAMESPACES``, which the configuration refuses as channel names (and a
channel name is one subject token), so a channel's keys can never be the core's.

Times in the core's own records are msgspec ``datetime`` fields (UTC, RFC 3339 on the
wire): desk records, pending surveys, liveness markers. Delivery leases and presences hold
no time: the server's per-message TTL is their clock. The channel toolkit's ``Lease`` and
``SharedValue`` records (in a channel's namespace) still carry epoch seconds, because
processes of earlier releases read them during a rolling upgrade and would take a
``datetime`` for a missing record (a free lease, a token to fetch again)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import nats.js.errors

from ..channel.api import KeyValue
from ..config import CORE_NAMESPACES
from ..channel.shared import stable_id
from .codes import WRONG_LAST_SEQUENCE
from .connection import Subjects
from .contract import EXPECTED_LAST_SEQUENCE
from .reads import Entry, valid_key

if TYPE_CHECKING:
    from nats.js import api

    from .connection import Bus

_OPERATION = "KV-Operation"
"""The header that makes a message of a bucket a delete (``DEL``) or purge (``PURGE``) marker."""
_REMOVED = frozenset({"DEL", "PURGE"})


def _core(namespace: str, rest: str) -> str:
    # Every core key goes through here, so a namespace the configuration does not reserve
    # for the core fails the first test that writes it.
    if namespace not in CORE_NAMESPACES:
        raise AssertionError(f"state namespace {namespace!r} is not in config.CORE_NAMESPACES")
    return f"{namespace}.{rest}"

_SAFE_KEY = re.compile(r"^[-_=a-zA-Z0-9]{1,200}$")


def liveness_key(instance: str) -> str:
    """The liveness marker of one gateway process (dedup restore)."""
    return _core("core", f"inbound-live.{instance}")


def delivery_owner_key(channel: str) -> str:
    """The lease of the process that delivers ``channel``'s outbounds."""
    return _core("core", f"delivery.{channel}")


def delivery_live_key(instance: str) -> str:
    """The presence of one process that delivers outbounds (``*``: all of them)."""
    return _core("core", f"delivery-live.{instance}")


def survey_key(conversation: str) -> str:
    """The pending survey of ``conversation``."""
    return _core("survey", conversation)


def quiet_key(conversation: str) -> str:
    """The quiet hours reminders use for ``conversation``."""
    return _core("quiet", conversation)


def desk_key(rest: str) -> str:
    """A service-desk record: ``conv.<conversation>`` or ``open.<calendar>``."""
    return _core("desk", rest)


def channel_key(channel: str, key: str) -> str:
    """The state-bucket key of a channel's own ``key``: used as given when it is a valid
    KV token, hashed otherwise (any string a plugin chooses is a valid key)."""
    return f"{channel}.{key}" if _SAFE_KEY.match(key) else f"{channel}.h-{stable_id(key, n=40)}"


def lost_race(exc: BaseException) -> bool:
    """True for the error of a compare-and-set (create, update, expected last sequence)
    that another writer won."""
    return isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or \
        getattr(exc, "err_code", None) == WRONG_LAST_SEQUENCE


class Stored(NamedTuple):
    """The last message on a key, whatever it is: a value, or a delete or purge marker."""

    value: bytes
    revision: int
    """Its stream sequence: what a compare-and-set expects."""
    time: datetime | None
    """When the server stored it (its clock, not ours)."""
    removed: bool
    """A delete or purge marker: nothing is stored at the key."""


class Bucket:
    """One KV bucket of the bus through JetStream's own API, by full key: gets of the last
    message on a key's subject and publishes on it. It needs no nats-py ``KeyValue``
    object (no bucket lookup first), so the backend client and the CLI, on a bare
    connection, read and write the gateway's records the way the gateway does.

    ``js`` is a JetStream context; :class:`Records` takes it from the gateway's bus on every
    call instead, since a new connection brings a new one."""

    def __init__(self, js: Any, bucket: str):
        self._js = js
        self.bucket = bucket
        self.stream = Subjects.kv_stream(bucket)
        self._prefix = Subjects.kv(bucket, "")

    @property
    def js(self) -> Any:
        return self._js

    def subject(self, key: str) -> str:
        """The subject a write of ``key`` is published on."""
        return self._prefix + key

    async def last(self, key: str, *, leader: bool = False) -> Stored | None:
        """The last message stored on ``key``, a delete or purge marker included (a
        compare-and-set against it needs its revision); None when there is none (never
        written, expired, purged away) or ``key`` cannot be a key. Read from any replica
        (a direct get) unless ``leader``: a decision that must see the latest write asks the
        stream's leader."""
        if not valid_key(key):
            return None
        try:
            m = await self.js.get_msg(self.stream, subject=self.subject(key), direct=not leader)
        except nats.js.errors.NotFoundError:
            return None
        return Stored(m.data or b"", m.seq or 0, m.time, (m.headers or {}).get(_OPERATION) in _REMOVED)

    async def read(self, key: str) -> bytes | None:
        """The value stored at ``key``, or None: nothing (never written, deleted, purged,
        expired, empty) or not a key."""
        try:
            found = await self.last(key)
        except nats.js.errors.BadRequestError:
            return None
        return None if found is None or found.removed or not found.value else found.value

    async def keys(self, pattern: str) -> list[str]:
        """The keys matching ``pattern`` (``*`` one token, ``>`` the rest) that have a
        message stored, a delete or purge marker included, in no particular order."""
        info = await self.js.stream_info(self.stream, subjects_filter=self.subject(pattern))
        cut = len(self._prefix)
        return [subject[cut:] for subject in info.state.subjects or {}]

    async def stored_at(self, revision: int) -> datetime:
        """When the server stored ``revision`` (asked of the stream's leader)."""
        m = await self.js.get_msg(self.stream, seq=revision)
        if m.time is None:  # nats-py types it Optional; a stored message always has it
            raise ValueError(f"stream message {revision} has no time")
        return m.time

    async def write(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Store ``value`` at ``key``; its revision. With ``ttl`` (whole seconds, at least
        one), the server removes it after that long (a per-message TTL: the bucket's stream
        allows them; nats-py's ``put`` takes none)."""
        ack = await self.js.publish(self.subject(key), value, msg_ttl=ttl)
        return int(ack.seq)

    async def write_if(self, key: str, value: bytes, revision: int, *, ttl: float | None = None) -> int | None:
        """Store ``value`` at ``key`` only if its last revision is still ``revision`` (0:
        nothing was ever stored, or all of it is gone); the new revision, or None if
        another writer won."""
        try:
            ack = await self.js.publish(self.subject(key), value, msg_ttl=ttl,
                                        headers={EXPECTED_LAST_SEQUENCE: str(revision)})
        except nats.js.errors.APIError as exc:
            if lost_race(exc):
                return None
            raise
        return int(ack.seq)

    async def delete(self, key: str) -> None:
        """Delete ``key``: a delete marker (``KV-Operation: DEL``), as a KV delete writes."""
        await self.js.publish(self.subject(key), b"", headers={_OPERATION: "DEL"})

    async def delete_if(self, key: str, revision: int) -> bool:
        """Delete ``key`` only if its last revision is still ``revision``; False if it changed."""
        try:
            await self.js.publish(self.subject(key), b"",
                                  headers={_OPERATION: "DEL", EXPECTED_LAST_SEQUENCE: str(revision)})
        except nats.js.errors.APIError as exc:
            if lost_race(exc):
                return False
            raise
        return True

    async def purge(self, key: str, *, ttl: float | None = None) -> None:
        """Remove ``key`` and its history: a purge marker (``KV-Operation: PURGE``, rolling up
        the key's older messages), as a KV purge writes. Unlike :meth:`erase`, something
        stays: the marker, which says "removed" even if older messages reappear (a
        nats-server killed before it synced a removal). ``ttl``: the marker goes after that
        long."""
        await self.js.publish(self.subject(key), b"", headers={_OPERATION: "PURGE", "Nats-Rollup": "sub"},
                              msg_ttl=ttl)

    async def erase(self, key: str) -> None:
        """Remove every message of ``key`` from the stream, leaving nothing (not even a
        marker): :meth:`keys` no longer names it."""
        await self.js.purge_stream(self.stream, subject=self.subject(key))


class Records(Bucket):
    """Reads and writes of one KV bucket of the gateway's bus, by full key: plain, with a
    per-message TTL and by compare-and-set, on the bus's current connection. The
    :class:`KeyValue`-like calls (:meth:`get` ... :meth:`update`) need the bus up
    (:class:`BusUnavailable` otherwise); the others, only a connection (the bus's own
    start-up callbacks use them)."""

    def __init__(self, bus: Bus, bucket: str):
        super().__init__(None, bucket)
        self.bus = bus

    @property
    def js(self) -> Any:
        return self.bus.js

    def _kv(self) -> Any:
        self.bus.require()
        return self.bus.kv[self.bucket]

    def ask(self, key: str) -> Coroutine[Any, Any, asyncio.Future[Entry | None]]:
        """Send a pipelined read of ``key`` (:mod:`.reads`); awaited, the future of its
        entry. ``key`` must be a valid key (:func:`.reads.valid_key`). Returns the
        read's own coroutine, so the caller's await is the only one (the inbound path)."""
        return self.bus.reads.send(self.stream, self._prefix + key)

    async def get(self, key: str) -> bytes | None:
        entry = await self.get_revision(key)
        return None if entry is None else entry[0]

    async def get_revision(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self._kv().get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            return None
        return entry.value or b"", entry.revision

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        if ttl is None:
            await self._kv().put(key, value)
            return
        self._kv()  # the bus must be up
        await self.write(key, value, ttl=max(1.0, ttl))

    async def delete(self, key: str) -> None:
        try:
            await self._kv().delete(key)
        except nats.js.errors.KeyNotFoundError:
            pass

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        """Write ``key`` only if it does not exist; False if it does."""
        try:
            await self._kv().create(key, value, msg_ttl=None if ttl is None else max(1.0, ttl))
            return True
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as exc:
            if lost_race(exc):
                return False
            raise

    async def update(self, key: str, value: bytes, revision: int, *, ttl: float | None = None) -> bool:
        """Write ``key`` only if its revision is still ``revision``; False if it changed."""
        if ttl is not None:
            self._kv()  # the bus must be up
            return await self.write_if(key, value, revision, ttl=max(1.0, ttl)) is not None
        try:
            await self._kv().update(key, value, last=revision)
            return True
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as exc:
            if lost_race(exc):
                return False
            raise


class Dedup:
    """The dedup bucket (``<prefix>_dedup``): for each provider message (key
    ``<channel>.<message id>``) the sequence of its copy on the inbound stream, as decimal
    text. Read and written on the inbound path, pipelined: :meth:`ask` and :meth:`write`
    return the read's or the publish's own coroutine (no frame of their own), awaited by the
    caller for the future of the answer."""

    def __init__(self, bus: Bus):
        self.bus = bus
        self.bucket = bus.subjects.kv_dedup
        self._stream = Subjects.kv_stream(self.bucket)
        self._prefix = Subjects.kv(self.bucket, "")

    def ask(self, key: str) -> Coroutine[Any, Any, asyncio.Future[Entry | None]]:
        """Send the read of ``key``'s record (a valid key: :func:`.reads.valid_key`)."""
        return self.bus.reads.send(self._stream, self._prefix + key)

    def write(self, key: str, seq: int) -> Coroutine[Any, Any, asyncio.Future[api.PubAck]]:
        """Send ``key``'s record: its message is ``seq`` on the inbound stream."""
        return self.bus.js.publish_async(self._prefix + key, str(seq).encode())

    @staticmethod
    def sequence(entry: Entry) -> int | None:
        """The inbound stream sequence a record names, or None (a record that names none)."""
        return int(entry.value) if entry.value and entry.value.isdigit() else None

    async def missing(self, keys: Sequence[str]) -> list[bool]:
        """Whether each of ``keys`` has no record, read together."""
        kv = self.bus.kv[self.bucket]
        found = await asyncio.gather(*(kv.get(key) for key in keys), return_exceptions=True)
        out = []
        for r in found:
            if isinstance(r, nats.js.errors.KeyNotFoundError):
                out.append(True)
            elif isinstance(r, BaseException):
                raise r
            else:
                out.append(False)
        return out


def state_bucket(js: Any, subjects: Subjects) -> Bucket:
    """The shared state bucket (``<prefix>_state``) over a bare JetStream context ``js``."""
    return Bucket(js, subjects.kv_state)


def state_records(bus: Bus) -> Records:
    """The shared state bucket (``<prefix>_state``) of the gateway's ``bus``."""
    return Records(bus, bus.subjects.kv_state)


class _Route(msgspec.Struct):
    """The two fields of a stored conversation (``channel.api.Conversation``) a reply's
    subject needs; everything else is left undecoded."""

    channel_type: str = ""
    channel: str = ""


_route_decoder = msgspec.json.Decoder(_Route)


async def channel_of(js: Any, subjects: Subjects, conversation: str) -> tuple[str, str] | None:
    """The channel type and name of the stored conversation ``conversation`` (bucket
    ``<prefix>_conversations``), read over ``js``; None if none is stored (or the record
    names no channel). For the backend client, which may run without a gateway, and for
    surveys."""
    data = await Bucket(js, subjects.kv_conversations).read(conversation)
    if data is None:
        return None
    try:
        route = _route_decoder.decode(data)
    except msgspec.DecodeError:
        return None
    return (route.channel_type, route.channel) if route.channel_type and route.channel else None


class ChannelRecords(KeyValue):
    """A channel's own records (``ctx.state``): the state bucket under the channel's name."""

    def __init__(self, bus: Bus, channel: str):
        self.channel = channel
        self.records = state_records(bus)

    def _key(self, key: str) -> str:
        return channel_key(self.channel, key)

    async def get(self, key: str) -> bytes | None:
        return await self.records.get(self._key(key))

    async def get_revision(self, key: str) -> tuple[bytes, int] | None:
        return await self.records.get_revision(self._key(key))

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        await self.records.put(self._key(key), value, ttl=ttl)

    async def delete(self, key: str) -> None:
        await self.records.delete(self._key(key))

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        return await self.records.create(self._key(key), value, ttl=ttl)

    async def update(self, key: str, value: bytes, revision: int, *, ttl: float | None = None) -> bool:
        return await self.records.update(self._key(key), value, revision, ttl=ttl)
