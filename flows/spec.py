"""The spec: one YAML file that says everything a post-training run needs.

A pydantic model, so the same class validates YAML, feeds `posttrain validate`, and (later)
the Prefect UI form. Every field carries its help text. Unknown keys are errors
(`extra="forbid"`), because a misspelt key silently ignored is how spec drift starts.

`load_spec(path)` returns a `Spec` or raises `SpecError`, whose `.problems` are lines of the
form `field.path: what is wrong, and the fix` — never a traceback.

This file holds the data, the task and the assembled `Spec`; the other sections live in
`spec_llm.py` (who plays which part), `spec_generation.py` (the sub-agents and the drift
test) and `spec_training.py` (student, SFT, DPO, tuning), on `spec_base.py`'s strict model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from flows.spec_base import FieldError, Strict
from flows.spec_generation import Drift, Generation
from flows.spec_llm import LLM, Budget, Price, RateLimit, Role
from flows.spec_task import AnswerRules, Criterion, Rubric, Task
from flows.spec_training import DPO, Lora, Student, TinyModel, Training, Tuning

__all__ = ["DPO", "LLM", "AnswerRules", "Budget", "Criterion", "Drift", "Generation", "Lora",
           "Price", "RateLimit", "Role", "Rubric", "Student", "Task", "TinyModel", "Training",
           "Tuning"]  # re-exported: the sections live in their files

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ── where the data is ────────────────────────────────────────────────────────────────────────
class Warehouse(Strict):
    url: str = Field(
        description="SQLAlchemy URL of the warehouse. A relative sqlite path is resolved "
        "against the spec file's folder.",
    )
    tables: dict[str, list[str]] = Field(
        description="Allow-list: table -> columns an agent may read. Anything not listed "
        "(e.g. the gold label column) is invisible to agents.",
    )

    @field_validator("url")
    @classmethod
    def _url_has_scheme(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError(f"must be a SQLAlchemy URL like sqlite:///path.db, got {v!r}")
        return v

    @field_validator("tables")
    @classmethod
    def _tables_non_empty(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if not v:
            raise ValueError("must allow at least one table")
        for table, cols in v.items():
            if not IDENTIFIER.match(table):
                raise ValueError(f"table name {table!r} is not a plain SQL identifier")
            if not cols:
                raise ValueError(f"table {table!r} must allow at least one column")
            for c in cols:
                if not IDENTIFIER.match(c):
                    raise ValueError(f"column {c!r} of {table!r} is not a plain SQL identifier")
        return v


class Slicing(Strict):
    table: str = Field(description="The allow-listed table to slice.")
    id_column: str = Field("id", description="Primary key column (used for hashing and paging).")
    method: Literal["group_by", "hash"] = Field(
        "group_by", description="group_by: one slice per value of `column`; hash: `buckets` "
        "slices by a hash of the id."
    )
    column: str | None = Field(None, description="Column to group by (method group_by).")
    buckets: int = Field(8, description="Number of hash buckets (method hash).", ge=1)
    max_rows_per_slice: int = Field(
        200, ge=1, description="Row cap per slice: a larger group is split into several slices."
    )

    @model_validator(mode="after")
    def _column_for_group_by(self) -> Slicing:
        if self.method == "group_by" and not self.column:
            raise ValueError("column: required when method is group_by")
        return self


class Distribution(Strict):
    target: Literal["none", "uniform"] | dict[str, float] = Field(
        "none", description="Label shares the training set should have: none (measure only), "
        "uniform, or {label: share}."
    )
    tolerance: float = Field(
        0.05, ge=0.0, lt=1.0, description="Total variation distance accepted after balancing."
    )
    max_topup_rounds: int = Field(
        2, ge=0, description="Targeted top-up rounds for under-represented labels."
    )


# the promotion metrics of each kind, the default first
METRICS = {"classification": ("accuracy", "macro_f1"), "generation": ("rouge_l", "chrf"),
           "extraction": ("field_f1", "exact_match")}


class Promotion(Strict):
    metric: Literal["accuracy", "macro_f1", "rouge_l", "chrf", "field_f1", "exact_match"] | None \
        = Field(None, description="Classification: accuracy (default) or macro_f1, compared "
                "with the champion's. Generation: rouge_l (default) or chrf, extraction: "
                "field_f1 (default) or exact_match: the reference metric that may not drop "
                "more than max_reference_drop below the champion's (text kinds are promoted "
                "on the judge's win-rate).")
    min_improvement: float = Field(
        0.0, ge=0.0, description="Promote only if metric > champion's + this (both measured "
        "on this run's held-out rows)."
    )
    max_label_drop: float | None = Field(
        None, ge=0, le=1,
        description="Also refuse promotion when any label's F1 is more than this below the "
        "champion's on the same rows; null: no per-label check.",
    )
    max_slice_drop: float | None = Field(
        None, ge=0, le=1,
        description="Also refuse promotion, whatever the overall gain, when on any slice "
        "group (the slicing column's value, or hash bucket) of the held-out rows the new model "
        "falls behind the champion by more than this: classification, `metric` more than this "
        "below the champion's; text kinds, the judge preferring the champion on more rows than "
        "the new model by more than this share of the group's rows. null: no per-slice check.")
    min_slice_rows: int = Field(
        30, ge=1, description="With max_slice_drop: only slice groups with at least this many "
        "held-out rows are checked (a smaller group's figure is noise).")
    min_over_baseline: float = Field(
        0.05, ge=0.0, description="Never promote a model whose metric does not beat always "
        "answering the commonest held-out label by more than this (champion or not).")
    min_win_lower_bound: float = Field(
        0.5, ge=0.0, le=1.0, description="Text kinds: promote only if the 95% Wilson lower "
        "bound of the judge's win-rate (ties apart, both answer orders) against the champion "
        "(else the base model) reaches this.")
    min_rows: int = Field(
        30, ge=1, description="Text kinds: never promote on fewer held-out rows compared.")
    min_decided_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Text kinds: never promote when the judge decided "
        "(did not tie) fewer than this share of the rows compared: a model the judge cannot "
        "tell from the other has not shown it is better.")
    max_reference_drop: float | None = Field(
        0.02, ge=0.0, description="Text kinds with a gold column: refuse when `metric` falls "
        "more than this below the champion's on the same rows; null: no check.")
    require_approval: bool = Field(
        False, description="Pause before moving the alias until a person approves in the "
        "Prefect UI (the run waits for input)."
    )
    approval_timeout_minutes: float = Field(
        60.0, gt=0.0, description="With require_approval: no answer in this time = not approved."
    )


class Evaluation(Strict):
    holdout_fraction: float = Field(
        0.18, gt=0.0, lt=1.0,
        description="Share of rows held out for evaluation, chosen by a hash of the id "
        "before any slicing; agents never see them.",
    )
    max_rows: int | None = Field(None, ge=1, description="Evaluate at most this many rows.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Tokens a model may generate per held-out prompt (default: 6 "
        "for a label, 64 for text and JSON answers).")
    promotion: Promotion = Field(default_factory=Promotion)


class Tracking(Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<out>/../mlflow.db shared by all runs under that folder.",
    )
    experiment: str = Field("posttrain", description="MLflow experiment name.")
    registered_model: str = Field(description="Model Registry name of the trained model.")
    traces: bool = Field(True, description="One MLflow trace per agent (and the tuner), with "
                         "its LLM and tool calls, linked to the run (flows/agent_traces.py).")


class Store(Strict):
    url: str | None = Field(
        None, description="Example store SQLAlchemy URL. Default: sqlite:///<out>/store.db."
    )


class Contamination(Strict):
    """The near-duplicate guard between training data and held-out rows
    (flows/contamination.py): an SFT example or DPO pair whose prompt (or, for text answers,
    chosen/rejected text) is this similar to a held-out row's rendered prompt is dropped."""

    enabled: bool = Field(True, description="Drop training examples and DPO pairs that are "
                          "near-duplicates (paraphrases, light edits) of held-out rows.")
    threshold: float = Field(
        0.3, gt=0.0, le=1.0, description="Jaccard similarity of word n-gram shingles at or "
        "above which a training text counts as a copy of a held-out prompt (0.3 caught 97% of "
        "edited copies in the bench and no clean row; 0.25 all copies, and follow-up articles "
        "on a held-out story too: bench/RESULTS.md).")
    ngram: int = Field(2, ge=1, le=8, description="Words per shingle (after casefolding and "
                       "dropping punctuation).")
    num_perm: int = Field(256, ge=16, le=1024, description="MinHash permutations of the LSH "
                          "that proposes candidates (each is then verified exactly).")


class ErrorDriven(Strict):
    """Start from the champion's mistakes (flows/error_driven.py): probe rows of every slice
    are labelled by the run's agents and predicted by the champion; the slices it gets most
    wrong go first with more turns, and a top-up targets its weakest labels."""

    enabled: bool = Field(
        False, description="Probe the champion before generating and focus the agents on its "
        "errors; without a champion the run is a plain one (logged). Classification only.")
    probe_rows: int = Field(
        20, ge=1, description="Unlabelled rows per slice (chosen by a hash of the id) the "
        "agents label and the champion predicts.")
    max_probe_rows: int = Field(
        2000, ge=1, description="Probe rows in all: per-slice probes shrink evenly to fit (a "
        "large warehouse has thousands of slices).")
    weak_labels: int = Field(
        2, ge=1, description="The champion's k worst labels by F1 on the probes: the targeted "
        "top-up's want_labels.")
    focus_turns: float = Field(
        2.0, ge=1.0, le=20.0, description="Agents on the champion's weakest slice groups "
        "(error above zero and at least its overall error on the probes) get this x "
        "generation.max_turns.")
    topup: bool = Field(
        True, description="After the first agents (and retries), send agents over the "
        "still-unlabelled rows for the weak labels only, before the balance top-up.")
    start_from_champion: bool = Field(
        True, description="Fine-tune the champion's weights (and tokenizer) on this run's "
        "examples instead of a fresh student: what it already does well is kept while the "
        "focus fixes its errors. False: the student of `student`, as in a plain run.")

    @model_validator(mode="after")
    def _probe_cap(self) -> ErrorDriven:
        if self.max_probe_rows < self.probe_rows:
            raise FieldError("error_driven.max_probe_rows",
                             f"must be >= probe_rows ({self.probe_rows}), got "
                             f"{self.max_probe_rows}")
        return self


class Spec(Strict):
    name: str = Field(description="Short name of this post-training job.")
    warehouse: Warehouse
    slicing: Slicing
    task: Task
    llm: LLM = Field(default_factory=LLM)
    generation: Generation = Field(default_factory=Generation)
    distribution: Distribution = Field(default_factory=Distribution)
    student: Student = Field(default_factory=Student)
    training: Training = Field(default_factory=Training)
    tuning: Tuning = Field(default_factory=Tuning)
    dpo: DPO = Field(default_factory=DPO)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    tracking: Tracking
    store: Store = Field(default_factory=Store)
    contamination: Contamination = Field(default_factory=Contamination)
    error_driven: ErrorDriven = Field(default_factory=ErrorDriven)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        gen = data.get("generation") if isinstance(data, dict) else None
        old = [k for k in ("drift_window", "drift_threshold") if isinstance(gen, dict) and k in gen]
        if old:
            raise FieldError(
                f"generation.{old[0]}",
                "was replaced by generation.drift (a CUSUM test of a rise in each agent's bad "
                "rate, with baseline_rate, odds_ratio, false_alarm_rate ...): remove it")
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Spec:
        table_cols = self.warehouse.tables.get(self.slicing.table)
        if table_cols is None:
            raise FieldError(
                "slicing.table",
                f"must be one of the allow-listed tables ({', '.join(self.warehouse.tables)}), "
                f"got {self.slicing.table!r}",
            )
        if self.slicing.id_column not in table_cols:
            raise FieldError(
                "slicing.id_column",
                f"must be an allow-listed column of {self.slicing.table!r}, "
                f"got {self.slicing.id_column!r}",
            )
        if self.slicing.column and self.slicing.column not in table_cols:
            raise FieldError(
                "slicing.column",
                f"must be an allow-listed column of {self.slicing.table!r}, "
                f"got {self.slicing.column!r}",
            )
        missing = [c for c in self.task.template_columns() if c not in table_cols]
        if missing:
            raise FieldError(
                "task.prompt_template",
                f"uses {', '.join(missing)}, not allow-listed columns of {self.slicing.table!r}",
            )
        if self.task.gold_column is not None and self.task.gold_column in table_cols:
            raise FieldError(
                "task.gold_column",
                f"{self.task.gold_column!r} is allow-listed in warehouse.tables."
                f"{self.slicing.table}: remove it there, agents must never read the gold label",
            )
        target = self.distribution.target
        if self.task.kind != "classification" and target != "none":
            raise FieldError("distribution.target",
                             f"balances labels, which a {self.task.kind} task has none of: "
                             "set it to none (answer lengths are reported by task.rules)")
        if self.task.kind != "classification" and self.llm.judge is None:
            raise FieldError("llm.judge",
                             f"a {self.task.kind} task needs a judge: it scores answers "
                             "against task.rubric and compares models on the held-out rows")
        if self.task.kind != "classification" and any(
                r.simulated for r in self.llm.roles().values()) and self.task.gold_column is None:
            raise FieldError("task.gold_column",
                             "the simulated teacher answers from the gold column: name one, "
                             "or use real LLM endpoints")
        metric, kind = self.evaluation.promotion.metric, self.task.kind
        if metric is not None and metric not in METRICS[kind]:
            raise FieldError("evaluation.promotion.metric",
                             f"must be one of {', '.join(METRICS[kind])} for kind {kind}, "
                             f"got {metric!r}")
        if metric is None:
            self.evaluation.promotion.metric = METRICS[kind][0]
        if self.evaluation.max_new_tokens is None:
            self.evaluation.max_new_tokens = 6 if kind == "classification" else 64
        if isinstance(target, dict):
            unknown = sorted(set(target) - set(self.task.labels))
            if unknown:
                raise FieldError("distribution.target",
                                  f"labels {', '.join(unknown)} are not in task.labels")
            if abs(sum(target.values()) - 1.0) > 1e-6:
                raise FieldError("distribution.target",
                                  f"shares must sum to 1, got {sum(target.values()):g}")
        bias = [b for b in self.llm.simulated.bias_labels if b not in (self.task.labels or [])]
        if bias:
            raise FieldError("llm.simulated.bias_labels",
                              f"labels {', '.join(bias)} are not in task.labels")
        profile = Path(__file__).resolve().parent.parent / "training" / "accelerate"
        if not (profile / f"{self.training.accelerate_profile}.yaml").exists():
            choices = sorted(p.stem for p in profile.glob("*.yaml"))
            raise FieldError(
                "training.accelerate_profile",
                f"must be one of {', '.join(choices)}, got {self.training.accelerate_profile!r}",
            )
        return self

    @model_validator(mode="after")
    def _error_driven_kind(self) -> Spec:
        if self.error_driven.enabled and self.task.kind != "classification":
            raise FieldError("error_driven.enabled",
                             f"classification only for now (the champion's errors are label "
                             f"errors), got task.kind {self.task.kind}: set it to false")
        return self

    # ── helpers used across the pipeline ──
    def content_hash(self) -> str:
        """Stable hash of the validated spec (pins the run to exactly this spec)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def allowed_columns(self) -> list[str]:
        return self.warehouse.tables[self.slicing.table]


class SpecError(Exception):
    """A spec that cannot be used. `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _format_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind, msg, got = err["type"], err["msg"], err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"{loc}: unknown key, remove it or check its spelling"
    if kind == "missing":
        return f"{loc}: required, add it"
    if kind == "value_error":
        inner = ctx.get("error")
        if isinstance(inner, FieldError):
            return f"{inner.path}: {inner.message}"
        text = msg.removeprefix("Value error, ")
        # a model validator that names a sub-field ("column: ...") gets the full path
        head, sep, rest = text.partition(": ")
        if sep and IDENTIFIER.match(head):
            return f"{loc + '.' if loc else ''}{head}: {rest}"
        return f"{loc}: {text}"
    bounds = {
        "greater_than_equal": "must be at least {ge}",
        "greater_than": "must be greater than {gt}",
        "less_than_equal": "must be at most {le}",
        "less_than": "must be less than {lt}",
    }
    if kind in bounds:
        return f"{loc}: {bounds[kind].format(**ctx)}, got {got!r}"
    if kind == "literal_error":
        return f"{loc}: must be one of {ctx.get('expected')}, got {got!r}"
    return f"{loc}: {msg[0].lower() + msg[1:]}, got {got!r}"


def parse_spec(data: object, base_dir: Path | None = None) -> Spec:
    """Validate already-loaded YAML data. Relative sqlite paths resolve against base_dir."""
    if not isinstance(data, dict):
        raise SpecError([f"(top level): must be a mapping of sections, got {type(data).__name__}"])
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError([_format_error(err) for err in e.errors()]) from None
    if base_dir is not None:
        spec.warehouse.url = resolve_sqlite_url(spec.warehouse.url, base_dir)
        if spec.store.url:
            spec.store.url = resolve_sqlite_url(spec.store.url, base_dir)
    return spec


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and validate a spec file; raise SpecError with one line per problem."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([f"{path}: no such spec file"])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    return parse_spec(data, base_dir=p.resolve().parent)


def resolve_sqlite_url(url: str, base_dir: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/base/relative.db; other URLs unchanged."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str((base_dir / url[len(prefix):]).resolve())
    return url
