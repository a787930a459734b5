"""SMTP in at the bus's real size limit (payload plus headers, as nats-server counts it): a
mail whose message is just over is refused with 552 and a reason, the bus connection
stays up, and the next mail is published on it (issue 9.1)."""

from __future__ import annotations

import base64
from email.message import EmailMessage

from gateway.testing import stream_messages


def cjk_mail(n: int, message_id: str) -> bytes:
    """A mail of ``n`` CJK characters of text plus the same as HTML (what the issue's
    reporter sent: about 256k characters with its HTML)."""
    m = EmailMessage()
    m["From"] = "Alice Zhang <alice@customer.test>"
    m["To"] = "ACME Support <support@acme.test>"
    m["Subject"] = f"size {message_id}"  # one thread each: threading adds nothing to later ones
    m["Date"] = "Mon, 06 Jan 2025 10:00:00 +0800"
    m["Message-ID"] = message_id
    text = "字" * n
    m.set_content(text)
    m.add_alternative(f"<p>{text}</p>", subtype="html")
    return m.as_bytes()


async def stored_size(url: str) -> int:
    m = (await stream_messages(url, "GW_IN"))[-1]
    return len(base64.b64decode(m.hdrs)) + len(m.data)


async def test_mail_just_over_the_bus_limit_gets_552_and_the_next_mail_is_published_on_the_same_connection(
        start_email, send_mail, email_bus, nats_server):
    gw, ch = await start_email()
    nc = gw.bus.nc
    limit = min(nc.max_payload, gw.config.bus.max_message_size)

    # Each character costs 6 bytes on the wire (3 of UTF-8 in the text, 3 in the HTML);
    # the rest is measured with a probe of the same order of size (the meta carries the
    # mail's size, whose digits count), then the mails aim just below and above the limit.
    n0 = 150_000
    assert (await send_mail(ch.smtp_port, cjk_mail(n0, "<p1@customer.test>")))[0] == 250
    base = await stored_size(nats_server.url) - 6 * n0
    under = (limit - 40 - base) // 6
    over = (limit + 40 - base) // 6 + 1

    code, text = await send_mail(ch.smtp_port, cjk_mail(over, "<o1@customer.test>"))
    assert code == 552, text
    assert "too large" in text.lower()

    code, text = await send_mail(ch.smtp_port, cjk_mail(10, "<n1@customer.test>"))
    assert code == 250, text
    assert gw.bus.nc is nc and nc.is_connected and nc.stats["reconnects"] == 0

    code, text = await send_mail(ch.smtp_port, cjk_mail(under, "<u1@customer.test>"))
    assert code == 250, text
    assert limit - 200 < await stored_size(nats_server.url) <= limit
    published = [m.provider_id for m in await email_bus.inbound()]
    assert published == ["<p1@customer.test>", "<n1@customer.test>", "<u1@customer.test>"]
