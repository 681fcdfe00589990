"""The spec's generation section: how the sub-agents run (concurrency, turns, pages, the
task runner, top-up rounds) and the drift test that stops an agent gone off spec.

Split from `flows/spec.py` (which imports and re-exports it), like `flows/spec_llm.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from flows.spec_base import FieldError, Strict


class Drift(Strict):
    """The drift test (agents/drift.py): a CUSUM of each agent's bad rate (off-spec
    submissions and judge disagreements) against its own early rate."""

    baseline_rate: float = Field(
        0.10, gt=0.0, lt=1.0, description="Bad rate any agent may have all along (cheap "
        "models mislabel ~10%): the floor of the early rate a rise is measured against.")
    max_baseline_rate: float = Field(
        0.20, gt=0.0, lt=1.0, description="Ceiling of the early rate: a worse start is not "
        "taken as the agent's normal.")
    odds_ratio: float = Field(
        3.0, gt=1.0, description="The rise to detect: the early rate's odds times this.")
    false_alarm_rate: float = Field(
        0.01, gt=0.0, lt=0.5, description="Chance of any false alarm over one agent's whole "
        "slice, whatever its length (sets the CUSUM threshold).")
    warmup: int = Field(40, ge=0, description="Observations that set the agent's early rate.")
    min_observations: int = Field(20, ge=1, description="No alarm before this many.")
    fleet_warmup: int = Field(
        200, ge=0, description="The run's first observations (all agents of a process) set "
        "the fleet's early rate; an agent is measured against the lower of its own and the "
        "fleet's, so one that starts after the fleet went bad is still caught. 0: own only.")
    suspicion: float = Field(
        0.25, gt=0.0, le=1.0, description="Share of the alarm level past which every example "
        "is judged until the test settles (more judge calls, a quicker alarm).")

    @model_validator(mode="after")
    def _ordered(self) -> Drift:
        if self.max_baseline_rate < self.baseline_rate:
            raise FieldError("generation.drift.max_baseline_rate",
                              f"must be >= baseline_rate ({self.baseline_rate}), got "
                              f"{self.max_baseline_rate}")
        return self


class Generation(Strict):
    concurrency: int = Field(4, ge=1, description="Sub-agents running at once.")
    hostile_rows: Literal["quarantine", "judge"] = Field(
        "quarantine", description="Rows whose text addresses the agent (instructions, SQL, "
        "markup: agents/hostile_text.py): quarantine = the model never sees their text and "
        "they are excluded and reported, never trained on; judge = shown, and the agent that "
        "read one is judged on everything after (its memory reset when the judge disagrees).")
    max_turns: int = Field(40, ge=1, description="LLM calls one agent may make.")
    page_size: int = Field(
        25, ge=1, le=500, description="Rows the skill asks an agent to read per SQL call."
    )
    sql_row_limit: int = Field(200, ge=1, description="Most rows one SQL tool call returns.")
    max_slices: int | None = Field(
        None, ge=1, description="Use only the first N slices (for quick runs)."
    )
    memory_budget_tokens: int = Field(
        16000, ge=500, description="Context budget per agent; older turns are pruned to fit."
    )
    judge_sample_rate: float = Field(
        0.2, ge=0.0, le=1.0, description="Share of accepted examples the judge reviews."
    )
    drift: Drift = Field(default_factory=Drift, description="The per-agent drift test.")
    max_agent_retries: int = Field(
        2, ge=0, description="Rounds of fresh agents over the rows that stopped or failed "
        "agents left unlabelled (each told why the last one stopped).")
    min_coverage: float = Field(
        0.98, ge=0.0, le=1.0, description="Labelled rows / planned rows (copies of held-out "
        "rows excluded) below which the run fails before training, naming the slices.")
    max_nudges: int = Field(
        2, ge=0, description="Times an agent that stops early is told rows remain."
    )
    task_runner: Literal["async", "thread", "dask"] = Field(
        "async", description="Where sub-agent tasks run: async = coroutines on one event loop "
        "in the flow's process (async Prefect tasks, one per slice; many agents without a "
        "thread each); thread = a thread per running agent in the flow's process; dask = a "
        "Dask cluster (each worker process has its own budget and rate limiter)."
    )
    dask_address: str | None = Field(
        None, description="Dask scheduler address like tcp://host:8786; null with task_runner "
        "dask = a local cluster of processes started for the run."
    )
    dask_workers: int = Field(
        2, ge=1, description="Worker processes of the local Dask cluster (no dask_address)."
    )
