"""A gateway upgraded in place from the release before the channel toolkit (commit
f3660f2) keeps using the email state that release left in the channel's KV.

Each test writes the old records byte for byte as f3660f2 wrote them, straight into the
state bucket of a real nats-server (not through the new code), then shows the new code
acting on them. The formats are spelled out in the tests, with where f3660f2 made them."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from datetime import datetime, timezone

import msgspec
import nats

from gateway.testing import wait_until


# --- the previous release's storage ------------------------------------------------------

def old_kv_key(channel: str, key: str) -> str:
    """The KV key f3660f2 stored a channel's state key under (gateway/core/inbound/pipeline.py
    ``_State._key`` and ``_token``): ``<channel>.<key>`` for keys of ``[-_=a-zA-Z0-9]``,
    else ``<channel>.h-`` + 40 base32 characters of the key's SHA-256."""
    if re.fullmatch(r"[-_=a-zA-Z0-9]{1,200}", key):
        return f"{channel}.{key}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return f"{channel}.h-" + base64.b32encode(digest[:25]).decode("ascii").lower()[:40]


async def write_old(url: str, channel: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
    """Store ``value`` as f3660f2's ``ctx.state.put(key, value, ttl=ttl)`` did: a KV put
    into bucket ``gw_state``, or with a TTL a publish with a per-message TTL."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if ttl is None:
            await (await js.key_value("gw_state")).put(old_kv_key(channel, key), value)
        else:
            await js.publish(f"$KV.gw_state.{old_kv_key(channel, key)}", value, msg_ttl=ttl)
    finally:
        await nc.close()


def old_message_id(channel: str, outbound_id: str, domain: str) -> str:
    """f3660f2 plugins/email/_threading.py ``own_message_id``: our Message-ID of an outbound."""
    digest = hashlib.sha256(f"{channel}\x00{outbound_id}".encode()).digest()
    return f"<gw.{base64.b32encode(digest).decode('ascii').rstrip('=').lower()[:26]}@{domain}>"


THREAD_TTL = 180 * 86400.0  # f3660f2's default thread_ttl, the TTL of every mid: record


# --- bounces -------------------------------------------------------------------------------

def dsn(our_id: str, action: str, status: str) -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.customer.test>\r\n"
        "To: support@acme.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-upgrade@mx.customer.test>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="R"\r\n\r\n'
        "--R\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--R\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.customer.test\r\n\r\n"
        f"Final-Recipient: rfc822; alice@customer.test\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} mailbox unavailable\r\n\r\n"
        "--R\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@acme.test\r\nTo: alice@customer.test\r\nSubject: Re: Parcel\r\nMessage-ID: {our_id}\r\n\r\n"
        "--R--\r\n"
    ).encode()


async def test_bounce_of_mail_sent_before_the_upgrade_marks_that_outbound_dead(
        start_email, send_mail, email_bus, smtp_sink, nats_server):
    _, ch = await start_email(send={"host": "127.0.0.1", "port": smtp_sink.port, "security": "none"})
    # The previous release sent outbound "out-old" as a reply in the thread of
    # <p1@customer.test> and kept, per Message-ID, a MessageRecord (f3660f2
    # plugins/email/_threading.py: msgspec JSON, omit_defaults, fields in the order
    # t g o c r s a; EmailChannel.deliver wrote t, o, c, r, s) under "mid:<Message-ID>".
    our_id = old_message_id("support", "out-old", "acme.test")
    conversation = ch.ctx.conversation_key("thread:<p1@customer.test>")
    old = (b'{"t":"thread:<p1@customer.test>","o":"out-old","c":"' + conversation.encode()
           + b'","r":["<p1@customer.test>"],"s":"Re: Parcel"}')
    await write_old(nats_server.url, "support", "mid:" + our_id, old, ttl=THREAD_TTL)

    assert (await send_mail(ch.smtp_port, dsn(our_id, "failed", "5.1.1"), mail_from=""))[0] == 250
    dead = await email_bus.wait_status("out-old", "dead")
    assert dead.conversation == conversation and dead.provider_id == our_id
    assert dead.error.permanent is True and dead.error.code == "5.1.1"
    # Recognised as our bounce: not published as a customer message.
    assert await email_bus.inbound() == []


# --- thread map ----------------------------------------------------------------------------

async def test_answer_to_mail_sent_before_the_upgrade_joins_its_conversation(
        start_email, send_mail, email_bus, nats_server):
    _, ch = await start_email()
    # The thread began long ago with <p0@customer.test>; the previous release's reply
    # (out-old) is the only id the customer's answer names, so only its stored record
    # can lead back to the thread (without it the answer would start a thread of its own).
    our_id = old_message_id("support", "out-old", "acme.test")
    conversation = ch.ctx.conversation_key("thread:<p0@customer.test>")
    old = (b'{"t":"thread:<p0@customer.test>","o":"out-old","c":"' + conversation.encode()
           + b'","r":["<p0@customer.test>"],"s":"Re: Parcel"}')
    await write_old(nats_server.url, "support", "mid:" + our_id, old, ttl=THREAD_TTL)

    answer = (f"From: alice@customer.test\r\nTo: support@acme.test\r\nSubject: Re: Parcel\r\n"
              f"Message-ID: <p2@customer.test>\r\nIn-Reply-To: {our_id}\r\nReferences: {our_id}\r\n\r\n"
              f"Still nothing.\r\n").encode()
    assert (await send_mail(ch.smtp_port, answer))[0] == 250
    [msg] = await email_bus.wait_inbound(1)
    assert msg.conversation == conversation and msg.meta["thread_by"] == "in-reply-to"


# --- IMAP ------------------------------------------------------------------------------------

def mail(n: int) -> bytes:
    return (f"From: alice@customer.test\r\nTo: support@acme.test\r\nSubject: Order {n}\r\n"
            f"Message-ID: <up-{n}@customer.test>\r\nDate: Mon, 06 Jan 2025 10:00:00 +0000\r\n\r\n"
            f"message number {n}\r\n").encode()


async def uidvalidity(dovecot) -> int:
    c = await dovecot.client()
    try:
        resp = await c.select("INBOX")
        joined = b"\n".join(bytes(x) for x in resp.lines)
        return int(re.search(rb"\[UIDVALIDITY (\d+)\]", joined).group(1))
    finally:
        await c.logout()


async def test_imap_checkpoint_of_the_previous_release_is_resumed_nothing_reread_nothing_skipped(
        dovecot, start_email, email_bus, nats_server):
    for n in (1, 2, 3):
        await dovecot.append(mail(n))
    # The previous release read mail 1 and 2 (onto a bus this test does not have: re-read,
    # they would be published again) and left its checkpoint (f3660f2
    # plugins/email/_imap.py: Checkpoint(uidvalidity, last_uid), msgspec JSON, no TTL,
    # under "imap-cp-<mailbox>"). A first run creates the buckets, as that release did.
    gw, _ = await start_email()
    await gw.stop()
    old = b'{"uidvalidity":%d,"last_uid":2}' % await uidvalidity(dovecot)
    await write_old(nats_server.url, "support", "imap-cp-INBOX", old)

    _, ch = await start_email(smtp=None, imap=dovecot.imap_config())
    await email_bus.wait_inbound(1)
    await dovecot.append(mail(4))
    await wait_until(lambda: ch.imap.published == 2, timeout=15)
    assert [m.provider_id for m in await email_bus.inbound()] == ["<up-3@customer.test>", "<up-4@customer.test>"]


async def test_imap_lease_held_by_the_previous_release_is_respected_until_it_expires(
        dovecot, start_email, email_bus, nats_server):
    await dovecot.append(mail(1))
    gw, _ = await start_email()
    await gw.stop()
    # A process of the previous release still reads the mailbox (a rolling upgrade, or one
    # killed without releasing): its lease (f3660f2 plugins/email/_imap.py: _Lease(holder,
    # expires), msgspec JSON, under "imap-lease-<mailbox>") runs for 2 more seconds.
    expires = time.time() + 2.0
    old = msgspec.json.encode({"holder": "5f0c9e3a8b7d4c2e9a1b6d3f7e8c0a21", "expires": expires})
    await write_old(nats_server.url, "support", "imap-lease-INBOX", old)

    _, ch = await start_email(smtp=None, imap=dovecot.imap_config(lease_ttl="2s"))
    [msg] = await email_bus.wait_inbound(1)
    # Read once, and only after the old lease ran out (never two readers at once).
    assert msg.received_at >= datetime.fromtimestamp(expires, timezone.utc)
    await wait_until(lambda: ch.imap.published == 1)
    assert len(await email_bus.inbound()) == 1
