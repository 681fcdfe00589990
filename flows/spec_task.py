"""The spec's `task` section: what one training example is, for each kind of task.

    classification  one label of `labels` per row                      (skill label-examples)
    generation      free text written from the row, within `rules`     (skill write-responses)
    extraction      a JSON object valid against `answer_schema`        (skill extract-records)

Every kind renders the row with `prompt_template` and trains the model to write
`completion_template` with the answer (`{label}` or `{answer}`: the same value). Text kinds
are reviewed by the judge against `rubric` (criteria scored 1-5; an answer whose mean score
is under `rubric.threshold` is rejected with the judge's reason). The gold column is the
reference answer, read only by evaluation and the simulated teacher: required for
classification and extraction, optional for generation (without it a model is evaluated by
the judge alone).
"""

from __future__ import annotations

import re
import string
from typing import Literal

import jsonschema
from pydantic import Field, field_validator, model_validator

from flows.spec_base import FieldError, Strict

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SKILLS = {"classification": "label-examples", "generation": "write-responses",
          "extraction": "extract-records"}


class AnswerRules(Strict):
    """What a generated answer must keep; the gate rejects an answer that breaks one, with a
    message naming the rule (agents/answers.py TextAnswer)."""

    min_words: int | None = Field(None, ge=1, description="Fewest words an answer may have.")
    max_words: int | None = Field(None, ge=1, description="Most words an answer may have.")
    min_chars: int | None = Field(None, ge=1, description="Fewest characters.")
    max_chars: int | None = Field(None, ge=1, description="Most characters.")
    forbidden: list[str] = Field(
        default_factory=list, description="Regular expressions (Python syntax) no answer may "
        "match, e.g. '(?i)click here'.")
    required: list[str] = Field(
        default_factory=list, description="Regular expressions every answer must match.")
    max_prompt_overlap: float = Field(
        0.8, gt=0.0, le=1.0, description="An answer whose 5-word runs are more than this "
        "share found in its prompt copies the prompt and is rejected.")
    max_similarity: float = Field(
        0.8, gt=0.0, le=1.0, description="Near-duplicates: an answer whose Jaccard similarity "
        "of word n-grams (MinHash, checked exactly) with an answer accepted for another row "
        "(of another prompt) reaches this is rejected at the gate and dropped at curation; "
        "1.0 rejects only exact copies.")
    similarity_ngram: int = Field(
        1, ge=1, le=8, description="The n of those word n-grams: 1 for short answers such as "
        "headlines (one word changed in a 9-word headline keeps 0.8 of its words but only 0.4 "
        "of its trigrams), 3-5 for paragraphs.")
    target_words: list[int] | None = Field(
        None, min_length=2, max_length=2, description="[low, high]: the answer length most "
        "answers should have, in words; the run reports the share inside it and the length "
        "histogram (null: report the histogram only).")

    @field_validator("forbidden", "required")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AnswerRules:
        for low, high in (("min_words", "max_words"), ("min_chars", "max_chars")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low}: {lo} is more than {high} {hi}")
        if self.target_words and self.target_words[0] > self.target_words[1]:
            raise ValueError(f"target_words: [{self.target_words[0]}, {self.target_words[1]}] "
                             "must be [low, high]")
        return self


class Criterion(Strict):
    name: str = Field(description="A short identifier, e.g. faithful.")
    description: str = Field(description="What a 5 means, in one sentence; 1 is its opposite.")

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not IDENTIFIER.match(v):
            raise ValueError(f"must be a plain identifier (letters, digits, _), got {v!r}")
        return v


DEFAULT_CRITERIA = {
    "generation": [
        Criterion(name="faithful", description="Says only what the row supports; nothing "
                  "invented."),
        Criterion(name="follows_instructions", description="Does what the task's "
                  "instructions ask, in the form they ask."),
        Criterion(name="clear", description="Clear, specific and well written."),
    ],
    "extraction": [
        Criterion(name="correct", description="Every field holds what the row says."),
        Criterion(name="complete", description="Every field the row supports is filled."),
    ],
}


class Rubric(Strict):
    criteria: list[Criterion] = Field(
        default_factory=list, description="What the judge scores, each on 1-5 (empty: the "
        "kind's defaults: faithful, follows_instructions, clear for generation; correct, "
        "complete for extraction).")
    threshold: float = Field(
        3.0, ge=1.0, le=5.0, description="An answer whose mean score is under this is "
        "rejected with the judge's reason.")

    @field_validator("criteria")
    @classmethod
    def _distinct(cls, v: list[Criterion]) -> list[Criterion]:
        names = [c.name for c in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"criteria names must be unique, {', '.join(repeated)} repeated")
        return v


class Task(Strict):
    kind: Literal["classification", "generation", "extraction"] = Field(
        "classification", description="classification: one label of `labels` per row; "
        "generation: free text within `rules`; extraction: a JSON object valid against "
        "`answer_schema`.")
    description: str = Field(description="What the model must learn, in one or two sentences.")
    labels: list[str] | None = Field(
        None, description="The closed label set (classification only).")
    instructions: str | None = Field(
        None, description="Generation and extraction: how to write the answer, shown to the "
        "agents and the judge (style, what to include, what never to say).")
    prompt_template: str = Field(
        description="Python format string over the row's allow-listed columns, e.g. "
        "'Title: {title}\\nLead: {body:.300}\\nTopic:'. Renders the training prompt.",
    )
    completion_template: str = Field(
        " {label}", description="Format string for the completion; `{label}` (or `{answer}`) "
        "is the answer: the label, the text, or the JSON record.")
    gold_column: str | None = Field(
        None, description="Column holding each row's reference answer. Never allow-listed: "
        "only evaluation (held-out rows) and the simulated teacher read it. Required for "
        "classification and extraction (a JSON object per row); optional for generation.")
    rules: AnswerRules | None = Field(
        None, description="Generation: what every answer must keep (length, patterns, no "
        "copy of the prompt, no near-duplicates).")
    answer_schema: dict | None = Field(
        None, description="Extraction: the JSON Schema (2020-12) every answer must be valid "
        "against.")
    rubric: Rubric | None = Field(
        None, description="Generation and extraction: what the judge scores (default: the "
        "kind's criteria, threshold 3).")
    example_kinds: list[Literal["sft"]] = Field(["sft"], description="Example kinds to write.")
    skill: str | None = Field(
        None, description="Skill folder under skills/ the agents follow (default: "
        "label-examples, write-responses or extract-records, by kind).")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError(f"must list at least 2 labels, got {len(v)}")
        if len(set(v)) != len(v):
            dup = sorted({x for x in v if v.count(x) > 1})
            raise ValueError(f"labels must be unique, {', '.join(dup)} repeated")
        for label in v:
            if not label.strip() or label != label.strip():
                raise ValueError(f"label {label!r} must be non-empty with no outer whitespace")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template_parses(cls, v: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"is not a valid format string ({e})") from None
        if not fields:
            raise ValueError("must use at least one {column} from the row")
        return v

    @field_validator("completion_template")
    @classmethod
    def _completion_parses(cls, v: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"is not a valid format string ({e})") from None
        if not fields or not fields <= {"label", "answer"}:
            raise ValueError("must use {label} (or {answer}) and nothing else, got "
                             f"{', '.join('{' + f + '}' for f in sorted(fields)) or 'no field'}")
        return v

    @field_validator("answer_schema")
    @classmethod
    def _schema_valid(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        try:
            jsonschema.Draft202012Validator.check_schema(v)
        except jsonschema.SchemaError as e:
            where = "/".join(map(str, e.path)) or "(top level)"
            raise ValueError(f"is not a valid JSON Schema at {where}: {e.message}") from None
        if v.get("type") != "object":
            raise ValueError("must describe an object (type: object): one record per row")
        return v

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Task:
        kind = self.kind
        needs = {"classification": ["labels", "gold_column"], "generation": [],
                 "extraction": ["answer_schema", "gold_column"]}[kind]
        refuses = {"classification": ["instructions", "rules", "answer_schema", "rubric"],
                   "generation": ["labels", "answer_schema"],
                   "extraction": ["labels", "rules"]}[kind]
        for name in needs:
            if getattr(self, name) is None:
                raise FieldError(f"task.{name}", f"required for kind {kind}, add it")
        for name in refuses:
            if getattr(self, name) is not None:
                raise FieldError(f"task.{name}", f"is not used by kind {kind}: remove it")
        if kind == "generation" and self.rules is None:
            self.rules = AnswerRules()
        if kind != "classification":
            self.rubric = self.rubric or Rubric()
            if not self.rubric.criteria:
                self.rubric.criteria = list(DEFAULT_CRITERIA[kind])
        self.skill = self.skill or SKILLS[kind]
        return self

    def template_columns(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f]
