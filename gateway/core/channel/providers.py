"""What a provider's answer means to the gateway: HTTP statuses and ``Retry-After`` mapped
to :class:`DeliveryError`, and one mapping for calls that got no answer (``unreachable``:
nothing was sent; ``timeout``: the request went out, a retry may double), the same codes
for every channel (taken from the WeChat API client, where it was first written)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from email.utils import parsedate_to_datetime

import httpx
import websockets.exceptions

from ..errors import DeliveryError, WebSocketClosed


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
