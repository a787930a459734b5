"""The bus's key-value state, owned here: which namespaces the shared state bucket holds,
the key of everything the core and the channels keep there, reads, writes with a
per-message TTL and compare-and-set (the JetStream error codes these depend on are named
in ``codes``).

The state bucket (``<prefix>_state``) is shared by the core and every channel. Its keys are
``<namespace>.<rest>``: a channel's own records live under its name, the core's under the
names in ``config.CORE_NAMESPACES``, which the configuration refuses as channel names (and a
channel name is one subject token), so a channel's keys can never be the core's."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import nats.js.errors

from ..channel.api import KeyValue
from ..config import CORE_NAMESPACES
from ..channel.toolkit import stable_id
from .codes import WRONG_LAST_SEQUENCE

if TYPE_CHECKING:
    from .connection import Bus


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


class Records:
    """Reads and writes of one KV bucket of the bus, by full key: plain, with a per-message
    TTL (the bucket's stream allows them; nats-py's ``put``/``update`` take none) and by
    compare-and-set. Every call needs the bus up (:class:`BusUnavailable` otherwise)."""

    def __init__(self, bus: Bus, bucket: str):
        self.bus = bus
        self.bucket = bucket

    def _kv(self) -> Any:
        self.bus.require()
        return self.bus.kv[self.bucket]

    def subject(self, key: str) -> str:
        """The subject a write of ``key`` is published on (for pipelined writes)."""
        return self.bus.subjects.kv(self.bucket, key)

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
        await self.bus.js.publish(self.subject(key), value, msg_ttl=max(1.0, ttl))

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
        try:
            if ttl is None:
                await self._kv().update(key, value, last=revision)
            else:
                self._kv()  # the bus must be up
                await self.bus.js.publish(self.subject(key), value, msg_ttl=max(1.0, ttl),
                                          headers={"Nats-Expected-Last-Subject-Sequence": str(revision)})
            return True
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as exc:
            if lost_race(exc):
                return False
            raise


class ChannelRecords(KeyValue):
    """A channel's own records (``ctx.state``): the state bucket under the channel's name."""

    def __init__(self, bus: Bus, channel: str):
        self.channel = channel
        self.records = Records(bus, bus.subjects.kv_state)

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
