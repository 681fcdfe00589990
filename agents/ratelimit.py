"""Adaptive concurrency per provider endpoint: AIMD over a dynamic semaphore
(docs/agent-runtime.md, "Rate limits").

Each success grows the limit by `increase / limit` (about `increase` per window of `limit`
calls); each throttle (429/529) multiplies it by `decrease` and makes new slots wait
`retry_after`. As in TCP, one congestion event decreases the limit once: a throttle from a
call that was already in flight when the limit last decreased (same thread, slot started
before that decrease) pauses new slots but does not cut the limit again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


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
        self._local = threading.local()
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
            while True:
                wait = self._paused_until - self._clock()
                if wait > 0:
                    self._cond.wait(wait)
                elif self._in_flight < int(self._limit):
                    break
                else:
                    self._cond.wait()
            self._in_flight += 1
            self._local.started = self._clock()
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify()

    def on_success(self) -> None:
        with self._cond:
            before = int(self._limit)
            self._limit = min(self.maximum, self._limit + self.increase / self._limit)
            if int(self._limit) != before:
                self._record()
                self._cond.notify_all()

    def on_throttle(self, retry_after: float | None = None) -> None:
        with self._cond:
            now = self._clock()
            if retry_after:
                self._paused_until = max(self._paused_until, now + retry_after)
            started = getattr(self._local, "started", None)
            if started is None or started >= self._last_decrease:
                self._limit = max(self.minimum, self._limit * self.decrease)
                self._last_decrease = now
                self._record()
            self._cond.notify_all()  # paused waiters re-read the deadline

    def _record(self) -> None:
        self.history.append((self._clock(), self._limit))


_registry: dict[str, AdaptiveLimiter] = {}
_registry_lock = threading.Lock()


def limiter_for(endpoint: str, **defaults) -> AdaptiveLimiter:
    """The process-wide limiter of one provider endpoint (`defaults` apply on first use)."""
    with _registry_lock:
        limiter = _registry.get(endpoint)
        if limiter is None:
            limiter = _registry[endpoint] = AdaptiveLimiter(**defaults)
        return limiter
