"""DriftMonitor and DriftPolicy: quiet at a steady low bad rate, quick after a switch."""

from __future__ import annotations

import random

import pytest

from agents.drift import DriftMonitor, DriftPolicy


def test_monitor_counts_a_window():
    m = DriftMonitor(window=4, threshold=0.25, min_observations=2)
    assert m.rate == 0.0 and not m.alarm
    assert m.observe(False) is False  # 1 of 1 bad, but below min_observations
    assert m.observe(True) is True and m.rate == 0.5  # 1 of 2: over 25%
    for _ in range(3):
        m.observe(True)
    assert m.in_window == 4 and m.bad == 0 and m.observations == 5 and not m.alarm
    m.observe(False)
    assert m.rate == 0.25 and not m.alarm  # strictly over the threshold
    m.reset()
    assert m.in_window == 0 and m.observations == 6
    with pytest.raises(ValueError):
        DriftMonitor(window=10, min_observations=20)


def test_no_alarm_at_a_steady_five_percent():
    rng = random.Random(11)
    m = DriftMonitor()
    alarms = sum(m.observe(rng.random() >= 0.05) for _ in range(2000))
    assert alarms == 0


@pytest.mark.parametrize("seed", range(5))
def test_alarm_soon_after_a_switch_to_forty_percent(seed):
    rng = random.Random(seed)
    policy = DriftPolicy()
    for i in range(1000):
        assert policy.observe(rng.random() >= 0.05, at=i) is None
    for i in range(1000, 1050):
        if policy.observe(rng.random() >= 0.40, at=i) == "reanchor":
            break
    assert policy.state == "reanchored"
    event = policy.events[0]
    assert event.action == "reanchor" and 1000 <= event.at < 1050
    assert event.observation == event.at + 1 and event.window == 40
    assert event.first == event.observation - 39 and event.rate > 0.25


def test_reanchor_then_stop():
    policy = DriftPolicy(DriftMonitor(window=40, threshold=0.25, min_observations=20))
    actions = [policy.observe(i % 3 != 0, at=100 + i) for i in range(200)]  # 33% bad
    assert actions.index("reanchor") == 19 and actions.count("reanchor") == 1
    assert actions.index("stop") == 39 and set(actions[39:]) == {"stop"}
    first, second = policy.events
    assert (first.action, second.action) == ("reanchor", "stop")
    assert first.observation == 20  # min_observations reached with 7 of 20 bad
    assert second.observation == 40 and second.window == 20  # the window restarted
    assert second.at == 139
    assert policy.state == "stopped"
    assert policy.reason == "drift: 7 of 20 recent examples rejected (35%) after re-anchoring"
    assert policy.observe(True) == "stop" and len(policy.events) == 2


def test_recovery_after_reanchor_stays_reanchored():
    policy = DriftPolicy()
    for i in range(20):
        policy.observe(i % 2 == 0)
    assert policy.state == "reanchored"
    assert all(policy.observe(True) is None for _ in range(500))
    assert policy.state == "reanchored" and policy.reason is None
