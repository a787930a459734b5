"""IMAP mailbox → bus against a real, throw-away Dovecot: IDLE, polling, the UID checkpoint
across restarts, UIDVALIDITY changes, the single-poller lease and post-publish actions."""

from __future__ import annotations

import asyncio
import time


def mail(n: int, subject: str = "Order", sender: str = "alice@customer.test") -> bytes:
    return (f"From: {sender}\r\nTo: support@acme.test\r\nSubject: {subject} {n}\r\n"
            f"Message-ID: <imap-{n}@customer.test>\r\nDate: Mon, 06 Jan 2025 10:00:00 +0000\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\nmessage number {n}\r\n").encode()


async def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def ids(msgs) -> list[str]:
    return [m.provider_id for m in msgs]


async def test_mail_appended_to_the_mailbox_is_published_through_idle(dovecot, start_email, email_bus):
    _, ch = await start_email(smtp=None, imap=dovecot.imap_config(poll_interval="60s"))
    await wait_for(lambda: ch.imap.holding and ch.imap.client is not None)
    await asyncio.sleep(0.5)
    await dovecot.append(mail(1))
    t0 = time.monotonic()
    msgs = await email_bus.wait_inbound(1, timeout=10)
    # IDLE pushes within about a second; polling every 60 s would not have.
    assert ids(msgs) == ["<imap-1@customer.test>"] and time.monotonic() - t0 < 5
    m = msgs[0]
    assert m.meta["transport"] == "imap" and m.meta["imap"]["uid"] == "1" and m.meta["imap"]["mailbox"] == "INBOX"
    assert m.parts[0].text == "message number 1"


async def test_restart_neither_duplicates_nor_skips_mail_including_mail_appended_while_stopped(
        dovecot, start_email, email_bus):
    for n in (1, 2, 3):
        await dovecot.append(mail(n))  # there before the gateway ever ran
    gw1, ch1 = await start_email(smtp=None, imap=dovecot.imap_config())
    await email_bus.wait_inbound(3)
    await dovecot.append(mail(4))
    await wait_for(lambda: ch1.imap.published == 4)
    await gw1.stop()
    for n in (5, 6):
        await dovecot.append(mail(n))  # arrives while no gateway runs
    gw2, ch2 = await start_email(smtp=None, imap=dovecot.imap_config())
    await email_bus.wait_inbound(6)
    await dovecot.append(mail(7))
    msgs = await email_bus.wait_inbound(7)
    await asyncio.sleep(1.0)  # give a wrong implementation time to publish duplicates
    msgs = await email_bus.inbound()
    assert ids(msgs) == [f"<imap-{n}@customer.test>" for n in range(1, 8)]
    # The second gateway started at the checkpoint: it read only 5, 6 and 7, not 1-4 again.
    assert ch2.imap.published == 3


async def test_polling_fallback_without_idle(dovecot, start_email, email_bus):
    _, ch = await start_email(smtp=None, imap=dovecot.imap_config(idle=False, poll_interval="500ms"))
    await wait_for(lambda: ch.imap.holding)
    await dovecot.append(mail(1))
    await dovecot.append(mail(2))
    assert ids(await email_bus.wait_inbound(2)) == ["<imap-1@customer.test>", "<imap-2@customer.test>"]


async def test_start_new_skips_mail_that_was_there_before_the_first_start(dovecot, start_email, email_bus):
    await dovecot.append(mail(1))
    _, ch = await start_email(smtp=None, imap=dovecot.imap_config(start="new"))
    await wait_for(lambda: ch.imap.holding and ch.imap.client is not None)
    await asyncio.sleep(0.5)
    await dovecot.append(mail(2))
    assert ids(await email_bus.wait_inbound(1)) == ["<imap-2@customer.test>"]


async def test_uidvalidity_change_rescans_the_mailbox_without_duplicates(dovecot, start_email, email_bus):
    c = await dovecot.client()
    assert (await c.create("Support")).result == "OK"
    await c.logout()
    for n in (1, 2):
        await dovecot.append(mail(n), mailbox="Support")
    gw1, ch1 = await start_email(smtp=None, imap=dovecot.imap_config(mailbox="Support"))
    await email_bus.wait_inbound(2)
    await gw1.stop()
    # The mailbox is recreated (a new UIDVALIDITY: UIDs restart at 1) with the old mail
    # and a new one. UIDVALIDITY is Dovecot's creation time in seconds.
    await asyncio.sleep(1.1)
    c = await dovecot.client()
    assert (await c.delete("Support")).result == "OK"
    assert (await c.create("Support")).result == "OK"
    await c.logout()
    for n in (1, 2, 3):
        await dovecot.append(mail(n), mailbox="Support")
    _, ch2 = await start_email(smtp=None, imap=dovecot.imap_config(mailbox="Support"))
    await wait_for(lambda: ch2.imap.published == 3)
    msgs = await email_bus.inbound()
    assert ids(msgs) == [f"<imap-{n}@customer.test>" for n in (1, 2, 3)]
    assert msgs[-1].meta["imap"]["rescan"] is True


async def test_exactly_one_gateway_polls_a_mailbox_and_another_takes_over_when_it_dies(
        dovecot, start_email, email_bus):
    gw_a, a = await start_email(smtp=None, imap=dovecot.imap_config(lease_ttl="2s"))
    gw_b, b = await start_email(smtp=None, imap=dovecot.imap_config(lease_ttl="2s"))
    await wait_for(lambda: a.imap.holding or b.imap.holding)
    await asyncio.sleep(1.0)
    assert a.imap.holding != b.imap.holding
    holder, other = (a, b) if a.imap.holding else (b, a)
    for n in (1, 2, 3):
        await dovecot.append(mail(n))
    await email_bus.wait_inbound(3)
    assert holder.imap.published == 3 and other.imap.published == 0
    # The holder dies: its poller stops without releasing the lease.
    holder.imap.task.cancel()
    await dovecot.append(mail(4))
    t0 = time.monotonic()
    await wait_for(lambda: other.imap.published == 1, timeout=15)
    assert time.monotonic() - t0 < 6  # lease of 2 s: taken over within seconds
    assert ids(await email_bus.inbound()) == [f"<imap-{n}@customer.test>" for n in (1, 2, 3, 4)]


async def test_after_publishing_mail_is_flagged_seen_or_moved(dovecot, start_email, email_bus):
    c = await dovecot.client()
    assert (await c.create("Done")).result == "OK"
    await c.logout()
    await dovecot.append(mail(1))
    _, ch = await start_email(smtp=None, imap=dovecot.imap_config(after="move", move_to="Done"))
    await wait_for(lambda: ch.imap.published == 1)
    c = await dovecot.client()
    inbox = await c.status("INBOX", "(MESSAGES)")
    done = await c.status("Done", "(MESSAGES)")
    await c.logout()
    assert b"MESSAGES 0" in inbox.lines[0] and b"MESSAGES 1" in done.lines[0]


async def test_imap_mail_is_flagged_seen_when_configured(dovecot, start_email, email_bus):
    await dovecot.append(mail(1))
    _, ch = await start_email(smtp=None, imap=dovecot.imap_config(after="seen"))
    await wait_for(lambda: ch.imap.published == 1)
    c = await dovecot.client()
    await c.select("INBOX")
    r = await c.uid("fetch", "1", "(FLAGS)")
    await c.logout()
    assert b"\\Seen" in r.lines[0]


async def test_reconnects_after_the_imap_server_restarts(dovecot, start_email, email_bus):
    _, ch = await start_email(smtp=None, imap=dovecot.imap_config())
    await wait_for(lambda: ch.imap.client is not None)
    dovecot.kill()
    await asyncio.sleep(1.0)
    dovecot.restart()
    await dovecot.append(mail(1))
    assert ids(await email_bus.wait_inbound(1, timeout=20)) == ["<imap-1@customer.test>"]


class DoneRace:
    """A TCP relay between the gateway and Dovecot (bytes pass unchanged) that, once armed,
    holds the client's next ``DONE`` until ``before_done()`` has run: mail delivered in
    that moment reaches Dovecot after its IDLE check and before IDLE ends, the window
    where Dovecot reports ``* N EXISTS`` in the response of the next command instead."""

    def __init__(self, upstream_port: int, before_done) -> None:
        self.upstream_port = upstream_port
        self.before_done = before_done
        self.armed = asyncio.Event()
        self.fired = asyncio.Event()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.server is not None:
            self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for t in (self._pipe(up_r, writer, False), self._pipe(reader, up_w, True)):
            task = asyncio.create_task(t)
            self.tasks.add(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
        try:
            while line := await src.readline():
                if from_client and line.strip().upper() == b"DONE" and self.armed.is_set() and not self.fired.is_set():
                    await self.before_done()
                    self.fired.set()
                dst.write(line)
                await dst.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            dst.close()


async def test_mail_reported_by_exists_in_a_command_response_after_idle_is_read_at_once(dovecot, start_email, email_bus):
    # IDLE ends every lease_ttl / 3 = 10 s here: mail left unread after an IDLE would wait
    # that long for the next round.
    race = DoneRace(dovecot.port, lambda: dovecot.append(mail(2)))
    await race.start()
    try:
        _, ch = await start_email(smtp=None, imap=dovecot.imap_config(port=race.port, lease_ttl="30s"))
        await wait_for(lambda: ch.imap.holding and ch.imap.client is not None and ch.imap.client.has_pending_idle())
        race.armed.set()
        # Mail 1 arrives during IDLE: Dovecot pushes it, the gateway leaves IDLE (DONE), and
        # mail 2 is delivered just before that DONE reaches Dovecot.
        await dovecot.append(mail(1))
        await asyncio.wait_for(race.fired.wait(), 10)
        t0 = time.monotonic()
        msgs = await email_bus.wait_inbound(2, timeout=12)
        took = time.monotonic() - t0
        assert ids(msgs) == ["<imap-1@customer.test>", "<imap-2@customer.test>"]
        assert took < 4, f"mail 2 waited {took:.1f} s for the next IDLE round"
    finally:
        await race.stop()


async def test_mail_the_bus_refuses_is_skipped_and_the_next_one_is_published(dovecot, gateway_factory, email_bus):
    # Over the bus's message size: SMTP answers 552; from a mailbox nobody can be told, so
    # the mail stays there, is logged and skipped, not retried forever ahead of the rest.
    from structlog.testing import capture_logs

    big = mail(1).replace(b"message number 1", b"x" * 200_000)
    await dovecot.append(big)
    await dovecot.append(mail(2))
    with capture_logs() as logs:
        gw = await gateway_factory({"support": {"type": "email", "address": "support@acme.test",
                                                "imap": dovecot.imap_config()}}, bus={"max_message_size": 65536})
        msgs = await email_bus.wait_inbound(1, timeout=15)
    assert ids(msgs) == ["<imap-2@customer.test>"]
    assert any(e["event"] == "imap message rejected" and e["uid"] == 1 for e in logs), logs
    assert gw.channels["support"].channel.imap.holding
