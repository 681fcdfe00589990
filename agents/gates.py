"""The gate every submitted example passes before it is kept.

`Gate(labels)` is made once per agent run. `gate.check(item, row_lookup)` returns a
`GateResult`; `ok` items are remembered, so the same row submitted again is a
`duplicate`. Reasons, in the order they are checked:

    invalid_schema     not exactly {"row_id": str|int, "label": str}
    label_not_in_set   the label is not one of the task's labels
    duplicate          this row was already accepted in this run
    row_not_in_slice   row_lookup(row_id) found no such row in the agent's slice
    copy_of_eval_row   the row's text equals a held-out evaluation row (`is_eval_copy`)

Each rejection's `message` tells the agent how to fix it. Rejections decided later (the
judge disagreeing, a re-review) call `gate.forget(row_id)` so the row can be labelled again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

INVALID_SCHEMA = "invalid_schema"
LABEL_NOT_IN_SET = "label_not_in_set"
DUPLICATE = "duplicate"
ROW_NOT_IN_SLICE = "row_not_in_slice"
COPY_OF_EVAL_ROW = "copy_of_eval_row"


class SubmittedExample(BaseModel):
    """One item of a `submit_examples` call."""

    model_config = ConfigDict(extra="forbid")
    row_id: StrictStr | StrictInt
    label: StrictStr


@dataclass(frozen=True)
class GateResult:
    ok: bool
    reason: str | None = None
    message: str = ""
    row_id: str | int | None = None
    label: str | None = None
    row: dict | None = None  # the slice's row, for accepted items


class Gate:
    """Checks submitted items against the label set, the slice, and what was accepted."""

    def __init__(self, labels: list[str],
                 is_eval_copy: Callable[[dict], bool] | None = None):
        if not labels:
            raise ValueError("a gate needs a non-empty label set")
        self.labels = list(labels)
        self._label_set = set(labels)
        self._accepted: set[str] = set()
        self._is_eval_copy = is_eval_copy

    def forget(self, row_id: str | int) -> None:
        """A row accepted here was rejected afterwards: let it be submitted again."""
        self._accepted.discard(str(row_id))

    @property
    def accepted_count(self) -> int:
        return len(self._accepted)

    def check(self, item: object, row_lookup: Callable[[str | int], dict | None]) -> GateResult:
        try:
            ex = SubmittedExample.model_validate(item)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'item'}: {err['msg']}" for err in e.errors()
            )
            raw = item if isinstance(item, dict) else {}
            return GateResult(
                False, INVALID_SCHEMA,
                f"each example must be exactly {{\"row_id\": <id>, \"label\": \"<label>\"}} "
                f"({problems})",
                row_id=raw.get("row_id") if isinstance(raw.get("row_id"), (str, int)) else None,
                label=raw.get("label") if isinstance(raw.get("label"), str) else None,
            )
        fields = {"row_id": ex.row_id, "label": ex.label}
        if ex.label not in self._label_set:
            return GateResult(
                False, LABEL_NOT_IN_SET,
                f"label {ex.label!r} is not one of: {', '.join(self.labels)}; "
                f"resubmit row {ex.row_id!r} with one of these, spelled exactly",
                **fields,
            )
        key = str(ex.row_id)
        if key in self._accepted:
            return GateResult(
                False, DUPLICATE,
                f"row {ex.row_id!r} already has an accepted label; do not submit it again",
                **fields,
            )
        row = row_lookup(ex.row_id)
        if row is None:
            return GateResult(
                False, ROW_NOT_IN_SLICE,
                f"row {ex.row_id!r} is not in your slice; submit only row ids your sql "
                f"queries returned",
                **fields,
            )
        if self._is_eval_copy is not None and self._is_eval_copy(row):
            return GateResult(
                False, COPY_OF_EVAL_ROW,
                f"row {ex.row_id!r} duplicates a held-out evaluation row and cannot be used "
                f"for training; skip it",
                **fields,
            )
        self._accepted.add(key)
        return GateResult(True, None, "accepted", row=row, **fields)
