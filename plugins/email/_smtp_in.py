"""The SMTP listener (aiosmtpd) for mail relayed or forwarded to the gateway. A message
is answered 250 only once it is on the bus; a bus outage answers 451 so the sending MTA
keeps it and retries."""

from __future__ import annotations

import asyncio
import hmac
import ssl
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from gateway import BusUnavailable, PayloadTooLarge, RequestError, Throttle

from ._config import SmtpInConfig
from ._parse import MailRejected

Ingest = Callable[[bytes, str, list[str], str], Awaitable[str]]


class _Handler:
    """aiosmtpd handler hooks: RCPT filtering and DATA → bus."""

    def __init__(self, cfg: SmtpInConfig, ingest: Ingest, log: Any, default_address: str):
        self.cfg = cfg
        self.ingest = ingest
        self.log = log
        self.domains = {d.lower().lstrip("@") for d in cfg.domains}
        self.addresses = {a.lower() for a in cfg.addresses}
        if not self.domains and not self.addresses:
            # Nothing configured: accept the channel's own address only, never an open relay.
            self.addresses = {default_address.lower()}
        # A bus outage or a flood of hostile mail answers every message the same way: one
        # log line a minute per kind says so (and how many were held back), not one each.
        self.throttle = Throttle(60.0)

    def _log(self, level: str, key: Hashable, event: str, **fields: Any) -> None:
        held = self.throttle.allow(key)
        if held is not None:
            getattr(self.log, level)(event, **fields, **({"held_back": held} if held else {}))

    def accepts(self, address: str) -> bool:
        a = address.strip().strip("<>").lower()
        if a in self.addresses:
            return True
        return "@" in a and a.rsplit("@", 1)[1] in self.domains

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if not self.accepts(address):
            return "550 5.1.1 Recipient not accepted here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        try:
            mail_from = envelope.mail_from or ""
            await self.ingest(bytes(raw), mail_from, list(envelope.rcpt_tos), "smtp")
        except BusUnavailable:
            self._log("warning", "bus", "bus unavailable: SMTP message deferred (451)")
            return "451 4.3.0 Temporarily unable to accept the message, try again later"
        except MailRejected as exc:
            self._log("info", "rejected", "message rejected", reason=exc.reason)
            return f"{exc.code} 5.6.0 Message rejected: {exc.reason}"
        except PayloadTooLarge:
            return "552 5.3.4 Message too large for the gateway's bus"
        except RequestError as exc:
            # The gateway refused what it made of the mail (it would not decode on the bus):
            # a permanent refusal with the reason, not a retry that can only fail again.
            self._log("info", "rejected", "message rejected", reason=exc.reason)
            return f"554 5.6.0 Message rejected: {exc.reason}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not lose mail: the MTA retries
            self._log("error", ("failed", type(exc).__name__), "message processing failed; deferred (451)",
                      error=f"{type(exc).__name__}: {exc}")
            return "451 4.3.0 Temporary processing failure, try again later"
        return "250 2.0.0 OK: queued"


def _tls_context(cfg: SmtpInConfig) -> ssl.SSLContext | None:
    if not (cfg.tls_cert and cfg.tls_key):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return ctx


class SmtpListener:
    """Runs aiosmtpd's SMTP protocol on the gateway's own event loop (not aiosmtpd's
    Controller thread): ``ingest`` publishes straight from the DATA handler."""

    def __init__(self, cfg: SmtpInConfig, ingest: Ingest, log: Any, default_address: str):
        self.cfg = cfg
        self.handler = _Handler(cfg, ingest, log, default_address)
        self.log = log
        self.server: asyncio.base_events.Server | None = None
        self.port: int | None = None
        self._tls = _tls_context(cfg)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        expected = self.cfg.auth_users.get(user)
        ok = expected is not None and hmac.compare_digest(expected.encode(), auth_data.password)
        # handled=False: aiosmtpd answers 535 itself (its default, True, answers nothing).
        return AuthResult(success=True, auth_data=auth_data) if ok else AuthResult(success=False, handled=False)

    def _protocol(self) -> SMTP:
        cfg = self.cfg
        auth = bool(cfg.auth_users)
        return SMTP(
            self.handler,
            data_size_limit=cfg.max_size,
            enable_SMTPUTF8=True,
            hostname=cfg.hostname or None,
            ident="gateway ESMTP",
            tls_context=self._tls,
            require_starttls=cfg.require_starttls and self._tls is not None,
            timeout=cfg.timeout,
            auth_required=cfg.auth_required and auth,
            auth_require_tls=cfg.auth_require_tls,
            authenticator=self._authenticate if auth else None,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        """Listen on ``host:port``."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, host=self.cfg.host, port=self.cfg.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting; sessions in flight get up to 10 s to finish."""
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 10)
            except asyncio.TimeoutError:
                pass
            self.server = None
