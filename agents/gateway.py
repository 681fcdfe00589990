"""One LLM call, the same way for every agent: cache → budget → rate limit → provider → ledger
(docs/agent-runtime.md, "Gateway").

A cache hit returns at once (0 tokens, $0). Otherwise the ledger must allow the call, then up
to 1 + max_retries attempts run, each inside a slot of the endpoint's `AdaptiveLimiter`; a
retryable `ProviderError` throttles the limiter (429/529), backs off (exponential, seeded
jitter, never less than the server's retry-after) and retries; anything else raises at once.
Every attempt that reached the provider, and every cache hit, goes to `on_call(record)`, and
with its request and reply to the calling agent's tracer (agents/tracing.py), if any.

With a `CircuitBreaker` (agents/breaker.py) the gateway rides out a provider in trouble: it
keeps retrying past `max_retries`, every failure halves the endpoint's concurrency (down to
one probe at a time), and when the trouble outlasts the outage budget every call raises
`ProviderOutage` before a request is sent.

The cache key (`request_key`) hashes the API and the request content, NOT the endpoint: the
endpoint is transport (which server, which rate-limit bucket), and the same request through a
proxy, a mirror or a moved base URL should replay the same reply. Serving different weights
under one model name at two endpoints would therefore share entries: name models distinctly.

One gateway per role is shared by many agents, threads or coroutines; it holds no per-call
state. `complete` / `complete_json` block; `acomplete` / `acomplete_json` are the same path for
coroutines (the provider's async client, the limiter's `aslot`, `asyncio.sleep` between
attempts). The cache, the ledger and the records are the same code for both and run inline:
short synchronous store queries (CPU on a local SQLite store; on a remote PostgreSQL store a
network round trip each, which the event loop waits out).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from agents.breaker import CircuitBreaker, is_provider_fault
from agents.ledger import BudgetExceeded, CostLedger
from agents.providers import Completion, Provider, ProviderError, parse_json_reply
from agents.ratelimit import AdaptiveLimiter, limiter_for
from agents.redact import redact
from agents.tracing import reply_of, report_llm_call

__all__ = ["BudgetExceeded", "CallCache", "LLMGateway", "MemoryCache", "request_key"]

_THROTTLES = ("rate_limited", "overloaded")


class CallCache(Protocol):
    def get(self, key: str) -> dict | None: ...
    def put(self, key: str, *, api: str, model: str, response: dict) -> None: ...


class MemoryCache:
    """A thread-safe in-process `CallCache` (the store implements the persistent one)."""

    def __init__(self) -> None:
        self._data: dict[str, dict] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, *, api: str, model: str, response: dict) -> None:
        del api, model  # the store keeps them as columns; here the key is enough
        with self._lock:
            self._data[key] = dict(response)

    def __len__(self) -> int:
        return len(self._data)


def request_key(api: str, endpoint: str | None, model: str, messages: list[dict],
                tools: list[dict] | None, params: dict) -> str:
    """sha256 of the canonical JSON of what determines a reply; `endpoint` is deliberately
    left out (see the module docstring)."""
    del endpoint
    blob = json.dumps(
        {"api": api, "model": model, "messages": messages, "tools": tools or [],
         "params": params},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class LLMGateway:
    def __init__(self, provider: Provider, *, role: str, cache: CallCache | None = None,
                 ledger: CostLedger | None = None, limiter: AdaptiveLimiter | None = None,
                 on_call: Callable[[dict], None] | None = None, max_retries: int = 4,
                 backoff_base: float = 0.5, backoff_max: float = 30.0,
                 max_retry_after: float = 120.0, seed: int = 0,
                 breaker: CircuitBreaker | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 asleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.provider = provider
        self.role = role
        self.cache = cache
        self.ledger = ledger if ledger is not None else CostLedger()
        self.limiter = limiter if limiter is not None else limiter_for(provider.endpoint)
        self.on_call = on_call or (lambda record: None)
        self.max_retries = max_retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.max_retry_after = max_retry_after  # a server asking for longer: give up
        self.breaker = breaker
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._sleep, self._asleep = sleep, asleep

    # ── one call: blocking, or for a coroutine ────────────────────────────────────────────
    def complete(self, *, model: str, messages: list[dict], tools: list[dict] | None = None,
                 temperature: float | None = None, max_tokens: int | None = None,
                 agent: str, slice_id: str | None = None) -> Completion:
        key = self._chat_key(model, messages, tools, temperature, max_tokens)

        def call() -> tuple[Completion, dict | None]:
            return self.provider.complete(model=model, messages=messages, tools=tools,
                                          temperature=temperature, max_tokens=max_tokens), None

        completion, _ = self._run(key, model, agent, slice_id, call,
                                  _request(model, messages, tools=tools))
        return completion

    async def acomplete(self, *, model: str, messages: list[dict],
                        tools: list[dict] | None = None, temperature: float | None = None,
                        max_tokens: int | None = None, agent: str,
                        slice_id: str | None = None) -> Completion:
        key = self._chat_key(model, messages, tools, temperature, max_tokens)

        async def call() -> tuple[Completion, dict | None]:
            return await self.provider.acomplete(
                model=model, messages=messages, tools=tools, temperature=temperature,
                max_tokens=max_tokens), None

        completion, _ = await self._arun(key, model, agent, slice_id, call,
                                         _request(model, messages, tools=tools))
        return completion

    def complete_json(self, *, model: str, messages: list[dict], schema: dict,
                      schema_name: str, temperature: float | None = None,
                      max_tokens: int | None = None, agent: str,
                      slice_id: str | None = None) -> dict:
        key = self._json_key(model, messages, schema, schema_name, temperature, max_tokens)

        def call() -> tuple[Completion, dict | None]:
            data, completion = self.provider.complete_json(
                model=model, messages=messages, schema=schema, schema_name=schema_name,
                temperature=temperature, max_tokens=max_tokens)
            return completion, data

        completion, data = self._run(key, model, agent, slice_id, call,
                                     _request(model, messages, schema_name=schema_name))
        return data if data is not None else parse_json_reply(completion)

    async def acomplete_json(self, *, model: str, messages: list[dict], schema: dict,
                             schema_name: str, temperature: float | None = None,
                             max_tokens: int | None = None, agent: str,
                             slice_id: str | None = None) -> dict:
        key = self._json_key(model, messages, schema, schema_name, temperature, max_tokens)

        async def call() -> tuple[Completion, dict | None]:
            data, completion = await self.provider.acomplete_json(
                model=model, messages=messages, schema=schema, schema_name=schema_name,
                temperature=temperature, max_tokens=max_tokens)
            return completion, data

        completion, data = await self._arun(key, model, agent, slice_id, call,
                                            _request(model, messages, schema_name=schema_name))
        return data if data is not None else parse_json_reply(completion)

    def _chat_key(self, model, messages, tools, temperature, max_tokens) -> str:
        params = {"temperature": temperature, "max_tokens": max_tokens}
        return request_key(self.provider.api, self.provider.endpoint, model, messages, tools,
                           params)

    def _json_key(self, model, messages, schema, schema_name, temperature, max_tokens) -> str:
        params = {"temperature": temperature, "max_tokens": max_tokens, "schema": schema,
                  "schema_name": schema_name, "structured": True}
        return request_key(self.provider.api, self.provider.endpoint, model, messages, None,
                           params)

    # ── the path: the two drivers differ only in how they wait ──────────────────────────────
    def _run(self, key, model, agent, slice_id, call, request):
        base = self._base(key, model, agent, slice_id)
        hit = self._hit(base, key, request)
        if hit is not None:
            return hit
        for attempt in itertools.count(1):
            with self.limiter.slot():
                self._check_breaker()  # open: no request is sent
                started = time.perf_counter()
                try:
                    outcome, error = call(), None
                except ProviderError as e:
                    outcome, error = None, e
                latency = _ms(started)
            if error is None:
                return self._succeeded(base, key, outcome, latency, attempt, request)
            self._sleep(self._failed(base, error, latency, attempt, request))
            self.ledger.check()

    async def _arun(self, key, model, agent, slice_id, call, request):
        base = self._base(key, model, agent, slice_id)
        hit = self._hit(base, key, request)
        if hit is not None:
            return hit
        for attempt in itertools.count(1):
            async with self.limiter.aslot():
                self._check_breaker()  # open: no request is sent
                started = time.perf_counter()
                try:
                    outcome, error = await call(), None
                except ProviderError as e:
                    outcome, error = None, e
                latency = _ms(started)
            if error is None:
                return self._succeeded(base, key, outcome, latency, attempt, request)
            await self._asleep(self._failed(base, error, latency, attempt, request))
            self.ledger.check()

    def _base(self, key, model, agent, slice_id) -> dict:
        return {"role": self.role, "agent": agent, "slice_id": slice_id,
                "api": self.provider.api, "model": model, "request_hash": key}

    def _hit(self, base: dict, key: str, request: dict) -> tuple[Completion, dict | None] | None:
        """A cached reply (recorded as a hit), else None once the budget allows a new call."""
        hit = self._cached(key)
        if hit is not None:
            self._notify(_record(base, None, 0.0, 0.0, cached=True, error=None, attempt=0),
                         request, reply_of(*hit))
            return hit
        self.ledger.check()
        self._check_breaker()  # before waiting for a slot: an open breaker never waits
        return None

    def _notify(self, record: dict, request: dict, reply: dict | None) -> None:
        """The record to `on_call`; the call with its request and reply to the tracer of the
        agent that made it (agents/tracing.py: the tracer current in the calling task)."""
        self.on_call(record)
        report_llm_call(record, request, reply)

    def _check_breaker(self) -> None:
        if self.breaker is not None:
            self.breaker.check()

    def _succeeded(self, base: dict, key: str, outcome: tuple[Completion, dict | None],
                   latency: float, attempt: int, request: dict
                   ) -> tuple[Completion, dict | None]:
        """Grow the limit, pay, cache and record the reply."""
        completion, data = outcome
        self.limiter.on_success()
        if self.breaker is not None:
            self.breaker.on_success()
        cost = self.ledger.add(self.role, base["model"], base["agent"], base["slice_id"],
                               completion)
        if self.cache is not None:
            response = completion.to_dict() | ({"json": data} if data is not None else {})
            self.cache.put(key, api=self.provider.api, model=base["model"], response=response)
        self._notify(_record(base, completion, cost, latency, cached=False, error=None,
                             attempt=attempt), request, reply_of(completion, data))
        return outcome

    def _failed(self, base: dict, error: ProviderError, latency: float, attempt: int,
                request: dict) -> float:
        """Record a failed attempt; raise it, or throttle and return the seconds to back off
        before the next."""
        spent = error.completion  # the model answered but unusably: its tokens were paid for
        cost = self.ledger.add(self.role, base["model"], base["agent"], base["slice_id"],
                               spent) if spent else 0.0
        message = redact(f"{error.kind}: {error.message}")[:500]
        self._notify(_record(base, spent, cost, latency, cached=False, error=message,
                             attempt=attempt), request, reply_of(spent) if spent else None)
        breaker = self.breaker
        if breaker is not None:
            breaker.on_failure(error)
        trouble = breaker is not None and breaker.in_trouble and is_provider_fault(error)
        if error.kind in _THROTTLES or trouble:  # in trouble: down towards one probe
            self.limiter.on_throttle(error.retry_after)
        too_long = (error.retry_after or 0) > self.max_retry_after
        if not error.retryable or too_long or (attempt > self.max_retries and not trouble):
            raise error
        self._check_breaker()  # this failure may have used up the outage budget
        return self._backoff(attempt, error.retry_after)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        with self._rng_lock:
            jitter = 0.5 + self._rng.random() / 2
        delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)) * jitter
        return max(delay, retry_after or 0.0)

    def _cached(self, key: str) -> tuple[Completion, dict | None] | None:
        entry = self.cache.get(key) if self.cache is not None else None
        if entry is None:
            return None
        try:
            return Completion.from_dict(entry), entry.get("json")
        except (TypeError, KeyError, ValueError):
            return None  # an unreadable entry is a miss; the fresh reply overwrites it


def _record(base: dict, usage: Completion | None, cost: float, latency: float, *,
            cached: bool, error: str | None, attempt: int) -> dict:
    return {
        **base, "cached": cached,
        "input_tokens": usage.input_tokens if usage else 0,
        "output_tokens": usage.output_tokens if usage else 0,
        "cache_read_tokens": usage.cache_read_tokens if usage else 0,
        "cache_write_tokens": usage.cache_write_tokens if usage else 0,
        "cost_usd": cost, "latency_ms": latency,
        "status": "ok" if error is None else "error", "error": error, "attempt": attempt,
    }


def _request(model: str, messages: list[dict], **extra) -> dict:
    """What a trace shows of a request (not copied: the tracer scrubs what it keeps)."""
    return {"model": model, "messages": messages, **extra}


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
