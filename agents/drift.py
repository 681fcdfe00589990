"""Spec drift: a per-agent bad rate over a sliding window, and what to do when it climbs.

`DriftMonitor` counts gated or judged examples: `observe(ok)` once per example (ok=False
for a gate rejection or a judge disagreement). `alarm` is true when the window holds at
least `min_observations` and its bad rate is strictly over `threshold`.

`DriftPolicy` is the small state machine the agent loop drives:

    normal ──alarm──> reanchored ──alarm again──> stopped
             "reanchor"                    "stop"

On "reanchor" the caller resets the agent's memory to the spec, judges every example from
then on, and re-reviews the examples accepted in the suspect window (`event.first` ..
`event.last`, observation indices); the window restarts empty. On "stop" the caller stops
the agent with `policy.reason`. Every alarm is kept in `policy.events` with the
observation index and the caller's own index (`at`, e.g. the LLM call number) for benches.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

NORMAL, REANCHORED, STOPPED = "normal", "reanchored", "stopped"
REANCHOR, STOP = "reanchor", "stop"


class DriftMonitor:
    """Bad rate over the last `window` observations."""

    def __init__(self, window: int = 40, threshold: float = 0.25, min_observations: int = 20):
        if window < 1 or not 1 <= min_observations <= window:
            raise ValueError("need window >= 1 and 1 <= min_observations <= window, got "
                             f"window={window}, min_observations={min_observations}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.window, self.threshold, self.min_observations = window, threshold, min_observations
        self._recent: deque[bool] = deque(maxlen=window)
        self.observations = 0  # every observation ever (reset() does not rewind it)

    def observe(self, ok: bool) -> bool:
        """Record one example; returns `alarm` after it."""
        self._recent.append(bool(ok))
        self.observations += 1
        return self.alarm

    @property
    def in_window(self) -> int:
        return len(self._recent)

    @property
    def bad(self) -> int:
        return self.in_window - sum(self._recent)

    @property
    def rate(self) -> float:
        return self.bad / self.in_window if self._recent else 0.0

    @property
    def alarm(self) -> bool:
        return self.in_window >= self.min_observations and self.rate > self.threshold

    def reset(self) -> None:
        """Empty the window (after a re-anchor); `observations` keeps counting."""
        self._recent.clear()


@dataclass(frozen=True)
class DriftEvent:
    action: str  # "reanchor" | "stop"
    observation: int  # 1-based index of the observation that raised the alarm
    at: int | None  # the caller's index (LLM call, example number), if it passed one
    first: int  # 1-based index of the oldest observation in the suspect window
    bad: int
    window: int  # observations in the window when it fired
    rate: float


class DriftPolicy:
    """normal → reanchored → stopped, driven by a `DriftMonitor`."""

    def __init__(self, monitor: DriftMonitor | None = None):
        self.monitor = monitor or DriftMonitor()
        self.state = NORMAL
        self.reason: str | None = None
        self.events: list[DriftEvent] = []

    def observe(self, ok: bool, at: int | None = None) -> str | None:
        """Record one example; returns "reanchor", "stop" or None (carry on).

        Once stopped, every call returns "stop" and records nothing more.
        """
        if self.state == STOPPED:
            return STOP
        if not self.monitor.observe(ok):
            return None
        m = self.monitor
        action = REANCHOR if self.state == NORMAL else STOP
        self.events.append(DriftEvent(
            action, m.observations, at, m.observations - m.in_window + 1, m.bad, m.in_window,
            m.rate,
        ))
        if action == REANCHOR:
            self.state = REANCHORED
            m.reset()
        else:
            self.state = STOPPED
            self.reason = (f"drift: {m.bad} of {m.in_window} recent examples rejected "
                           f"({m.rate:.0%}) after re-anchoring")
        return action
