"""What an agent tells an observer as it works, so a person can read each agent's calls as a
trace (flows/agent_traces.py writes them to MLflow; nothing here knows MLflow or Prefect).

    tracer = SomeTracer(...)                       # one per agent: it keeps that agent's spans
    with use(tracer):                              # the gateway's calls in this task report here
        with step(tracer, "agent uk/0", AGENT, inputs=...) as root:
            with step(tracer, "sql", TOOL, inputs={"sql": q}) as s:
                s.outputs = {"rows": 12}
            ...                                    # gateway.acomplete(...) -> tracer.llm_call(...)
            root.outputs = {"accepted": 40}

A `Tracer` opens and closes nested spans (`open` returns a handle; `close` ends it) and takes
finished LLM calls (`llm_call`: the gateway's record, the request, the reply), each a child of
the innermost span open. One tracer belongs to one agent, and an agent is one coroutine, so its
open spans form a stack; no span is ever shared between agents.

Which tracer the gateway reports to: the gateway is shared by every agent of a role, so it
asks `current()`, a `ContextVar`. asyncio gives every task its own copy of the context (the
agents of a fan-out are separate tasks) and every thread its own, so two agents on one event
loop never see each other's tracer; the gateway's report runs inside the calling task.

Tracing must never fail or slow down an agent: every call to a tracer goes through `_safe`,
which logs the first failure and carries on; the default tracer does nothing. Everything
handed to a tracer is scrubbed first (`scrub`): secrets redacted (agents/redact.py, plus
passwords in URLs) and long texts cut.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from agents.redact import MARK, redact

AGENT, LLM, TOOL, CHAIN, EVALUATOR = "AGENT", "LLM", "TOOL", "CHAIN", "EVALUATOR"

_log = logging.getLogger(__name__)
# user:password@ after a scheme's "://" (matched from "://" on: linear in the text's length)
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^@\s/]+@")


class Tracer(Protocol):
    def open(self, name: str, kind: str, inputs: Any = None,
             attributes: dict | None = None) -> Any:
        """Start a span under the innermost open one (a new trace when none is open)."""

    def close(self, handle: Any, outputs: Any = None, attributes: dict | None = None,
              error: str | None = None) -> None:
        """End the span `open` returned."""

    def llm_call(self, record: dict, request: dict, reply: dict | None) -> None:
        """One finished LLM attempt or cache hit: the gateway's `on_call` record (role, model,
        tokens, cost_usd, latency_ms, cached, attempt, status, error), the request (model,
        messages, tools) and the reply (text, tool_calls, json), None for a failed attempt."""


class NullTracer:
    """The default: tracing off."""

    def open(self, name, kind, inputs=None, attributes=None):
        return None

    def close(self, handle, outputs=None, attributes=None, error=None):
        return None

    def llm_call(self, record, request, reply):
        return None


NULL = NullTracer()
_current: ContextVar[Tracer] = ContextVar("posttrain_tracer", default=NULL)


def current() -> Tracer:
    """The tracer of the agent running in this task or thread (NULL outside one)."""
    return _current.get()


@contextlib.contextmanager
def use(tracer: Tracer | None) -> Iterator[Tracer]:
    """Make `tracer` current for this task (or thread) until the block ends; None leaves the
    current one as it is."""
    if tracer is None:
        yield _current.get()
        return
    token = _current.set(tracer)
    try:
        yield tracer
    finally:
        _current.reset(token)


@dataclass
class Step:
    """What the block inside `step` found out: set outputs, attributes or error on it."""

    outputs: Any = None
    attributes: dict = field(default_factory=dict)
    error: str | None = None


@contextlib.contextmanager
def step(tracer: Tracer | None, name: str, kind: str, inputs: Any = None,
         attributes: dict | None = None) -> Iterator[Step]:
    """One span around the block; an exception leaving it marks the span as failed."""
    s = Step()
    if tracer is None or tracer is NULL:
        yield s
        return
    handle = _safe(tracer.open, name, kind, inputs, attributes)
    try:
        yield s
    except BaseException as e:
        s.error = s.error or f"{type(e).__name__}: {e}"
        raise
    finally:
        _safe(tracer.close, handle, s.outputs, s.attributes, s.error)


def report_llm_call(record: dict, request: dict, reply: dict | None) -> None:
    """The gateway's hook: the current agent's tracer hears of one LLM call."""
    tracer = _current.get()
    if tracer is not NULL:
        _safe(tracer.llm_call, record, request, reply)


def reply_of(completion: Any, data: dict | None = None) -> dict:
    """A provider's Completion (and a structured reply's parsed JSON) as plain data."""
    out: dict = {"text": getattr(completion, "text", None)}
    calls = getattr(completion, "tool_calls", None)
    if calls:
        out["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in calls]
    if data is not None:
        out["json"] = data
    return out


def scrub(obj: Any, limit: int = 4000, secrets: list[str] | None = None) -> Any:
    """A copy safe to store: secrets redacted (`secrets`: the environment's, as
    agents/redact.py's `env_secrets()` finds them, by default), passwords in URLs masked,
    texts over `limit` characters cut (the head kept, the length said)."""
    return _cut(redact(obj, secrets=secrets), limit)


def _cut(obj: Any, limit: int) -> Any:
    if isinstance(obj, str):
        if "://" in obj:
            obj = _URL_PASSWORD.sub(r"\g<1>" + MARK + "@", obj)
        return obj if len(obj) <= limit else f"{obj[:limit]}... [{len(obj)} chars]"
    if isinstance(obj, dict):
        return {k: _cut(v, limit) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_cut(v, limit) for v in obj]
    return obj


_failed_once = False


def quietly(fn, *args) -> Any:
    """`fn(*args)` for tracing's sake: a failure is logged once and gives None."""
    return _safe(fn, *args)


def _safe(fn, *args) -> Any:
    """Call a tracer method; a failure is logged the first time and never raised."""
    global _failed_once
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - tracing must never fail an agent
        if not _failed_once:
            _failed_once = True
            _log.warning("tracing failed (%s: %s); agents carry on, traces may be incomplete",
                         type(e).__name__, redact(str(e))[:300])
        return None
