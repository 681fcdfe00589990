"""Riding out a provider's bad minutes, and giving up on a real outage: one circuit breaker
per provider endpoint (docs/agent-runtime.md, "Outages"; docs/RELIABILITY.md).

The gateway tells the breaker how every attempt went. A healthy provider that fails now and
then costs a few retries (the gateway's `max_retries`). When most recent attempts fail (at
least `error_share` of the last `window`, or the last quarter-window of attempts in a row: a
provider that was healthy a minute ago and now refuses everything), the provider is *in
trouble*: from then on the
gateway keeps retrying past `max_retries`, every failure halves the endpoint's concurrency
(down to one call at a time: a probe), and each retry waits at least the server's
retry-after. Successes that bring the failure share under half the line end the trouble
(hysteresis: a provider failing 90% of calls, with the odd success, stays in trouble) and the
limiter grows back. Trouble that lasts longer than `budget_s` (30 s at most for an endpoint
that has not answered once in this run: a wrong URL is not an outage) OPENS the breaker: the
waiting calls and every later one raise `ProviderOutage` at once (no request is sent), which
stops the agents with one reason that the generate stage reports as the end of the stage.

Only the provider's failures count: throttles, 5xx, timeouts, dropped connections, bodies that
are not the API's JSON. A model that answered badly (`malformed` with a completion: tokens
spent) is the model's fault, not the endpoint's, and is left to the gates.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from agents.providers import ProviderError

UNREACHED_BUDGET_S = 30.0
PROVIDER_FAULTS = frozenset({"rate_limited", "overloaded", "server", "timeout", "connection"})


def is_provider_fault(error: ProviderError) -> bool:
    return error.kind in PROVIDER_FAULTS or (error.kind == "malformed"
                                             and error.completion is None)


class ProviderOutage(ProviderError):
    """The breaker is open: the endpoint failed for longer than the outage budget."""

    def __init__(self, message: str) -> None:
        super().__init__("outage", message)


class CircuitBreaker:
    def __init__(self, endpoint: str, *, budget_s: float = 600.0, window: int = 20,
                 error_share: float = 0.8, clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[str], None] | None = None) -> None:
        if budget_s < 0 or window < 1 or not 0 < error_share <= 1:
            raise ValueError("need budget_s >= 0, window >= 1 and 0 < error_share <= 1")
        self.endpoint, self.budget_s = endpoint, budget_s
        self.window, self.error_share = window, error_share
        self._clock = clock
        self._on_event = on_event or (lambda message: None)  # trouble began / ended / open
        self._lock = threading.Lock()
        self._recent: deque[bool] = deque(maxlen=window)  # True: the attempt failed
        self._trouble_since: float | None = None
        self._in_a_row = 0  # failures since the last success
        self._last_error = ""
        self.attempts = self.failures = 0
        self.opened_reason: str | None = None
        self.answered = False  # has this endpoint answered once in this run?
        self.troubles = 0  # how many times the provider went into trouble (for the summary)

    # ── what the gateway asks ──────────────────────────────────────────────────────────────
    def check(self) -> None:
        """Raise `ProviderOutage` when the breaker is open (before a request is sent)."""
        if self.opened_reason is not None:
            raise ProviderOutage(self.opened_reason)

    @property
    def in_trouble(self) -> bool:
        return self._trouble_since is not None

    def trouble_seconds(self) -> float:
        with self._lock:
            since = self._trouble_since
            return 0.0 if since is None else self._clock() - since

    # ── what the gateway reports ───────────────────────────────────────────────────────────
    def on_success(self) -> None:
        event = None
        with self._lock:
            self.attempts += 1
            self.answered = True
            self._recent.append(False)
            self._in_a_row = 0
            if self._trouble_since is not None and self._share() < self.error_share / 2:
                event = (f"{self.endpoint} recovered after "
                         f"{self._clock() - self._trouble_since:.0f} s of trouble")
                self._trouble_since = None
        if event:
            self._on_event(event)

    def on_failure(self, error: ProviderError) -> None:
        """Count a provider fault; open the breaker when the trouble outlasts the budget."""
        if not is_provider_fault(error):
            return
        event = None
        with self._lock:
            self.attempts += 1
            self.failures += 1
            self._recent.append(True)
            self._in_a_row += 1
            self._last_error = f"{error.kind}" + (f" (HTTP {error.status})" if error.status
                                                  else "")
            now = self._clock()
            if self._trouble_since is None and (self._share() >= self.error_share
                                                or self._in_a_row >= self._quarter()):
                self._trouble_since = now
                self.troubles += 1
                event = (f"{self.endpoint} in trouble: {self._in_a_row} calls in a row and "
                         f"{sum(self._recent)} of the last {len(self._recent)} failed (last: "
                         f"{self._last_error}); calls "
                         f"go one at a time, retried for up to llm.outage.budget_s "
                         f"{self.budget_s:g} s")
            if (self._trouble_since is not None and self.opened_reason is None
                    and now - self._trouble_since > self._budget()):
                self.opened_reason = event = self._reason(now - self._trouble_since)
        if event:
            self._on_event(event)

    def remaining(self) -> float:
        """Seconds of the outage budget left (the whole budget when not in trouble)."""
        return max(0.0, self._budget() - self.trouble_seconds())

    def _budget(self) -> float:
        """`budget_s`; at most UNREACHED_BUDGET_S for an endpoint that has not answered once
        in this run (a wrong URL or no route is a setting to fix, not bad minutes to wait)."""
        return self.budget_s if self.answered else min(self.budget_s, UNREACHED_BUDGET_S)

    # ── helpers ────────────────────────────────────────────────────────────────────────────
    def _share(self) -> float:
        """Failure share of the last `window` attempts (0 until the window has filled to a
        quarter, so the first one or two errors are never an outage)."""
        if len(self._recent) < self._quarter():
            return 0.0
        return sum(self._recent) / len(self._recent)

    def _quarter(self) -> int:
        return max(2, self.window // 4)

    def _reason(self, lasted: float) -> str:
        never = "" if self.answered else " (it has not answered once in this run)"
        return (f"provider outage at {self.endpoint}{never}: {sum(self._recent)} of the last "
                f"{len(self._recent)} calls failed (last: {self._last_error}) for {lasted:.0f} s, "
                f"past llm.outage.budget_s {self._budget():g} s")

    def figures(self) -> dict:
        with self._lock:
            return {"endpoint": self.endpoint, "attempts": self.attempts,
                    "failures": self.failures, "troubles": self.troubles,
                    "open": self.opened_reason is not None, "reason": self.opened_reason}
