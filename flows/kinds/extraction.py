"""Extraction: a JSON record of what the row states, valid against `task.answer_schema`.

The answer is a JSON object (agents.answers.JsonAnswer: JSON Schema 2020-12; an answer sent
as JSON text is parsed); the completion is its canonical JSON. Models are scored by exact
match and field-level F1 against the gold records, and by the judge's pairwise win-rate
(flows/kinds/text.py), which decides promotion.
"""

from __future__ import annotations

import json

from agents.answers import JsonAnswer
from flows.kinds.text import TextKind
from training.text_eval import extraction_scores


class Extraction(TextKind):
    name = "extraction"
    references = ("field_f1", "exact_match")

    def answer_rule(self) -> JsonAnswer:
        return JsonAnswer(self.task.answer_schema)

    def parse(self, text: str):
        """The first JSON object a decoded completion holds, else its first line as text."""
        line = text.strip().split("\n", 1)[0].strip()
        try:
            value, _ = json.JSONDecoder().raw_decode(line)
        except json.JSONDecodeError:
            return line
        return value if isinstance(value, dict) else line

    def gold(self, rows: list[dict]) -> list | None:
        gold = super().gold(rows)
        return None if gold is None else [json.loads(g) if isinstance(g, str) else g
                                          for g in gold]

    def reference(self, outputs: list, gold: list) -> dict:
        scores = extraction_scores(outputs, gold)
        return {"field_f1": scores["field_f1"], "exact_match": scores["exact_match"],
                "invalid": scores["invalid"], "per_field": scores["per_field"]}
