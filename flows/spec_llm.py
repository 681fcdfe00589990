"""The spec's LLM section: which model plays each role (generator, judge, tuner), through
which SDK and endpoint, what calls cost and may spend, and how fast they may go.

Split from `flows/spec.py` (which imports and re-exports it), like `flows/spec_training.py`.
Same rules: every field has help text, unknown keys are errors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agents.teacher.config import TeacherKnobs
from flows.spec_base import Strict


class Role(Strict):
    """Which LLM plays one role, through which SDK, at which endpoint."""

    api: Literal["openai", "anthropic"] = Field(
        "openai",
        description="Wire format and official SDK: openai (OpenAI, MiniMax, vLLM, Ollama, any "
        "OpenAI-compatible endpoint) or anthropic (Claude, MiniMax's Anthropic endpoint).",
    )
    model: str = Field(description="Model name sent to the provider.")
    endpoint: str | None = Field(
        "simulated",
        description="`simulated` (posttrain's local teacher, always announced as such), a base "
        "URL (e.g. https://api.minimax.io/v1), or null for the SDK's default endpoint.",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable with the key (default OPENAI_API_KEY or "
        "ANTHROPIC_API_KEY by api)."
    )
    secret_block: str | None = Field(
        None, description="Prefect Secret block holding the key, used when the variable is unset."
    )
    temperature: float = Field(0.2, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(4096, ge=1, description="Most output tokens per call.")
    stream: bool = Field(False, description="Anthropic only: stream replies (SSE).")

    @property
    def simulated(self) -> bool:
        return self.endpoint == "simulated"

    @property
    def key_env(self) -> str:
        return self.api_key_env or ("OPENAI_API_KEY" if self.api == "openai" else "ANTHROPIC_API_KEY")


class Price(Strict):
    input: float = Field(ge=0.0, description="USD per million input tokens.")
    output: float = Field(ge=0.0, description="USD per million output tokens.")
    cache_read: float | None = Field(None, ge=0.0, description="USD per million cache-read "
                                     "tokens (default: the input price).")
    cache_write: float | None = Field(None, ge=0.0, description="USD per million cache-write "
                                      "tokens (default: the input price).")


class Budget(Strict):
    max_usd: float | None = Field(None, gt=0.0, description="Stop new LLM calls past this cost.")
    max_tokens: int | None = Field(None, ge=1, description="Stop new LLM calls past this many "
                                   "tokens (input, output, cache reads and writes).")


class RateLimit(Strict):
    initial: int = Field(8, ge=1, description="Concurrent calls per endpoint at the start.")
    minimum: int = Field(1, ge=1, description="Floor the adaptive limit never goes under.")
    maximum: int = Field(64, ge=1, description="Ceiling the adaptive limit grows back to.")


class Outage(Strict):
    """How long a provider in trouble is waited out before the generate stage gives up
    (agents/breaker.py, docs/RELIABILITY.md)."""

    budget_s: float = Field(
        600.0, ge=0.0, description="Seconds a provider may stay in trouble (most recent calls "
        "failing) while calls are retried one at a time; past it the endpoint's circuit "
        "breaker opens, the agents stop, and the generate stage ends with that reason "
        "(accepted work is kept: run the same command again to resume).")
    error_share: float = Field(
        0.8, gt=0.0, le=1.0, description="Share of the last `window` calls failing (429, 5xx, "
        "timeouts, dropped connections, bodies that are not JSON) that puts a provider in "
        "trouble.")
    window: int = Field(20, ge=4, description="How many recent calls the share is taken over.")


class LLM(Strict):
    generator: Role = Field(
        default_factory=lambda: Role(model="simulated-teacher"),
        description="The bulk: the sub-agents that label rows (a cheap model).",
    )
    judge: Role | None = Field(
        default_factory=lambda: Role(api="anthropic", model="simulated-judge", temperature=0.0),
        description="Reviews a sample of accepted examples (a strong model); null to skip.",
    )
    tuner: Role | None = Field(None, description="Proposes training configs (later stages).")
    simulated: TeacherKnobs = Field(
        default_factory=TeacherKnobs,
        description="Knobs of the simulated teacher: noise, drift, bias, misuse, faults.",
    )
    prices: dict[str, Price] = Field(
        default_factory=dict, description="Per-model prices overriding agents/prices.yaml."
    )
    budget: Budget = Field(default_factory=Budget)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    outage: Outage = Field(default_factory=Outage)

    def roles(self) -> dict[str, Role]:
        return {n: r for n, r in (("generator", self.generator), ("judge", self.judge),
                                  ("tuner", self.tuner)) if r is not None}
