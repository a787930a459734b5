"""Keyed rate limits for a channel's sends (part of the channel toolkit).

Providers state their limits as "at most N messages per window" per recipient and per
account (Telegram: one message per second in a chat, 20 per minute in a group, 30 per
second in all). The core's per-channel ``rate_limit`` is one token bucket for the whole
channel; a channel whose provider also counts per chat keeps those counts here.

A sliding window, not a token bucket: a bucket of capacity N refilling N per window
lets through up to 2N in the first window, which is exactly what such a provider punishes.
The counts live in this process's memory: several gateway processes sending into the
same chat each keep their own (the provider's 429 with ``retry_after`` catches the rest)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque


class RateLimit:
    """At most ``count`` events per ``per`` seconds for each key (a chat, a recipient;
    ``""`` for a limit of the whole account), in this process.

    :meth:`delay` says how long until one more is allowed, :meth:`record` counts one,
    :meth:`acquire` waits and counts. To respect several limits at once (a chat's and
    the account's), use :func:`acquire_all`: it counts on every limit at the same moment,
    after waiting for the slowest, so no limit is charged for a send that has to wait for
    another. The least recently used keys beyond ``max_keys`` are forgotten (a flood of
    recipients cannot grow memory without bound)."""

    def __init__(self, count: int, per: float, *, max_keys: int = 10000) -> None:
        if count < 1 or per <= 0:
            raise ValueError("RateLimit needs count >= 1 and per > 0")
        self.count = count
        self.per = per
        self.max_keys = max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def delay(self, key: str = "", *, now: float | None = None) -> float:
        """Seconds until one more event for ``key`` is allowed (0 if it is now)."""
        events = self._events.get(key)
        if events is None or len(events) < self.count:
            return 0.0
        t = time.monotonic() if now is None else now
        return max(0.0, events[0] + self.per - t)

    def record(self, key: str = "", *, now: float | None = None) -> None:
        """Count one event for ``key`` now (whether or not it was allowed)."""
        events = self._events.pop(key, None)
        if events is None:
            events = deque(maxlen=self.count)
        events.append(time.monotonic() if now is None else now)
        self._events[key] = events  # most recently used last
        while len(self._events) > self.max_keys:
            self._events.popitem(last=False)

    async def acquire(self, key: str = "") -> float:
        """Wait until an event for ``key`` is allowed, count it; returns the seconds waited."""
        return await acquire_all((self, key))


async def acquire_all(*limits: tuple[RateLimit, str]) -> float:
    """Wait until every ``(limit, key)`` allows one more event, then count it on each at
    once; returns the seconds waited. Concurrent callers in one event loop never overrun a
    limit: the last check and the counting happen without an ``await`` in between."""
    waited = 0.0
    while True:
        now = time.monotonic()
        wait = max((limit.delay(key, now=now) for limit, key in limits), default=0.0)
        if wait <= 0:
            for limit, key in limits:
                limit.record(key, now=now)
            return waited
        await asyncio.sleep(wait)
        waited += wait
