"""The gateway's cost ledger and price table: totals by role, agent and slice with cache
prices, unknown models, the bundled prices and their overrides."""

from __future__ import annotations

import logging

import pytest

from agents.ledger import CostLedger, load_prices
from agents.providers import Completion


# ── ledger and prices ──────────────────────────────────────────────────────────────────────
def test_ledger_totals_by_role_agent_slice_with_cache_prices():
    ledger = CostLedger(load_prices())
    usage = Completion(None, [], "stop", "m", input_tokens=1000, output_tokens=200,
                       cache_read_tokens=10_000, cache_write_tokens=2000)
    cost = ledger.add("teacher", "claude-sonnet-4-5", "a1", "s1", usage)
    assert cost == pytest.approx((1000 * 3 + 200 * 15 + 10_000 * 0.3 + 2000 * 3.75) / 1e6)
    ledger.add("teacher", "claude-sonnet-4-5-20250929", "a2", "s1", usage)  # dated name
    ledger.add("judge", "simulated-judge", "judge", None,
               {"input_tokens": 1_000_000, "output_tokens": 0})
    t = ledger.totals()
    assert t["calls"] == 3 and t["input_tokens"] == 1_002_000
    assert t["cost_usd"] == pytest.approx(2 * cost + 3.0)
    assert t["by_role"]["teacher"]["cost_usd"] == pytest.approx(2 * cost)
    assert t["by_role"]["judge"]["cost_usd"] == pytest.approx(3.0)
    assert set(t["by_agent"]) == {"a1", "a2", "judge"} and set(t["by_slice"]) == {"s1"}
    assert t["by_slice"]["s1"]["cache_read_tokens"] == 20_000
    t["by_role"]["teacher"]["calls"] = 99  # a copy
    assert ledger.totals()["by_role"]["teacher"]["calls"] == 2


def test_unknown_model_costs_nothing_and_warns_once(caplog):
    ledger = CostLedger(load_prices())
    with caplog.at_level(logging.WARNING, logger="agents.ledger"):
        for _ in range(3):
            assert ledger.add("teacher", "mystery-1", "a", "s", {"input_tokens": 5}) == 0.0
        assert ledger.cost("gpt-4.1-nano", {"input_tokens": 5}) == 0.0  # no prefix guessing
    assert sum("mystery-1" in r.getMessage() for r in caplog.records) == 1
    assert ledger.totals()["input_tokens"] == 15


def test_price_table_and_overrides():
    prices = load_prices()
    assert prices["claude-opus-4-1"] == {"input": 15, "output": 75, "cache_read": 1.5,
                                         "cache_write": 18.75}
    assert prices["gpt-4o-mini"]["cache_write"] == 0.15  # none listed: the input price
    assert prices["simulated-teacher"] == prices["MiniMax-M2.5"]
    assert prices["simulated-judge"] == prices["claude-sonnet-4-5"]
    merged = load_prices({"gpt-4.1": {"output": 9}, "local-vllm": {"input": 0, "output": 0}})
    assert merged["gpt-4.1"] == {**prices["gpt-4.1"], "output": 9.0}
    assert merged["local-vllm"]["cache_read"] == 0
    with pytest.raises(ValueError, match="unknown price fields"):
        load_prices({"gpt-4.1": {"inptu": 1}})
    with pytest.raises(ValueError, match="at least input and output"):
        load_prices({"new-model": {"input": 1}})
    with pytest.raises(ValueError, match="non-negative"):
        load_prices({"gpt-4.1": {"input": -1}})
