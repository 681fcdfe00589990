"""The LLM runtime of one pipeline run: providers per role, gateways, the shared ledger.

Prefect tasks receive only small, hashable settings (`RuntimeSettings`); each process
builds the runtime once from them (`get_runtime`) and every agent shares it, threads and
coroutines alike (the gateways' blocking and async paths share their state), so the cost
ledger, the budget and each endpoint's adaptive rate limit are per run, not per agent.
Keys are never task parameters (they would land in Prefect's database): they are read here,
from the environment or a Prefect Secret block, by `resolve_key`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from agents.breaker import CircuitBreaker
from agents.drift import DriftMonitor, DriftPolicy, DriftSettings, FleetBaseline
from agents.gateway import LLMGateway
from agents.ledger import CostLedger, load_prices
from agents.provider_factory import make_provider
from agents.ratelimit import limiter_for
from agents.redact import redact
from flows.spec import Spec, load_spec
from flows.spec_llm import Role
from flows.store import shared_store

SIMULATED_KEY = "simulated-teacher-key"


class MissingKey(RuntimeError):
    """A role needs an API key that is neither in the environment nor in a Secret block."""


def resolve_key(role_name: str, role: Role) -> str:
    if role.simulated:
        return SIMULATED_KEY
    key = os.environ.get(role.key_env)
    if key:
        return key
    if role.secret_block:
        try:
            from prefect.blocks.system import Secret

            return Secret.load(role.secret_block).get()
        except Exception as e:  # noqa: BLE001 - any failure to load is the same user error
            raise MissingKey(f"llm.{role_name}.secret_block: could not load Prefect Secret "
                             f"block {role.secret_block!r} ({e.__class__.__name__})") from None
    raise MissingKey(f"llm.{role_name}: ${role.key_env} is not set; export it or name a "
                     f"Prefect Secret block in llm.{role_name}.secret_block")


def check_keys(spec: Spec) -> None:
    """Every role's key, before any work starts: one clear error for the first missing."""
    for name, role in spec.llm.roles().items():
        resolve_key(name, role)


@dataclass(frozen=True)
class RuntimeSettings:
    """What a task needs to rebuild the runtime: small, hashable, no secrets."""

    spec_path: str
    run_id: str
    store_url: str
    out_dir: str
    endpoints: tuple[tuple[str, str | None], ...]  # (role, base URL); simulated resolved
    attempt: str = ""  # this start of the run: a resumed run gets a fresh runtime (breakers)


class Runtime:
    def __init__(self, settings: RuntimeSettings):
        self.settings = settings
        self.spec = load_spec(settings.spec_path)
        self.store = shared_store(settings.store_url)
        llm = self.spec.llm
        self.ledger = CostLedger(
            load_prices({m: p.model_dump(exclude_none=True) for m, p in llm.prices.items()}),
            max_usd=llm.budget.max_usd, max_tokens=llm.budget.max_tokens,
        )
        endpoints = dict(settings.endpoints)
        # a reply and its call record are written in one transaction (StoreCallCache)
        self.cache = self.store.call_cache(with_records=True)
        self.gateways: dict[str, LLMGateway] = {}
        # one circuit breaker per endpoint and run: roles sharing a server share its outage
        self.breakers: dict[str, CircuitBreaker] = {}
        for name, role in llm.roles().items():
            provider = make_provider(role.api, base_url=endpoints.get(name),
                                     api_key=resolve_key(name, role), stream=role.stream)
            limiter = limiter_for(provider.endpoint, initial=llm.rate_limit.initial,
                                  minimum=llm.rate_limit.minimum,
                                  maximum=llm.rate_limit.maximum)
            self.gateways[name] = LLMGateway(
                provider, role=name, cache=self.cache, ledger=self.ledger,
                limiter=limiter, on_call=self._record,
                breaker=self._breaker(provider.endpoint))
        # the drift test's settings, and the fleet's early bad rate shared by this process's
        # agents (agents/drift.py)
        self.drift_settings = DriftSettings(**self.spec.generation.drift.model_dump())
        self.fleet = FleetBaseline(self.drift_settings)
        # the judge reviews what agents submit: labels, or answers against the task's rubric
        self.judge = None
        if llm.judge is not None:
            from flows.kinds import kind_of  # the kinds import training code: load it late

            self.judge = kind_of(self.spec).judge(self.gateways["judge"], llm.judge)

    def _breaker(self, endpoint: str) -> CircuitBreaker:
        if endpoint not in self.breakers:
            self.breakers[endpoint] = CircuitBreaker(
                redact(endpoint), **self.spec.llm.outage.model_dump(), on_event=_warn)
        return self.breakers[endpoint]

    def _record(self, record: dict) -> None:
        self.store.record_call(self.settings.run_id, **record,
                               reply=self.cache.take(record["request_hash"]))

    def drift_policy(self, rows: int) -> DriftPolicy:
        """A fresh drift test for an agent over `rows` rows: it sees about one observation a
        row (twice that at most, with corrections), so that bounds its false alarms."""
        return DriftPolicy(DriftMonitor(self.drift_settings, horizon=2 * max(rows, 1),
                                        fleet=self.fleet))


def _warn(message: str) -> None:
    """A provider's trouble, in the run's log (the Prefect UI) when inside a run."""
    try:
        get_run_logger().warning(message)
    except MissingContextError:
        logging.getLogger("posttrain").warning(message)


_lock = threading.Lock()


@functools.cache
def _build(settings: RuntimeSettings) -> Runtime:
    return Runtime(settings)


def get_runtime(settings: RuntimeSettings) -> Runtime:
    with _lock:  # agent threads start together; build once
        return _build(settings)
