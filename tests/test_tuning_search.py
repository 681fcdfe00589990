"""The tune stage's proposals without an LLM: the clamp gate every proposed config passes
(clamped, rounded, rejected or dropped as a duplicate, each with a note) and the seeded search
(deterministic, in bounds, typed, log-uniform learning rates, steered by past trials)."""

from __future__ import annotations

import json
import math

import pytest

from agents.tuner import clamp_config
from tests.tuning_helpers import BOUNDS, GOOD, _inside
from training.search import suggest


# ── the gate ─────────────────────────────────────────────────────────────────────────────────
def test_clamp_keeps_a_good_config_unchanged():
    assert clamp_config(GOOD, BOUNDS) == (GOOD, [])


def test_clamp_clamps_and_rounds_with_notes():
    config, notes = clamp_config(
        {"learning_rate": 0.5, "batch_size": 12.6, "warmup_ratio": -0.2}, BOUNDS)
    assert config == {"learning_rate": 3e-3, "batch_size": 13, "warmup_ratio": 0.0}
    assert isinstance(config["batch_size"], int)
    assert any("learning_rate 0.5 outside" in n for n in notes)
    assert any("batch_size 12.6 rounded to 13" in n for n in notes)
    assert any("warmup_ratio -0.2 outside" in n for n in notes)
    config, notes = clamp_config({**GOOD, "batch_size": 99}, BOUNDS)
    assert config["batch_size"] == 32 and notes == ["batch_size 99 outside [8, 32], clamped to 32"]
    # lora_r is an integer too; a fractional bound is tightened to the integers inside it
    config, notes = clamp_config({"lora_r": 2.2}, {"lora_r": (3.5, 16)})
    assert config == {"lora_r": 4} and len(notes) == 2


@pytest.mark.parametrize("proposal, says", [
    ({**GOOD, "epochs": 3}, "unknown setting(s) epochs"),
    ({**GOOD, "lora_r": 8}, "unknown setting(s) lora_r"),  # tunable, but not bounded here
    ({"learning_rate": 1e-3, "batch_size": 16}, "missing setting(s) warmup_ratio"),
    ({**GOOD, "learning_rate": float("nan")}, "learning_rate=nan is not a finite number"),
    ({**GOOD, "learning_rate": float("inf")}, "is not a finite number"),
    ({**GOOD, "batch_size": "16"}, "batch_size='16' is not a finite number"),
    ({**GOOD, "warmup_ratio": None}, "warmup_ratio=None is not a finite number"),
    ({**GOOD, "batch_size": True}, "batch_size=True is not a finite number"),
    ([1e-3, 16, 0.05], "must be an object"),
])
def test_clamp_rejects(proposal, says):
    config, notes = clamp_config(proposal, BOUNDS)
    assert config is None and any(says in n for n in notes), notes


def test_clamp_drops_duplicates_after_clamping():
    assert clamp_config(GOOD, BOUNDS, seen=[GOOD])[0] is None
    # 40 clamps to 32, the same config as one already seen
    config, notes = clamp_config({**GOOD, "batch_size": 40}, BOUNDS,
                                 seen=[{**GOOD, "batch_size": 32}])
    assert config is None and "duplicate" in notes[-1]
    # equal to 6 significant digits is the same trial
    assert clamp_config({**GOOD, "learning_rate": 0.0010000001}, BOUNDS, seen=[GOOD])[0] is None


# ── the seeded search ──────────────────────────────────────────────────────────────────────
def test_search_is_deterministic_in_bounds_and_typed():
    bounds = {**BOUNDS, "lora_r": (4.0, 16.0)}
    first = suggest(5, bounds, seed=3)
    assert first == suggest(5, bounds, seed=3)
    assert first != suggest(5, bounds, seed=4)
    assert len(first) == 5 and len({json.dumps(c, sort_keys=True) for c in first}) == 5
    for c in first:
        assert set(c) == set(bounds) and _inside(c, bounds)
        assert isinstance(c["batch_size"], int) and isinstance(c["lora_r"], int)
        assert isinstance(c["learning_rate"], float)


def test_search_learning_rate_is_log_uniform():
    rates = [c["learning_rate"] for c in suggest(60, {"learning_rate": (1e-5, 1e-1)}, seed=0)]
    # log-uniform over 4 decades: about a quarter per decade, not ~90% in the top one
    assert sum(r < 1e-3 for r in rates) >= 20


def test_search_uses_past_trials_and_never_repeats_them():
    # 12 past trials whose loss is lowest near lr 1e-3, batch 16: TPE searches near there
    past = [{"config": {"learning_rate": lr, "batch_size": bs, "warmup_ratio": 0.05},
             "eval_loss": abs(math.log10(lr) + 3) + abs(bs - 16) / 16}
            for lr in (3e-4, 1e-3, 2.5e-3) for bs in (8, 16, 24, 32)]
    blind = suggest(6, BOUNDS, seed=0)
    told = suggest(6, BOUNDS, past, seed=0)
    assert told == suggest(6, BOUNDS, past, seed=0)  # deterministic with history too
    assert told != blind
    keys = {json.dumps(p["config"], sort_keys=True) for p in past}
    assert not keys & {json.dumps(c, sort_keys=True) for c in told}

    def distance(c):
        return abs(math.log10(c["learning_rate"]) + 3) + abs(c["batch_size"] - 16) / 16

    assert sum(map(distance, told)) < sum(map(distance, blind))
    # an exhausted box: only the integers left
    few = suggest(5, {"batch_size": (8, 10)}, exclude=[{"batch_size": 9}])
    assert sorted(c["batch_size"] for c in few) == [8, 10]
