"""DriftMonitor and DriftPolicy: a CUSUM of the bad rate against the agent's own early rate.
Quiet at a steady rate (10% and 12%, the level cheap hosted models err at), however long the
slice; quick after a rise; bounded false alarms by construction."""

from __future__ import annotations

import math
import random

import pytest

from agents.drift import DriftMonitor, DriftPolicy, DriftSettings, FleetBaseline


def alarms_at_steady_rate(rate: float, length: int, agents: int, horizon: int) -> float:
    """Share of agents that ever alarm over `length` observations at a constant bad rate."""
    fired = 0
    for seed in range(agents):
        rng, m = random.Random(seed), DriftMonitor(horizon=horizon)
        fired += any(m.observe(rng.random() >= rate) for _ in range(length))
    return fired / agents


def test_threshold_is_log_horizon_over_alpha():
    m = DriftMonitor(DriftSettings(false_alarm_rate=0.01), horizon=1500)
    assert m.threshold == pytest.approx(math.log(1500 / 0.01))
    assert m.p0 >= 0.10 and m.p1 > m.p0  # the prior alone: the floor or a little above
    odds = m.p0 / (1 - m.p0) * 3
    assert m.p1 == pytest.approx(odds / (1 + odds))


@pytest.mark.parametrize("rate", [0.05, 0.10, 0.12])
def test_no_false_alarms_at_a_steady_rate_on_long_slices(rate):
    # 300 agents x 1,600 observations each: twice a 780-row slice
    assert alarms_at_steady_rate(rate, 1600, 300, horizon=1600) <= 0.01


def test_false_alarms_do_not_grow_with_the_slice():
    """A fixed-level window alarms more the longer it watches; the CUSUM's threshold grows
    with log(horizon), so a 10x longer slice keeps its false alarms at the bound."""
    short = alarms_at_steady_rate(0.13, 300, 400, horizon=300)
    long = alarms_at_steady_rate(0.13, 3000, 400, horizon=3000)
    assert short <= 0.01 and long <= 0.01


def test_the_early_rate_is_learnt_and_clipped():
    rng = random.Random(3)
    m = DriftMonitor(DriftSettings(warmup=40))
    for _ in range(40):
        m.observe(rng.random() >= 0.2)  # a 20% agent from the start
    p0 = m.p0
    assert 0.15 < p0 <= 0.30
    for _ in range(100):
        m.observe(True)
    assert m.p0 == p0  # frozen after the warmup
    bad_start = DriftMonitor(DriftSettings(warmup=40, max_baseline_rate=0.3))
    for _ in range(40):
        bad_start.observe(False)
    assert bad_start.p0 == 0.3  # an agent bad from the start is not taken as normal


@pytest.mark.parametrize("seed", range(5))
def test_alarm_soon_after_a_step_from_five_to_forty_percent(seed):
    rng = random.Random(seed)
    policy = DriftPolicy(DriftMonitor(horizon=1600))
    for i in range(1000):
        assert policy.observe(rng.random() >= 0.05, at=i) is None
    for i in range(1000, 1200):
        if policy.observe(rng.random() >= 0.40, at=i) == "reanchor":
            break
    assert policy.state == "reanchored"
    event = policy.events[0]
    assert event.action == "reanchor" and 1000 <= event.at < 1150  # ~40-100 observations
    assert event.statistic >= policy.monitor.threshold and 0.1 <= event.baseline < 0.2
    assert policy.monitor.statistic == 0.0  # restarted for the next alarm


def test_suspicion_comes_before_the_alarm():
    m = DriftMonitor(DriftSettings(warmup=0, min_observations=1), horizon=100)
    seen_suspicious = False
    while not m.alarm:
        m.observe(False)
        seen_suspicious |= m.suspicious and not m.alarm
    assert seen_suspicious


def test_reanchor_then_stop():
    policy = DriftPolicy(DriftMonitor(DriftSettings(warmup=0, min_observations=5), horizon=200))
    actions = [policy.observe(i % 2 != 0, at=100 + i) for i in range(400)]  # 50% bad
    first = actions.index("reanchor")
    stop = actions.index("stop")
    assert 5 <= first < stop and actions.count("reanchor") == 1
    assert set(actions[stop:]) == {"stop"}
    assert [e.action for e in policy.events] == ["reanchor", "stop"]
    assert policy.state == "stopped"
    assert policy.reason.startswith("drift: ") and "since re-anchoring" in policy.reason
    assert "early rate of" in policy.reason
    assert policy.observe(True) == "stop" and len(policy.events) == 2


def test_recovery_after_reanchor_stays_reanchored():
    policy = DriftPolicy(DriftMonitor(DriftSettings(warmup=0, min_observations=5), horizon=100))
    while policy.state == "normal":
        policy.observe(False)
    assert policy.state == "reanchored"
    assert all(policy.observe(True) is None for _ in range(2000))
    assert policy.state == "reanchored" and policy.reason is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="baseline_rate"):
        DriftSettings(baseline_rate=0.4, max_baseline_rate=0.3)
    with pytest.raises(ValueError, match="odds_ratio"):
        DriftSettings(odds_ratio=1.0)
    with pytest.raises(ValueError, match="false_alarm_rate"):
        DriftSettings(false_alarm_rate=0.0)


def test_an_agent_that_starts_after_the_fleet_went_bad_is_measured_against_the_fleet():
    """The fleet's first observations were at 5% bad; an agent that starts when labels are
    already 40% wrong has no good early rate of its own, and is still caught."""
    settings = DriftSettings(fleet_warmup=200)
    fleet = FleetBaseline(settings)
    rng = random.Random(5)
    early = DriftMonitor(settings, horizon=1600, fleet=fleet)
    for _ in range(300):
        early.observe(rng.random() >= 0.05)
    assert fleet.n == 200 and fleet.rate is not None and fleet.rate < 0.15
    late = DriftPolicy(DriftMonitor(settings, horizon=1600, fleet=fleet))
    alone = DriftPolicy(DriftMonitor(settings, horizon=1600))
    fired = {"fleet": None, "alone": None}
    for i in range(400):
        ok = rng.random() >= 0.40
        if late.observe(ok) and fired["fleet"] is None:
            fired["fleet"] = i
        if alone.observe(ok) and fired["alone"] is None:
            fired["alone"] = i
    assert fired["fleet"] is not None and fired["fleet"] < 150
    assert late.events[0].baseline == pytest.approx(fleet.rate)
    # on its own the same agent learns 40% as normal, clipped at max_baseline_rate (20%)
    assert alone.monitor.p0 == pytest.approx(0.2)
