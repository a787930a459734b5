"""Checks of what arrives at a webhook: HMAC and Ed25519 signatures in constant time,
timestamps within a tolerance, and the public URL a provider signed."""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from typing import TYPE_CHECKING, Literal

from ..errors import SignatureError

if TYPE_CHECKING:
    from starlette.requests import Request


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
