"""Exponential backoff with jitter, for loops that reconnect for as long as the process runs,
and the one way a background task is stopped."""

from __future__ import annotations

import asyncio
import random
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has ended. What it raised on its way out
    is not the caller's concern: it is stopping it."""
    if task is None:
        return
    task.cancel()  # a no-op for a task that has ended; awaiting it still collects its exception
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass


class Backoff:
    """Delays ``first``, ``2 × first`` … up to ``cap`` seconds, each with ±20 % jitter so that
    many processes cut off together do not all come back in the same instant."""

    def __init__(self, first: float = 0.2, cap: float = 10.0, factor: float = 2.0):
        self.first = first
        self.cap = cap
        self.factor = factor
        self._next = first

    def next(self) -> float:
        """The delay to wait now; the following one is longer, up to ``cap``."""
        delay = self._next
        self._next = min(self._next * self.factor, self.cap)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        """Start again from ``first`` (after the thing being retried worked for a while)."""
        self._next = self.first
