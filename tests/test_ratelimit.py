"""The one keyed rate limiter (gateway.RateLimiter) every pace uses: a channel's
rate_limit, a QQ group's group_interval, web chat floods, provider limits."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway import RateLimiter


def test_take_allows_a_burst_then_says_how_long_to_wait_without_taking():
    limit = RateLimiter(60, per=60, burst=2)  # one a second, two at once
    assert limit.take("a") == 0.0 and limit.take("a") == 0.0
    wait = limit.take("a")
    assert 0.9 < wait <= 1.0
    assert 0.9 < limit.take("a") <= 1.0  # the refusal took nothing
    assert limit.take("b") == 0.0  # keys are independent


def test_forgotten_keys_are_bounded_and_start_full():
    limit = RateLimiter(1, per=60, burst=1, max_keys=3)
    for key in "abcd":
        assert limit.take(key) == 0.0
    assert len(limit._buckets) == 3
    assert limit.take("a") == 0.0  # "a" was the least recently used: forgotten, full again
    assert limit.take("d") > 0


def test_rate_must_be_positive():
    with pytest.raises(ValueError, match="rate and per must be positive"):
        RateLimiter(0)


async def test_acquire_paces_one_key_in_arrival_order_and_leaves_others_alone():
    limit = RateLimiter(20, burst=1)  # one per 50 ms
    order: list[int] = []

    async def go(i: int) -> None:
        await limit.acquire("group")
        order.append(i)

    t0 = time.monotonic()
    await asyncio.gather(*(go(i) for i in range(5)))
    paced = time.monotonic() - t0
    t1 = time.monotonic()
    await limit.acquire("other")
    assert order == [0, 1, 2, 3, 4]
    assert paced >= 0.19  # four waits of 50 ms after the first token
    assert time.monotonic() - t1 < 0.05
    assert not limit._waiting  # nobody waits: nothing kept per key


async def test_a_cancelled_waiter_gives_its_turn_back():
    limit = RateLimiter(1, per=10, burst=1)
    await limit.acquire("k")
    waiter = asyncio.create_task(limit.acquire("k"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not limit._waiting
