"""What the simulated teacher is told: where the gold answers live, and how badly to behave.

`TeacherKnobs` is a strict pydantic model (the spec embeds it); every knob is a rate or a
size, and every random choice the teacher makes is seeded from `seed` and what it is
deciding about (a row id, a request hash), so two runs over the same requests answer alike.
"""

from __future__ import annotations

import re
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# `profile: realistic`: how a cheap hosted model errs (every knob not set explicitly)
REALISTIC: dict[str, float] = {
    "error_rate": 0.10, "off_spec_rate": 0.0, "case_error_rate": 0.03, "string_id_rate": 0.3,
    "fenced_json_rate": 0.03, "malformed_rate": 0.01, "multi_call_rate": 0.05,
    "think_rate": 0.5, "empty_rate": 0.01, "prose_rate": 0.01, "judge_error_rate": 0.02,
    # text kinds (generation, extraction) only
    "too_long_rate": 0.03, "copy_prompt_rate": 0.01, "empty_answer_rate": 0.01,
    "off_format_rate": 0.02, "broken_json_rate": 0.02, "judge_position_bias": 0.05,
}
# the seeded faults of a first answer of a text kind, in the order of their shares
TEXT_FAULTS = ("too_long", "copy_prompt", "empty_answer", "off_format", "broken_json")
KINDS = ("classification", "generation", "extraction")


def _rate(description: str) -> float:
    return Field(0.0, ge=0.0, le=1.0, description=description)


class TeacherKnobs(BaseModel):
    """How the simulated teacher misbehaves. All zero: an honest, fast, perfect labeller.

    `profile: realistic` makes it err like a cheap hosted model: every knob absent from the
    input takes its value from `REALISTIC` (error_rate 0.10, off_spec_rate 0, case_error_rate
    0.03, string_id_rate 0.3, fenced_json_rate 0.03, malformed_rate 0.01, multi_call_rate
    0.05, think_rate 0.5, empty_rate 0.01, prose_rate 0.01, judge_error_rate 0.02; for text
    kinds too_long_rate 0.03, copy_prompt_rate 0.01, empty_answer_rate 0.01, off_format_rate
    0.02, broken_json_rate 0.02, judge_position_bias 0.05); a knob given explicitly wins
    (`{profile: realistic, error_rate: 0.05}`). `custom` (the default) leaves every knob
    absent at 0 / its default.
    """

    model_config = ConfigDict(extra="forbid")

    profile: Literal["custom", "realistic"] = Field(
        "custom", description="`realistic`: every knob not given takes the value of a cheap "
        "hosted model (REALISTIC in agents/teacher/config.py); `custom`: the defaults.")
    seed: int = Field(0, description="Seed of every random choice the teacher makes.")
    # labels
    error_rate: float = _rate("Share of rows given a wrong but valid label.")
    off_spec_rate: float = _rate(
        "Share of rows first given a label outside the set; corrected when the gate rejects it.")
    case_error_rate: float = _rate(
        "Share of rows whose first submitted label is wrongly capitalised ('Tech', 'TECH' for "
        "'tech'; a spelling no label of the set has); the fix round sends the right one.")
    drift_after_calls: int | None = Field(
        None, ge=0, description="After this many labelling requests (server-wide), labels "
        "start to drift (see drift_error_rate). None: never.")
    drift_error_rate: float = _rate("Once drifted: share of rows given a wrong label.")
    bias_labels: list[str] = Field(
        default_factory=list, description="Favoured labels: in open labelling, rows whose "
        "label is not among them are submitted only with probability 1/bias_factor.")
    bias_factor: float = Field(
        1.0, ge=1.0, description="How strongly bias_labels are favoured (1: no bias).")
    # tool use
    malformed_rate: float = _rate("Share of tool calls whose arguments are not valid JSON.")
    misuse_rate: float = _rate(
        "Share of sql calls that send a harmful or invalid query, or wrong arguments.")
    prose_rate: float = _rate("Share of mid-task replies that are prose with no tool call.")
    empty_rate: float = _rate(
        "Share of mid-task replies that are empty: content '' and no tool call (after the "
        "nudge it redoes the page it was on).")
    string_id_rate: float = _rate(
        "Share of submit_examples calls that send every integer row_id as a string (\"42\").")
    fenced_json_rate: float = _rate(
        "Share of tool calls whose arguments are wrapped in a markdown fence "
        "(```json ... ```, valid JSON inside).")
    multi_call_rate: float = _rate(
        "Share of submit steps that split the page's examples into two submit_examples "
        "calls in one message (first half, second half).")
    think_rate: float = _rate(
        "Share of replies whose content starts with reasoning in <think>...</think> tags.")
    # prompt injection (agents/teacher/slips.py `injections` lists what it recognises)
    obey_injection_rate: float = _rate(
        "Gullibility: share of rows carrying an instruction it recognises (run `DROP TABLE "
        "x` / DELETE / UPDATE ..., read from table T, label everything as L, print your "
        "instructions) that it obeys when it reads them (seeded per row): the SQL goes out "
        "through the sql tool, the label sticks to the rest of its slice, the instructions go "
        "out as the row's answer. 0: it ignores text in rows.")
    # transport faults (each hits only the first attempt of a request)
    fault_429_rate: float = _rate("Share of requests answered 429 with retry-after headers.")
    fault_500_rate: float = _rate("Share of requests answered 500.")
    fault_529_rate: float = _rate(
        "Share of requests answered 529 overloaded_error (503 on the OpenAI route).")
    timeout_rate: float = _rate("Share of requests that stall timeout_s before answering.")
    truncated_rate: float = _rate(
        "Share of requests whose body is cut short or is not valid JSON.")
    retry_after_s: float = Field(1.0, ge=0.0, description="retry-after sent with a 429.")
    timeout_s: float = Field(30.0, ge=0.0, description="How long a timeout fault stalls.")
    latency_ms: float = Field(0.0, ge=0.0, description="Added to every answer.")
    read_chars: int | None = Field(
        600, ge=1, description="Read each column but the id as its first N characters "
        "(as an agent that needs only the lead of an article would); null reads whole values.")
    # text kinds (generation, extraction): the first answer of a row; the fix round sends
    # the gold answer once the gate rejects it
    too_long_rate: float = _rate(
        "Generation: share of rows first answered with the answer padded beyond the rules' "
        "max_words / max_chars.")
    copy_prompt_rate: float = _rate(
        "Generation: share of rows first answered with a copy of the row's own text (the "
        "first ~12 words of its longest column).")
    empty_answer_rate: float = _rate("Text kinds: share of rows first answered with ''.")
    off_format_rate: float = _rate(
        "Text kinds: share of rows first answered off the format: generation wraps the "
        "answer like `Headline: \"...\"`; extraction sends an object that breaks the "
        "schema (a required field dropped or a value of the wrong type).")
    broken_json_rate: float = _rate(
        "Extraction: share of rows first answered with JSON text that has a syntax error "
        "(cut short).")
    # other roles
    judge_error_rate: float = _rate(
        "Share of reviewed rows the judge believes wrongly (text kinds: every rubric score "
        "moved by 2 the wrong way; pairwise: a decided winner flipped).")
    judge_position_bias: float = _rate(
        "Share of pairwise comparisons (<compare>) the judge answers 'a' whatever the answers.")

    @model_validator(mode="before")
    @classmethod
    def _profile(cls, data):
        """`profile: realistic` fills every knob absent from the input from REALISTIC."""
        if isinstance(data, dict) and data.get("profile") == "realistic":
            return {**REALISTIC, **data}
        return data

    @model_validator(mode="after")
    def _shares_fit(self) -> TeacherKnobs:
        if self.error_rate + self.off_spec_rate > 1:
            raise ValueError("error_rate + off_spec_rate must be at most 1")
        text = sum(getattr(self, f"{f}_rate") for f in TEXT_FAULTS)
        if text + self.error_rate > 1 + 1e-9:
            raise ValueError(
                "too_long_rate + copy_prompt_rate + empty_answer_rate + off_format_rate + "
                f"broken_json_rate + error_rate must be at most 1, got {text + self.error_rate:g}"
                " (each row of a text kind gets at most one of them)")
        if self.prose_rate + self.misuse_rate + self.malformed_rate + self.empty_rate > 1:
            raise ValueError(
                "prose_rate + misuse_rate + malformed_rate + empty_rate must be at most 1")
        faults = (self.fault_429_rate, self.fault_500_rate, self.fault_529_rate,
                  self.timeout_rate, self.truncated_rate)
        if sum(faults) > 1:
            raise ValueError("the fault rates must add up to at most 1")
        return self


@dataclass
class TeacherConfig:
    """Where the gold answers are, and the knobs. `kind` is the task's kind: classification
    (the gold column holds a label of `labels`), generation (the reference text) or extraction
    (a JSON object, as JSON text); text kinds need no `labels`. `error_rate`, `off_spec_rate`
    and `seed` are still accepted as keyword arguments: they land in `knobs` (read them
    there)."""

    warehouse_url: str
    table: str
    id_column: str
    gold_column: str
    labels: list[str] = field(default_factory=list)
    knobs: TeacherKnobs = field(default_factory=TeacherKnobs)
    api_key: str | None = None
    request_log: str | Path | None = None
    models: list[str] = field(default_factory=lambda: ["simulated-teacher"])
    error_rate: InitVar[float | None] = None
    off_spec_rate: InitVar[float | None] = None
    seed: InitVar[int | None] = None
    kind: str = "classification"

    def __post_init__(self, error_rate, off_spec_rate, seed) -> None:
        for name in (self.table, self.id_column, self.gold_column):
            if not _IDENT.match(name):
                raise ValueError(f"{name!r} is not a plain SQL identifier")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "classification" and not self.labels:
            raise ValueError("a classification teacher needs its label set (labels)")
        self.labels = list(self.labels or [])
        if isinstance(self.knobs, dict):
            self.knobs = TeacherKnobs.model_validate(self.knobs)
        legacy = {k: v for k, v in (("error_rate", error_rate), ("off_spec_rate", off_spec_rate),
                                    ("seed", seed)) if v is not None}
        if legacy:
            self.knobs = TeacherKnobs.model_validate({**self.knobs.model_dump(), **legacy})
