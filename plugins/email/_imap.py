"""The IMAP mailbox reader: IDLE (or polling) and a UIDVALIDITY + UID checkpoint in the
channel's KV state, run as a :class:`gateway.Supervised` task (reconnect with backoff,
health) under a :class:`gateway.Lease` so exactly one gateway process reads a mailbox.

Order of work per message: publish (the core dedups on Message-ID), then move the
checkpoint past its UID, then the optional \\Seen / move. A crash between publish and
checkpoint re-reads that message at the next start, and the dedup drops it; nothing is
ever checkpointed before it is on the bus, so nothing is skipped."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aioimaplib
import msgspec

from gateway import Backoff, ChannelState, GatewayError, KeyValue, Lease, RequestError, Supervised

from ._config import ImapConfig

Ingest = Callable[[bytes, dict[str, Any]], Awaitable[str]]


class ImapError(GatewayError):
    """The IMAP server refused something (login, select, fetch)."""


class Checkpoint(msgspec.Struct):
    """Where reading stopped: every message with a UID up to ``last_uid`` in the mailbox
    generation ``uidvalidity`` is on the bus."""

    uidvalidity: int
    last_uid: int


_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_EXISTS = re.compile(rb"^\*\s+\d+\s+EXISTS\s*$", re.IGNORECASE)


def _check(resp: Any, what: str) -> Any:
    if resp.result != "OK":
        detail = b" ".join(bytes(x) for x in resp.lines[-1:]).decode("utf-8", "replace")[:200]
        raise ImapError(f"{what} failed: {resp.result} {detail}")
    return resp


def fetched_messages(resp: Any) -> list[tuple[int, bytes]]:
    """(uid, raw bytes) from an aioimaplib ``UID FETCH (UID BODY.PEEK[])`` response."""
    out: list[tuple[int, bytes]] = []
    lines = resp.lines
    i = 0
    while i < len(lines):
        line = lines[i]
        # aioimaplib hands literals over as bytearray and response lines as bytes.
        if isinstance(line, bytes) and b" FETCH (" in line and i + 1 < len(lines) and isinstance(lines[i + 1], bytearray):
            m = _FETCH_UID.search(line)
            tail = lines[i + 2] if i + 2 < len(lines) and not isinstance(lines[i + 2], bytearray) else b""
            if m is None:
                m = _FETCH_UID.search(bytes(tail))
            if m is not None:
                out.append((int(m.group(1)), bytes(lines[i + 1])))
            i += 2
            continue
        i += 1
    return out


class ImapPoller:
    """Reads one mailbox into the bus (see the module docstring)."""

    def __init__(self, cfg: ImapConfig, state: KeyValue, ingest: Ingest, log: Any,
                 set_state: Callable[[ChannelState, str | None], None]):
        self.cfg = cfg
        self.state = state
        self.ingest = ingest
        self.log = log
        self.set_state = set_state
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", cfg.mailbox)[:80]
        self.cp_key = f"imap-cp-{safe}"
        self.lease = Lease(state, f"imap-lease-{safe}", cfg.lease_ttl)
        self.supervisor = Supervised(f"imap:{cfg.mailbox}", self._serve, set_state=set_state, log=log,
                                     lease=self.lease, backoff=Backoff(1.0, cfg.backoff_max))
        self.client: aioimaplib.IMAP4 | None = None
        self.published = 0
        self._lost = asyncio.Event()
        self._exists_seen = False
        """Set when the server announced new mail (``* N EXISTS``) in any response."""

    @property
    def holding(self) -> bool:
        """Whether this process holds the mailbox's lease."""
        return self.supervisor.holding

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The background task (cancelling it is a crash: the lease is not released)."""
        return self.supervisor.task

    def start(self) -> None:
        """Run in the background until :meth:`stop`."""
        self.supervisor.start()

    async def stop(self) -> None:
        """Stop reading, log out, and release the lease so a peer takes over at once."""
        await self.supervisor.stop()
        await self._disconnect()

    # --- the loop ------------------------------------------------------------------

    async def _serve(self, task: Supervised) -> None:
        # The supervisor restarts this after any error, and cancels it when the lease is
        # lost: a message published but not checkpointed is re-read, and dedup drops it.
        try:
            await self._session(task)
        finally:
            await self._disconnect()

    async def _session(self, task: Supervised) -> None:
        cfg = self.cfg
        client = await self._connect()
        uidvalidity, uidnext = await self._select(client)
        task.running()
        # IDLE is ended this often even without news: mail announced only in the answer
        # to DONE is then read within this time, not at the next idle_refresh.
        wake_every = self.lease.ttl / 3
        use_idle = cfg.idle and client.has_capability("IDLE")
        await self._catch_up_all(client, uidvalidity, uidnext)
        while True:
            if use_idle:
                await self._idle(client, wake_every)
            else:
                await asyncio.sleep(self.cfg.poll_interval)
            if not use_idle:
                _check(await client.noop(), "NOOP")
            await self._catch_up_all(client, uidvalidity, None)

    async def _catch_up_all(self, client: aioimaplib.IMAP4, uidvalidity: int, uidnext: int | None) -> None:
        """Catch up, and again while the server announced new mail meanwhile.

        Mail delivered just before IDLE ends is announced (``* N EXISTS``) in the response
        of the next command, after that command ran on the older view: the UID SEARCH
        misses it, and without another round it would wait for the next IDLE exit."""
        while True:
            self._exists_seen = False
            await self._catch_up(client, uidvalidity, uidnext)
            uidnext = None
            if not self._exists_seen:
                return

    async def _idle(self, client: aioimaplib.IMAP4, wake_every: float) -> None:
        """IDLE until the server pushes a change or ``wake_every`` passed."""
        lost = self._lost
        idle = await client.idle_start(timeout=self.cfg.idle_refresh)
        try:
            while True:
                push_task = asyncio.ensure_future(client.wait_server_push(timeout=wake_every))
                lost_task = asyncio.ensure_future(lost.wait())
                try:
                    await asyncio.wait({push_task, lost_task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost_task.cancel()
                    if not push_task.done():
                        push_task.cancel()
                if lost.is_set():
                    raise ConnectionError("IMAP connection lost during IDLE")
                try:
                    push = push_task.result()
                except asyncio.TimeoutError:
                    break
                if push == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    break
                lines = [bytes(x) for x in (push if isinstance(push, list) else []) if isinstance(x, (bytes, bytearray))]
                if any(x.startswith(b"BYE") for x in lines):
                    raise ConnectionError("IMAP server closed the connection (BYE)")
                if any(x.endswith((b"EXISTS", b"EXPUNGE")) for x in lines):
                    break
        finally:
            if not lost.is_set():
                client.idle_done()
                # A server that does not answer DONE is treated as gone.
                await asyncio.wait_for(idle, min(5.0, self.cfg.timeout))

    # --- IMAP ----------------------------------------------------------------------

    async def _connect(self) -> aioimaplib.IMAP4:
        cfg = self.cfg
        timeout = cfg.timeout
        if cfg.security == "ssl":
            ctx = ssl.create_default_context()
            if not cfg.verify_certs:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            client: aioimaplib.IMAP4 = aioimaplib.IMAP4_SSL(host=cfg.host, port=cfg.port, timeout=timeout, ssl_context=ctx)
        else:
            client = aioimaplib.IMAP4(host=cfg.host, port=cfg.port, timeout=timeout)
        self.client = client
        self._lost = lost = asyncio.Event()
        client.protocol.conn_lost_cb = lambda exc: lost.set()
        self._watch_exists(client)
        await client.wait_hello_from_server()
        _check(await client.login(cfg.user, cfg.password), "LOGIN")
        return client

    def _watch_exists(self, client: aioimaplib.IMAP4) -> None:
        """Note every ``* N EXISTS`` the server sends, in any response. aioimaplib hands
        untagged data that arrives during an asynchronous command (UID SEARCH, UID FETCH)
        to no one and drops it, so it is observed where every untagged line passes."""
        protocol = client.protocol
        untagged = protocol._untagged_response  # noqa: SLF001 - the one place all untagged lines pass

        def observe(line: bytes) -> Any:
            if _EXISTS.match(line):
                self._exists_seen = True
            return untagged(line)

        protocol._untagged_response = observe  # noqa: SLF001

    async def _select(self, client: aioimaplib.IMAP4) -> tuple[int, int | None]:
        resp = _check(await client.select(self.cfg.mailbox), f"SELECT {self.cfg.mailbox}")
        joined = b"\n".join(bytes(x) for x in resp.lines)
        m = _UIDVALIDITY.search(joined)
        if m is None:
            raise ImapError("server sent no UIDVALIDITY")
        n = _UIDNEXT.search(joined)
        return int(m.group(1)), int(n.group(1)) if n else None

    async def _disconnect(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if client.has_pending_idle():
                client.idle_done()
            await asyncio.wait_for(client.logout(), 3)
        except Exception:  # noqa: BLE001
            pass
        try:
            if client.protocol.transport is not None:
                client.protocol.transport.close()
        except Exception:  # noqa: BLE001
            pass

    async def _load_checkpoint(self) -> Checkpoint | None:
        return await self.state.get_record(self.cp_key, Checkpoint)

    async def _catch_up(self, client: aioimaplib.IMAP4, uidvalidity: int, uidnext: int | None) -> None:
        """Publish every message after the checkpoint, in UID order."""
        cp = await self._load_checkpoint()
        rescan = False
        if cp is None:
            start_uid = 0
            if self.cfg.start == "new" and uidnext is not None:
                start_uid = uidnext - 1
            cp = Checkpoint(uidvalidity=uidvalidity, last_uid=start_uid)
            await self.state.put_record(self.cp_key, cp)
        elif cp.uidvalidity != uidvalidity:
            # The mailbox was recreated or its UIDs renumbered (RFC 3501 2.3.1.1): old UIDs
            # mean nothing now. Re-read all of it; Message-ID dedup drops what is on the bus.
            self.log.warning("imap UIDVALIDITY changed; re-scanning the mailbox", old=cp.uidvalidity, new=uidvalidity)
            cp = Checkpoint(uidvalidity=uidvalidity, last_uid=0)
            rescan = True
            await self.state.put_record(self.cp_key, cp)
        resp = _check(await client.uid_search(f"UID {cp.last_uid + 1}:*", charset=None), "UID SEARCH")
        uids: list[int] = []
        for line in resp.lines[:-1]:
            uids += [int(x) for x in bytes(line).split() if x.isdigit()]
        # "N:*" always matches the highest UID, even one below N.
        uids = sorted(u for u in set(uids) if u > cp.last_uid)
        for i in range(0, len(uids), self.cfg.batch):
            chunk = uids[i:i + self.cfg.batch]
            resp = _check(await client.uid("fetch", ",".join(map(str, chunk)), "(UID BODY.PEEK[])"), "UID FETCH")
            got = dict(fetched_messages(resp))
            for uid in chunk:
                raw = got.get(uid)
                if raw is None:
                    continue  # expunged meanwhile
                meta = {"mailbox": self.cfg.mailbox, "uidvalidity": str(uidvalidity), "uid": str(uid),
                        **({"rescan": True} if rescan else {})}
                try:
                    await self.ingest(raw, meta)
                except RequestError as exc:
                    # Unprocessable mail (MailRejected), or mail the bus refuses (too large
                    # for it) stays in the mailbox; it is skipped, not retried forever
                    # ahead of everything after it.
                    self.log.warning("imap message rejected", uid=uid, reason=exc.reason)
                cp = Checkpoint(uidvalidity=uidvalidity, last_uid=uid)
                await self.state.put_record(self.cp_key, cp)
                self.published += 1
                await self._after(client, uid)

    async def _after(self, client: aioimaplib.IMAP4, uid: int) -> None:
        cfg = self.cfg
        if cfg.after == "seen":
            _check(await client.uid("store", str(uid), "+FLAGS.SILENT (\\Seen)"), "UID STORE")
        elif cfg.after == "move" and cfg.move_to:
            if client.has_capability("MOVE"):
                _check(await client.uid("move", str(uid), cfg.move_to), "UID MOVE")
            else:
                _check(await client.uid("copy", str(uid), cfg.move_to), "UID COPY")
                _check(await client.uid("store", str(uid), "+FLAGS.SILENT (\\Deleted)"), "UID STORE")
                if client.has_capability("UIDPLUS"):
                    _check(await client.uid("expunge", str(uid)), "UID EXPUNGE")
