"""Threading and loop protection of inbound mail (through the real SMTP listener)."""

from __future__ import annotations

import pytest


def mail(subject: str, sender: str, message_id: str | None, body: str = "hello", **headers: str) -> bytes:
    lines = [f"From: {sender}", "To: support@acme.test", f"Subject: {subject}",
             "Date: Mon, 06 Jan 2025 10:00:00 +0000", "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


async def test_reply_with_in_reply_to_joins_the_conversation(start_email, send_mail, email_bus):
    _, ch = await start_email()
    await send_mail(ch.smtp_port, mail("Parcel", "alice@customer.test", "<a1@customer.test>"))
    await send_mail(ch.smtp_port, mail("Re: Parcel", "alice@customer.test", "<a2@customer.test>",
                                       In_Reply_To="<a1@customer.test>"))
    first, second = await email_bus.inbound()
    assert first.conversation == second.conversation
    assert second.in_reply_to == "<a1@customer.test>" and second.meta["thread_by"] == "in-reply-to"


async def test_reply_with_only_references_joins_the_conversation(start_email, send_mail, email_bus):
    _, ch = await start_email()
    await send_mail(ch.smtp_port, mail("Parcel", "alice@customer.test", "<b1@customer.test>"))
    await send_mail(ch.smtp_port, mail("Re: Parcel", "alice@customer.test", "<b2@customer.test>",
                                       References="<unknown@elsewhere.test> <b1@customer.test>"))
    first, second = await email_bus.inbound()
    assert first.conversation == second.conversation and second.meta["thread_by"] == "references"


async def test_thread_started_elsewhere_is_keyed_by_its_root(start_email, send_mail, email_bus):
    # We were added to a thread whose start we never saw: its messages still meet.
    _, ch = await start_email()
    await send_mail(ch.smtp_port, mail("Re: Invoice", "bob@customer.test", "<c2@customer.test>",
                                       References="<root@customer.test> <c1@customer.test>"))
    await send_mail(ch.smtp_port, mail("Re: Invoice", "carol@customer.test", "<c3@customer.test>",
                                       References="<root@customer.test> <c1@customer.test> <cx@customer.test>"))
    a, b = await email_bus.inbound()
    assert a.conversation == b.conversation and a.meta["thread_by"] == "root"


async def test_two_customers_writing_help_are_never_merged(start_email, send_mail, email_bus):
    _, ch = await start_email()
    await send_mail(ch.smtp_port, mail("Help", "alice@customer.test", "<h1@customer.test>"))
    await send_mail(ch.smtp_port, mail("Help", "bob@other.test", "<h2@other.test>"), mail_from="bob@other.test")
    await send_mail(ch.smtp_port, mail("Re: Help", "bob@other.test", "<h3@other.test>"), mail_from="bob@other.test")
    alice, bob, bob_again = await email_bus.inbound()
    assert alice.conversation != bob.conversation
    # Bob's header-less "Re: Help" falls back to subject + participants: his thread only.
    assert bob_again.conversation == bob.conversation and bob_again.meta["thread_by"] == "subject"


async def test_reply_subject_without_headers_falls_back_to_subject_and_participants(start_email, send_mail, email_bus):
    _, ch = await start_email()
    await send_mail(ch.smtp_port, mail("订单问题", "alice@customer.test", "<s1@customer.test>"))
    await send_mail(ch.smtp_port, mail("回复：订单问题", "alice@customer.test", "<s2@customer.test>"))
    await send_mail(ch.smtp_port, mail("订单问题", "alice@customer.test", "<s3@customer.test>"))
    first, reply, fresh = await email_bus.inbound()
    assert reply.conversation == first.conversation
    # A new mail (no reply prefix, no headers) starts a new conversation even with the same subject.
    assert fresh.conversation != first.conversation and fresh.meta["thread_by"] == "new"


@pytest.mark.parametrize(("headers", "sender", "reason"), [
    ({"Auto_Submitted": "auto-replied"}, "alice@customer.test", "auto-submitted: auto-replied"),
    ({"Auto_Submitted": "auto-generated"}, "alice@customer.test", "auto-submitted: auto-generated"),
    ({"Precedence": "bulk"}, "news@customer.test", "precedence: bulk"),
    ({"Precedence": "junk"}, "news@customer.test", "precedence: junk"),
    ({"Precedence": "list"}, "news@customer.test", "precedence: list"),
    ({}, "MAILER-DAEMON@mx.customer.test", "mailer-daemon sender"),
])
async def test_machine_generated_mail_is_marked_auto_with_a_reason(start_email, send_mail, email_bus, headers, sender, reason):
    _, ch = await start_email()
    await send_mail(ch.smtp_port, mail("Out of office", sender, "<auto@customer.test>", **headers))
    [msg] = await email_bus.inbound()
    assert msg.auto is True and msg.meta["auto_reason"] == reason


async def test_auto_submitted_no_is_a_human_message(start_email, send_mail, email_bus):
    _, ch = await start_email()
    await send_mail(ch.smtp_port, mail("Question", "alice@customer.test", "<n@customer.test>", Auto_Submitted="no"))
    [msg] = await email_bus.inbound()
    assert msg.auto is False and "auto_reason" not in msg.meta


async def test_our_own_message_id_coming_back_is_marked_as_a_loop(start_email, send_mail, email_bus):
    _, ch = await start_email()
    await send_mail(ch.smtp_port, mail("Re: Parcel", "alice@customer.test", "<gw.abcdefghijklmnopqrstuvwxyz@acme.test>"))
    [msg] = await email_bus.inbound()
    assert msg.auto is True and msg.meta["auto_reason"] == "own message-id (loop)"


async def test_thread_map_expires_after_thread_ttl(start_email, send_mail, email_bus):
    import asyncio

    _, ch = await start_email(thread_ttl="1s")
    await send_mail(ch.smtp_port, mail("Parcel", "alice@customer.test", "<t1@customer.test>"))
    await asyncio.sleep(2.5)  # the map entry of <t1> is gone: personal data is not kept forever
    await send_mail(ch.smtp_port, mail("Re: Parcel", "alice@customer.test", "<t2@customer.test>",
                                       In_Reply_To="<t1@customer.test>"))
    first, second = await email_bus.inbound()
    # Without the map the reply is keyed by its root, <t1>: the same conversation key is
    # derived, but through the root rule, not from a stored record.
    assert second.meta["thread_by"] == "root"
