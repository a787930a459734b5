"""Hostile and odd mail through the real SMTP listener: each message is published or
refused with a reason, and the listener keeps serving."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import time
import warnings
from collections.abc import Iterator
from email.message import EmailMessage

from gateway import FilePart, TextPart

NORMAL = (b"From: alice@customer.test\r\nTo: support@acme.test\r\nSubject: still there?\r\n"
          b"Message-ID: <normal@customer.test>\r\n\r\nhello\r\n")


def head(subject: bytes = b"odd", extra: bytes = b"", message_id: bytes = b"<odd@customer.test>") -> bytes:
    mid = b"Message-ID: " + message_id + b"\r\n" if message_id else b""
    return (b"From: alice@customer.test\r\nTo: support@acme.test\r\nSubject: " + subject + b"\r\n" + mid
            + b"MIME-Version: 1.0\r\n" + extra)


def nested(depth: int, top_text: bytes | None = None) -> bytes:
    """``depth`` nested multiparts with text only at the bottom (and, with ``top_text``,
    a text part at the top as well)."""
    out = [head()]
    for i in range(depth):
        out.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % i)
        if i == 0 and top_text is not None:
            out.append(b"--b0\r\nContent-Type: text/plain\r\n\r\n" + top_text + b"\r\n")
        out.append(b"--b%d\r\n" % i)
    out.append(b"Content-Type: text/plain\r\n\r\ndeep inside\r\n")
    for i in reversed(range(depth)):
        out.append(b"--b%d--\r\n" % i)
    return b"".join(out)


async def still_serving(send_mail, port: int, email_bus) -> None:
    before = len(await email_bus.inbound())
    assert (await send_mail(port, NORMAL))[0] == 250
    assert len(await email_bus.inbound()) == before + 1


async def test_thousands_of_nested_multiparts_are_refused_with_a_reason(start_email, send_mail, email_bus):
    _, ch = await start_email()
    code, text = await send_mail(ch.smtp_port, nested(3000))
    assert code == 554 and "multipart" in text
    await still_serving(send_mail, ch.smtp_port, email_bus)


async def test_deep_nesting_below_readable_text_is_published_with_the_depth_cut(start_email, send_mail, email_bus):
    _, ch = await start_email()
    assert (await send_mail(ch.smtp_port, nested(60, top_text=b"read me")))[0] == 250
    [msg] = await email_bus.inbound()
    assert msg.meta["truncated"] == ["nesting"] and msg.parts[0].text == "read me"


async def test_nesting_that_hides_all_the_text_below_the_depth_limit_is_refused_not_published_empty(
        start_email, send_mail, email_bus):
    # 200 levels declare 200 boundaries: below the 25 x max_nesting pre-check, so the
    # parser runs and the depth cut at 40 drops the only text there is.
    _, ch = await start_email()
    code, text = await send_mail(ch.smtp_port, nested(200))
    assert code == 554 and "nested" in text and "40" in text
    assert await email_bus.inbound() == []
    await still_serving(send_mail, ch.smtp_port, email_bus)


async def test_thousands_of_parts_are_published_with_the_rest_dropped(start_email, send_mail, email_bus):
    _, ch = await start_email()
    parts = [head(extra=b'Content-Type: multipart/mixed; boundary="X"\r\n\r\n')]
    parts.append(b"--X\r\nContent-Type: text/plain\r\n\r\nsee attachments\r\n")
    for i in range(3000):
        parts.append(b'--X\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; '
                     b'filename="f%d.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n' % i)
    parts.append(b"--X--\r\n")
    # A slow parse runs off the event loop: another sender is served meanwhile.
    t0 = time.monotonic()
    big = asyncio.create_task(send_mail(ch.smtp_port, b"".join(parts)))
    await still_serving(send_mail, ch.smtp_port, email_bus)
    assert (await big)[0] == 250
    msgs = await email_bus.inbound()
    msg = next(m for m in msgs if m.provider_id == "<odd@customer.test>")
    assert msg.meta["truncated"] == ["parts"] and msg.parts[0].text == "see attachments"
    assert 400 < len(msg.parts) <= 500
    assert time.monotonic() - t0 < 30


async def test_huge_headers_are_published_and_an_overlong_line_is_refused(start_email, send_mail, email_bus):
    _, ch = await start_email()
    many = b"".join(b"X-Junk-%d: %s\r\n" % (i, b"v" * 80) for i in range(5000))
    folded_subject = b"\r\n ".join([b"word" * 20] * 2000)  # a 160 KB subject, folded
    raw = head(subject=folded_subject, extra=many) + b"\r\nbody\r\n"
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    [msg] = await email_bus.inbound()
    assert len(msg.subject) == 998 and msg.parts[0].text == "body"
    code, text = await send_mail(ch.smtp_port, head(extra=b"X-Long: " + b"y" * 5000 + b"\r\n", message_id=b"<l@x>") + b"\r\nx\r\n")
    assert code == 500 and "too long" in text.lower()
    await still_serving(send_mail, ch.smtp_port, email_bus)


async def test_broken_base64_is_decoded_as_far_as_possible_and_noted(start_email, send_mail, email_bus):
    _, ch = await start_email()
    good = base64.b64encode("付款失败，请帮忙".encode("utf-8")).decode()
    body = good[:-3] + "!!*\r\n"  # stray characters and a cut-off last quantum
    raw = head(extra=b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n") \
        + b"\r\n" + body.encode()
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    [msg] = await email_bus.inbound()
    assert msg.parts[0].text.startswith("付款失败，请")
    assert any("Base64" in p for p in msg.meta["problems"])


async def test_gb2312_subject_with_gbk_characters_and_legacy_charsets_decode(start_email, send_mail, email_bus):
    _, ch = await start_email()
    # 镕 is not in GB2312 but Chinese mailers label such text GB2312 anyway.
    subject = b"=?GB2312?B?" + base64.b64encode("朱镕基的订单".encode("gb18030")) + b"?="
    raw = head(subject=subject, extra=b"Content-Type: text/plain; charset=gb2312\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n") + b"\r\n" + "镕字也在正文里".encode("gb18030") + b"\r\n"
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    big5 = head(subject=b"=?big5?B?" + base64.b64encode("訂單查詢".encode("big5")) + b"?=", message_id=b"<b5@x>",
                extra=b"Content-Type: text/plain; charset=big5\r\n\r\n") + "請問我的包裹在哪裡".encode("big5") + b"\r\n"
    assert (await send_mail(ch.smtp_port, big5))[0] == 250
    jis = head(subject=b"=?ISO-2022-JP?B?" + base64.b64encode("注文".encode("iso2022_jp")) + b"?=", message_id=b"<jp@x>",
               extra=b"Content-Type: text/plain; charset=ISO-2022-JP\r\n\r\n") + "荷物が届きません".encode("iso2022_jp") + b"\r\n"
    assert (await send_mail(ch.smtp_port, jis))[0] == 250
    gb, b5, jp = await email_bus.inbound()
    assert gb.subject == "朱镕基的订单" and gb.parts[0].text == "镕字也在正文里"
    assert b5.subject == "訂單查詢" and b5.parts[0].text == "請問我的包裹在哪裡"
    assert jp.subject == "注文" and jp.parts[0].text == "荷物が届きません"


async def test_wrong_and_missing_charsets_do_not_crash(start_email, send_mail, email_bus):
    _, ch = await start_email()
    utf8_as_latin1 = head(message_id=b"<w1@x>", extra=b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n") \
        + "Grüße, 你好".encode("utf-8") + b"\r\n"
    unknown = head(message_id=b"<w2@x>", extra=b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\n") \
        + "退款".encode("gbk") + b"\r\n"
    missing = head(message_id=b"<w3@x>", extra=b"Content-Type: text/plain\r\n\r\n") + "没有字符集".encode("gbk") + b"\r\n"
    raw_header = head(subject="原始字节主题".encode("utf-8"), message_id=b"<w4@x>") + b"\r\nx\r\n"
    for raw in (utf8_as_latin1, unknown, missing, raw_header):
        assert (await send_mail(ch.smtp_port, raw))[0] == 250
    a, b, c, d = await email_bus.inbound()
    assert a.parts[0].text == "Grüße, 你好"
    assert b.parts[0].text == "退款" and c.parts[0].text == "没有字符集"
    assert d.subject == "原始字节主题"


async def test_rfc2231_and_rfc2047_attachment_names_decode(start_email, send_mail, email_bus):
    _, ch = await start_email()
    raw = head(extra=b'Content-Type: multipart/mixed; boundary="Z"\r\n\r\n') + (
        b"--Z\r\nContent-Type: text/plain\r\n\r\nsee files\r\n"
        b"--Z\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
        b"filename*=gb2312''%D6%EC%E9F%BB%F9.pdf\r\n\r\nPDF1\r\n"
        b"--Z\r\nContent-Type: application/pdf; name=\"=?UTF-8?B?5Y+R56WoLnBkZg==?=\"\r\n"
        b"Content-Disposition: attachment; filename=\"=?UTF-8?B?5Y+R56WoLnBkZg==?=\"\r\n\r\nPDF2\r\n--Z--\r\n")
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    [msg] = await email_bus.inbound()
    assert [p.filename for p in msg.parts[1:]] == ["朱镕基.pdf", "发票.pdf"]


async def test_missing_message_id_gets_a_stable_synthetic_one(start_email, send_mail, email_bus):
    _, ch = await start_email()
    raw = head(message_id=b"") + b"\r\nno id here\r\n"
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    assert (await send_mail(ch.smtp_port, raw))[0] == 250  # the MTA retried: same bytes
    [msg] = await email_bus.inbound()
    assert msg.meta["message_id_synthetic"] is True and msg.provider_id.endswith("@missing-message-id.invalid>")
    assert "no Message-ID" in msg.meta["problems"]


async def test_forwarded_message_as_attachment_is_kept_whole(start_email, send_mail, email_bus):
    _, ch = await start_email()
    inner = EmailMessage()
    inner["From"] = "bob@vendor.test"
    inner["Subject"] = "Original complaint"
    inner["Message-ID"] = "<inner@vendor.test>"
    inner.set_content("The product broke after a day.")
    outer = EmailMessage()
    outer["From"] = "alice@customer.test"
    outer["To"] = "support@acme.test"
    outer["Subject"] = "Fwd: Original complaint"
    outer["Message-ID"] = "<fwd@customer.test>"
    outer.set_content("See the forwarded mail.")
    outer.add_attachment(inner)
    assert (await send_mail(ch.smtp_port, outer.as_bytes()))[0] == 250
    [msg] = await email_bus.inbound()
    text, fwd = msg.parts
    assert text == TextPart(text="See the forwarded mail.")
    assert isinstance(fwd, FilePart) and fwd.content_type == "message/rfc822"
    assert b"The product broke after a day." in fwd.data and fwd.filename == "Original complaint.eml"
    assert msg.meta["forwarded"] == [{"subject": "Original complaint", "from": "bob@vendor.test",
                                      "message_id": "<inner@vendor.test>"}]
    # The forwarded message does not hijack threading: it is Alice's own new thread.
    assert msg.meta["thread_by"] == "new"


async def test_forwarded_message_keeps_the_filename_its_sender_gave_it(start_email, send_mail, email_bus):
    inner = (b"From: bob@vendor.test\r\nSubject: Original complaint\r\nMessage-ID: <inner2@vendor.test>\r\n\r\n"
             b"The product broke.\r\n")
    raw = head(extra=b'Content-Type: multipart/mixed; boundary="F"\r\n\r\n') + (
        b"--F\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--F\r\nContent-Type: message/rfc822\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''%E6%8A%95%E8%AF%89%E5%8E%9F%E4%BB%B6.eml\r\n\r\n"
        + inner + b"--F\r\nContent-Type: message/rfc822; name=\"by-name.eml\"\r\n\r\n" + inner + b"--F\r\n"
        b"Content-Type: message/rfc822\r\n\r\n" + inner + b"--F--\r\n")
    _, ch = await start_email()
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    [msg] = await email_bus.inbound()
    # The part's own name wins (Content-Disposition, then Content-Type); only a nameless
    # part is named after the forwarded subject.
    assert [p.filename for p in msg.parts[1:]] == ["投诉原件.eml", "by-name.eml", "Original complaint.eml"]



@contextlib.contextmanager
def no_unawaited_coroutines() -> Iterator[None]:
    """Fails if a coroutine was created and dropped unawaited meanwhile."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]


async def test_raw_8bit_byte_in_the_from_address_of_a_reply_is_published_not_deferred(start_email, send_mail, email_bus):
    # A "Re:" subject without thread headers makes the channel key the conversation by
    # subject, customer and our address: the undecodable address once made that key
    # raise, and the listener answered 451 (try later) to mail that can never succeed.
    _, ch = await start_email()
    raw = (b"From: al\x9bice@customer.test\r\nTo: support@acme.test\r\nSubject: Re: ticket\r\n"
           b"Message-ID: <hostile-from@customer.test>\r\n\r\nhello\r\n")
    with no_unawaited_coroutines():
        code, text = await send_mail(ch.smtp_port, raw)
    assert code == 250, (code, text)
    [msg] = await email_bus.inbound()
    # No declared charset: the bytes are read by the fallback list (utf-8, then GB18030).
    assert msg.subject == "Re: ticket" and msg.sender.id == b"al\x9bice@customer.test".decode("gb18030")
    await still_serving(send_mail, ch.smtp_port, email_bus)


async def test_repeated_message_id_with_raw_8bit_references_is_answered_250_twice(start_email, send_mail, email_bus):
    # The second copy is a duplicate (not published again), but its thread headers are
    # still recorded: the undecodable reference once failed that, answered 451.
    _, ch = await start_email()
    clean = (b"From: alice@customer.test\r\nTo: support@acme.test\r\nSubject: again\r\n"
             b"Message-ID: <repeat@customer.test>\r\n\r\nhello\r\n")
    hostile = clean.replace(b"\r\n\r\n", b"\r\nReferences: <a@\xca>\r\n\r\n", 1)
    with no_unawaited_coroutines():
        first = await send_mail(ch.smtp_port, clean)
        second = await send_mail(ch.smtp_port, hostile)
        third = await send_mail(ch.smtp_port, hostile.replace(b"<repeat@", b"<fresh@"))
    assert (first[0], second[0], third[0]) == (250, 250, 250), (first, second, third)
    msgs = await email_bus.inbound()
    assert len(msgs) == 2 and msgs[1].meta["references"] == ["<a@\u00ca>"]
    await still_serving(send_mail, ch.smtp_port, email_bus)


async def test_broken_base64_encoded_word_in_a_sender_name_is_published_as_written(start_email, send_mail, email_bus):
    _, ch = await start_email()
    raw = (b"From: =?GB2312?B?1c^I/Q==?= <zhang@customer.test>\r\nTo: support@acme.test\r\nSubject: hi\r\n"
           b"Message-ID: <broken-word@customer.test>\r\n\r\nhello\r\n")
    assert (await send_mail(ch.smtp_port, raw))[0] == 250
    [msg] = await email_bus.inbound()
    assert (msg.sender.id, msg.sender.name) == ("zhang@customer.test", "=?GB2312?B?1c^I/Q==?=")
