"""Adaptive concurrency per provider endpoint: AIMD over a dynamic semaphore
(docs/agent-runtime.md, "Rate limits").

Each success grows the limit by `increase / limit` (about `increase` per window of `limit`
calls); each throttle (429/529) multiplies it by `decrease` and makes new slots wait
`retry_after`. As in TCP, one congestion event decreases the limit once: a throttle from a
call that was already in flight when the limit last decreased (same thread or asyncio task,
slot started before that decrease) pauses new slots but does not cut the limit again.

One limiter serves threads (`slot`) and coroutines (`aslot`) at once, on any number of event
loops: the count lives under one lock, and a coroutine waiting for a slot waits on a future
of its own loop, which a release on any thread resolves (`call_soon_threadsafe`), so a full
limiter never blocks an event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager


class AdaptiveLimiter:
    def __init__(self, initial: float = 8, minimum: float = 1, maximum: float = 64,
                 increase: float = 1.0, decrease: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        if not 0 < decrease < 1 or increase <= 0:
            raise ValueError("need 0 < decrease < 1 and increase > 0")
        self.minimum, self.maximum = float(minimum), float(maximum)
        self.increase, self.decrease = increase, decrease
        self._clock = clock
        self._cond = threading.Condition()
        self._limit = float(min(max(initial, minimum), maximum))
        self._in_flight = 0
        self._paused_until = 0.0
        self._last_decrease = float("-inf")
        # when the caller's current slot started: per thread, and per asyncio task
        self._started: contextvars.ContextVar[float | None] = contextvars.ContextVar(
            f"limiter-{id(self)}-started", default=None)
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self.history: list[tuple[float, float]] = [(clock(), self._limit)]

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of `int(limit)` slots; waits while full or paused by a throttle."""
        with self._cond:
            while (wait := self._wait()) is not None:
                self._cond.wait(wait or None)
            self._take()
        try:
            yield
        finally:
            self._release()

    @asynccontextmanager
    async def aslot(self) -> AsyncIterator[None]:
        """`slot` for a coroutine: waits without blocking its event loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                wait = self._wait()
                if wait is None:
                    self._take()
                    break
                woken = loop.create_future()
                self._waiters.append((loop, woken))
            try:
                await asyncio.wait_for(woken, wait or None)
            except TimeoutError:
                pass  # the pause is over: look again
            except asyncio.CancelledError:
                with self._cond:
                    self._wake(1)  # a wake-up this waiter may have taken goes on to the next
                raise
        try:
            yield
        finally:
            self._release()

    def _wait(self) -> float | None:
        """None: a slot is free now; 0: wait for a release; > 0: seconds of a pause left."""
        pause = self._paused_until - self._clock()
        if pause > 0:
            return pause
        return None if self._in_flight < int(self._limit) else 0

    def _take(self) -> None:
        self._in_flight += 1
        self._started.set(self._clock())

    def _release(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify()
            self._wake(1)

    def _wake(self, n: int | None) -> None:
        """Wake `n` waiting coroutines (None: all); each looks again for a slot. Held: _cond."""
        while self._waiters and (n is None or n > 0):
            loop, woken = self._waiters.popleft()
            if woken.done():
                continue  # timed out or cancelled: not a waiter any more
            try:
                loop.call_soon_threadsafe(_resolve, woken)
            except RuntimeError:  # its loop has closed: nobody waits there any more
                continue
            n = None if n is None else n - 1

    def on_success(self) -> None:
        with self._cond:
            before = int(self._limit)
            self._limit = min(self.maximum, self._limit + self.increase / self._limit)
            if int(self._limit) != before:
                self._record()
                self._cond.notify_all()
                self._wake(int(self._limit) - before)

    def on_throttle(self, retry_after: float | None = None) -> None:
        with self._cond:
            now = self._clock()
            if retry_after:
                self._paused_until = max(self._paused_until, now + retry_after)
            started = self._started.get()
            if started is None or started >= self._last_decrease:
                self._limit = max(self.minimum, self._limit * self.decrease)
                self._last_decrease = now
                self._record()
            self._cond.notify_all()  # paused waiters re-read the deadline
            self._wake(None)

    def _record(self) -> None:
        self.history.append((self._clock(), self._limit))


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


_registry: dict[str, AdaptiveLimiter] = {}
_registry_lock = threading.Lock()


def limiter_for(endpoint: str, **defaults) -> AdaptiveLimiter:
    """The process-wide limiter of one provider endpoint (`defaults` apply on first use)."""
    with _registry_lock:
        limiter = _registry.get(endpoint)
        if limiter is None:
            limiter = _registry[endpoint] = AdaptiveLimiter(**defaults)
        return limiter
