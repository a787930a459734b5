"""One keyed rate limiter for every pace the gateway keeps: a channel's sends per second
(``rate_limit``), a QQ group's one send per ``group_interval``, a web chat visitor's
messages per minute, a provider's per-chat and global limits."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict


class RateLimiter:
    """Token buckets by key, in this process's memory: ``rate`` tokens per ``per`` seconds,
    bursts of up to ``burst`` (default: one second's worth of ``rate``, at least 1).

    :meth:`take` answers at once (refuse a flood); :meth:`acquire` waits for a token (pace
    sends), first come first served per key. The least recently used keys are forgotten
    beyond ``max_keys``, so a flood of keys (addresses, chats) cannot grow it without
    bound; a forgotten key starts with a full bucket."""

    def __init__(self, rate: float, *, per: float = 1.0, burst: float | None = None, max_keys: int = 10000) -> None:
        if rate <= 0 or per <= 0:
            raise ValueError(f"RateLimiter: rate and per must be positive, got {rate} per {per}s")
        self.rate = rate / per
        """Tokens per second."""
        self.burst = max(1.0, float(burst) if burst is not None else self.rate)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._waiting: dict[str, _Turns] = {}

    def take(self, key: str = "") -> float:
        """0.0 when a token was taken; else the seconds until one is available (nothing is
        taken then)."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    async def acquire(self, key: str = "") -> None:
        """Wait until a token of ``key`` is taken. Callers of one key go in arrival order."""
        entry = self._waiting.get(key)
        if entry is None:
            entry = self._waiting[key] = _Turns()
        entry.users += 1
        try:
            async with entry.lock:
                while (wait := self.take(key)) > 0:
                    await asyncio.sleep(wait)
        finally:
            entry.users -= 1
            if not entry.users:
                del self._waiting[key]


class _Turns:
    """The callers of one key waiting for a token, in order (dropped when none is left)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
