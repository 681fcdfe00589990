"""Spec drift: a *rise* in an agent's bad rate, found by a CUSUM test, and what to do then.

Cheap hosted models mislabel ~10% of rows all along. A fixed threshold over a sliding window
raises false alarms at that rate, more often the longer the slice. What matters is a change:
the agent getting worse than it was. `DriftMonitor` runs a Bernoulli CUSUM (Page's test)
on the stream of gated/judged examples (`observe(ok)`, ok=False for an off-spec submission
or a judge disagreement):

    p0  the in-control bad rate: the agent's own early rate (a Beta posterior's upper
        bound over its first `warmup` observations, shrunk towards `baseline_rate`), or the
        fleet's early rate when that is lower (`FleetBaseline`: the first observations of the
        whole run, so an agent that starts after the fleet went bad is still measured
        against how the fleet began), kept within [baseline_rate, max_baseline_rate]
    p1  the rate to detect: p0's odds times `odds_ratio`
    S   max(0, S + log(p1/p0)) on a bad example, max(0, S + log((1-p1)/(1-p0))) on a good one
    h   log(horizon / false_alarm_rate): the alarm fires when S >= h (and at least
        `min_observations` have been seen)

Why h = log(horizon / alpha): the alarm at time t means some run of observations s..t has a
likelihood ratio p1:p0 of at least e^h. Under the in-control rate (at most p0) that ratio,
started at any s, is a martingale, so by Ville's inequality it ever reaches e^h with
probability at most e^-h; over the at most `horizon` starting points of one agent, the
chance of any false alarm is at most horizon * e^-h = alpha. The caller sets `horizon` from
the slice (an agent sees about as many observations as it has rows, twice at most), so the
false-alarm rate per agent stays at alpha however long the slice is, instead of growing with
it as a fixed-level window's does. A step from 5% to 40% bad moves S up by ~0.3 an
observation: with h ~ 12 the alarm comes ~40 observations after the change.

`suspicious` (S past `suspicion` x h) lets the caller look harder (judge every example)
before it is sure, which shortens the delay without judging everything all the time.

`DriftPolicy` is the small state machine the agent loop drives:

    normal ──alarm──> reanchored ──alarm again──> stopped
             "reanchor"                    "stop"

On "reanchor" the caller resets the agent's memory to the spec, judges every example from
then on, and re-reviews the examples accepted unjudged lately; the CUSUM restarts at 0 with
the same p0. On "stop" the caller stops the agent with `policy.reason`. Every alarm is kept in
`policy.events` with the observation index and the caller's own index (`at`, e.g. the LLM
call number) for benches.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

NORMAL, REANCHORED, STOPPED = "normal", "reanchored", "stopped"
REANCHOR, STOP = "reanchor", "stop"
PRIOR_STRENGTH = 20  # pseudo-observations at baseline_rate behind the early-rate estimate
UPPER_Z = 1.28       # the early rate's upper bound: ~90% one-sided


@dataclass(frozen=True)
class DriftSettings:
    """The test's knobs (spec: `generation.drift`)."""

    baseline_rate: float = 0.10      # bad rate an agent may have all along (floor of p0)
    max_baseline_rate: float = 0.20  # ceiling of p0: an agent worse from the start is not "in control"
    odds_ratio: float = 3.0          # detect p1 = p0's odds x this
    false_alarm_rate: float = 0.01   # alpha: chance of any false alarm over one agent's run
    warmup: int = 40                 # observations that set the agent's own p0
    min_observations: int = 20       # no alarm before this many
    fleet_warmup: int = 200          # the run's first observations: the fleet's early rate
    suspicion: float = 0.25          # S past this share of h: judge every example observations

    def __post_init__(self):
        if not 0 < self.baseline_rate <= self.max_baseline_rate < 1:
            raise ValueError("need 0 < baseline_rate <= max_baseline_rate < 1, got "
                             f"{self.baseline_rate} and {self.max_baseline_rate}")
        if self.odds_ratio <= 1:
            raise ValueError(f"odds_ratio must be > 1, got {self.odds_ratio}")
        if not 0 < self.false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {self.false_alarm_rate}")
        if self.warmup < 0 or self.min_observations < 1 or self.fleet_warmup < 0:
            raise ValueError("need warmup >= 0, fleet_warmup >= 0 and min_observations >= 1")
        if not 0 < self.suspicion <= 1:
            raise ValueError(f"suspicion must be in (0, 1], got {self.suspicion}")


def upper_rate(bad: int, n: int, settings: DriftSettings) -> float:
    """A ~90% upper bound of a bad rate seen as bad/n, shrunk towards baseline_rate, clipped
    to [baseline_rate, max_baseline_rate]."""
    s = settings
    mean = (bad + s.baseline_rate * PRIOR_STRENGTH) / (n + PRIOR_STRENGTH)
    upper = mean + UPPER_Z * math.sqrt(mean * (1 - mean) / (n + PRIOR_STRENGTH))
    return min(max(upper, s.baseline_rate), s.max_baseline_rate)


class FleetBaseline:
    """The bad rate of a run's first `fleet_warmup` observations, over all its agents (in
    this process); frozen once that many are in. Thread-safe."""

    def __init__(self, settings: DriftSettings | None = None):
        self.settings = settings or DriftSettings()
        self.bad = self.n = 0
        self._lock = threading.Lock()

    def observe(self, ok: bool) -> None:
        with self._lock:
            if self.n < self.settings.fleet_warmup:
                self.n += 1
                self.bad += not ok

    @property
    def rate(self) -> float | None:
        """The fleet's early rate (upper bound), once its warmup is complete."""
        with self._lock:
            if self.n < self.settings.fleet_warmup or self.settings.fleet_warmup == 0:
                return None
            return upper_rate(self.bad, self.n, self.settings)


class DriftMonitor:
    """Bernoulli CUSUM of one agent's bad rate against its own early rate."""

    def __init__(self, settings: DriftSettings | None = None, horizon: int = 1000,
                 fleet: FleetBaseline | None = None):
        self.settings = s = settings or DriftSettings()
        self.fleet = fleet
        self.horizon = max(int(horizon), s.min_observations)
        self.threshold = math.log(self.horizon / s.false_alarm_rate)  # h
        self.observations = 0   # every observation ever (reset() does not rewind it)
        self.bad_total = 0
        self.statistic = 0.0    # S
        self.since_reset = 0
        self.bad_since_reset = 0
        self._own: float | None = None
        self._set_rates(self._early_rate())

    def _early_rate(self) -> float:
        """p0: the agent's own early rate (frozen after its warmup), or the fleet's when lower."""
        if self.observations <= self.settings.warmup or self._own is None:
            self._own = upper_rate(self.bad_total, self.observations, self.settings)
        fleet = self.fleet.rate if self.fleet is not None else None
        return self._own if fleet is None else min(self._own, fleet)

    def _set_rates(self, p0: float) -> None:
        odds = p0 / (1 - p0) * self.settings.odds_ratio
        self.p0, self.p1 = p0, odds / (1 + odds)
        self._up = math.log(self.p1 / self.p0)
        self._down = math.log((1 - self.p1) / (1 - self.p0))

    def observe(self, ok: bool) -> bool:
        """Record one example; returns `alarm` after it."""
        bad = not ok
        self.observations += 1
        self.since_reset += 1
        self.bad_total += bad
        self.bad_since_reset += bad
        if self.fleet is not None:
            self.fleet.observe(ok)
        if self.observations <= self.settings.warmup or self.fleet is not None:
            p0 = self._early_rate()
            if p0 != self.p0:
                self._set_rates(p0)
        self.statistic = max(0.0, self.statistic + (self._up if bad else self._down))
        return self.alarm

    @property
    def alarm(self) -> bool:
        return (self.observations >= self.settings.min_observations
                and self.statistic >= self.threshold)

    @property
    def suspicious(self) -> bool:
        """Past `suspicion` of the alarm level: worth judging every example until it
        settles."""
        return self.statistic >= self.threshold * self.settings.suspicion

    @property
    def rate(self) -> float:
        """Bad share since the last reset (for messages)."""
        return self.bad_since_reset / self.since_reset if self.since_reset else 0.0

    def reset(self) -> None:
        """Restart the test (after a re-anchor); p0 and `observations` are kept."""
        self.statistic = 0.0
        self.since_reset = self.bad_since_reset = 0


@dataclass(frozen=True)
class DriftEvent:
    action: str  # "reanchor" | "stop"
    observation: int  # 1-based index of the observation that raised the alarm
    at: int | None  # the caller's index (LLM call, example number), if it passed one
    bad: int  # bad observations since the last reset
    seen: int  # observations since the last reset
    rate: float  # bad / seen
    baseline: float  # p0 the rise was measured against
    statistic: float  # S when it fired


class DriftPolicy:
    """normal → reanchored → stopped, driven by a `DriftMonitor`."""

    def __init__(self, monitor: DriftMonitor | None = None):
        self.monitor = monitor or DriftMonitor()
        self.state = NORMAL
        self.reason: str | None = None
        self.events: list[DriftEvent] = []

    @property
    def suspicious(self) -> bool:
        return self.state != STOPPED and self.monitor.suspicious

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
        self.events.append(DriftEvent(action, m.observations, at, m.bad_since_reset,
                                      m.since_reset, m.rate, m.p0, m.statistic))
        if action == REANCHOR:
            self.state = REANCHORED
        else:
            self.state = STOPPED
            self.reason = (f"drift: {m.bad_since_reset} of {m.since_reset} examples rejected "
                           f"({m.rate:.0%}) since re-anchoring, against this agent's early "
                           f"rate of {m.p0:.0%}")
        m.reset()
        return action
