"""Riding out a provider's bad minutes and giving up on an outage (agents/breaker.py): the
breaker's arithmetic on a manual clock, then the gateway with a breaker through the real SDKs
on mock transports, the clock moved by the gateway's own back-off sleeps."""

from __future__ import annotations

import httpx2
import pytest

from agents.breaker import CircuitBreaker, ProviderOutage
from agents.gateway import LLMGateway
from agents.ledger import CostLedger, load_prices
from agents.providers import Completion, ProviderError
from agents.ratelimit import AdaptiveLimiter
from tests.test_gateway import MESSAGES, Wire, openai_ok, too_many


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def fault(kind: str = "rate_limited", completion: Completion | None = None) -> ProviderError:
    return ProviderError(kind, "x", status=429 if kind == "rate_limited" else 500,
                         completion=completion)


# ── the breaker alone ───────────────────────────────────────────────────────────────────────
def test_a_few_errors_in_a_healthy_stream_are_not_trouble():
    clock = Clock()
    b = CircuitBreaker("http://llm", budget_s=60, window=20, error_share=0.8, clock=clock)
    b.on_failure(fault())  # the first errors, before a quarter of the window: never trouble
    assert not b.in_trouble
    for i in range(40):
        (b.on_failure(fault("server")) if i % 4 == 0 else b.on_success())
        clock.sleep(10)
    assert not b.in_trouble and b.opened_reason is None and b.failures == 11


def test_trouble_starts_at_the_error_share_ends_on_recovery_and_opens_past_the_budget():
    clock, events = Clock(), []
    b = CircuitBreaker("http://llm/v1", budget_s=60, window=10, error_share=0.8, clock=clock,
                       on_event=events.append)
    for _ in range(5):
        b.on_failure(fault())
    assert b.in_trouble and b.troubles == 1 and "in trouble" in events[-1]
    clock.sleep(30)
    for _ in range(5):  # the share falls to the line: not yet well
        b.on_success()
    assert b.in_trouble
    for _ in range(2):  # under half the line: recovered
        b.on_success()
    assert not b.in_trouble and "recovered after 30 s" in events[-1]
    for _ in range(8):
        b.on_failure(fault("overloaded"))
    assert b.in_trouble and b.troubles == 2
    b.check()  # in trouble, within the budget: calls go on
    clock.sleep(61)
    b.on_failure(fault("timeout"))
    assert b.opened_reason and events[-1] == b.opened_reason
    with pytest.raises(ProviderOutage) as e:
        b.check()
    assert e.value.kind == "outage" and not e.value.retryable
    assert "http://llm/v1" in str(e.value) and "llm.outage.budget_s 60 s" in str(e.value)
    b.on_success()  # an open breaker stays open for the rest of the run
    with pytest.raises(ProviderOutage):
        b.check()


def test_a_healthy_provider_that_suddenly_refuses_everything_is_in_trouble():
    """Twenty successes fill the window; five failures in a row (a quarter of it) are
    trouble although they are only a quarter of the window: the gateway's five attempts of
    one call must not run out before the breaker notices."""
    b = CircuitBreaker("http://llm", budget_s=60, window=20, clock=Clock())
    for _ in range(20):
        b.on_success()
    for _ in range(4):
        b.on_failure(fault())
    assert not b.in_trouble
    b.on_failure(fault())
    assert b.in_trouble
    b.on_success()  # one answer: the share is low, so the trouble is over
    assert not b.in_trouble


def test_a_model_answering_badly_is_not_an_outage():
    b = CircuitBreaker("http://llm", budget_s=0, window=4)
    spent = Completion("not json", [], "stop", "m", 10, 5)
    for _ in range(20):
        b.on_failure(fault("malformed", completion=spent))  # tokens spent: the model's fault
        b.on_failure(fault("bad_request"))
    assert not b.in_trouble and b.failures == 0
    for _ in range(4):
        b.on_failure(fault("malformed"))  # a body that is not the API's JSON: the provider
    assert b.in_trouble


# ── the gateway with a breaker ──────────────────────────────────────────────────────────────
def gateway_with(wire: Wire, clock: Clock, budget_s: float, **kw):
    records: list[dict] = []
    limiter = AdaptiveLimiter(initial=8, clock=clock)
    breaker = CircuitBreaker("http://llm.test/v1", budget_s=budget_s, window=20, clock=clock)
    gw = LLMGateway(wire.provider(), role="generator", on_call=records.append,
                    ledger=CostLedger(load_prices()), limiter=limiter, breaker=breaker,
                    sleep=clock.sleep, **kw)
    return gw, records, limiter, breaker


def call(gw):
    return gw.complete(model="gpt-4.1-mini", messages=MESSAGES, tools=None, temperature=0.5,
                       max_tokens=100, agent="a1", slice_id="s1")


def test_bad_minutes_are_ridden_out_past_max_retries():
    """Twelve 429s in a row (retry-after 5 s): without a breaker the call gives up after
    max_retries; with one it waits them out, one call at a time, and succeeds."""
    clock = Clock()
    wire = Wire(*[lambda: too_many("5")] * 12, openai_ok("back"))
    plain = LLMGateway(wire.provider(), role="generator", ledger=CostLedger(load_prices()),
                       limiter=AdaptiveLimiter(initial=8, clock=clock), sleep=clock.sleep)
    with pytest.raises(ProviderError) as e:
        call(plain)
    assert e.value.kind == "rate_limited" and wire.count == 5  # 1 + max_retries

    wire = Wire(openai_ok("hello"), *[lambda: too_many("5")] * 12, openai_ok("back"))
    clock = Clock()
    gw, records, limiter, breaker = gateway_with(wire, clock, budget_s=600)
    assert call(gw).text == "hello"  # the provider answered once: then the bad minutes
    started = clock.now
    assert call(gw).text == "back"
    assert wire.count == 14 and [r["status"] for r in records].count("error") == 12
    assert min(limit for _, limit in limiter.history) == 1  # down to one probe at a time
    assert clock.now - started >= 12 * 5  # every wait at least the server's retry-after
    assert breaker.troubles == 1 and breaker.opened_reason is None


def test_an_outage_past_the_budget_opens_the_breaker_and_sends_nothing_more():
    clock = Clock()
    wire = Wire(openai_ok("fine"), lambda: too_many("10"))  # one answer, then 429 forever
    gw, records, _, breaker = gateway_with(wire, clock, budget_s=120)
    assert call(gw).text == "fine"
    started = clock.now
    with pytest.raises(ProviderOutage) as e:
        call(gw)
    assert "past llm.outage.budget_s 120 s" in str(e.value)
    # trouble begins at the 4th failure (4 of the 5 calls seen, after 3 waits of >= 10 s),
    # and the call gives up at the first failure past the budget (waits are <= 30 s)
    assert 120 + 30 < clock.now - started < 120 + 4 * 30 + 30
    sent = wire.count
    assert sent > 5 and len(records) == sent  # every attempt recorded (and the first answer)
    with pytest.raises(ProviderOutage):
        call(gw)  # open: refused before a request
    assert wire.count == sent and breaker.figures()["open"] is True


def test_an_endpoint_that_never_answered_gets_30_s_not_the_whole_budget():
    """A wrong URL or no route: not bad minutes to wait out for ten minutes."""
    clock = Clock()
    wire = Wire(httpx2.Response(503, json={"error": {"message": "down", "type": "x"}}))
    gw, _, _, breaker = gateway_with(wire, clock, budget_s=600)
    started = clock.now
    with pytest.raises(ProviderOutage) as e:
        call(gw)
    assert "has not answered once in this run" in str(e.value)
    assert "budget_s 30 s" in str(e.value) and clock.now - started < 30 + 4 * 30 + 30
    assert breaker.answered is False and breaker.figures()["open"] is True


def test_a_request_the_server_refuses_is_not_retried_by_the_breaker():
    clock = Clock()
    wire = Wire(httpx2.Response(400, json={"error": {"message": "bad", "type": "invalid"}}))
    gw, _, _, breaker = gateway_with(wire, clock, budget_s=600)
    with pytest.raises(ProviderError) as e:
        call(gw)
    assert e.value.kind == "bad_request" and wire.count == 1 and not breaker.in_trouble
