"""Shared state of a channel, for every gateway process at once: stable ids, leases,
shared values (an access token refreshed by one process for all) and the provider-id
index. Each was extracted from a plugin that had its own copy (STYLE.md 19): the lease
from the IMAP reader and the WeChat access-token refresh, the provider-id index from
e-mail bounces and WeChat template events, the stable id from the core and e-mail."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from ..errors import DeliveryError

if TYPE_CHECKING:
    from .api import KeyValue

T = TypeVar("T")


# --- stable ids ------------------------------------------------------------------------


def stable_id(*parts: str, n: int = 26) -> str:
    """A short lowercase base32 id (``[a-z2-7]``, ``n`` characters, at most 52) hashed
    from ``parts``: the same for the same parts in every process and release, and
    revealing nothing of them. Use it for ids a retry must reproduce (an outbound's
    Message-ID, an idempotency key sent to a provider)."""
    h = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).digest()
    # base32 turns each 5 bytes into 8 characters: encode only the bytes the first n
    # characters come from (the same string, at half the cost of the pure-Python encoder).
    return base64.b32encode(h[: -(-n // 8) * 5]).decode("ascii").lower()[:n]


# --- leases ------------------------------------------------------------------------------


class _LeaseRecord(msgspec.Struct):
    holder: str
    expires: float
    """Wall-clock expiry, for releases before leases ran on server time (they read only this)."""
    ttl: float | None = None
    """Set by leases that expire on the server's clock (the record's per-message TTL)."""


_lease_decoder = msgspec.json.Decoder(_LeaseRecord)


class Lease:
    """A lease in a channel's state KV, shared by every gateway process: at most one
    holder at a time, taken and renewed by compare-and-set. The holder renews it (call
    :meth:`acquire` again) well within ``ttl``; when the holder dies, another process
    takes it once it expired. The record is written with a per-message TTL, so it runs out
    on the NATS server's clock: the gateway processes' clocks do not need to agree."""

    def __init__(self, state: KeyValue, key: str, ttl: float):
        self.state = state
        self.key = key
        self.ttl = max(1.0, float(ttl))  # JetStream's smallest per-message TTL; a plain float: it is encoded
        self.holder = uuid.uuid4().hex
        """This contender's identity (one per :class:`Lease` object)."""

    async def _current(self) -> tuple[_LeaseRecord, int] | None:
        cur = await self.state.get_revision(self.key)
        if cur is None:
            return None
        raw, revision = cur
        try:
            return _lease_decoder.decode(raw), revision
        except msgspec.DecodeError:
            return _LeaseRecord(holder="", expires=0.0), revision

    def _record(self, holder: str) -> bytes:
        return msgspec.json.encode(_LeaseRecord(holder=holder, expires=time.time() + self.ttl if holder else 0.0,
                                                ttl=self.ttl))

    async def acquire(self) -> bool:
        """Take the lease, or renew it if we hold it; True if we hold it now."""
        cur = await self._current()
        if cur is None:
            return await self.state.create(self.key, self._record(self.holder), ttl=self.ttl)
        lease, revision = cur
        if lease.holder and lease.holder != self.holder:
            if lease.ttl is not None:
                return False  # held: the server removes the record when it runs out
            if lease.expires > time.time():
                return False  # a previous release's lease: its own wall-clock expiry
        return await self.state.update(self.key, self._record(self.holder), revision, ttl=self.ttl)

    async def release(self) -> None:
        """Give the lease up (only if we still hold it) so a peer takes over at once."""
        cur = await self._current()
        if cur is not None and cur[0].holder == self.holder:
            await self.state.update(self.key, self._record(""), cur[1], ttl=self.ttl)


class _Shared(msgspec.Struct):
    value: Any
    expires_at: float


class SharedValue(Generic[T]):
    """A value every gateway process shares and exactly one refreshes at a time (an access
    token): kept in the state KV under ``key``, cached in the process, refreshed by
    ``fetch`` under a :class:`Lease` when it is missing, about to expire, or refused.

    ``fetch`` returns ``(value, seconds it stays valid)``. Callers of :meth:`get` in this
    process wait for one refresh (single flight); other processes wait for the lease
    holder's result and reuse it instead of fetching their own."""

    def __init__(self, state: KeyValue, key: str, value_type: type[T],
                 fetch: Callable[[], Awaitable[tuple[T, float]]], *, margin: float = 0.0,
                 lease_ttl: float = 15.0, wait: float | None = None):
        self.state = state
        self.key = key
        self.fetch = fetch
        self.margin = margin
        self.lease = Lease(state, key + ".lease", lease_ttl)
        self.wait = 2 * lease_ttl if wait is None else wait
        self._decoder = msgspec.json.Decoder(_shared_type(value_type))
        self._value: T | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0
        """How many times this object called ``fetch`` (for tests and metrics)."""

    def _fresh(self, value: T | None, expires_at: float, stale: T | None) -> bool:
        return value is not None and value != stale and expires_at - self.margin > time.time()

    async def _stored(self) -> _Shared | None:
        raw = await self.state.get(self.key)
        if raw is None:
            return None
        try:
            return self._decoder.decode(raw)  # type: ignore[no-any-return]
        except msgspec.DecodeError:
            return None

    async def get(self, *, stale: T | None = None) -> T:
        """A valid value. ``stale`` is one the provider just refused: it is never returned,
        and only one process replaces it. Raises :class:`DeliveryError` (transient) when a
        refresh by another process does not finish in time; ``fetch``'s own errors pass."""
        if self._fresh(self._value, self._expires_at, stale):
            return self._value  # type: ignore[return-value]
        async with self._lock:
            deadline = time.monotonic() + self.wait
            while True:
                if self._fresh(self._value, self._expires_at, stale):
                    return self._value  # type: ignore[return-value]
                rec = await self._stored()
                if rec is not None and self._fresh(rec.value, rec.expires_at, stale):
                    self._value, self._expires_at = rec.value, rec.expires_at
                    return rec.value  # type: ignore[no-any-return]
                if await self.lease.acquire():
                    try:
                        # The holder before us may have stored a new value just now.
                        rec = await self._stored()
                        if rec is not None and self._fresh(rec.value, rec.expires_at, stale):
                            self._value, self._expires_at = rec.value, rec.expires_at
                            return rec.value  # type: ignore[no-any-return]
                        self.fetches += 1
                        value, valid_for = await self.fetch()
                        expires_at = time.time() + valid_for
                        await self.state.put(self.key, msgspec.json.encode(_Shared(value=value, expires_at=expires_at)))
                        self._value, self._expires_at = value, expires_at
                        return value
                    finally:
                        await self.lease.release()
                if time.monotonic() > deadline:
                    raise DeliveryError(f"refresh of {self.key!r} by another gateway process did not finish",
                                        permanent=False, code="refresh_timeout")
                await asyncio.sleep(0.05 + random.random() * 0.1)


def _shared_type(value_type: type[Any]) -> type[Any]:
    return msgspec.defstruct("_SharedOf", [("value", value_type), ("expires_at", float)])


# --- provider index ------------------------------------------------------------------------


class Sent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What :class:`ProviderIndex` keeps per provider id: our outbound it belongs to."""

    outbound_id: str
    conversation: str = ""


class ProviderIndex:
    """Provider id → our outbound id, in the state KV for ``ttl`` seconds: delivery
    reports, bounces and template events name the provider's id, status events ours.
    Record the id when the provider accepts (``deliver``), look it up when its report
    arrives; a report after ``ttl`` finds nothing."""

    def __init__(self, state: KeyValue, namespace: str, *, ttl: float | None = None):
        self.state = state
        self.namespace = namespace
        self.ttl = ttl

    async def put(self, provider_id: str, outbound_id: str, conversation: str = "") -> None:
        """Remember that ``provider_id`` is ``outbound_id`` (in ``conversation``)."""
        await self.state.put_record(f"{self.namespace}:{provider_id}", Sent(outbound_id=outbound_id,
                                                                            conversation=conversation), ttl=self.ttl)

    async def get(self, provider_id: str) -> Sent | None:
        """The outbound ``provider_id`` belongs to, or None (unknown, or older than ``ttl``)."""
        return await self.state.get_record(f"{self.namespace}:{provider_id}", Sent)
