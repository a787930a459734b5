"""Mutated real mail through the real SMTP listener: every message is either accepted
(250, published) or refused for good (5xx), never deferred (4xx: the sending server would
retry it for days and it could only fail again) and never a crash.

The mutations are seeded: ``GATEWAY_FUZZ_SEED`` and ``GATEWAY_FUZZ_MAILS`` (default 300)
replay or widen a run, e.g. ``GATEWAY_FUZZ_MAILS=3000`` by hand."""

from __future__ import annotations

import base64
import os
import random
from collections import Counter
from collections.abc import Callable

from structlog.testing import capture_logs

SEED = int(os.environ.get("GATEWAY_FUZZ_SEED", "20261205"))
COUNT = int(os.environ.get("GATEWAY_FUZZ_MAILS", "300"))


def _h(*lines: str) -> bytes:
    return ("\r\n".join(lines)).encode("utf-8")


CORPUS: list[bytes] = [
    _h("From: Alice <alice@customer.test>", "To: support@acme.test", "Subject: Where is my order?",
       "Message-ID: <c1@customer.test>", "Date: Tue, 01 Dec 2026 10:00:00 +0800", "", "Hello,", "order 42?", ""),
    _h("From: =?GB2312?B?1cXI/Q==?= <zhang@customer.test>", "To: support@acme.test",
       "Subject: =?GB2312?B?zsrM4rGouOY=?=", "Message-ID: <c2@customer.test>", "MIME-Version: 1.0",
       'Content-Type: text/plain; charset="gb2312"', "Content-Transfer-Encoding: base64", "",
       base64.b64encode("你好，我的订单还没到。".encode("gb2312")).decode(), ""),
    _h("From: bob@customer.test", "To: support@acme.test", "Subject: Re: Re: ticket #12",
       "Message-ID: <c3@customer.test>", "In-Reply-To: <gw.aaaaaaaaaaaaaaaaaaaaaaaaaa@acme.test>",
       "References: <root@customer.test> <gw.aaaaaaaaaaaaaaaaaaaaaaaaaa@acme.test>", "MIME-Version: 1.0",
       'Content-Type: multipart/alternative; boundary="alt"', "", "--alt",
       "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable", "",
       "Thanks =E2=80=94 still broken.", "", "> earlier text", "--alt", "Content-Type: text/html; charset=utf-8", "",
       "<p>Thanks &mdash; still broken.</p>", "--alt--", ""),
    _h("From: carol@customer.test", "To: support@acme.test", "Subject: invoice attached",
       "Message-ID: <c4@customer.test>", "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="mix"', "",
       "--mix", "Content-Type: text/plain", "", "see attachment", "--mix",
       "Content-Type: application/pdf; name=\"=?utf-8?B?5Y+R56WoLnBkZg==?=\"",
       "Content-Disposition: attachment; filename*=utf-8''%E5%8F%91%E7%A5%A8.pdf",
       "Content-Transfer-Encoding: base64", "", base64.b64encode(b"%PDF-1.4 fake").decode(), "--mix",
       "Content-Type: image/png", "Content-ID: <img1@customer.test>", "Content-Transfer-Encoding: base64", "",
       base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode(), "--mix--", ""),
    _h("From: MAILER-DAEMON@mx.customer.test", "To: support@acme.test", "Subject: Undelivered Mail Returned to Sender",
       "Message-ID: <dsn1@mx.customer.test>", "Auto-Submitted: auto-replied", "MIME-Version: 1.0",
       'Content-Type: multipart/report; report-type=delivery-status; boundary="r"', "", "--r",
       "Content-Type: text/plain", "", "Your message could not be delivered.", "--r",
       "Content-Type: message/delivery-status", "", "Reporting-MTA: dns; mx.customer.test", "",
       "Final-Recipient: rfc822; nobody@customer.test", "Action: failed", "Status: 5.1.1",
       "Diagnostic-Code: smtp; 550 5.1.1 no such user", "", "--r", "Content-Type: text/rfc822-headers", "",
       "Message-ID: <gw.bbbbbbbbbbbbbbbbbbbbbbbbbb@acme.test>", "Subject: Re: order", "", "--r--", ""),
    _h("From: dave@customer.test", "To: support@acme.test", "Subject: Fwd: complaint",
       "Message-ID: <c6@customer.test>", "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="f"', "",
       "--f", "Content-Type: text/plain; charset=big5", "", "see below", "--f", "Content-Type: message/rfc822", "",
       "From: other@elsewhere.test", "Subject: =?utf-8?q?the_original?=", "Message-ID: <inner@elsewhere.test>", "",
       "inner body", "--f--", ""),
    _h("From: erin@customer.test", "To: support@acme.test", "Subject: out of office",
       "Message-ID: <c7@customer.test>", "Auto-Submitted: auto-replied", "Precedence: bulk",
       "Content-Type: text/plain; charset=iso-2022-jp", "", "\x1b$B$3$s$K$A$O\x1b(B", ""),
]


def _flip_bytes(r: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(r.randint(1, 8)):
        b[r.randrange(len(b))] = r.randrange(256)
    return bytes(b)


def _header_8bit(r: random.Random, raw: bytes) -> bytes:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    i = r.randrange(len(lines))
    line = lines[i]
    at = r.randint(line.find(b":") + 1 if b":" in line else 0, len(line))
    junk = bytes(r.choice([0x80, 0x9B, 0xC0, 0xCA, 0xE4, 0xFF, 0xA1, 0xFE]) for _ in range(r.randint(1, 4)))
    lines[i] = line[:at] + junk + line[at:]
    return b"\r\n".join(lines) + sep + body


def _broken_encoding(r: random.Random, raw: bytes) -> bytes:
    choices: list[Callable[[bytes], bytes]] = [
        lambda x: x.replace(b"=?GB2312?B?", b"=?x-unknown?B?"),
        lambda x: x.replace(b"?B?", b"?Q?", 1),
        lambda x: x.replace(b"==?=", b"?=", 1),
        lambda x: x.replace(b"charset=", b"charset=utf-7", 1),
        lambda x: x.replace(b"charset=", b'charset="', 1),
        lambda x: x.replace(b"base64", b"base64\r\n\r\n!!!**", 1),
        lambda x: x.replace(b"quoted-printable", b"quoted-printable\r\n\r\n=ZZ=\xff=", 1),
        lambda x: x.replace(b"boundary=", b"boundary=\xc3", 1),
        lambda x: x.replace(b"--", b"-\x00-", 1),
        lambda x: x.replace(b"filename*=utf-8''", b"filename*=gb2312''%FF%FE%", 1),
        lambda x: x.replace(b"Subject: ", b"Subject: =?utf-8?B?" + base64.b64encode(b"\xff\xfe\x9b") + b"?= ", 1),
        lambda x: x.replace(b"References: ", b"References: <a@\xca> <\xff\xfe@x> ", 1)
        if b"References: " in x else x.replace(b"\r\n\r\n", b"\r\nReferences: <a@\xca>\r\n\r\n", 1),
        lambda x: x.replace(b"From: ", b"From: \"\xe4\xb8\" <", 1),
        lambda x: x.replace(b"Message-ID: <", b"Message-ID: <\x9b", 1),
        lambda x: x[: r.randrange(1, len(x))],
        lambda x: x.replace(b"\r\n\r\n", b"\r\nContent-Type: multipart/mixed; boundary=\"q\"\r\n\r\n--q\r\n", 1),
        lambda x: x.replace(b"Date: ", b"Date: \xff 99 Foo 20261 99:99 +9999 ", 1),
        lambda x: x.replace(b"Subject: ", b"Subject: Re: ", 1),
        # Refused by design (554): more multipart boundaries than the parser will follow.
        lambda x: x + b"boundary=\r\n" * 1001,
    ]
    return r.choice(choices)(raw)


MUTATIONS = {"bytes": _flip_bytes, "header-8bit": _header_8bit, "encoding": _broken_encoding}


def mutate(r: random.Random, seen_ids: list[bytes]) -> tuple[str, bytes]:
    """One mutated corpus mail (sometimes two mutations on top of each other, sometimes a
    Message-ID that an earlier mail of the run already used)."""
    raw = r.choice(CORPUS)
    names = r.sample(sorted(MUTATIONS), r.choice([1, 1, 2]))
    for name in names:
        raw = MUTATIONS[name](r, raw)
    if seen_ids and r.random() < 0.25:
        i = raw.find(b"Message-ID: ")
        if i >= 0:
            end = raw.find(b"\r\n", i)
            raw = raw[:i] + b"Message-ID: " + r.choice(seen_ids) + raw[end if end >= 0 else len(raw):]
            names.append("repeated-id")
    i = raw.find(b"Message-ID: ")
    if i >= 0:
        seen_ids.append(raw[i + 12: raw.find(b"\r\n", i)] if raw.find(b"\r\n", i) > 0 else raw[i + 12:])
    return "+".join(names), raw


async def test_mutated_mail_is_accepted_or_refused_for_good_never_deferred(start_email, send_mail, email_bus):
    _, ch = await start_email()
    r = random.Random(SEED)
    seen: list[bytes] = []
    outcomes: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    deferred: list[tuple[int, str, str, bytes]] = []
    with capture_logs() as logs:
        for n in range(COUNT):
            kinds, raw = mutate(r, seen)
            code, text = await send_mail(ch.smtp_port, raw)
            outcomes["250" if code == 250 else f"{code // 100}xx"] += 1
            if 500 <= code < 600:
                refusals[f"{code} {text[:60]}"] += 1
            elif code != 250:
                deferred.append((n, kinds, f"{code} {text}", raw[:300]))
    print(f"seed {SEED}, {COUNT} mails: {dict(outcomes)}; refusals: {dict(refusals)}")
    assert not deferred, f"seed {SEED}: {len(deferred)} of {COUNT} not 250/5xx, first: {deferred[:3]}"
    crashes = [e for e in logs if e.get("log_level") == "error"]
    assert not crashes, crashes[:3]
    # What was accepted is on the bus, and decodes (email_bus decodes every message).
    published = await email_bus.inbound()
    assert 0 < len(published) <= outcomes["250"]
    assert outcomes["250"] > COUNT // 4, outcomes
