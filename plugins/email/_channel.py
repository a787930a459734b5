"""The ``email`` channel: SMTP and IMAP in, SMTP out, threading across both."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import msgspec

from gateway import (
    Channel,
    ChannelContext,
    Conversation,
    DeliveryError,
    DeliveryState,
    ErrorInfo,
    Outbound,
    Participant,
    ProviderIndex,
    Receipt,
)

from ._config import EmailConfig
from ._imap import ImapPoller
from ._parse import Limits, MailRejected, ParsedMail, meta_addresses, parse_mail
from ._smtp_in import SmtpListener
from ._smtp_out import Sender, build_message
from ._threading import (
    MessageRecord,
    ThreadStore,
    is_own_message_id,
    own_message_id,
    reply_subject,
    route_record,
)
from ._upgrade import sent_before_upgrade

# Parsing a large message takes milliseconds to seconds of CPU: above this size it runs in
# a worker thread so the listener keeps answering other sessions meanwhile.
_THREAD_PARSE_ABOVE = 131072
_STATUS_CODE = re.compile(rb"\b([45]\.\d{1,3}\.\d{1,3})\b")


class EmailChannel(Channel):
    """Receives mail by SMTP (aiosmtpd) and IMAP (aioimaplib), answers by SMTP
    (aiosmtplib), and keeps every message of a thread in one conversation."""

    channel_type = "email"
    config_type = EmailConfig
    supported_parts = frozenset({"text", "html", "image", "file", "link"})

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        cfg: EmailConfig = ctx.config
        self.cfg = cfg
        self.domain = (cfg.message_id_domain or cfg.address.rsplit("@", 1)[1]).lower()
        self.own_addresses = {cfg.address.lower(), *(a.lower() for a in cfg.own_addresses)}
        self.threads = ThreadStore(ctx.state, ttl=cfg.thread_ttl)
        # Our Message-ID → the outbound it carried: bounces name the Message-ID.
        self.sent = ProviderIndex(ctx.state, "sent", ttl=cfg.thread_ttl)
        self.limits = Limits(max_parts=cfg.max_parts, max_nesting=cfg.max_nesting, max_text=cfg.max_text,
                             fallback_charsets=tuple(cfg.fallback_charsets))
        self.smtp: SmtpListener | None = None
        self.imap: ImapPoller | None = None
        self.sender: Sender | None = None
        self._own_id_re = re.compile(rb"<gw\.[a-z2-7]{26}@" + re.escape(self.domain.encode()) + rb">", re.IGNORECASE)

    @property
    def smtp_port(self) -> int | None:
        """The port the SMTP listener is bound to (useful with ``port = 0``)."""
        return self.smtp.port if self.smtp else None

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.send is not None:
            self.sender = Sender(cfg.send, cfg.dkim)
        if cfg.smtp is not None and cfg.smtp.enabled:
            self.smtp = SmtpListener(cfg.smtp, self._ingest_smtp, self.ctx.log, cfg.address)
            await self.smtp.start()
            self.ctx.log.info("smtp listening", host=cfg.smtp.host, port=self.smtp.port)
        if cfg.imap is not None and cfg.imap.enabled:
            self.imap = ImapPoller(cfg.imap, self.ctx.state, self._ingest_imap, self.ctx.log, self.ctx.set_state)
            self.imap.start()

    async def stop(self) -> None:
        if self.smtp is not None:
            await self.smtp.stop()
        if self.imap is not None:
            await self.imap.stop()
        if self.sender is not None:
            await self.sender.close()

    # --- inbound -------------------------------------------------------------------

    async def _ingest_smtp(self, raw: bytes, mail_from: str, rcpt_tos: list[str], transport: str) -> str:
        return await self.ingest(raw, transport="smtp", envelope_from=mail_from, envelope_to=rcpt_tos)

    async def _ingest_imap(self, raw: bytes, imap_meta: dict[str, Any]) -> str:
        return await self.ingest(raw, transport="imap", imap=imap_meta)

    async def parse(self, raw: bytes, envelope_from: str | None = None) -> ParsedMail:
        """Parse ``raw`` (in a worker thread when it is large)."""
        try:
            if len(raw) > _THREAD_PARSE_ABOVE:
                return await asyncio.to_thread(parse_mail, raw, self.limits, envelope_from=envelope_from)
            return parse_mail(raw, self.limits, envelope_from=envelope_from)
        except MailRejected:
            raise
        except RecursionError:
            raise MailRejected("MIME structure nested too deeply") from None
        except Exception as exc:  # noqa: BLE001 - unparseable input is rejected with a reason, never retried forever
            raise MailRejected(f"unparseable message ({type(exc).__name__})") from exc

    async def ingest(self, raw: bytes, *, transport: str, envelope_from: str | None = None,
                     envelope_to: list[str] | None = None, imap: dict[str, Any] | None = None) -> str:
        """Parse one message and publish it (or, for a bounce of our mail, report the
        outbound's status). Returns the gateway id, or ``"bounce"``. Raises
        :class:`MailRejected` for unprocessable mail and :class:`BusUnavailable`."""
        mail = await self.parse(raw, envelope_from)
        if await self._handle_bounce(mail, raw):
            return "bounce"
        customer, customer_name = mail.sender
        ours = next((a.lower() for a in envelope_to or [] if a.lower() in self.own_addresses), None) \
            or next((a for a, _ in mail.to + mail.cc if a in self.own_addresses), None) or self.cfg.address.lower()
        reason = mail.auto_reason
        if is_own_message_id(mail.message_id, self.domain):
            reason = "own message-id (loop)"
        elif customer in self.own_addresses:
            reason = reason or "sent from our own address (loop)"
        # The raw copy and the thread lookup are independent round trips to the bus.
        thread, raw_ref = await asyncio.gather(
            self.threads.resolve(mail, customer, ours),
            self.ctx.put_blob(raw, content_type="message/rfc822") if self.cfg.keep_raw else _none())
        meta: dict[str, Any] = {
            "transport": transport,
            "message_id": mail.message_id,
            "thread_by": thread.how,
            "size": mail.size,
        }
        if mail.in_reply_to:
            meta["in_reply_to"] = mail.in_reply_to
        if mail.references:
            meta["references"] = mail.references
        if mail.to:
            meta["to"] = meta_addresses(mail.to)
        if mail.cc:
            meta["cc"] = meta_addresses(mail.cc)
        if mail.reply_to:
            meta["reply_to"] = meta_addresses([mail.reply_to])[0]
        if mail.message_id_missing:
            meta["message_id_synthetic"] = True
        if reason:
            meta["auto_reason"] = reason
        if mail.problems:
            meta["problems"] = mail.problems
        if mail.truncated:
            meta["truncated"] = mail.truncated
        if mail.forwarded:
            meta["forwarded"] = mail.forwarded
        if mail.bounce is not None:
            # A report about mail this channel did not send (or no longer knows).
            b = mail.bounce
            meta["bounce"] = {k: v for k, v in (("action", b.action), ("status", b.status),
                                                 ("diagnostic", b.diagnostic)) if v}
        if envelope_from is not None:
            meta["envelope_from"] = envelope_from
        if envelope_to:
            meta["envelope_to"] = envelope_to
        if imap:
            meta["imap"] = imap
        if raw_ref is not None:
            meta["raw"] = msgspec.to_builtins(raw_ref)
        msg = self.ctx.message(
            conversation=thread.native,
            sender=Participant(id=customer, name=customer_name),
            recipient=Participant(id=ours),
            parts=mail.parts,
            provider_id=mail.message_id,
            subject=mail.subject,
            sent_at=mail.date,
            in_reply_to=mail.in_reply_to[0] if mail.in_reply_to else None,
            auto=reason is not None,
            meta=meta,
        )
        reply_addr, reply_name = mail.reply_to or mail.sender
        refs = (mail.references or mail.in_reply_to)[-19:]
        route = {
            "thread": thread.native,
            "to": reply_addr,
            **({"to_name": reply_name} if reply_name else {}),
            "message_id": mail.message_id,
            "references": refs,
            "subject": mail.subject or "",
            "auto": reason is not None,
            "gid": msg.id,
        }
        if reason is not None and await self.ctx.get_conversation(msg.conversation) is not None:
            # Automatic mail (an out-of-office, a list copy) never becomes what a reply
            # answers: the conversation keeps the customer's latest human message as its
            # target (route=None keeps the stored one). A conversation that automatic mail
            # starts still gets a route, or nobody could ever answer in it.
            route_or_keep: dict[str, Any] | None = None
        else:
            route_or_keep = route
        result = await self.ctx.publish(msg, route=route_or_keep)
        await self.threads.remember(mail, thread, gateway_id=result.id,
                                    customer=customer, ours=ours, auto=reason is not None)
        return result.id

    async def _handle_bounce(self, mail: ParsedMail, raw: bytes) -> bool:
        """A delivery status notification about mail we sent becomes a status event of that
        outbound (RFC 3464), not a customer message. True if it was one."""
        ids: list[str] = []
        action, status, diagnostic = "failed", None, None
        if mail.bounce is not None:
            ids = list(mail.bounce.original_ids)
            action, status, diagnostic = mail.bounce.action, mail.bounce.status, mail.bounce.diagnostic
        looks_bounced = mail.bounce is not None or (mail.auto_reason or "") in ("mailer-daemon sender", "null envelope sender")
        if not looks_bounced:
            return False
        if not ids:
            # Non-standard bounces (qmail, some Exchange setups) quote our Message-ID in the
            # body without a report structure.
            ids = list(dict.fromkeys(m.decode("ascii") for m in self._own_id_re.findall(raw)))
            m = _STATUS_CODE.search(raw)
            status = m.group(1).decode() if m else None
        # A relay's retry or an IMAP re-scan delivers the same report again, days later
        # perhaps: the core's Message-ID dedup covers published messages only, so bounces
        # keep their own record (written after the status, so a crash repeats it rather
        # than losing it).
        seen_key = "dsn:" + mail.message_id
        if await self.ctx.state.get(seen_key) is not None:
            self.ctx.log.info("bounce already reported", status=status)
            return True
        handled = False
        # Action "failed" is final whatever the status class (the reporting MTA stopped
        # trying): dead, permanent unless the cause was temporary (4.4.7 expired), when
        # sending again may work. "delayed" is a failed that is not final. "delivered" (a
        # NOTIFY=SUCCESS report) is a receipt; "relayed" and "expanded" say nothing about
        # the outcome, so they report nothing (and are no customer message either).
        outcomes: dict[str, DeliveryState] = {"failed": "dead", "delayed": "failed", "delivered": "delivered"}
        state = outcomes.get(action)
        permanent = state == "dead" and not (status or "").startswith("4")
        for mid in ids:
            rec = await self.sent.get(mid) or await sent_before_upgrade(self.ctx.state, mid)
            if rec is None:
                continue
            handled = True
            if state is None:
                self.ctx.log.info("delivery report without an outcome", outbound_id=rec.outbound_id, action=action[:20])
                continue
            text = f"bounced: {action}" + (f" {status}" if status else "") + (f" ({diagnostic})" if diagnostic else "")
            error = None if state == "delivered" else \
                ErrorInfo(message=text[:500], permanent=permanent, code=status or "bounce")
            await self.ctx.report_status(rec.outbound_id, state, conversation=rec.conversation, provider_id=mid,
                                         error=error)
            self.ctx.log.info("bounce reported", outbound_id=rec.outbound_id, state=state, status=status)
        if handled:
            await self.ctx.state.put(seen_key, b"1", ttl=self.cfg.thread_ttl)
        return handled

    # --- outbound ------------------------------------------------------------------

    async def deliver(self, outbound: Outbound, conversation: Conversation) -> Receipt:
        if self.sender is None:
            raise DeliveryError(f"channel {self.ctx.name!r} has no [send] section", permanent=True, code="not_configured")
        route = conversation.route
        to = route.get("to")
        if not to:
            raise DeliveryError("conversation has no address to reply to", permanent=True, code="no_route")
        thread = route.get("thread") or ""
        parent_id = route.get("message_id")
        parent: MessageRecord | None = None
        if outbound.in_reply_to and outbound.in_reply_to != route.get("gid"):
            mid = await self.threads.message_id_of(outbound.in_reply_to)
            if mid is not None:
                parent_id = mid
                parent = await self.threads.get(mid)
        if parent is None:
            parent = (await self.threads.get(parent_id)) if parent_id else None
        if parent is None:
            parent = route_record(route)
        if outbound.auto and parent.a:
            # RFC 3834 section 2: never answer machine-generated mail automatically.
            raise DeliveryError("automatic answer to machine-generated mail refused (RFC 3834)", permanent=True,
                                code="auto_loop")
        subject = outbound.subject if outbound.subject else reply_subject(parent.s or route.get("subject"))
        references = [r for r in parent.r if r != parent_id][-19:] + ([parent_id] if parent_id else [])
        message_id = own_message_id(self.ctx.name, outbound.id, self.domain)
        msg = await build_message(
            parts=outbound.parts, from_addr=self.cfg.address, from_name=self.cfg.name or None,
            to_addr=to, to_name=route.get("to_name"), subject=subject, message_id=message_id,
            in_reply_to=parent_id,
            references=references, auto=outbound.auto, part_bytes=self.ctx.part_bytes)
        # Recorded before sending: the customer's answer may arrive before deliver returns.
        await asyncio.gather(
            self.threads.put(message_id, MessageRecord(t=thread, r=references, s=subject, a=outbound.auto)),
            self.sent.put(message_id, outbound.id, conversation.key))
        await self.sender.send(msg, self.cfg.address, [to])
        return Receipt(provider_id=message_id)


async def _none() -> None:
    return None
