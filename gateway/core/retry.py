"""The one reconnect loop (:class:`Supervised`): exponential backoff with jitter, for work
that must go on for as long as the process runs (the bus connection, the embedded server,
pollers, outgoing WebSockets), and the one way a background task is stopped."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, Protocol


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


class Lease(Protocol):
    """What :class:`Supervised` needs of a lease (the toolkit's ``Lease``)."""

    ttl: float

    async def acquire(self) -> bool: ...

    async def release(self) -> None: ...


class _LeaseLost(Exception):
    pass


class Supervised:
    """A background task that runs for as long as the channel does: the one reconnect loop
    of the toolkit (pollers, outgoing WebSockets, sync loops). ``run`` is called again
    whenever it fails or returns (a connection closed), after a :class:`Backoff` delay,
    and only while ``lease`` (if given) is held, so one gateway process does the work.

    Health goes to ``set_state`` (``/healthz``): ``degraded`` with the cause (``describe``
    turns an exception into text without secrets) while it retries; ``run`` calls
    :meth:`running` once it works. The backoff starts again from its first delay once a
    run that worked lasted ``stable_after`` seconds (0: as soon as it works), so a
    connection that opens and drops at once does not reconnect in a tight loop. One
    warning per outage; the retries that follow are logged at debug."""

    def __init__(self, name: str, run: Callable[[Supervised], Coroutine[Any, Any, None]], *,
                 set_state: Callable[[Literal["running", "degraded"], str | None], None], log: Any,
                 lease: Lease | None = None, backoff: Backoff | None = None, stable_after: float = 0.0,
                 describe: Callable[[BaseException], str] | None = None):
        self.name = name
        self.run = run
        self.set_state = set_state
        self.log = log
        self.lease = lease
        self.backoff = backoff or Backoff(1.0, 60.0)
        self.stable_after = stable_after
        self.describe = describe or (lambda exc: f"{type(exc).__name__}: {exc}")
        self.task: asyncio.Task[None] | None = None
        self.holding = False
        self.up = False
        """True between :meth:`running` and the end of that run."""
        self.last_error: str | None = None
        """Why the last run ended (no secrets)."""
        self._up_since = 0.0

    def start(self) -> None:
        """Start in the background until :meth:`stop` (again after a stop)."""
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._loop(), name=self.name)

    def running(self) -> None:
        """Called by ``run`` once it works (connected, first poll done)."""
        self.up = True
        self._up_since = time.monotonic()
        if self.stable_after <= 0:
            self.backoff.reset()
        self.set_state("running", None)

    async def hold(self) -> bool:
        """Take or renew the lease (True without one). A KV error counts as not held: we
        cannot know, so we do not work."""
        if self.lease is None:
            return True
        try:
            self.holding = await self.lease.acquire()
        except Exception as exc:  # noqa: BLE001
            self.log.warning("lease check failed", task=self.name, error=f"{type(exc).__name__}: {exc}")
            self.holding = False
        return self.holding

    async def _loop(self) -> None:
        first = True
        while True:
            if not await self.hold():
                assert self.lease is not None
                await asyncio.sleep(self.lease.ttl / 3)
                continue
            self.up = False
            try:
                await self._run_holding()
                reason = "ended"
            except asyncio.CancelledError:
                raise
            except _LeaseLost:
                self.log.warning("lease lost; another process does the work", task=self.name)
                continue
            except Exception as exc:  # noqa: BLE001 - whatever failed, the task goes on
                reason = self.describe(exc)
            was_up, self.up = self.up, False
            self.last_error = reason
            if was_up and self.stable_after > 0 and time.monotonic() - self._up_since >= self.stable_after:
                self.backoff.reset()
            delay = self.backoff.next()
            self.set_state("degraded", f"{self.name}: {reason}; retrying in {delay:.1f}s")
            log = self.log.warning if was_up or first else self.log.debug
            log("background task down; restarting", task=self.name, error=reason, retry_in=round(delay, 2))
            first = False
            await asyncio.sleep(delay)

    async def _run_holding(self) -> None:
        """``run``, with the lease renewed every third of its TTL meanwhile; when it cannot
        be renewed, ``run`` is cancelled: a peer may hold it by now."""
        if self.lease is None:
            await self.run(self)
            return
        work: asyncio.Task[None] = asyncio.create_task(self.run(self), name=self.name + ":run")
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=self.lease.ttl / 3)
                if done:
                    work.result()
                    return
                if not await self.hold():
                    raise _LeaseLost()
        finally:
            if not work.done():
                await cancel_and_wait(work)

    async def stop(self) -> None:
        """Cancel the task and release the lease so a peer takes over at once."""
        task, self.task = self.task, None
        if task is not None:
            await cancel_and_wait(task)
        self.up = False
        if self.lease is not None and self.holding:
            try:
                await asyncio.wait_for(self.lease.release(), 5)
            except Exception:  # noqa: BLE001 - it expires by itself
                pass
            self.holding = False
