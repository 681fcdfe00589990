"""The gateway path (cache → budget → rate limit → provider → ledger) through the real SDKs on
httpx2 mock transports, blocking and async; redaction. (The ledger and prices:
tests/test_gateway_ledger.py; the adaptive limiter: tests/test_gateway_limiter.py.)"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx2
import pytest

from agents.gateway import BudgetExceeded, LLMGateway, MemoryCache, request_key
from agents.ledger import CostLedger, load_prices
from agents.provider_factory import make_provider
from agents.providers import ProviderError
from agents.ratelimit import AdaptiveLimiter
from agents.redact import MARK, redact

RECORD_KEYS = {"role", "agent", "slice_id", "api", "model", "request_hash", "cached",
               "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
               "cost_usd", "latency_ms", "status", "error", "attempt"}
MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


class Wire:
    """Mock transport: serves the replies in order (the last one repeats), counts requests."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        with self._lock:
            self.count += 1
            reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return reply() if callable(reply) else reply

    def provider(self, api: str = "openai"):
        client = httpx2.Client(transport=httpx2.MockTransport(self))
        base = "http://llm.test/v1" if api == "openai" else "http://llm.test/anthropic"
        return make_provider(api, base_url=base, api_key="k", http_client=client)


def openai_ok(content="done", prompt=1000, completion=100, cached=0) -> httpx2.Response:
    return httpx2.Response(200, json={
        "id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4.1-mini",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": content, "refusal": None}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached}}})


def anthropic_ok(text="done", usage=None) -> httpx2.Response:
    return httpx2.Response(200, json={
        "id": "m1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": usage or {"input_tokens": 10, "output_tokens": 2}})


def too_many(retry_after: str = "0.25") -> httpx2.Response:
    return httpx2.Response(429, headers={"retry-after": retry_after},
                           json={"error": {"message": "slow down", "type": "requests"}})


def gateway(wire: Wire, api="openai", **kw):
    records: list[dict] = []
    sleeps: list[float] = []
    kw.setdefault("ledger", CostLedger(load_prices()))
    kw.setdefault("limiter", AdaptiveLimiter(initial=8))
    gw = LLMGateway(wire.provider(api), role="teacher", on_call=records.append,
                    sleep=sleeps.append, **kw)
    return gw, records, sleeps


def call(gw, model="gpt-4.1-mini", agent="a1", slice_id="s1", messages=MESSAGES):
    return gw.complete(model=model, messages=messages, tools=None, temperature=0.5,
                       max_tokens=100, agent=agent, slice_id=slice_id)


# ── the gateway ────────────────────────────────────────────────────────────────────────────
def test_cache_hit_makes_no_request():
    wire = Wire(openai_ok(prompt=1000, completion=100, cached=400))
    gw, records, _ = gateway(wire, cache=MemoryCache())
    first, second = call(gw), call(gw)
    assert first == second and first.text == "done" and wire.count == 1
    assert [set(r) for r in records] == [RECORD_KEYS, RECORD_KEYS]
    fresh, hit = records
    assert fresh["cached"] is False and fresh["status"] == "ok" and fresh["attempt"] == 1
    assert (fresh["input_tokens"], fresh["cache_read_tokens"], fresh["output_tokens"]) == (
        600, 400, 100)
    # gpt-4.1-mini: 600 × 0.4 + 400 × 0.1 + 100 × 1.6 per million
    assert fresh["cost_usd"] == pytest.approx((600 * 0.4 + 400 * 0.1 + 100 * 1.6) / 1e6)
    assert hit["cached"] is True and hit["cost_usd"] == 0 and hit["request_hash"] == \
        fresh["request_hash"]
    assert all(hit[k] == 0 for k in RECORD_KEYS if k.endswith("_tokens"))
    assert gw.ledger.totals()["calls"] == 1
    call(gw, messages=[*MESSAGES, {"role": "user", "content": "more"}])
    assert wire.count == 2  # other content, other key


def test_retries_after_429_then_succeeds():
    wire = Wire(too_many("0.25"), openai_ok())
    limiter = AdaptiveLimiter(initial=8, minimum=1, maximum=64)
    gw, records, sleeps = gateway(wire, limiter=limiter, max_retries=3, backoff_base=0.01)
    assert call(gw).text == "done"
    assert wire.count == 2
    assert [(r["attempt"], r["status"]) for r in records] == [(1, "error"), (2, "ok")]
    assert records[0]["error"].startswith("rate_limited: ")
    assert records[0]["input_tokens"] == 0 and records[0]["cost_usd"] == 0
    assert len(sleeps) == 1 and sleeps[0] >= 0.25  # at least the server's retry-after
    assert [limit for _, limit in limiter.history] == [8, 4]  # halved, then regrowing
    assert 4 < limiter.limit < 5


def test_backoff_grows_and_the_last_error_is_raised():
    wire = Wire(httpx2.Response(503, json={"error": {"message": "down"}}))
    gw, records, sleeps = gateway(wire, max_retries=3, backoff_base=1.0, backoff_max=3.0)
    with pytest.raises(ProviderError) as e:
        call(gw)
    assert e.value.kind == "server" and wire.count == 4
    assert [r["attempt"] for r in records] == [1, 2, 3, 4]
    assert all(r["status"] == "error" for r in records)
    assert len(sleeps) == 3 and 0.5 <= sleeps[0] <= 1 and 1 <= sleeps[1] <= 2
    assert 1.5 <= sleeps[2] <= 3  # capped by backoff_max
    again = gateway(Wire(httpx2.Response(503, json={}), openai_ok()), max_retries=3)[0]
    assert call(again).text == "done"


def test_non_retryable_error_raises_at_once():
    wire = Wire(httpx2.Response(400, json={"error": {"message": "bad schema"}}), openai_ok())
    gw, records, sleeps = gateway(wire)
    with pytest.raises(ProviderError) as e:
        call(gw)
    assert e.value.kind == "bad_request" and wire.count == 1 and sleeps == []
    assert [(r["status"], r["attempt"]) for r in records] == [("error", 1)]


def test_retry_after_beyond_the_cap_gives_up():
    wire = Wire(too_many("600"), openai_ok())
    gw, records, _ = gateway(wire, max_retry_after=120)
    with pytest.raises(ProviderError, match="rate_limited"):
        call(gw)
    assert wire.count == 1 and len(records) == 1


def test_error_records_are_redacted(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEACHER_API_KEY", "supersecretvalue123")
    wire = Wire(httpx2.Response(401, json={"error": {"message": "bad key supersecretvalue123"}}))
    gw, records, _ = gateway(wire)
    with pytest.raises(ProviderError):
        call(gw)
    assert "supersecretvalue123" not in records[0]["error"] and MARK in records[0]["error"]


def test_budget_stops_the_next_call():
    wire = Wire(openai_ok(prompt=1_000_000, completion=0))  # $0.40 on gpt-4.1-mini
    gw, records, _ = gateway(wire, ledger=CostLedger(load_prices(), max_usd=0.5))
    call(gw, agent="a1")
    call(gw, agent="a2")  # allowed: $0.40 < $0.50 before it; overshoots to $0.80
    with pytest.raises(BudgetExceeded):
        call(gw, agent="a3")
    assert wire.count == 2 and len(records) == 2
    tokens = gateway(Wire(openai_ok()), ledger=CostLedger(load_prices(), max_tokens=1100))[0]
    call(tokens)
    with pytest.raises(BudgetExceeded, match="token"):
        call(tokens, agent="other")


def test_structured_output_is_cached_and_a_bad_reply_is_paid_and_retried():
    wire = Wire(openai_ok("not json", prompt=50, completion=10), openai_ok('{"ok": true}'))
    gw, records, _ = gateway(wire, cache=MemoryCache())
    kw = {"model": "gpt-4.1-mini", "messages": MESSAGES, "schema": {"type": "object"},
          "schema_name": "v", "temperature": 0.0, "max_tokens": 10, "agent": "judge",
          "slice_id": None}
    assert gw.complete_json(**kw) == {"ok": True}
    assert gw.complete_json(**kw) == {"ok": True}
    assert wire.count == 2
    assert [(r["status"], r["cached"]) for r in records] == [
        ("error", False), ("ok", False), ("ok", True)]
    assert records[0]["error"].startswith("malformed") and records[0]["output_tokens"] == 10
    assert records[0]["cost_usd"] > 0 and gw.ledger.totals()["calls"] == 2


def test_gateway_is_thread_safe():
    wire = Wire(openai_ok(prompt=100, completion=10))
    limiter = AdaptiveLimiter(initial=4, maximum=4)
    gw, records, _ = gateway(wire, limiter=limiter, cache=MemoryCache())
    threads = [threading.Thread(target=call, args=(gw,),
                                kwargs={"agent": f"a{i % 4}", "slice_id": f"s{i}",
                                        "messages": [{"role": "user", "content": str(i)}]})
               for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals = gw.ledger.totals()
    assert wire.count == 24 and len(records) == 24 and totals["calls"] == 24
    assert totals["input_tokens"] == 2400 and len(totals["by_slice"]) == 24
    assert sum(a["calls"] for a in totals["by_agent"].values()) == 24
    assert limiter.limit == 4 and limiter.in_flight == 0


def test_request_key_is_content_only():
    args = ("openai", "http://a/v1", "m", MESSAGES, None, {"temperature": 0.5})
    key = request_key(*args)
    assert len(key) == 64
    assert request_key("openai", "http://b/v1", *args[2:]) == key  # endpoint: not in the key
    assert request_key("anthropic", *args[1:]) != key
    assert request_key(*args[:2], "m2", *args[3:]) != key
    assert request_key(*args[:5], {"temperature": 0.6}) != key
    reordered = [{"content": "s", "role": "system"}, {"content": "u", "role": "user"}]
    assert request_key(*args[:3], reordered, *args[4:]) == key


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_async_gateway_takes_the_same_path(api):
    """acomplete: the same records, retries, backoff and cache as complete."""
    ok = openai_ok if api == "openai" else anthropic_ok
    wire = Wire(too_many("0.25"), ok())
    base = "http://llm.test/v1" if api == "openai" else "http://llm.test/anthropic"
    provider = make_provider(api, base_url=base, api_key="k",
                             http_client=httpx2.Client(transport=httpx2.MockTransport(wire)),
                             async_http_client=httpx2.AsyncClient(
                                 transport=httpx2.MockTransport(wire)))
    records, sleeps = [], []

    async def asleep(seconds: float) -> None:
        sleeps.append(seconds)

    gw = LLMGateway(provider, role="teacher", cache=MemoryCache(), on_call=records.append,
                    limiter=AdaptiveLimiter(initial=8), asleep=asleep, backoff_base=0.01,
                    ledger=CostLedger(load_prices()))
    kw = {"model": "m", "messages": MESSAGES, "tools": None, "temperature": 0.5,
          "max_tokens": 100, "agent": "a1", "slice_id": "s1"}
    completion = asyncio.run(gw.acomplete(**kw))
    assert completion.text == "done" and wire.count == 2
    assert [(r["attempt"], r["status"]) for r in records] == [(1, "error"), (2, "ok")]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert len(sleeps) == 1 and sleeps[0] >= 0.25  # the server's retry-after
    assert gw.complete(**kw) == completion and wire.count == 2  # the blocking call: a hit
    assert records[-1]["cached"] is True


# ── redaction ──────────────────────────────────────────────────────────────────────────────
def test_redact_env_values_and_patterns(monkeypatch):
    monkeypatch.setenv("MINIMAX_API_KEY", "mm-0123456789abcdef")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghij")
    monkeypatch.setenv("SHORT_SECRET", "abc")  # under 8 characters: left alone
    monkeypatch.setenv("POSTTRAIN_HOME", "/tmp/posttrain-home")  # not a secret name
    obj = {
        "error": "401 for key mm-0123456789abcdef",
        "headers": ["Authorization: Bearer eyJhbGciOi.J9.xyz", "X-Api-Key: abcd1234efgh5678"],
        "nested": {"keys": ("sk-proj-ABCDEFGHIJKLMNOPQRST", "sk-ant-api03-abcdefghijklmnop_qr")},
        "note": "abc and /tmp/posttrain-home and hf_abcdefghij",
        "n": 3, "none": None,
    }
    out = redact(obj)
    assert out == {
        "error": f"401 for key {MARK}",
        "headers": [f"Authorization: Bearer {MARK}", f"X-Api-Key: {MARK}"],
        "nested": {"keys": (MARK, MARK)},
        "note": f"abc and /tmp/posttrain-home and {MARK}",
        "n": 3, "none": None,
    }
    assert obj["error"].endswith("mm-0123456789abcdef")  # the input is not modified
    assert redact("sk-short") == "sk-short"
    assert json.loads(redact(json.dumps({"x-api-key": "abcdefgh12345"}))) == {"x-api-key": MARK}
