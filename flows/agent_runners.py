"""The runners the sub-agent tasks of the generation stage (flows/generation.py) run on:
`sub_agent_runner(spec)` picks one by `generation.task_runner`.

Where the agents run, and what they share:
- `async` (default): every agent a coroutine on one event loop in the flow's process, at most
  `generation.concurrency` at a time (`EventLoopRunner`: async Prefect tasks, one task run
  per slice, gathered under a semaphore). An agent waiting on its LLM call costs no thread,
  so hundreds run at once; the SDKs' aiohttp transport carries the calls. Every agent shares
  one runtime (gateways, cost ledger, budget, each endpoint's AIMD rate limit, judge) and the
  flow's progress bars. bench/fanout.py measures it against the thread runner.
- `thread`: a thread pool of `generation.concurrency` in the flow's process, each agent on an
  event loop of its own (`generate_slice` runs the same coroutine); the runtime and progress
  bars shared as above. Past ~100 agents the threads cost more CPU per call than the one loop
  (GIL contention; bench/fanout.py: ~15 ms a call with 512 threads, ~7-8 on the loop).
- `dask`: a Dask cluster, local (`dask_workers` processes started for the run, together
  `concurrency` threads) or an existing one at `dask_address`. Only small descriptors cross
  the process boundary (a `SliceDescriptor`, `RuntimeSettings`, the progress id, the wanted
  labels; back comes the result dict); each worker process builds its own runtime with
  `get_runtime(settings)`. So the budget (`llm.budget`) and the rate limiter are **per worker
  process**: W workers may together spend up to W x max_usd and start W x the limiter's
  rate against one endpoint. Every process writes to the one example store by its URL (the
  SQLite store takes concurrent writers: WAL, busy timeout, `BEGIN IMMEDIATE`; prefer
  PostgreSQL for many workers) and shares its call cache. A remote agent's progress shows
  only when its task ends (the flow advances the bar by its accepted count). A cluster on
  other hosts must reach the spec, out folder, store and LLM endpoints by the same paths
  and URLs; the simulated teacher listens on the flow host's 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Self
from urllib.parse import urlsplit

from prefect import get_run_logger
from prefect.context import AsyncClientContext
from prefect.exceptions import MissingContextError
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from agents.providers import run_on_own_loop
from flows.spec import Spec


class EventLoopRunner:
    """`generation.task_runner: async`: each slice's agent is an async Prefect task (one task
    run per slice, as with the other runners), awaited on one event loop in the flow's
    process, at most `concurrency` at a time (a semaphore). The tasks are gathered, not
    `.map`ped: `.map` of async tasks runs each on a thread and loop of its own (slower, and a
    thread per agent again; shared/STACK.md). The loop lives for one `generate` call."""

    def __init__(self, concurrency: int):
        self.concurrency = concurrency

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, task: Callable[..., Any], calls: list[dict],
            settle: Callable[[int, dict | Exception], dict]) -> list[dict]:
        """`task(**calls[i])` (an async Prefect task: the generation stage's
        `agenerate_slice`) for every i; `settle(i, result or exception)` as each ends.
        Returns the settled results in the calls' order."""

        async def gather() -> list[dict]:
            limit = asyncio.Semaphore(self.concurrency)

            async def one(i: int, kwargs: dict) -> dict:
                async with limit:
                    try:
                        outcome = await task(**kwargs)
                    except Exception as e:  # noqa: BLE001 - settled like a failed future
                        outcome = e
                return settle(i, outcome)

            # one Prefect API client for every task run on this loop: without it each task
            # run opens its own (~6 ms of CPU, mostly building an SSL context)
            async with AsyncClientContext.get_or_create():
                return list(await asyncio.gather(*(one(i, kw) for i, kw in enumerate(calls))))

        return run_on_own_loop(gather())


def sub_agent_runner(spec: Spec, concurrency: int | None = None
                     ) -> TaskRunner | EventLoopRunner:
    """The (unstarted) runner the sub-agent tasks run on: use it as
    `with sub_agent_runner(spec) as runner:` and pass it to `generate` / `rebalance` to share
    one Dask cluster between the first pass and the top-up rounds.

    async: `concurrency` coroutines on one event loop in this process (`EventLoopRunner`).
    thread: `concurrency` threads in this process. dask without an address: a LocalCluster of
    min(dask_workers, concurrency) processes with ceil(concurrency / workers) threads each
    (so at least `concurrency` agents at once); with `dask_address`: that cluster, whose own
    threads set the concurrency. Budget and rate limits are per worker process (module doc).
    """
    g = spec.generation
    concurrency = concurrency or g.concurrency
    if g.task_runner == "async":
        return EventLoopRunner(concurrency)
    if g.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=concurrency)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RuntimeError("generation.task_runner: dask needs the prefect-dask package "
                           "(pip install prefect-dask), or set task_runner: async") from None
    log = _logger()
    if g.dask_address:
        if urlsplit(g.dask_address).hostname not in ("127.0.0.1", "localhost", "::1"):
            if spec.store.url is None or spec.store.url.startswith("sqlite"):
                log.warning("generation.dask_address %s: the example store is a SQLite file; "
                            "workers on other hosts need store.url on a server (PostgreSQL)",
                            g.dask_address)
            if any(r.simulated for r in spec.llm.roles().values()):
                log.warning("generation.dask_address %s: the simulated teacher listens on this "
                            "host's 127.0.0.1; workers on other hosts cannot reach it",
                            g.dask_address)
        log.info("sub-agents on the Dask cluster at %s (budget and rate limits per worker "
                 "process)", g.dask_address)
        return DaskTaskRunner(address=g.dask_address)
    workers = min(g.dask_workers, concurrency)
    threads = -(-concurrency // workers)
    log.info("sub-agents on a local Dask cluster: %d processes x %d threads (budget and rate "
             "limits per process)", workers, threads)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers, "threads_per_worker": threads, "processes": True,
        "dashboard_address": None})


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow (a test, a notebook)
        return logging.getLogger(__name__)

