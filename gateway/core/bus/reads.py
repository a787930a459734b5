"""Pipelined reads of the bus's buckets: the last message on a subject, as a future.

nats-py's ``KeyValue.get`` encodes a JSON request, waits for the answer with
``asyncio.wait_for`` and turns it into dataclasses: about 55 µs of CPU per read on the
benchmark machine, and a round trip that cannot overlap another one without a task. A
direct get of the last message on a subject (``$JS.API.DIRECT.GET.<stream>.<subject>``,
nats-server 2.10 or later, on streams with ``allow_direct``, which every bucket of the
gateway has) has no request body, and its answer is the stored message itself or a
``404`` status. Sent here with a reply subject under one wildcard subscription, a read is a
future: several leave in one socket write and are awaited together, at about 18 µs of CPU
each."""

from __future__ import annotations

import asyncio
import base64
import re
from typing import Any

import msgspec

from ..errors import BusUnavailable

_GONE = frozenset({"DEL", "PURGE"})
_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


def valid_key(key: str) -> bool:
    """Whether ``key`` can be a KV key (nats-py's rule). A direct get puts the key into a
    subject, so anything else (a space, a wildcard) must never get that far: a subject with
    a space would be a protocol error that closes the connection."""
    return bool(key) and key[0] != "." and key[-1] != "." and _KEY.match(key) is not None


class Entry:
    """A stored value and its stream sequence (the KV revision)."""

    __slots__ = ("value", "revision")

    def __init__(self, value: bytes, revision: int):
        self.value = value
        self.revision = revision


class Reads:
    """Direct gets over one connection. :meth:`start` once per connection; nats-py
    renews the subscription after a reconnect by itself."""

    def __init__(self, nc: Any):
        self.nc = nc
        self._prefix = nc.new_inbox()
        self._cut = len(self._prefix) + 1
        self._waiting: dict[str, asyncio.Future[Entry | None]] = {}
        self._leader: set[str] = set()
        self._n = 0

    async def start(self) -> None:
        await self.nc.subscribe(self._prefix + ".*", cb=self._answer)

    async def send(self, stream: str, subject: str, *, leader: bool = False) -> asyncio.Future[Entry | None]:
        """Ask for the last message on ``subject`` of ``stream``; the future of its
        :class:`Entry`, None when there is none (never written, expired, deleted or
        purged), :class:`BusUnavailable` when the server could not answer. Await it within
        a deadline of your own: the future is forgotten when it is cancelled.

        A direct get may be answered by any replica of a clustered stream, and a replica
        that is catching up (a server just restarted) answers from what it has. With
        ``leader=True`` the stream's leader answers (``STREAM.MSG.GET``): for reads that
        decide whether to send again, such as a receipt."""
        self._n += 1
        token = str(self._n)
        fut: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        fut.add_done_callback(lambda _: self._waiting.pop(token, None))
        if leader:
            self._leader.add(token)
            fut.add_done_callback(lambda _: self._leader.discard(token))
            await self.nc.publish(f"$JS.API.STREAM.MSG.GET.{stream}", _last_by_subject(subject),
                                  reply=f"{self._prefix}.{token}")
        else:
            await self.nc.publish(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", reply=f"{self._prefix}.{token}")
        return fut

    async def _answer(self, msg: Any) -> None:
        token = msg.subject[self._cut:]
        fut = self._waiting.get(token)
        if fut is None or fut.done():
            return
        if token in self._leader:
            _leader_answer(fut, msg.data)
            return
        headers = msg.headers
        if headers:
            status = headers.get("Status")
            if status is not None:
                if status == "404":
                    fut.set_result(None)
                else:  # 408 (bad request), 503 (no responders: the stream has no leader now)
                    fut.set_exception(BusUnavailable(f"direct get answered status {status}"))
                return
            if headers.get("KV-Operation") in _GONE or "Nats-Marker-Reason" in headers:
                fut.set_result(None)  # a delete, purge or TTL marker: nothing is stored
                return
            seq = headers.get("Nats-Sequence")
            fut.set_result(Entry(msg.data, int(seq) if seq and seq.isdigit() else 0))
            return
        fut.set_result(Entry(msg.data, 0))


class _Stored(msgspec.Struct):
    seq: int = 0
    data: str = ""
    hdrs: str = ""


class _Error(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


_NO_MESSAGE = 10037
"""JetStream's "no message found" (a missing stream is 10059, also with code 404)."""


class _MsgGet(msgspec.Struct):
    message: _Stored | None = None
    error: _Error | None = None


_msg_get_decoder = msgspec.json.Decoder(_MsgGet)
_encode = msgspec.json.encode


def _last_by_subject(subject: str) -> bytes:
    return _encode({"last_by_subj": subject})


def _leader_answer(fut: asyncio.Future[Entry | None], data: bytes) -> None:
    try:
        answer = _msg_get_decoder.decode(data)
    except msgspec.DecodeError:
        fut.set_exception(BusUnavailable("unreadable answer to a message get"))
        return
    if answer.error is not None:
        if answer.error.err_code == _NO_MESSAGE:
            fut.set_result(None)
        else:
            fut.set_exception(BusUnavailable(f"message get answered {answer.error.code}: {answer.error.description}"))
        return
    stored = answer.message
    if stored is None:
        fut.set_result(None)
        return
    if stored.hdrs:
        hdrs = base64.b64decode(stored.hdrs)
        if b"KV-Operation: DEL" in hdrs or b"KV-Operation: PURGE" in hdrs or b"Nats-Marker-Reason:" in hdrs:
            fut.set_result(None)
            return
    fut.set_result(Entry(base64.b64decode(stored.data) if stored.data else b"", stored.seq))

