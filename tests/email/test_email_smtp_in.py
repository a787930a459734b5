"""SMTP listener → bus: a real SMTP client (aiosmtplib) talks to the gateway's aiosmtpd
listener; what arrives is read off a real nats-server."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage

import aiosmtplib
import msgspec

from gateway import FilePart, HtmlPart, ImagePart, ObjectRef, TextPart


def customer_mail(*, subject: str = "Where is my parcel?", body: str = "Hello, my parcel has not arrived.",
                  sender: str = "Alice Zhang <alice@customer.test>", message_id: str = "<m1@customer.test>",
                  **headers: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = "ACME Support <support@acme.test>"
    m["Subject"] = subject
    m["Date"] = "Mon, 06 Jan 2025 10:00:00 +0800"
    if message_id:
        m["Message-ID"] = message_id
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content(body)
    return m


async def test_smtp_message_is_on_the_bus_with_text_html_inline_image_and_attachment(start_email, send_mail, email_bus):
    gw, ch = await start_email()
    m = customer_mail(body="The parcel is late.\n\n-- \nAlice")
    m.add_alternative('<p>The parcel is <b>late</b>.</p><img src="cid:logo1">', subtype="html")
    m.get_payload()[1].add_related(b"\x89PNG\r\n\x1a\nfake", maintype="image", subtype="png", cid="<logo1>",
                                   filename="logo.png")
    m.add_attachment(b"%PDF-1.4 invoice", maintype="application", subtype="pdf", filename="发票.pdf")
    code, _ = await send_mail(ch.smtp_port, m.as_bytes())
    assert code == 250
    # 250 came only after the publish was acknowledged: no waiting needed.
    [msg] = await email_bus.inbound()
    assert msg.channel_type == "email" and msg.channel == "support"
    assert msg.sender.id == "alice@customer.test" and msg.sender.name == "Alice Zhang"
    assert msg.recipient.id == "support@acme.test"
    assert msg.subject == "Where is my parcel?" and msg.provider_id == "<m1@customer.test>"
    assert msg.auto is False
    text, html, image, pdf = msg.parts
    assert text == TextPart(text="The parcel is late.", signature="-- \nAlice")
    assert isinstance(html, HtmlPart) and "<b>late</b>" in html.html
    assert isinstance(image, ImagePart) and image.content_id == "logo1" and image.data == b"\x89PNG\r\n\x1a\nfake"
    assert isinstance(pdf, FilePart) and pdf.filename == "发票.pdf" and pdf.data == b"%PDF-1.4 invoice"
    assert msg.meta["transport"] == "smtp" and msg.meta["message_id"] == "<m1@customer.test>"
    assert msg.meta["envelope_to"] == ["support@acme.test"]
    # The original is kept for audit in the object store.
    ref = msgspec.convert(msg.meta["raw"], ObjectRef)
    assert await gw.get_blob(ref) == m.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


async def test_large_attachment_goes_to_the_object_store(start_email, send_mail, email_bus, gateway_factory):
    gw, ch = await start_email()
    blob = bytes(range(256)) * 400  # 100 KiB, above the bus inline limit
    m = customer_mail()
    m.add_attachment(blob, maintype="application", subtype="octet-stream", filename="dump.bin")
    assert (await send_mail(ch.smtp_port, m.as_bytes()))[0] == 250
    [msg] = await email_bus.inbound()
    part = msg.parts[-1]
    assert isinstance(part, FilePart) and part.data is None and part.ref is not None and part.size == len(blob)
    assert await gw.get_blob(part.ref) == blob


async def test_unknown_recipient_is_refused_with_550(start_email, send_mail, email_bus):
    _, ch = await start_email()
    code, text = await send_mail(ch.smtp_port, customer_mail().as_bytes(), rcpt="someone@elsewhere.test")
    assert code == 550
    assert await email_bus.inbound() == []


async def test_configured_single_address_is_accepted_besides_domains(start_email, send_mail, email_bus):
    _, ch = await start_email(smtp={"port": 0, "domains": [], "addresses": ["help@other.test"]})
    assert (await send_mail(ch.smtp_port, customer_mail().as_bytes(), rcpt="help@other.test"))[0] == 250
    assert (await send_mail(ch.smtp_port, customer_mail().as_bytes(), rcpt="support@acme.test"))[0] == 550
    assert len(await email_bus.inbound()) == 1


async def test_message_above_the_size_limit_is_refused_with_552(start_email, send_mail, email_bus):
    _, ch = await start_email(smtp={"port": 0, "domains": ["acme.test"], "max_size": 20000})
    m = customer_mail(body="x" * 30000)
    code, _ = await send_mail(ch.smtp_port, m.as_bytes())
    assert code == 552
    assert await email_bus.inbound() == []


async def test_bus_outage_answers_451_so_the_sender_retries(start_email, send_mail, email_bus, nats_server):
    from structlog.testing import capture_logs

    _, ch = await start_email()
    await nats_server.stop()
    with capture_logs() as logs:
        for _ in range(4):
            code, text = await send_mail(ch.smtp_port, customer_mail().as_bytes())
            assert code == 451, text
    # One line says the bus is down; the three repeats within the minute are held back.
    assert [e["event"] for e in logs if "451" in e["event"]] == ["bus unavailable: SMTP message deferred (451)"]
    await nats_server.start()
    # The sending MTA retries later and the message gets through exactly once.
    for _ in range(100):
        code, _ = await send_mail(ch.smtp_port, customer_mail().as_bytes())
        if code == 250:
            break
        await asyncio.sleep(0.2)
    assert code == 250
    assert len(await email_bus.inbound()) == 1


async def test_the_same_message_delivered_twice_is_published_once(start_email, send_mail, email_bus):
    _, ch = await start_email()
    raw = customer_mail().as_bytes()
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    assert len(await email_bus.inbound()) == 1


async def test_quoted_reply_and_signature_are_separate_fields(start_email, send_mail, email_bus):
    _, ch = await start_email()
    body = ("It still does not work.\n\n--\nAlice Zhang\nTel 123\n\n"
            "On Mon, 6 Jan 2025 at 10:00, ACME Support <support@acme.test> wrote:\n> Please restart it.\n")
    assert (await send_mail(ch.smtp_port, customer_mail(body=body).as_bytes()))[0] == 250
    [msg] = await email_bus.inbound()
    part = msg.parts[0]
    assert part.text == "It still does not work."
    assert part.signature == "--\nAlice Zhang\nTel 123"
    assert part.quoted.startswith("On Mon, 6 Jan 2025") and "> Please restart it." in part.quoted


async def test_html_only_mail_gets_a_plain_text_rendering(start_email, send_mail, email_bus):
    _, ch = await start_email()
    m = customer_mail()
    m.set_content("<html><body><p>Order <b>#42</b> is broken.</p><ul><li>screen</li></ul>"
                  "<script>alert(1)</script></body></html>", subtype="html")
    assert (await send_mail(ch.smtp_port, m.as_bytes()))[0] == 250
    [msg] = await email_bus.inbound()
    text, html = msg.parts
    assert "Order #42 is broken." in text.text and "screen" in text.text and "alert" not in text.text
    assert isinstance(html, HtmlPart)


async def test_smtp_auth_and_starttls_when_configured(start_email, email_bus, tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    _, ch = await start_email(smtp={"port": 0, "domains": ["acme.test"], "tls_cert": str(cert), "tls_key": str(key),
                                    "require_starttls": True, "auth_users": {"relay": "s3cret"}, "auth_required": True})
    raw = customer_mail().as_bytes()
    # Without TLS the listener refuses the transaction.
    plain = aiosmtplib.SMTP(hostname="127.0.0.1", port=ch.smtp_port, start_tls=False, timeout=10)
    await plain.connect()
    try:
        await plain.sendmail("alice@customer.test", ["support@acme.test"], raw)
        raise AssertionError("accepted without STARTTLS")
    except aiosmtplib.SMTPResponseException as exc:
        assert exc.code == 530
    finally:
        plain.close()
    # Wrong password after STARTTLS: 535.
    bad = aiosmtplib.SMTP(hostname="127.0.0.1", port=ch.smtp_port, start_tls=True, validate_certs=False, timeout=10,
                          username="relay", password="wrong")
    try:
        await bad.connect()
        raise AssertionError("wrong password accepted")
    except aiosmtplib.SMTPAuthenticationError as exc:
        assert exc.code == 535
    finally:
        bad.close()
    good = aiosmtplib.SMTP(hostname="127.0.0.1", port=ch.smtp_port, start_tls=True, validate_certs=False, timeout=10,
                           username="relay", password="s3cret")
    await good.connect()
    await good.sendmail("alice@customer.test", ["support@acme.test"], raw)
    await good.quit()
    assert len(await email_bus.inbound()) == 1


async def test_without_domains_only_the_channel_address_is_accepted(start_email, send_mail, email_bus):
    _, ch = await start_email(smtp={"port": 0})
    assert (await send_mail(ch.smtp_port, customer_mail().as_bytes(), rcpt="support@acme.test"))[0] == 250
    assert (await send_mail(ch.smtp_port, customer_mail().as_bytes(), rcpt="other@acme.test"))[0] == 550
