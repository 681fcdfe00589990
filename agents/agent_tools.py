"""The agent's tools as the model sees them, and how the arguments it writes are read.

`tool_specs` gives the two tools, `sql` and `submit_examples`, in OpenAI function form;
`SqlArgs` and `SubmitArgs` are the models a call's arguments are validated against;
`parse_arguments` reads them (a JSON object, also when written inside a ```json fence).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from agents.answers import AnswerRule

__all__ = ["MAX_SUBMIT", "SqlArgs", "SubmitArgs", "parse_arguments", "tool_specs"]

MAX_SUBMIT = 100
_FENCE = re.compile(r"\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*", re.DOTALL | re.IGNORECASE)


class SqlArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: StrictStr


class SubmitArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    examples: list[Any] = Field(min_length=1, max_length=MAX_SUBMIT)  # items: the gate's job


def tool_specs(table: str, rule: AnswerRule) -> list[dict]:
    """`sql` over the agent's table, and `submit_examples` of {row_id, <rule.field>} items
    whose answer schema is the task kind's (a label enum, text bounds, a JSON Schema)."""
    what = "labelled rows" if rule.field == "label" else "answered rows"
    return [
        {
            "type": "function",
            "function": {
                "name": "sql",
                "description": f"Run one read-only SELECT over table {table!r} (your slice "
                "only). Returns {rows, row_count, truncated}.",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "One SELECT."}},
                    "required": ["query"],
                    "additionalProperties": False,
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "submit_examples",
                "description": f"Submit {what} (at most {MAX_SUBMIT} per call). Returns "
                "{accepted, rejected: [{row_id, reason, message}]}.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "examples": {
                            "type": "array",
                            "maxItems": MAX_SUBMIT,
                            "items": {
                                "type": "object",
                                "properties": {
                                    "row_id": {"type": ["string", "integer"]},
                                    rule.field: rule.item_schema(),
                                },
                                "required": ["row_id", rule.field],
                                "additionalProperties": False,
                            },
                        }
                    },
                    "required": ["examples"],
                    "additionalProperties": False,
                },
            },
        },
    ]


def parse_arguments(arguments: str | None, model: type[BaseModel]) -> tuple[BaseModel | str, bool]:
    """(the arguments validated against `model`, or what is wrong with them; whether they were
    taken out of a markdown code fence)."""
    text = arguments or ""
    fenced = _FENCE.fullmatch(text)
    if fenced:  # a hosted-model habit: the JSON object inside a markdown code fence
        text = fenced.group(1)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        return f"arguments are not valid JSON: {e}", bool(fenced)
    try:
        return model.model_validate(raw), bool(fenced)
    except ValidationError as e:
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}"
                         for err in e.errors()), bool(fenced)
