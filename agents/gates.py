"""The gate every submitted example passes before it is kept.

`Gate(rule)` is made once per agent run, `rule` being the task kind's answer rule
(agents/answers.py: `LabelAnswer(labels)`, `TextAnswer(...)`, `JsonAnswer(schema)`).
`gate.check(item, row_lookup)` returns a `GateResult`; `ok` items are remembered, so the same
row submitted again is a `duplicate`. Reasons, in the order they are checked:

    invalid_schema     not exactly {"row_id": str|int, <rule.field>: <answer>}
    (the rule's own)   e.g. label_not_in_set: the label is not one of the task's labels, even
                       ignoring case and outer whitespace ("Tech " is taken as "tech",
                       `normalised` is set); too_long, forbidden_pattern, schema_violation ...
    duplicate          this row was already accepted in this run
    row_not_in_slice   row_lookup(row_id) found no such row in the agent's slice
    copy_of_eval_row   the row's text equals a held-out evaluation row (`is_eval_copy`)
    copies_prompt      (a rule that `uses_prompt`) the answer copies the row's prompt
                       (`prompt_of(row)`)
    near_duplicate     (with a `near_duplicates` index, agents/text_diversity.py) the answer is
                       near-identical to one accepted for another row (a pasted headline, a
                       recycled template); within a batch the first of two is accepted

`gate.check_batch(items, rows_lookup)` checks a whole submission with ONE lookup of the rows
it names (`rows_lookup(ids) -> {row_key(id): row}`), so a batch costs one indexed query, not
one per item. Each rejection's `message` tells the agent how to fix it. Rejections decided later (the
judge disagreeing, a re-review) call `gate.forget(row_id)` so the row can be labelled again (its
answer leaves the near-duplicate index too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, create_model

from agents.answers import LABEL_NOT_IN_SET, NEAR_DUPLICATE, AnswerRule

if TYPE_CHECKING:  # datasketch takes ~0.6 s to import; only a gate given an index needs it
    from agents.text_diversity import NearDuplicates

INVALID_SCHEMA = "invalid_schema"
DUPLICATE = "duplicate"
ROW_NOT_IN_SLICE = "row_not_in_slice"
COPY_OF_EVAL_ROW = "copy_of_eval_row"

__all__ = ["COPY_OF_EVAL_ROW", "DUPLICATE", "INVALID_SCHEMA", "LABEL_NOT_IN_SET",
           "NEAR_DUPLICATE", "ROW_NOT_IN_SLICE", "Gate", "GateResult", "one_by_one", "row_key"]


def submitted_item(field: str) -> type[BaseModel]:
    """One item of a `submit_examples` call: exactly a row id and the answer's field (a label
    is a string; a response is text or, for extraction, an object)."""
    value = StrictStr if field == "label" else StrictStr | dict[str, Any]
    return create_model("SubmittedExample", __config__=ConfigDict(extra="forbid"),
                        row_id=(StrictStr | StrictInt, ...), **{field: (value, ...)})


@dataclass(frozen=True)
class GateResult:
    ok: bool
    reason: str | None = None
    message: str = ""
    row_id: str | int | None = None
    label: str | None = None  # the answer as submitted or kept, as text
    row: dict | None = None  # the slice's row, for accepted items
    normalised: bool = False  # the label was accepted after fixing its case or whitespace
    answer: Any = None  # the answer as kept (a label, a text, a parsed JSON object)


def row_key(row_id: object) -> str:
    """How a row id is compared: 42, 42.0, "42" and " 42 " are the same row."""
    if isinstance(row_id, float) and row_id.is_integer():
        row_id = int(row_id)
    return str(row_id).strip()


def one_by_one(row_lookup: Callable[[str | int], dict | None]
               ) -> Callable[[list], dict[str, dict]]:
    """A batch lookup (`check_batch`'s) made of a lookup of one row at a time."""
    def rows_lookup(ids: list) -> dict[str, dict]:
        found = {row_key(i): row_lookup(i) for i in ids}
        return {k: v for k, v in found.items() if v is not None}
    return rows_lookup


class Gate:
    """Checks submitted items against the answer rule, the slice, and what was accepted."""

    def __init__(self, rule: AnswerRule, is_eval_copy: Callable[[dict], bool] | None = None,
                 prompt_of: Callable[[dict], str] | None = None,
                 near_duplicates: NearDuplicates | None = None):
        self.rule = rule
        self._item = submitted_item(rule.field)
        self._accepted: set[str] = set()
        self._is_eval_copy = is_eval_copy
        self._prompt_of = prompt_of
        self._near = near_duplicates  # accepted answers, keyed by row_key
        self._shown_ids: dict[str, str | int] = {}  # row_key -> the row id as submitted
        self._prompts: dict[str, str | None] = {}  # row_key -> its prompt (near-duplicates)

    def forget(self, row_id: str | int) -> None:
        """A row accepted here was rejected afterwards: let it be submitted again."""
        key = row_key(row_id)
        self._accepted.discard(key)
        if self._near is not None:
            self._near.remove(key)
            self._shown_ids.pop(key, None)
            self._prompts.pop(key, None)

    @property
    def accepted_count(self) -> int:
        return len(self._accepted)

    def check(self, item: object, row_lookup: Callable[[str | int], dict | None]) -> GateResult:
        """One item, its row found by `row_lookup(row_id)` (None: not in the slice)."""
        return self.check_batch([item], one_by_one(row_lookup))[0]

    def check_batch(self, items: list[object],
                    rows_lookup: Callable[[list], dict[str, dict]]) -> list[GateResult]:
        """Every item of one submission, in order, with one `rows_lookup` of the rows named."""
        first = [self._check_fields(item) for item in items]
        wanted = list(dict.fromkeys(r.row_id for r in first
                                    if r.ok and row_key(r.row_id) not in self._accepted))
        rows = rows_lookup(wanted) if wanted else {}
        return [self._check_row(r, rows) if r.ok else r for r in first]

    def _check_fields(self, item: object) -> GateResult:
        """Shape and the answer rule; ok=True means 'go on to the row checks'."""
        field = self.rule.field
        try:
            ex = self._item.model_validate(item)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'item'}: {err['msg']}" for err in e.errors()
            )
            raw = item if isinstance(item, dict) else {}
            shape = '"<label>"' if field == "label" else "<answer>"
            return GateResult(
                False, INVALID_SCHEMA,
                f"each example must be exactly {{\"row_id\": <id>, \"{field}\": {shape}}} "
                f"({problems})",
                row_id=raw.get("row_id") if isinstance(raw.get("row_id"), (str, int)) else None,
                label=raw.get(field) if isinstance(raw.get(field), str) else None,
            )
        value = getattr(ex, field)
        verdict = self.rule.check(value, row_id=ex.row_id)
        if not verdict.ok:
            return GateResult(False, verdict.reason, verdict.message, row_id=ex.row_id,
                              label=_as_text(value), answer=verdict.answer)
        return GateResult(True, row_id=ex.row_id, label=_as_text(verdict.answer),
                          normalised=verdict.normalised, answer=verdict.answer)

    def _check_row(self, r: GateResult, rows: dict[str, dict]) -> GateResult:
        fields = {"row_id": r.row_id, "label": r.label, "answer": r.answer}
        key = row_key(r.row_id)
        if key in self._accepted:
            return GateResult(
                False, DUPLICATE,
                f"row {r.row_id!r} already has an accepted label; do not submit it again",
                **fields,
            )
        row = rows.get(key)
        if row is None:
            return GateResult(
                False, ROW_NOT_IN_SLICE,
                f"row {r.row_id!r} is not in your slice; submit only row ids your sql "
                f"queries returned",
                **fields,
            )
        if self._is_eval_copy is not None and self._is_eval_copy(row):
            return GateResult(
                False, COPY_OF_EVAL_ROW,
                f"row {r.row_id!r} duplicates a held-out evaluation row and cannot be used "
                f"for training; skip it",
                **fields,
            )
        if self.rule.uses_prompt and self._prompt_of is not None:
            verdict = self.rule.check(r.answer, prompt=self._prompt_of(row), row_id=r.row_id)
            if not verdict.ok:
                return GateResult(False, verdict.reason, verdict.message, **fields)
        if self._near is not None and r.label is not None:
            # the same answer for a row whose prompt is the same (a warehouse that holds one
            # article twice) is right, not recycled
            prompt = self._prompt_of(row) if self._prompt_of is not None else None
            hit = self._near.find(r.label, key=key)
            if hit is not None and (prompt is None or self._prompts.get(hit[0]) != prompt):
                return GateResult(False, NEAR_DUPLICATE, self._near_message(r.row_id, *hit),
                                  **fields)
            self._near.add(key, r.label)
            self._shown_ids[key] = r.row_id
            self._prompts[key] = prompt
        self._accepted.add(key)
        return GateResult(True, None, "accepted", row=row, normalised=r.normalised, **fields)

    def _near_message(self, row_id: str | int, other: str, similarity: float) -> str:
        text = " ".join((self._near.text_of(other) or "").split())
        quoted = text if len(text) <= 80 else text[:79].rstrip() + "…"
        percent = math.floor(similarity * 100 + 1e-9)
        return (f"row {row_id!r}: your answer is {percent}% the same as the one accepted for "
                f"row {self._shown_ids.get(other, other)!r} (\"{quoted}\"): write an answer "
                f"specific to this row")


def _as_text(value: object) -> str | None:
    """An answer as the store and the agent's events hold it: text (objects as JSON)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
