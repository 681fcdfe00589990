"""What LLM calls cost: tokens × the price table (agents/prices.yaml, USD per million tokens),
totalled by role, agent and slice, with optional USD and token budgets
(docs/agent-runtime.md, "Ledger and prices").

Budgets are checked before a call, so calls already in flight when the budget runs out may
overshoot it by their own cost. Token budgets count every token processed: input, output,
cache reads and cache writes.
"""

from __future__ import annotations

import logging
import re
import threading
from importlib import resources
from typing import Any

import yaml

log = logging.getLogger(__name__)

FIELDS = ("input", "output", "cache_read", "cache_write")
USAGE = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
_DATED = re.compile(r"^(.*?)(?:-\d{8}|-\d{4}-\d{2}-\d{2}|-latest)$")  # claude-…-20250929


class BudgetExceeded(Exception):
    """Raised before a call that the budget no longer allows."""


def load_prices(overrides: dict | None = None) -> dict[str, dict[str, float]]:
    """The packaged price table with `overrides` ({model: {field: usd_per_mtok}}) merged over
    it field by field; missing cache prices default to the input price."""
    text = resources.files("agents").joinpath("prices.yaml").read_text()
    table: dict[str, dict] = {k: dict(v) for k, v in (yaml.safe_load(text) or {}).items()}
    for model, fields in (overrides or {}).items():
        if not isinstance(fields, dict):
            raise TypeError(f"prices for {model!r} must be a mapping of {', '.join(FIELDS)}")
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown price fields for {model!r}: {sorted(unknown)}")
        table[model] = {**table.get(model, {}), **fields}
    prices = {}
    for model, fields in table.items():
        if "input" not in fields or "output" not in fields:
            raise ValueError(f"prices for {model!r} need at least input and output")
        row = {f: fields.get(f) for f in FIELDS}
        for f in ("cache_read", "cache_write"):
            row[f] = fields["input"] if row[f] is None else row[f]
        if any(not isinstance(v, int | float) or v < 0 for v in row.values()):
            raise ValueError(f"prices for {model!r} must be non-negative numbers: {row}")
        prices[model] = {f: float(v) for f, v in row.items()}
    return prices


def _usage(usage: Any) -> dict[str, int]:
    get = usage.get if isinstance(usage, dict) else lambda k, d: getattr(usage, k, d)
    return {k: int(get(k, 0) or 0) for k in USAGE}


def _bucket() -> dict:
    return {"cost_usd": 0.0, "calls": 0, **dict.fromkeys(USAGE, 0)}


class CostLedger:
    """Thread-safe running totals; `add` returns the call's cost in USD."""

    def __init__(self, prices: dict | None = None, max_usd: float | None = None,
                 max_tokens: int | None = None) -> None:
        self.prices = {k.lower(): v for k, v in (load_prices() if prices is None else prices).items()}
        self.max_usd = max_usd
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._total = _bucket()
        self._by: dict[str, dict[str, dict]] = {"by_role": {}, "by_agent": {}, "by_slice": {}}
        self._warned: set[str] = set()

    def price(self, model: str) -> dict[str, float] | None:
        """The price row of `model`, also for a dated name (claude-sonnet-4-5-20250929)."""
        name = model.lower()
        if name in self.prices:
            return self.prices[name]
        m = _DATED.match(name)
        return self.prices.get(m.group(1)) if m else None

    def cost(self, model: str, usage: Any) -> float:
        row = self.price(model)
        if row is None:
            with self._lock:
                first = model not in self._warned
                self._warned.add(model)
            if first:
                log.warning("no price for model %r: its calls are counted at $0", model)
            return 0.0
        u = _usage(usage)
        return sum(u[k] * row[f] for k, f in zip(USAGE, FIELDS, strict=True)) / 1e6

    def check(self) -> None:
        with self._lock:
            spent, tokens = self._total["cost_usd"], sum(self._total[k] for k in USAGE)
        if self.max_usd is not None and spent >= self.max_usd:
            raise BudgetExceeded(f"spent ${spent:.4f} of a ${self.max_usd:.4f} budget")
        if self.max_tokens is not None and tokens >= self.max_tokens:
            raise BudgetExceeded(f"spent {tokens} of a {self.max_tokens}-token budget")

    def add(self, role: str, model: str, agent: str | None, slice_id: str | None,
            usage: Any) -> float:
        cost = self.cost(model, usage)
        u = _usage(usage)
        with self._lock:
            buckets = [self._total, self._by["by_role"].setdefault(role, _bucket())]
            if agent is not None:
                buckets.append(self._by["by_agent"].setdefault(agent, _bucket()))
            if slice_id is not None:
                buckets.append(self._by["by_slice"].setdefault(str(slice_id), _bucket()))
            for b in buckets:
                b["cost_usd"] += cost
                b["calls"] += 1
                for k in USAGE:
                    b[k] += u[k]
        return cost

    def totals(self) -> dict:
        """{"cost_usd", "calls", "<kind>_tokens"..., "by_role", "by_agent", "by_slice"}."""
        with self._lock:
            out = dict(self._total)
            for name, groups in self._by.items():
                out[name] = {k: dict(v) for k, v in groups.items()}
        return out
