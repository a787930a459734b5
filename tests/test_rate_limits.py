"""The toolkit's RateLimit: a sliding window per key, several limits acquired together."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway import RateLimit, acquire_all


def test_a_window_allows_count_events_then_says_how_long_to_wait():
    limit = RateLimit(3, 10.0)
    for t in (0.0, 1.0, 2.0):
        assert limit.delay("a", now=t) == 0
        limit.record("a", now=t)
    assert limit.delay("a", now=2.5) == pytest.approx(7.5)  # the first of the three leaves at 10
    assert limit.delay("b", now=2.5) == 0  # another key has its own window
    assert limit.delay("a", now=10.0) == 0
    limit.record("a", now=10.0)
    assert limit.delay("a", now=10.5) == pytest.approx(0.5)  # now the one at 1.0 is the oldest


def test_keys_beyond_max_keys_are_forgotten_least_recently_used_first():
    limit = RateLimit(1, 60.0, max_keys=2)
    for key in ("a", "b", "c"):
        limit.record(key, now=0.0)
    assert limit.delay("a", now=1.0) == 0 and limit.delay("c", now=1.0) > 0


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError):
        RateLimit(0, 1.0)
    with pytest.raises(ValueError):
        RateLimit(1, 0)


async def test_concurrent_callers_never_overrun_a_limit_and_wait_for_the_slowest():
    chat, everyone = RateLimit(1, 0.2), RateLimit(5, 0.2)
    stamps: list[float] = []

    async def send() -> None:
        await acquire_all((chat, "x"), (everyone, ""))
        stamps.append(time.monotonic())

    await asyncio.gather(*(send() for _ in range(4)))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) == 4 and min(gaps) >= 0.19, gaps


async def test_a_send_waiting_for_one_limit_is_not_counted_on_the_others_meanwhile():
    slow, fast = RateLimit(1, 0.3), RateLimit(1, 0.3)
    slow.record("k")
    waited = await acquire_all((slow, "k"), (fast, ""))
    assert waited >= 0.29
    # counted on fast only when it went: fast's window starts now, not when the wait began
    assert fast.delay("") == pytest.approx(0.3, abs=0.05)


async def test_acquire_counts_one_event():
    limit = RateLimit(2, 5.0)
    assert await limit.acquire("k") == 0 and await limit.acquire("k") == 0
    assert limit.delay("k") > 4
