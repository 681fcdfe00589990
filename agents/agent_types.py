"""What an agent is run with, `AgentConfig`, and what its run returns, `AgentResult`
(agents/loop.py runs it); and the rejection reasons a result counts beyond the gate's:
`JUDGE_DISAGREED`, with which reasons are drift signals and which are refusals."""

from __future__ import annotations

from dataclasses import dataclass, field

from agents.answers import OFF_SPEC
from agents.gates import COPY_OF_EVAL_ROW, INVALID_SCHEMA
from agents.hostile_text import HOSTILE_ROW

__all__ = ["DRIFT_SIGNALS", "JUDGE_DISAGREED", "REFUSED", "AgentConfig", "AgentResult"]

JUDGE_DISAGREED = "judge_disagreed"
# What counts as the agent straying from the spec. A duplicate, a row outside the slice or a
# copy of a held-out row is bookkeeping or data, not drift, and must not trip the alarm; nor
# does a label accepted after fixing its case (the gate normalises it). OFF_SPEC: the answer
# rules' rejections (label_not_in_set, too_long, schema_violation ...).
DRIFT_SIGNALS = {INVALID_SCHEMA, JUDGE_DISAGREED, *OFF_SPEC}
# Rows an agent did submit, which the gate or the judge would not take: not the agent's gap.
REFUSED = {COPY_OF_EVAL_ROW, JUDGE_DISAGREED, HOSTILE_ROW}


@dataclass
class AgentConfig:
    model: str
    temperature: float = 0.2
    max_tokens: int = 4096
    max_turns: int = 60
    memory_budget_tokens: int = 16000
    judge_sample_rate: float = 0.2
    max_nudges: int = 2
    seed: int = 0
    hostile_rows: str = "quarantine"  # or "judge" (agents/hostile_text.py)
    # a preview (flows/preview.py): stop once this many rows got a verdict (accepted or
    # refused), between calls, so every request sent is the one a full run sends first
    stop_after_rows: int | None = None


@dataclass
class AgentResult:
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    revoked: int = 0
    labels_normalised: int = 0  # accepted after the gate fixed the label's case/whitespace
    arguments_unfenced: int = 0  # tool arguments taken out of a markdown code fence
    calls: int = 0
    tool_errors: int = 0
    misuse: dict[str, int] = field(default_factory=dict)  # tool misuse by kind
    judged: int = 0
    hostile_rows: int = 0  # rows read whose text addressed the agent (agents/hostile_text.py)
    reanchors: int = 0
    drift_alarm_call: int | None = None   # this agent's call count at the first alarm
    drift_alarm_time: float | None = None  # and the wall-clock time (time.time())
    drift_baseline: float | None = None  # the early bad rate the drift test measured against
    max_context_tokens: int = 0
    pruned_turns: int = 0
    stopped_reason: str = ""
    transcript: list[dict] = field(default_factory=list)  # what happened, unpruned
