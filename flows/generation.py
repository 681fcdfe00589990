"""The generation stage: one sub-agent per slice, fresh agents for what they left, then
targeted top-up for balance; `label_rows` is the stage whole, as the flow calls it.

`generate` runs one Prefect task per slice (`generate_slice`, or its async twin
`agenerate_slice`; both run `label_slice`) on the runner the spec chooses
(`generation.task_runner`, see `sub_agent_runner`); a task that fails comes back as a result
whose `stopped_reason` starts with "failed:", never lost. `cover` measures each slice's
coverage and sends a fresh agent (told why the last one stopped) over the rows a stopped,
failed or short agent left, for up to `generation.max_agent_retries` rounds. `rebalance`
measures the accepted labels against the spec's target and sends top-up agents over the
still-unlabelled rows for the under-represented labels.

Where the agents run (`generation.task_runner`: async, thread or dask; `sub_agent_runner`) and
what they share: flows/agent_runners.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner

from agents.agent_types import AgentConfig
from agents.gates import Gate
from agents.loop import arun_agent
from agents.providers import run_on_own_loop
from agents.redact import redact
from agents.skills import load_skill
from agents.sql_tool import ScopedTable, SQLTool
from flows import coverage, distribution
from flows.agent_runners import EventLoopRunner, sub_agent_runner
from flows.kinds import kind_of
from flows.progress import Progress
from flows.runtime import RuntimeSettings, get_runtime
from flows.slicing import SliceDescriptor, fetch_slice_rows, slice_source, without_rows
from flows.spec import Spec, load_spec
from flows.store import Store
from flows.warehouse import iter_eval_rows, render_prompt, shared_engine

if TYPE_CHECKING:  # the error-driven run's plan; it imports this module
    from flows.error_driven import Focus


# ── the stage ───────────────────────────────────────────────────────────────────────────────
def label_rows(spec: Spec, store: Store, run_id: str, slices: list[SliceDescriptor],
               settings: RuntimeSettings, progress_id: str,
               focus: Focus | None = None) -> tuple[list[dict], dict]:
    """The generate stage whole: one sub-agent per slice, fresh agents over the rows they
    left, then top-up rounds for balance, all on one runner of the spec's choice. Returns
    every agent's result and the balance figures (tv_before, tv_after, topup_slices).
    `focus` (flows/error_driven.py, an error-driven run): the probe agents' results, the
    first agents worst slice first with their own max_turns, and a weak-label top-up."""
    results: list[dict] = list(focus.probe_results) if focus else []
    try:
        with sub_agent_runner(spec) as runner:  # one event loop, threads, or a Dask cluster
            results += generate(focus.first(slices) if focus else slices, settings,
                                progress_id, spec.generation.concurrency, runner=runner,
                                max_turns=focus.max_turns if focus else None)
            results += cover(spec, store, run_id, slices, results, settings, progress_id,
                             runner=runner)
            if focus:
                results += focus.topup(spec, store, run_id, slices, settings, progress_id,
                                       runner)
            balance = rebalance(spec, store, run_id, slices, settings, progress_id,
                                runner=runner)
    except GenerationStopped as stop:
        stop.results = results + stop.results  # every agent that ran, for the report
        raise
    results += balance.pop("topup_results")
    return results, balance


class GenerationStopped(RuntimeError):
    """The generate stage ended early for a reason no fresh agent can fix (the provider's
    circuit breaker opened): the flow reports it and trains nothing. What the agents had
    accepted stays in the store; the same command resumes the run."""

    def __init__(self, reason: str, results: list[dict]):
        super().__init__(reason)
        self.reason, self.results = reason, results


def outage_stop(results: list[dict]) -> str | None:
    """The first outage an agent of `results` stopped on, or None."""
    return next((r["stopped_reason"] for r in results
                 if r["stopped_reason"].startswith("outage:")), None)


# ── one sub-agent per slice ─────────────────────────────────────────────────────────────────
@task(name="generate-slice", cache_policy=NO_CACHE, task_run_name="agent {descriptor.slice_id}")
def generate_slice(descriptor: SliceDescriptor, settings: RuntimeSettings, progress_id: str,
                   want_labels: list[str] | None = None, handover: str | None = None,
                   max_turns: int | None = None) -> dict:
    """`label_slice` on a thread (the thread and Dask runners), on an event loop of its own."""
    return run_on_own_loop(label_slice(descriptor, settings, progress_id, want_labels, handover,
                                       max_turns=max_turns))


@task(name="generate-slice", cache_policy=NO_CACHE, task_run_name="agent {descriptor.slice_id}")
async def agenerate_slice(descriptor: SliceDescriptor, settings: RuntimeSettings,
                          progress_id: str, want_labels: list[str] | None = None,
                          handover: str | None = None, max_turns: int | None = None) -> dict:
    """`label_slice` as a coroutine on the flow's event loop (the async runner)."""
    return await label_slice(descriptor, settings, progress_id, want_labels, handover,
                             max_turns=max_turns)


async def label_slice(descriptor: SliceDescriptor, settings: RuntimeSettings, progress_id: str,
                      want_labels: list[str] | None, handover: str | None,
                      stop_after_rows: int | None = None, max_turns: int | None = None
                      ) -> dict:
    """One sub-agent labels one slice (`handover`: why the agent before it on these rows
    stopped, for a retry; `max_turns`: this agent's, else the spec's). A slice finished by
    an earlier, killed attempt of this run is skipped; an unfinished one starts over, its
    completed LLM calls served from the call cache, so a resumed run spends nothing twice.
    `stop_after_rows`: a preview's cap on the agent (flows/preview.py); the requests it
    sends are unchanged."""
    from flows import agent_traces  # MLflow tracing: loaded where the agents run

    rt = get_runtime(settings)
    spec, store, run_id = rt.spec, rt.store, settings.run_id
    previous = store.get_slice(run_id, descriptor.slice_id)
    if previous and previous["status"] == "done":
        Progress.get(progress_id).advance("generate", previous["accepted"])
        return {"slice_id": descriptor.slice_id, "accepted": previous["accepted"],
                "rejected": previous["rejected"], "stopped_reason": previous["stopped_reason"],
                "resumed": True, "process": this_process()}
    store.clear_slice_examples(run_id, descriptor.slice_id)
    engine = shared_engine(spec.warehouse.url)
    agent = f"labeler/{descriptor.slice_id}"
    progress = Progress.get(progress_id)  # a no-op in a Dask worker: the bars live in the flow
    store.update_slice(run_id, descriptor.slice_id, status="running", agent=agent)
    held_out = held_out_prompts(settings.spec_path)
    kind = kind_of(spec)  # the answer's format and rules, the completion it trains

    def on_examples(events: list[dict]) -> None:
        """One agent turn's examples, written in order, each run of additions in one
        transaction (a revocation, the judge's re-review disagreeing after acceptance,
        follows the additions before it)."""
        batch: list[dict] = []
        for event in events:
            if event["status"] == "revoked":
                store.add_examples(run_id, batch)
                batch = []
                store.revoke_example(run_id, descriptor.slice_id, str(event["row_id"]),
                                     event["reason"])
                continue
            row = event.get("row") or {}
            label = event.get("label")
            batch.append({
                "slice_id": descriptor.slice_id, "row_id": str(event["row_id"]),
                "prompt": render_prompt(spec, row) if row else "",
                "completion": kind.completion(label) if label else "",
                "label": None if label is None else str(label), "status": event["status"],
                "reason": event.get("reason"), "agent": agent,
                "model": spec.llm.generator.model})
        store.add_examples(run_id, batch)
        accepted = sum(e["status"] == "accepted" for e in events)
        progress.advance("generate", accepted - sum(e["status"] == "revoked" for e in events))

    g, role = spec.generation, spec.llm.generator
    result = await arun_agent(
        rt.gateways["generator"],
        config=AgentConfig(model=role.model, temperature=role.temperature,
                           max_tokens=role.max_tokens, max_turns=max_turns or g.max_turns,
                           memory_budget_tokens=g.memory_budget_tokens,
                           judge_sample_rate=g.judge_sample_rate, max_nudges=g.max_nudges,
                           seed=spec.llm.simulated.seed, hostile_rows=g.hostile_rows,
                           stop_after_rows=stop_after_rows),
        skill=load_skill(spec.task.skill),
        task={"slice_id": descriptor.slice_id, "rows": descriptor.row_count,
              "page_size": g.page_size, "description": spec.task.description,
              "want_labels": want_labels or [], "previous": handover, **kind.agent_task()},
        sql_tool=SQLTool(engine, ScopedTable(
            descriptor.table, descriptor.columns, *slice_source(engine, descriptor),
            id_column=descriptor.id_column), row_limit=g.sql_row_limit),
        gate=Gate(kind.answer_rule(), prompt_of=lambda row: render_prompt(spec, row),
                  is_eval_copy=lambda row: render_prompt(spec, row) in held_out,
                  near_duplicates=kind.near_duplicates()),
        rows_lookup=lambda row_ids: fetch_slice_rows(engine, descriptor, row_ids),
        on_examples=on_examples,
        agent_name=agent,
        slice_id=descriptor.slice_id,
        judge=rt.judge,
        drift=rt.drift_policy(descriptor.row_count),
        # one MLflow trace per agent, in the run's Traces tab (None: tracking.traces off)
        tracer=agent_traces.run_tracer(spec, settings, slice_id=descriptor.slice_id),
    )
    _write_transcript(settings, descriptor.slice_id, result.transcript)
    rejected = sum(result.rejected.values())
    # an agent an outage stopped did not finish: a resumed run starts its slice over (its
    # completed calls from the call cache), where a finished slice is kept as it is
    status = "interrupted" if result.stopped_reason.startswith("outage:") else "done"
    store.update_slice(run_id, descriptor.slice_id, status=status, accepted=result.accepted,
                       rejected=rejected, stopped_reason=result.stopped_reason)
    get_run_logger().info(
        "%s: %d accepted, %d rejected %s, %d revoked, %d calls, misuse %s, context max %d "
        "tokens, stopped: %s; ran in process %s", descriptor.slice_id, result.accepted,
        rejected, dict(result.rejected), result.revoked, result.calls, result.misuse,
        result.max_context_tokens, result.stopped_reason, this_process())
    return {"slice_id": descriptor.slice_id, "accepted": result.accepted, "rejected": rejected,
            "revoked": result.revoked, "misuse": result.misuse, "reanchors": result.reanchors,
            "drift_alarm_call": result.drift_alarm_call,
            "drift_alarm_time": result.drift_alarm_time,
            "drift_baseline": result.drift_baseline,
            "labels_normalised": result.labels_normalised,
            "hostile_rows": result.hostile_rows,
            "arguments_unfenced": result.arguments_unfenced,
            "max_context_tokens": result.max_context_tokens,
            "stopped_reason": result.stopped_reason, "resumed": False,
            "process": this_process()}


def this_process() -> str:
    """host:pid of the process running this code: where an agent ran."""
    return f"{socket.gethostname()}:{os.getpid()}"


class PromptSet:
    """A set of prompts kept as 16-byte digests: `prompt in s` without holding the texts."""

    def __init__(self, prompts: Iterable[str]):
        self._digests = frozenset(self._digest(p) for p in prompts)

    @staticmethod
    def _digest(prompt: str) -> bytes:
        return hashlib.blake2b(prompt.encode(), digest_size=16).digest()

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str) and self._digest(prompt) in self._digests

    def __len__(self) -> int:
        return len(self._digests)


@functools.cache
def held_out_prompts(spec_path: str) -> PromptSet:
    """The rendered prompts of the held-out rows (no training example may equal one), read in
    batches and kept as digests, so a large holdout costs megabytes, not its text."""
    spec = load_spec(spec_path)
    return PromptSet(render_prompt(spec, r)
                     for r in iter_eval_rows(spec, shared_engine(spec.warehouse.url)))


def _write_transcript(settings: RuntimeSettings, slice_id: str, transcript: list[dict]) -> None:
    """One JSONL per agent under <out>/transcripts, secrets redacted; logged to MLflow."""
    folder = Path(settings.out_dir) / "transcripts"
    folder.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in slice_id)
    (folder / f"{name}.jsonl").write_text("".join(
        json.dumps(redact(m), ensure_ascii=False, default=str) + "\n" for m in transcript))


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow (a test, a notebook)
        return logging.getLogger(__name__)


def generate(slices: list[SliceDescriptor], settings: RuntimeSettings, progress_id: str,
             concurrency: int, want_labels: list[str] | None = None,
             runner: TaskRunner | EventLoopRunner | None = None,
             handover: dict[str, str] | None = None,
             max_turns: dict[str, int] | None = None) -> list[dict]:
    """One agent task per slice, `concurrency` at a time, on `runner` (started), or on a
    runner of the spec's `generation.task_runner` made for this call. Results come back in
    slice order; a task that failed (after Prefect's retries) is a result with
    `stopped_reason` "failed: ..." and its slice is marked failed in the store.
    `handover`: slice id -> why the last agent on those rows stopped (retries);
    `max_turns`: slice id -> that agent's turns (an error-driven run's focus), else the spec's."""
    if runner is None:
        with sub_agent_runner(load_spec(settings.spec_path), concurrency) as started:
            return generate(slices, settings, progress_id, concurrency, want_labels, started,
                            handover, max_turns)
    here, progress = this_process(), Progress.get(progress_id)

    def settle(i: int, outcome: dict | Exception) -> dict:
        """One slice's end, the same on every runner: a failure recorded, never lost; the
        accepted count of an agent in another process added to the bars here."""
        if isinstance(outcome, Exception):
            return _failed(slices[i], settings, outcome)
        if outcome.get("process") != here:
            progress.advance("generate", outcome["accepted"])
        return outcome

    if isinstance(runner, EventLoopRunner):
        return _unless_outage(runner.run(agenerate_slice, [
            {"descriptor": s, "settings": settings, "progress_id": progress_id,
             "want_labels": want_labels, "handover": (handover or {}).get(s.slice_id),
             "max_turns": (max_turns or {}).get(s.slice_id)}
            for s in slices], settle))
    futures = runner.map(generate_slice, {
        "descriptor": slices, "settings": unmapped(settings),
        "progress_id": unmapped(progress_id), "want_labels": unmapped(want_labels),
        "handover": [(handover or {}).get(s.slice_id) for s in slices],
        "max_turns": [(max_turns or {}).get(s.slice_id) for s in slices]})
    results: dict[int, dict] = {}
    index = {id(f): i for i, f in enumerate(futures)}
    for future in as_completed(list(futures)):
        i = index[id(future)]
        try:
            outcome = future.result()
        except Exception as e:  # noqa: BLE001 - any agent failure is recorded, never lost
            outcome = e
        results[i] = settle(i, outcome)
    return _unless_outage([results[i] for i in range(len(futures))])


def _unless_outage(results: list[dict]) -> list[dict]:
    """`results`, or GenerationStopped when an agent stopped on a provider outage: no fresh
    agent is sent to a provider that is down."""
    if reason := outage_stop(results):
        stopped = sum(r["stopped_reason"].startswith("outage:") for r in results)
        _logger().error("generate stops: %d of %d agents stopped on %s", stopped,
                        len(results), reason)
        raise GenerationStopped(reason.removeprefix("outage: "), results)
    return results


def _failed(descriptor: SliceDescriptor, settings: RuntimeSettings, error: Exception) -> dict:
    reason = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    get_runtime(settings).store.update_slice(settings.run_id, descriptor.slice_id,
                                             status="failed", stopped_reason=reason)
    _logger().error("agent %s failed: %s", descriptor.slice_id, reason)
    return {"slice_id": descriptor.slice_id, "accepted": 0, "rejected": 0, "revoked": 0,
            "misuse": {}, "reanchors": 0, "drift_alarm_call": None, "drift_alarm_time": None,
            "max_context_tokens": 0, "stopped_reason": reason, "resumed": False,
            "process": None}


def cover(spec: Spec, store: Store, run_id: str, slices: list[SliceDescriptor],
          results: list[dict], settings: RuntimeSettings, progress_id: str,
          runner: TaskRunner | EventLoopRunner | None = None) -> list[dict]:
    """Fresh agents over the rows that stopped, failed or short agents left unlabelled,
    `generation.max_agent_retries` rounds at most; each is told why the last one stopped.
    Returns the retry agents' results."""
    by_slice = {s.slice_id: s for s in slices}
    retried: list[dict] = []
    for round_no in range(1, spec.generation.max_agent_retries + 1):
        cov = coverage.measure(store, run_id, slices, results + retried)
        short = [c for c in cov.values() if c.retryable > 0]
        if not short:
            break
        jobs, why = [], {}
        for c in short:
            job = without_rows(by_slice[c.slice_id], c.done_rows + c.disputed_rows,
                               f"{c.slice_id}+retry{round_no}")
            last = c.agents[-1].split(": ", 1)[-1] if c.agents else "no agent ran"
            why[job.slice_id] = (
                f"it finished without a label for {c.retryable} of {c.planned} rows"
                if last == "completed" else
                f"it stopped ({last}) and left {c.retryable} of {c.planned} rows unlabelled")
            jobs.append(job)
        store.add_slices(run_id, jobs)
        _logger().warning("coverage round %d: %d rows unlabelled in %d slices; fresh agents: "
                          "%s", round_no, sum(c.retryable for c in short), len(short),
                          ", ".join(f"{c.slice_id} ({c.retryable})" for c in short[:20]))
        retried += generate(jobs, settings, progress_id, spec.generation.concurrency,
                            runner=runner, handover=why)
    return retried


def rebalance(spec: Spec, store: Store, run_id: str, slices: list[SliceDescriptor],
              settings: RuntimeSettings, progress_id: str,
              runner: TaskRunner | EventLoopRunner | None = None) -> dict:
    """Measure the labels against the target; top up the under-represented ones (on `runner`
    when given, else on a runner of the spec's choice per round)."""
    labels = spec.task.labels or []
    target = distribution.target_shares(spec.distribution.target, labels)

    def measure() -> tuple[Counter, float | None]:
        counts = Counter(e["label"] for e in store.accepted_examples(run_id))
        tv = distribution.tv_distance(distribution.shares(counts, labels), target) \
            if target else None
        return counts, tv

    counts, tv_before = measure()
    tv, results, topups = tv_before, [], 0
    for round_no in range(1, spec.distribution.max_topup_rounds + 1):
        if not target or tv <= spec.distribution.tolerance:
            break
        want = distribution.under_represented(counts, target, spec.distribution.tolerance)
        if not want:
            break
        done: dict[str, list[str]] = {}
        for ex in store.accepted_examples(run_id):
            done.setdefault(coverage.base_slice(ex["slice_id"]), []).append(ex["row_id"])
        jobs = [without_rows(s, done.get(s.slice_id, []), f"{s.slice_id}+topup{round_no}")
                for s in slices]
        jobs = [j for j in jobs if j.row_count > 0]
        if not jobs:
            break
        store.add_slices(run_id, jobs)
        get_run_logger().info("label TV %.3f > %.3f: top-up round %d for %s over %d slices",
                              tv, spec.distribution.tolerance, round_no, ", ".join(want),
                              len(jobs))
        results += generate(jobs, settings, progress_id, spec.generation.concurrency, want,
                            runner)
        topups += len(jobs)
        counts, tv = measure()
    return {"tv_before": tv_before, "tv_after": tv, "topup_slices": topups,
            "topup_results": results}
