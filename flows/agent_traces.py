"""Every agent's work as an MLflow trace, in the run's experiment and linked to the run's
parent MLflow run (its Traces tab), so a person can read what went wrong, call by call.

    agent uk/0                      AGENT   inputs: the task; outputs: accepted, rejected,
    ├── generator <model>           LLM       revoked, stopped_reason, calls
    ├── sql                         TOOL    the SQL, rows returned (or the refusal)
    ├── generator <model>           LLM     messages sent, reply, tokens, cost, cached, ...
    ├── submit_examples             TOOL    the gate's verdicts, counts by reason
    │   └── judge review            EVALUATOR  the verdicts
    │       └── judge <model>       LLM
    ...

`MlflowTracer` implements agents/tracing.py's `Tracer` for one agent (the agents never import
MLflow). Spans are started with explicit parents (`mlflow.start_span_no_context`), never
MLflow's fluent "current span": many agents share one event loop. An LLM call is reported
once it has finished, so its span is placed at [end - latency, end]: a cache hit is a
near-zero span. What a span keeps is scrubbed (secrets redacted, long texts cut, the last
`LAST_MESSAGES` messages of a request). MLflow writes the traces on a background thread
(MLFLOW_ENABLE_ASYNC_TRACE_LOGGING, on by default); `flush()` waits for them.

`tracking.traces: false` turns tracing off; a tracer that cannot be made (the tracking store
down) is logged once and the process's agents run untraced from then on, and a failure while
tracing is logged once by agents/tracing.py and never reaches an agent. Writing the traces is
MLflow's background work: a store that fails then loses traces, never an agent's result.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import SpanStatus, SpanStatusCode
from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey
from mlflow.tracking import MlflowClient

from agents.redact import env_secrets
from agents.tracing import LLM, scrub
from flows import tracking

_log = logging.getLogger(__name__)

LAST_MESSAGES = 6   # the messages of a request a span keeps (the latest: the turn's news)
TEXT_LIMIT = 4000   # characters of any one text a span keeps
_RECORD_FIELDS = ("role", "agent", "slice_id", "api", "model", "input_tokens",
                  "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd",
                  "latency_ms", "cached", "attempt", "status", "error")


class MlflowTracer:
    """One agent's trace: the first span opened is its root, in `experiment_id`, its
    metadata naming `source_run` (the pipeline's parent run) so the run's Traces tab lists it."""

    def __init__(self, experiment_id: str, source_run: str, tags: dict | None = None):
        self.experiment_id, self.source_run = experiment_id, source_run
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self._open: list[Any] = []  # the open spans, innermost last (one agent: a stack)
        self._secrets = env_secrets()  # read once: the environment's secrets to redact

    def _scrub(self, obj: Any, limit: int = 0) -> Any:
        return scrub(obj, limit or TEXT_LIMIT, self._secrets)

    def _start(self, name: str, kind: str, inputs: Any, attributes: dict,
               start_time_ns: int | None = None) -> Any:
        parent = self._open[-1] if self._open else None
        root = {} if parent is not None else {
            "experiment_id": self.experiment_id, "tags": self.tags,
            "metadata": {TraceMetadataKey.SOURCE_RUN: self.source_run}}
        return mlflow.start_span_no_context(
            name, span_type=kind, parent_span=parent, inputs=self._scrub(inputs),
            attributes=self._scrub(attributes), start_time_ns=start_time_ns, **root)

    def open(self, name: str, kind: str, inputs: Any = None,
             attributes: dict | None = None) -> Any:
        span = self._start(name, kind, inputs, {k: v for k, v in (attributes or {}).items()
                                                if v is not None})
        self._open.append(span)
        return span

    def close(self, handle: Any, outputs: Any = None, attributes: dict | None = None,
              error: str | None = None) -> None:
        if handle is None:
            return
        self._open = [s for s in self._open if s is not handle]
        status = SpanStatus(SpanStatusCode.ERROR, self._scrub(error, 500)) if error else None
        handle.end(outputs=self._scrub(outputs), status=status,
                   attributes=self._scrub({k: v for k, v in (attributes or {}).items()
                                     if v is not None}))

    def llm_call(self, record: dict, request: dict, reply: dict | None) -> None:
        end = time.time_ns()
        start = end - int(float(record.get("latency_ms") or 0.0) * 1e6)
        messages = request.get("messages") or []
        inputs = {"model": request.get("model"), "messages": messages[-LAST_MESSAGES:],
                  "messages_sent": len(messages)}
        if request.get("tools"):
            inputs["tools"] = [t.get("function", t).get("name") for t in request["tools"]]
        if request.get("schema_name"):
            inputs["schema_name"] = request["schema_name"]
        attributes = {k: record.get(k) for k in _RECORD_FIELDS if record.get(k) is not None}
        attributes[SpanAttributeKey.CHAT_USAGE] = {
            "input_tokens": record.get("input_tokens", 0),
            "output_tokens": record.get("output_tokens", 0),
            "total_tokens": record.get("input_tokens", 0) + record.get("output_tokens", 0)}
        name = f"{record.get('role')} {record.get('model')}" + (
            " (cached)" if record.get("cached") else "")
        span = self._start(name, LLM, inputs, attributes, start_time_ns=start)
        error = record.get("error")
        span.end(outputs=self._scrub(reply), end_time_ns=end,
                 status=SpanStatus(SpanStatusCode.ERROR, self._scrub(error, 500)) if error else None)


def run_tracer(spec, settings, **tags: Any) -> MlflowTracer | None:
    """A tracer for one agent of the run `settings` describe, or None when the spec turns
    traces off or MLflow cannot be reached (logged once; this process's agents then run
    untraced, so a tracking server that is down costs its retries once, not per agent)."""
    if spec is None or settings is None or not spec.tracking.traces or _warned:
        return None
    try:
        uri = tracking.tracking_uri(spec.tracking.uri, Path(settings.out_dir))
        source_run = _source_run(settings.store_url, settings.run_id)
        if not source_run:
            return None
        experiment_id = _experiment_of(uri, source_run)
        if mlflow.get_tracking_uri() != uri:  # a worker process: trace where the run tracks
            mlflow.set_tracking_uri(uri)
        return MlflowTracer(experiment_id, source_run,
                            {"posttrain.run_id": settings.run_id, **tags})
    except Exception as e:  # noqa: BLE001 - tracing never stops an agent
        _warn_once(f"agent traces off: {type(e).__name__}: {scrub(str(e), 300)}")
        return None


@functools.lru_cache(maxsize=64)
def _experiment_of(uri: str, mlflow_run_id: str) -> str:
    return MlflowClient(uri).get_run(mlflow_run_id).info.experiment_id


def _source_run(store_url: str, run_id: str) -> str | None:
    from flows.store import shared_store

    return (shared_store(store_url).get_run(run_id) or {}).get("mlflow_run_id") or None


_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        _log.warning(message)


def flush() -> None:
    """Wait until every finished trace of this process is written (tests, the run's end)."""
    mlflow.flush_trace_async_logging()
