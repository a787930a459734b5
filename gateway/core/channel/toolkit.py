"""The channel toolkit: mechanisms every provider channel needs, written once.

Each piece was extracted from a plugin that had its own copy (STYLE.md 19): the lease
from the IMAP reader and the WeChat access-token refresh, the provider-id index from
email bounces and WeChat template events, part bytes from both outbound paths, the HTTP
answer mapping from the WeChat API client, the stable id from core and email."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import binascii
import hashlib
import hmac
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import httpx
import msgspec
import websockets.exceptions

from ..errors import DeliveryError, SignatureError, WebSocketClosed

if TYPE_CHECKING:
    from starlette.requests import Request

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


# --- provider answers ------------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110
    10.2.3). None when absent or unusable; a date in the past is 0."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP date is always GMT; one without a zone is not an HTTP date
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def provider_error(status: int, headers: Mapping[str, str] | None = None, *, provider: str = "provider",
                   now: float | None = None) -> DeliveryError | None:
    """The :class:`DeliveryError` for a provider's HTTP answer, or None for success (< 400).
    429, 408 and 5xx are transient (with ``retry_after`` from Retry-After, seconds or HTTP
    date); any other 4xx is permanent. ``code`` is ``http_<status>``."""
    if status < 400:
        return None
    transient = status in (408, 429) or status >= 500
    retry_after = None
    if transient and headers is not None:
        retry_after = parse_retry_after(_header(headers, "retry-after"), now=now)
    return DeliveryError(f"{provider} answered HTTP {status}", permanent=not transient, code=f"http_{status}",
                         retry_after=retry_after)


UNREACHABLE = "unreachable"
"""The error code of a provider call that never reached the provider (connection refused
or not open, DNS, TLS, connect timeout): retrying cannot double it."""
TIMEOUT = "timeout"
"""The error code of a provider call that went out and got no answer (in time, or at all:
the connection dropped first): the provider may have acted on it, so a retry may double."""

# httpx errors raised before the request was written: the provider never saw it.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def transport_error(exc: BaseException, *, provider: str = "provider") -> DeliveryError:
    """The transient :class:`DeliveryError` for a provider call that got no answer, with one
    of two fixed codes for every channel: :data:`UNREACHABLE` when the request cannot have
    reached the provider, :data:`TIMEOUT` when it may have. Takes httpx's errors, timeouts
    (``TimeoutError``), socket errors and a closed WebSocket. The message names the provider
    and the kind of failure, never a URL or credentials."""
    if isinstance(exc, _NOT_SENT) or isinstance(exc, ConnectionRefusedError):
        return DeliveryError(f"{provider} unreachable ({type(exc).__name__})", permanent=False, code=UNREACHABLE)
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return DeliveryError(f"{provider} did not answer in time", permanent=False, code=TIMEOUT)
    return DeliveryError(f"{provider}: connection lost before the answer ({type(exc).__name__})", permanent=False,
                         code=TIMEOUT)


def not_connected(provider: str) -> DeliveryError:
    """The transient :class:`DeliveryError` for a call that has no connection to go out on
    (a WebSocket provider that is not connected now): code :data:`UNREACHABLE`."""
    return DeliveryError(f"{provider} not connected", permanent=False, code=UNREACHABLE)


@contextlib.contextmanager
def provider_call(provider: str) -> Iterator[None]:
    """Maps what a call to ``provider`` raises when no answer comes (httpx transport
    errors and timeouts, ``TimeoutError``, ``OSError``, a closed WebSocket) to
    :func:`transport_error`; anything else passes unchanged::

        with provider_call("WeChat API"):
            response = await client.post(url, json=body)
    """
    try:
        yield
    except (httpx.TransportError, TimeoutError, OSError, WebSocketClosed, websockets.exceptions.ConnectionClosed) as exc:
        raise transport_error(exc, provider=provider) from exc


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict is not case-insensitive like httpx's and Starlette's headers
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


# --- webhooks --------------------------------------------------------------------------------


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def verify_hmac(secret: str | bytes, message: bytes, signature: str | None, *, digest: str = "sha256",
                encoding: Literal["hex", "base64"] = "hex", prefix: str = "") -> None:
    """Raise :class:`SignatureError` unless ``signature`` is the HMAC of ``message`` under
    ``secret`` (``hex`` or ``base64``, after an optional ``prefix`` such as ``sha256=``).
    Compared in constant time; the reason never repeats the signature."""
    if not signature:
        raise SignatureError("missing signature")
    if prefix:
        if not signature.startswith(prefix):
            raise SignatureError("bad signature")
        signature = signature[len(prefix):]
    mac = hmac.new(_as_bytes(secret), message, digest).digest()
    try:
        given = bytes.fromhex(signature.strip()) if encoding == "hex" else base64.b64decode(signature.strip(),
                                                                                            validate=True)
    except (ValueError, binascii.Error):
        raise SignatureError("malformed signature") from None
    if not hmac.compare_digest(mac, given):
        raise SignatureError("bad signature")


def verify_ed25519(public_key: str | bytes, message: bytes, signature: str | bytes | None) -> None:
    """Raise :class:`SignatureError` unless ``signature`` (raw bytes or hex) is the Ed25519
    signature of ``message`` by ``public_key`` (32 raw bytes or hex)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not signature:
        raise SignatureError("missing signature")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key) if isinstance(public_key, str)
                                                 else public_key)
        sig = bytes.fromhex(signature) if isinstance(signature, str) else signature
    except ValueError:
        raise SignatureError("malformed signature or key") from None
    try:
        key.verify(sig, message)
    except InvalidSignature:
        raise SignatureError("bad signature") from None


def check_timestamp(timestamp: str | float | None, tolerance: float, *, now: float | None = None) -> float:
    """The request's timestamp (Unix seconds) if it is within ``tolerance`` seconds of our
    clock, either way; else :class:`SignatureError` (a captured request cannot be replayed
    later). ``tolerance`` <= 0 checks only the form."""
    if isinstance(timestamp, str):
        if not timestamp.isdigit() or len(timestamp) > 12:
            raise SignatureError("missing or malformed timestamp")
        timestamp = int(timestamp)
    if timestamp is None:
        raise SignatureError("missing or malformed timestamp")
    if tolerance > 0 and abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise SignatureError("timestamp outside the allowed window")
    return float(timestamp)


def public_url(request: Request, *, base_url: str | None = None, trust_forwarded: bool = False) -> str:
    """The URL the provider called (what Twilio and others sign): ``base_url`` (the
    gateway's public address, configured) + path and query if given; else, behind a proxy
    that is trusted to set them, ``X-Forwarded-Proto`` / ``X-Forwarded-Host``; else the
    URL the request reached us at. Forwarded headers are ignored unless trusted: anyone
    can send them."""
    # The path and query exactly as the client sent them (a signature covers those bytes),
    # not as routing rewrote them: a channel's router sees only its own sub-path.
    raw: bytes | None = request.scope.get("raw_path")
    path: str = raw.decode("latin-1") if raw else request.scope.get("root_path", "") + request.scope["path"]
    query = request.scope.get("query_string", b"").decode("latin-1")
    path += f"?{query}" if query else ""
    if base_url:
        return base_url.rstrip("/") + path
    scheme, host = request.url.scheme, request.headers.get("host") or request.url.netloc
    if trust_forwarded:
        # A chain of proxies appends: the first entry is what the client used.
        scheme = (request.headers.get("x-forwarded-proto") or scheme).split(",")[0].strip()
        host = (request.headers.get("x-forwarded-host") or host).split(",")[0].strip()
    return f"{scheme}://{host}{path}"
