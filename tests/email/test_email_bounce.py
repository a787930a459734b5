"""Bounces (RFC 3464 delivery status notifications) of replies we sent become status events
of that outbound, never customer messages."""

from __future__ import annotations

import asyncio
import email
import email.policy

from gateway import Outbound, TextPart
from gateway.testing import stream_messages


def dsn(our_id: str, action: str, status: str, *, headers_only: bool = True) -> bytes:
    original = (f"From: support@acme.test\r\nTo: alice@customer.test\r\nSubject: Re: Parcel\r\n"
                f"Message-ID: {our_id}\r\n")
    if headers_only:
        returned = f"Content-Type: text/rfc822-headers\r\n\r\n{original}\r\n"
    else:
        returned = f"Content-Type: message/rfc822\r\n\r\n{original}\r\nIt ships today.\r\n"
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.customer.test>\r\n"
        "To: support@acme.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-" + action + "@mx.customer.test>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="R"\r\n\r\n'
        "--R\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--R\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.customer.test\r\n\r\n"
        f"Final-Recipient: rfc822; alice@customer.test\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} mailbox unavailable\r\n\r\n"
        f"--R\r\n{returned}--R--\r\n"
    ).encode()


async def sent_reply(start_email, send_mail, email_bus, smtp_sink, outbound_id: str):
    gw, ch = await start_email(send={"host": "127.0.0.1", "port": smtp_sink.port, "security": "none"})
    raw = (b"From: alice@customer.test\r\nTo: support@acme.test\r\nSubject: Parcel\r\n"
           b"Message-ID: <p1@customer.test>\r\n\r\nwhere?\r\n")
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    [msg] = await email_bus.inbound()
    await email_bus.send(Outbound(id=outbound_id, conversation=msg.conversation, in_reply_to=msg.id,
                                  parts=[TextPart(text="It ships today.")]))
    sent = await email_bus.wait_status(outbound_id, "sent")
    [(_, _, out)] = await smtp_sink.wait(1)
    our_id = email.message_from_bytes(out, policy=email.policy.default)["Message-ID"]
    return ch, msg, our_id, sent


async def test_permanent_bounce_of_a_reply_marks_the_outbound_dead(start_email, send_mail, email_bus, smtp_sink):
    ch, msg, our_id, _ = await sent_reply(start_email, send_mail, email_bus, smtp_sink, "out-b1")
    assert (await send_mail(ch.smtp_port, dsn(our_id, "failed", "5.1.1"), mail_from=""))[0] == 250
    dead = await email_bus.wait_status("out-b1", "dead")
    assert dead.conversation == msg.conversation and dead.provider_id == our_id
    assert dead.error.permanent is True and dead.error.code == "5.1.1" and "mailbox unavailable" in dead.error.message
    assert (dead.attempt, dead.next_attempt_at) == (0, None)
    # The gateway's part succeeded (the outbound was sent and acked): no dead letter.
    assert await stream_messages(email_bus.url, "GW_DEAD") == []
    # Not a customer message.
    assert len(await email_bus.inbound()) == 1


async def test_delayed_delivery_report_marks_the_outbound_failed_not_dead(start_email, send_mail, email_bus, smtp_sink):
    ch, _, our_id, _ = await sent_reply(start_email, send_mail, email_bus, smtp_sink, "out-b2")
    assert (await send_mail(ch.smtp_port, dsn(our_id, "delayed", "4.4.7", headers_only=False), mail_from=""))[0] == 250
    failed = await email_bus.wait_status("out-b2", "failed")
    # Not final: the remote MTA still tries. attempt 0: not one of the gateway's attempts.
    assert (failed.error.permanent, failed.error.code, failed.attempt, failed.next_attempt_at) == (False, "4.4.7", 0, None)
    assert len(await email_bus.inbound()) == 1


async def test_a_remote_server_giving_up_on_a_temporary_error_marks_the_outbound_dead_not_permanent(
        start_email, send_mail, email_bus, smtp_sink):
    # Action: failed is final whatever the status class: the reporting MTA stopped trying.
    # A 4.x.x cause (4.4.7, delivery time expired) may succeed if the backend sends again.
    ch, _, our_id, _ = await sent_reply(start_email, send_mail, email_bus, smtp_sink, "out-b4")
    assert (await send_mail(ch.smtp_port, dsn(our_id, "failed", "4.4.7"), mail_from=""))[0] == 250
    dead = await email_bus.wait_status("out-b4", "dead")
    assert (dead.error.permanent, dead.error.code, dead.attempt, dead.next_attempt_at) == (False, "4.4.7", 0, None)
    assert [s.state for s in await email_bus.statuses()] == ["accepted", "sent", "dead"]


async def test_non_standard_bounce_quoting_our_message_id_is_recognised(start_email, send_mail, email_bus, smtp_sink):
    ch, _, our_id, _ = await sent_reply(start_email, send_mail, email_bus, smtp_sink, "out-b3")
    qmail = (f"From: MAILER-DAEMON@mx.customer.test\r\nTo: support@acme.test\r\nSubject: failure notice\r\n"
             f"Message-ID: <q@mx.customer.test>\r\n\r\nHi. This is the qmail-send program.\r\n"
             f"<alice@customer.test>:\r\nSorry, no mailbox here by that name. (#5.1.1)\r\n\r\n"
             f"--- Below this line is a copy of the message.\r\n\r\nMessage-ID: {our_id}\r\n").encode()
    assert (await send_mail(ch.smtp_port, qmail, mail_from=""))[0] == 250
    dead = await email_bus.wait_status("out-b3", "dead")
    assert dead.error.code == "5.1.1"
    assert len(await email_bus.inbound()) == 1


async def test_bounce_of_mail_we_never_sent_is_published_as_auto(start_email, send_mail, email_bus):
    _, ch = await start_email()
    assert (await send_mail(ch.smtp_port, dsn("<someone-else@elsewhere.test>", "failed", "5.1.1"), mail_from=""))[0] == 250
    [msg] = await email_bus.inbound()
    assert msg.auto is True and msg.meta["auto_reason"] == "auto-submitted: auto-replied"
    assert msg.meta["bounce"]["status"] == "5.1.1" and msg.meta["bounce"]["action"] == "failed"


async def test_a_bounce_delivered_twice_reports_the_outbound_dead_once(gateway_factory, send_mail, email_bus, smtp_sink):
    # The status stream's own duplicate window is shortened to 1 s: a DSN delivered again
    # minutes later (a relay's retry, an IMAP re-scan) must still be recognised.
    gw = await gateway_factory({"support": {"type": "email", "address": "support@acme.test",
                                            "smtp": {"port": 0, "domains": ["acme.test"]},
                                            "send": {"host": "127.0.0.1", "port": smtp_sink.port, "security": "none"}}},
                               bus={"duplicate_window": "1s"})
    ch = gw.channels["support"].channel
    raw = (b"From: alice@customer.test\r\nTo: support@acme.test\r\nSubject: Parcel\r\n"
           b"Message-ID: <p9@customer.test>\r\n\r\nwhere?\r\n")
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    [msg] = await email_bus.inbound()
    await email_bus.send(Outbound(id="out-b9", conversation=msg.conversation, parts=[TextPart(text="Today.")]))
    await email_bus.wait_status("out-b9", "sent")
    our_id = email.message_from_bytes((await smtp_sink.wait(1))[0][2], policy=email.policy.default)["Message-ID"]
    report = dsn(our_id, "failed", "5.1.1")
    assert (await send_mail(ch.smtp_port, report, mail_from=""))[0] == 250
    first = await email_bus.wait_status("out-b9", "dead")
    await asyncio.sleep(1.5)  # past the (shortened) duplicate window: only our own dedup is left
    assert (await send_mail(ch.smtp_port, report, mail_from=""))[0] == 250
    # Answered 250 (the relay must not retry it) and nothing reported: a status is on the
    # stream before the SMTP answer, so reading it now is enough.
    dead = [s for s in await email_bus.statuses() if s.outbound_id == "out-b9" and s.state == "dead"]
    assert dead == [first]
    assert len(await email_bus.inbound()) == 1


async def test_success_and_relay_reports_are_not_failures(start_email, send_mail, email_bus, smtp_sink):
    # NOTIFY=SUCCESS reports (RFC 3464 Action: delivered / relayed) say nothing went wrong.
    ch, _, our_id, _ = await sent_reply(start_email, send_mail, email_bus, smtp_sink, "out-b5")
    assert (await send_mail(ch.smtp_port, dsn(our_id, "delivered", "2.0.0"), mail_from=""))[0] == 250
    delivered = await email_bus.wait_status("out-b5", "delivered")
    assert (delivered.attempt, delivered.error, delivered.provider_id) == (0, None, our_id)
    relayed = dsn(our_id, "relayed", "2.0.0").replace(b"<dsn-relayed@", b"<dsn-relayed-2@")
    assert (await send_mail(ch.smtp_port, relayed, mail_from=""))[0] == 250
    await still_delivered_only(email_bus, "out-b5")
    assert len(await email_bus.inbound()) == 1  # neither report is a customer message


async def still_delivered_only(email_bus, outbound_id: str) -> None:
    # A status is on the stream before the SMTP answer: reading now is enough.
    assert [s.state for s in await email_bus.statuses() if s.outbound_id == outbound_id] == ["accepted", "sent", "delivered"]
