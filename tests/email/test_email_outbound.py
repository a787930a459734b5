"""Outbound replies: a backend publishes an Outbound on the bus, the core's dispatcher calls
the channel, the reply reaches a real SMTP server (an aiosmtpd sink) and the customer's
answer to it comes back into the same conversation."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from gateway import FilePart, HtmlPart, ImagePart, Outbound, TextPart


def send_config(sink, **extra):
    return {"host": "127.0.0.1", "port": sink.port, "security": "none", "timeout": "5s", **extra}


def customer_mail(message_id: str, subject: str, body: str, **headers: str) -> bytes:
    m = EmailMessage()
    m["From"] = "Alice Zhang <alice@customer.test>"
    m["To"] = "support@acme.test"
    m["Subject"] = subject
    m["Message-ID"] = message_id
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content(body)
    return m.as_bytes()


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


async def test_customer_backend_reply_and_customer_answer_share_one_conversation(start_email, send_mail, email_bus, smtp_sink):
    _, ch = await start_email(send=send_config(smtp_sink))
    # 1. The customer writes.
    assert (await send_mail(ch.smtp_port, customer_mail("<q1@customer.test>", "Where is my parcel?", "Help!")))[0] == 250
    [question] = await email_bus.inbound()
    # 2. The backend answers on the bus.
    await email_bus.send(Outbound(id="out-1", conversation=question.conversation, in_reply_to=question.id,
                                  parts=[TextPart(text="It ships today."), HtmlPart(html="<p>It ships <b>today</b>.</p>")]))
    sent = await email_bus.wait_status("out-1", "sent")
    [(mail_from, rcpts, raw)] = await smtp_sink.wait(1)
    reply = parse(raw)
    assert mail_from == "support@acme.test" and rcpts == ["alice@customer.test"]
    assert reply["In-Reply-To"] == "<q1@customer.test>" and reply["References"] == "<q1@customer.test>"
    assert reply["Subject"] == "Re: Where is my parcel?"
    assert reply["From"] == "ACME Support <support@acme.test>" and reply["To"] == "Alice Zhang <alice@customer.test>"
    our_id = reply["Message-ID"]
    assert sent.provider_id == our_id and our_id.endswith("@acme.test>")
    assert reply.get_body(("plain",)).get_content().strip() == "It ships today."
    assert "<b>today</b>" in reply.get_body(("html",)).get_content()
    assert "Auto-Submitted" not in reply
    # 3. The customer's mail client answers the reply (In-Reply-To: our Message-ID).
    answer = customer_mail("<q2@customer.test>", "Re: Where is my parcel?", "Thanks!\n\n> It ships today.",
                           In_Reply_To=our_id, References=f"<q1@customer.test> {our_id}")
    assert (await send_mail(ch.smtp_port, answer))[0] == 250
    question_again, thanks = await email_bus.inbound()
    assert thanks.conversation == question.conversation
    assert thanks.meta["thread_by"] == "in-reply-to" and thanks.parts[0].text == "Thanks!"
    # 4. The next reply threads below the customer's answer, still with one "Re:".
    await email_bus.send(Outbound(id="out-2", conversation=thanks.conversation, in_reply_to=thanks.id,
                                  parts=[TextPart(text="You're welcome.")]))
    await email_bus.wait_status("out-2", "sent")
    second = parse((await smtp_sink.wait(2))[1][2])
    assert second["Subject"] == "Re: Where is my parcel?"
    assert second["In-Reply-To"] == "<q2@customer.test>"
    assert second["References"].split() == ["<q1@customer.test>", our_id, "<q2@customer.test>"]


async def test_reply_subject_gets_exactly_one_re(start_email, send_mail, email_bus, smtp_sink):
    _, ch = await start_email(send=send_config(smtp_sink))
    await send_mail(ch.smtp_port, customer_mail("<r1@customer.test>", "RE: Re: re:  Invoice 42", "again"))
    [msg] = await email_bus.inbound()
    await email_bus.send(Outbound(id="out-re", conversation=msg.conversation, parts=[TextPart(text="ok")]))
    await email_bus.wait_status("out-re", "sent")
    assert parse((await smtp_sink.wait(1))[0][2])["Subject"] == "Re: Invoice 42"


async def test_header_injection_from_the_backend_is_refused_permanently(start_email, send_mail, email_bus, smtp_sink):
    _, ch = await start_email(send=send_config(smtp_sink))
    await send_mail(ch.smtp_port, customer_mail("<i1@customer.test>", "Hi", "hi"))
    [msg] = await email_bus.inbound()
    await email_bus.send(Outbound(id="out-inj", conversation=msg.conversation,
                                  subject="Hello\r\nBcc: victim@elsewhere.test", parts=[TextPart(text="x")]))
    dead = await email_bus.wait_status("out-inj", "dead")
    assert dead.error.permanent and dead.error.code == "header_injection"
    assert smtp_sink.messages == []


async def test_smtp_4xx_is_retried_and_5xx_is_permanent(start_email, send_mail, email_bus, smtp_sink):
    _, ch = await start_email(send=send_config(smtp_sink))
    await send_mail(ch.smtp_port, customer_mail("<e1@customer.test>", "Hi", "hi"))
    [msg] = await email_bus.inbound()
    smtp_sink.reply = "451 4.7.1 Greylisted, try again"
    await email_bus.send(Outbound(id="out-4xx", conversation=msg.conversation, parts=[TextPart(text="x")]))
    failed = await email_bus.wait_status("out-4xx", "failed")
    assert failed.error.permanent is False and failed.error.code == "smtp_451"
    smtp_sink.reply = None
    await email_bus.wait_status("out-4xx", "sent")
    smtp_sink.reply = "550 5.7.1 Rejected by policy"
    await email_bus.send(Outbound(id="out-5xx", conversation=msg.conversation, parts=[TextPart(text="y")]))
    dead = await email_bus.wait_status("out-5xx", "dead")
    assert dead.error.permanent is True and dead.error.code == "smtp_550"


async def test_automatic_answer_carries_auto_submitted_auto_replied(start_email, send_mail, email_bus, smtp_sink):
    _, ch = await start_email(send=send_config(smtp_sink))
    await send_mail(ch.smtp_port, customer_mail("<o1@customer.test>", "Hi", "hi"))
    [msg] = await email_bus.inbound()
    await email_bus.send(Outbound(id="out-auto", conversation=msg.conversation, auto=True,
                                  parts=[TextPart(text="We are closed until Monday.")]))
    await email_bus.wait_status("out-auto", "sent")
    assert parse((await smtp_sink.wait(1))[0][2])["Auto-Submitted"] == "auto-replied"


async def test_automatic_answer_to_machine_generated_mail_is_refused(start_email, send_mail, email_bus, smtp_sink):
    _, ch = await start_email(send=send_config(smtp_sink))
    await send_mail(ch.smtp_port, customer_mail("<v1@customer.test>", "Out of office", "away",
                                                Auto_Submitted="auto-replied"))
    [msg] = await email_bus.inbound()
    await email_bus.send(Outbound(id="out-loop", conversation=msg.conversation, in_reply_to=msg.id, auto=True,
                                  parts=[TextPart(text="Thanks for your mail")]))
    dead = await email_bus.wait_status("out-loop", "dead")
    assert dead.error.code == "auto_loop"
    assert smtp_sink.messages == []


async def test_attachments_and_inline_images_from_the_object_store(start_email, send_mail, email_bus, smtp_sink):
    gw, ch = await start_email(send=send_config(smtp_sink))
    await send_mail(ch.smtp_port, customer_mail("<f1@customer.test>", "Invoice", "send it"))
    [msg] = await email_bus.inbound()
    pdf = b"%PDF-1.7 " + bytes(range(256)) * 200
    ref = await gw.put_blob(pdf, content_type="application/pdf")
    await email_bus.send(Outbound(id="out-att", conversation=msg.conversation, parts=[
        TextPart(text="Attached."), HtmlPart(html='<p>Attached.</p><img src="cid:sig1">'),
        ImagePart(content_type="image/png", filename="sig.png", data=b"\x89PNG-sig", content_id="sig1"),
        FilePart(content_type="application/pdf", filename="发票.pdf", ref=ref)]))
    await email_bus.wait_status("out-att", "sent")
    out = parse((await smtp_sink.wait(1))[0][2])
    atts = {p.get_filename(): p.get_content() for p in out.iter_attachments()}
    assert atts["发票.pdf"] == pdf
    inline = [p for p in out.walk() if p["Content-ID"] == "<sig1>"]
    assert inline and inline[0].get_content() == b"\x89PNG-sig"


async def test_the_smtp_connection_is_reused_between_replies(start_email, send_mail, email_bus, smtp_sink):
    _, ch = await start_email(send=send_config(smtp_sink))
    await send_mail(ch.smtp_port, customer_mail("<k1@customer.test>", "Hi", "hi"))
    [msg] = await email_bus.inbound()
    for i in range(3):
        await email_bus.send(Outbound(id=f"out-k{i}", conversation=msg.conversation, parts=[TextPart(text=str(i))]))
        await email_bus.wait_status(f"out-k{i}", "sent")
    await smtp_sink.wait(3)
    # One SMTP session (one EHLO) carried all three transactions.
    assert smtp_sink.ehlos == 1


async def test_replies_are_dkim_signed_when_configured(start_email, send_mail, email_bus, smtp_sink, tmp_path):
    import subprocess

    import dkim

    key = tmp_path / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    pub = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True).stdout
    import base64

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)
    _, ch = await start_email(send=send_config(smtp_sink),
                              dkim={"domain": "acme.test", "selector": "gw", "private_key_file": str(key)})
    await send_mail(ch.smtp_port, customer_mail("<d1@customer.test>", "Hi", "hi"))
    [msg] = await email_bus.inbound()
    await email_bus.send(Outbound(id="out-dkim", conversation=msg.conversation, parts=[TextPart(text="signed")]))
    await email_bus.wait_status("out-dkim", "sent")
    raw = (await smtp_sink.wait(1))[0][2]
    assert raw.startswith(b"DKIM-Signature:")

    def dns(name, timeout=5):
        return record if name == b"gw._domainkey.acme.test." else None

    assert dkim.verify(raw, dnsfunc=dns)
    assert not dkim.verify(raw.replace(b"signed", b"forged"), dnsfunc=dns)


async def test_crlf_smuggled_in_an_encoded_customer_name_does_not_reach_our_headers(start_email, send_mail, email_bus, smtp_sink):
    _, ch = await start_email(send=send_config(smtp_sink))
    raw = (b"From: =?utf-8?q?Eve=0D=0ABcc=3A_victim=40elsewhere=2Etest?= <eve@customer.test>\r\n"
           b"To: support@acme.test\r\nSubject: =?utf-8?q?Hi=0D=0ABcc=3A_x=40y=2Etest?=\r\n"
           b"Message-ID: <crlf@customer.test>\r\n\r\nhi\r\n")
    await send_mail(ch.smtp_port, raw)
    [msg] = await email_bus.inbound()
    assert "\n" not in msg.sender.name and "\n" not in msg.subject
    await email_bus.send(Outbound(id="out-crlf", conversation=msg.conversation, parts=[TextPart(text="ok")]))
    await email_bus.wait_status("out-crlf", "sent")
    [(_, rcpts, out)] = await smtp_sink.wait(1)
    reply = parse(out)
    assert rcpts == ["eve@customer.test"] and "Bcc" not in reply


async def test_out_of_office_mail_never_becomes_the_reply_target_of_the_conversation(
        start_email, send_mail, email_bus, smtp_sink):
    _, ch = await start_email(send=send_config(smtp_sink))
    assert (await send_mail(ch.smtp_port, customer_mail("<ooo1@customer.test>", "Help", "My order is late.")))[0] == 250
    [question] = await email_bus.inbound()
    await email_bus.send(Outbound(id="out-ooo-1", conversation=question.conversation, in_reply_to=question.id,
                                  parts=[TextPart(text="We are on it.")]))
    await email_bus.wait_status("out-ooo-1", "sent")
    our_id = parse((await smtp_sink.wait(1))[0][2])["Message-ID"]
    # The customer's mailbox answers our reply automatically (RFC 3834).
    ooo = customer_mail("<ooo2@customer.test>", "Automatic reply: Re: Help", "I am away until Monday.",
                        In_Reply_To=our_id, References=f"<ooo1@customer.test> {our_id}", Auto_Submitted="auto-replied")
    assert (await send_mail(ch.smtp_port, ooo))[0] == 250
    _, away = await email_bus.wait_inbound(2)
    assert away.auto is True and away.conversation == question.conversation
    # A reply to the conversation that names no message answers the customer's own mail.
    await email_bus.send(Outbound(id="out-ooo-2", conversation=question.conversation,
                                  parts=[TextPart(text="It has shipped now.")]))
    await email_bus.wait_status("out-ooo-2", "sent")
    second = parse((await smtp_sink.wait(2))[1][2])
    assert second["Subject"] == "Re: Help"
    assert second["In-Reply-To"] == "<ooo1@customer.test>"
    assert "Auto-Submitted" not in second
