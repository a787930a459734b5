"""Fixtures of the email channel tests: a throw-away unprivileged Dovecot (IMAP), an
aiosmtpd sink standing in for the submission server, and helpers to talk to the bus."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioimaplib
import aiosmtplib
import nats
import pytest
import pytest_asyncio
from aiosmtpd.smtp import SMTP as SMTPProtocol

from gateway import Message, Outbound
from gateway.wire import encode, message_decoder, status_decoder
from gateway.testing import free_port, stream_messages

_DOVECOT_CONF = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
listen = 127.0.0.1
protocols = imap
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
mail_uid = dovecot
mail_gid = dovecot
first_valid_uid = 1
mail_location = maildir:{d}/mail/%u
mail_max_userip_connections = 100
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={d}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


class Dovecot:
    """One Dovecot instance: ``await append(raw)`` adds mail over IMAP APPEND."""

    user = "support"
    password = "secret-pw"

    def __init__(self) -> None:
        # Short path under the system temp dir: every parent must be enterable by the
        # dovecot user and Unix socket paths are limited to about 100 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="dv", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.conf = self.dir / "dovecot.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("dovecot") or ("/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None)
        if binary is None:
            pytest.fail("dovecot is not installed: the IMAP tests need a real IMAP server "
                        "(apt-get install -y dovecot-imapd; .ci/run installs it)", pytrace=False)
        self.binary = binary
        (self.dir / "mail").mkdir()
        shutil.chown(self.dir / "mail", "dovecot", "dovecot")
        (self.dir / "users").write_text(f"{self.user}:{{PLAIN}}{self.password}::::::\n")
        self.conf.write_text(_DOVECOT_CONF.format(d=self.dir, port=self.port))
        self.restart()

    def restart(self) -> None:
        """Start the master process (again) and wait until it listens."""
        # Output to a file: Dovecot's children inherit stdout/stderr.
        with open(self.dir / "stdout.log", "ab") as out:
            subprocess.run([self.binary, "-c", str(self.conf)], stdout=out, stderr=out, check=True, timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        log = (self.dir / "dovecot.log").read_text(errors="replace") if (self.dir / "dovecot.log").exists() else ""
        pytest.fail(f"dovecot did not listen on port {self.port}:\n{log[-2000:]}", pytrace=False)

    def kill(self) -> None:
        """SIGTERM the master and wait until it is gone (the mail stays)."""
        pidfile = self.dir / "run" / "master.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.05)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """Stop and delete everything."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def client(self) -> aioimaplib.IMAP4:
        """A logged-in IMAP client (the test's own, not the gateway's)."""
        c = aioimaplib.IMAP4(host="127.0.0.1", port=self.port, timeout=10)
        await c.wait_hello_from_server()
        r = await c.login(self.user, self.password)
        assert r.result == "OK", r
        return c

    async def append(self, raw: bytes, mailbox: str = "INBOX") -> None:
        """IMAP APPEND ``raw`` to ``mailbox``."""
        c = await self.client()
        try:
            r = await c.append(raw, mailbox=mailbox)
            assert r.result == "OK", r
        finally:
            await c.logout()

    def imap_config(self, **overrides: Any) -> dict[str, Any]:
        """The ``imap`` section of a channel reading this server."""
        return {"host": "127.0.0.1", "port": self.port, "security": "none", "user": self.user,
                "password": self.password, "poll_interval": "1s", "lease_ttl": "3s", **overrides}


@pytest.fixture
def dovecot() -> Any:
    """A fresh Dovecot for this test (fails, never skips, when Dovecot is missing)."""
    server = Dovecot()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class SmtpSink:
    """An aiosmtpd server that keeps every message it is given (our submission server)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.arrived = asyncio.Condition()
        self.reply: str | None = None
        """Scripted answer to DATA (e.g. ``"451 4.7.1 try later"``); None accepts."""
        self.next_replies: deque[str] = deque()
        """One-shot answers to the next DATA commands, before ``reply`` applies."""
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.ehlos = 0
        """EHLO commands seen: one per SMTP session."""

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]) -> list[str]:
        self.ehlos += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.next_replies:
            return self.next_replies.popleft()
        if self.reply is not None:
            return self.reply
        async with self.arrived:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content)))
            self.arrived.notify_all()
        return "250 OK"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: SMTPProtocol(self, loop=loop, hostname="sink.test"),
                                               host="127.0.0.1", port=0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def wait(self, count: int, timeout: float = 10) -> list[tuple[str, list[str], bytes]]:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.messages) >= count), timeout)
        return list(self.messages)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


@pytest_asyncio.fixture
async def smtp_sink() -> AsyncIterator[SmtpSink]:
    """A running :class:`SmtpSink`."""
    sink = SmtpSink()
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


class Bus:
    """Reads what the gateway published and publishes what a backend would."""

    def __init__(self, url: str, channel: str):
        self.url = url
        self.channel = channel

    async def inbound(self) -> list[Message]:
        msgs = await stream_messages(self.url, "GW_IN", f"gw.in.email.{self.channel}")
        return [message_decoder.decode(m.data) for m in msgs]

    async def wait_inbound(self, count: int, timeout: float = 15) -> list[Message]:
        deadline = time.monotonic() + timeout
        while True:
            got = await self.inbound()
            if len(got) >= count or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.1)

    async def statuses(self) -> list[Any]:
        try:
            msgs = await stream_messages(self.url, "GW_STATUS", f"gw.status.email.{self.channel}")
        except nats.js.errors.NotFoundError:
            return []
        return [status_decoder.decode(m.data) for m in msgs]

    async def wait_status(self, outbound_id: str, state: str, timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in await self.statuses():
                if s.outbound_id == outbound_id and s.state == state:
                    return s
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {state!r} status for {outbound_id}: {[(s.outbound_id, s.state) for s in await self.statuses()]}")

    async def send(self, outbound: Outbound) -> None:
        """Publish an outbound like a backend: raw nats-py, Nats-Msg-Id = outbound id."""
        nc = await nats.connect(self.url)
        try:
            js = nc.jetstream()
            await js.publish(f"gw.out.email.{self.channel}", encode(outbound), headers={"Nats-Msg-Id": outbound.id})
        finally:
            await nc.close()


@pytest.fixture
def email_bus(nats_server: Any) -> Bus:
    """:class:`Bus` for channel ``support`` on the test's nats-server."""
    return Bus(nats_server.url, "support")


def channel_config(**overrides: Any) -> dict[str, Any]:
    """A ``support`` email channel: SMTP listener on a free port for ``acme.test``."""
    cfg: dict[str, Any] = {"type": "email", "address": "support@acme.test", "name": "ACME Support",
                           "smtp": {"port": 0, "domains": ["acme.test"]}}
    for k, v in overrides.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


@pytest.fixture
def start_email(gateway_factory: Any) -> Any:
    """``gw, channel = await start_email(imap=..., send=...)``: a gateway running channel
    ``support`` (type email) on the test's nats-server."""

    async def start(**overrides: Any) -> tuple[Any, Any]:
        gw = await gateway_factory({"support": channel_config(**overrides)})
        return gw, gw.channels["support"].channel

    return start


async def smtp_send(port: int, raw: bytes, *, mail_from: str = "alice@customer.test",
                    rcpt: str = "support@acme.test") -> tuple[int, str]:
    """Send ``raw`` with a real SMTP client; returns the final (code, text) of the
    transaction (250 on success, the refusal otherwise)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
    await client.connect()
    try:
        await client.sendmail(mail_from, [rcpt], raw)
        return 250, "OK"
    except aiosmtplib.SMTPRecipientsRefused as exc:
        r = exc.recipients[0]
        return r.code, r.message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()


@pytest.fixture
def send_mail() -> Any:
    """The :func:`smtp_send` helper."""
    return smtp_send
