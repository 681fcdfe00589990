"""Preference pairs for DPO, written by an LLM and gated against the curated SFT data.

    writer = PairWriter(gateway, model="...", skill=load_skill("write-preference-pairs"),
                        labels=L, completion_template=" {label}", description="...")
    result = writer.write([{"row_id": 7, "prompt": "...", "completion": " tech"}], "pairs/0")
    result.pairs        # kept Pair(row_id, prompt, chosen, rejected)
    result.rejected     # Counter: reason -> items

Each batch is one `gateway.complete_json` call (mirroring agents/judge.py): the skill's
instructions plus the task as the system message, and one user message, exactly

    <pairs>{"labels": [...], "items": [{"row_id": ..., "prompt": "..."}],
            "completion_template": " {label}"}</pairs>

answered by `{"pairs": [{"row_id", "chosen", "rejected"}]}` and validated with pydantic. Every
pair passes `gate_pair` before it is kept; the reasons, in the order they are checked:

    invalid_pair          not {"row_id": str|int, "chosen": str, "rejected": str}
    row_not_asked         a row id that is not in this batch
    chosen_not_in_set     chosen is not the completion template rendered with a label
    rejected_not_in_set   the same for rejected
    chosen_equals_rejected
    chosen_not_sft_label  chosen is not the row's curated SFT completion (the label the gated
                          and judged SFT data agreed on): the pair would contradict SFT
    duplicate_pair        the reply answered this row more than once (none of them is kept)

An item the reply leaves out is counted as `no_pair` (the skill allows it when no label fits).
A whole reply that is not `{"pairs": [...]}` counts each of its items as `invalid_reply`. A call
that still fails after the gateway's retries counts each of its items as
`call_failed:<kind>` (`call_failed:budget` when the budget stops it): nothing is dropped
silently. Rows in a batch must have distinct ids.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from agents.ledger import BudgetExceeded
from agents.providers import ProviderError

PAIRS_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "row_id": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    "chosen": {"type": "string"},
                    "rejected": {"type": "string"},
                },
                "required": ["row_id", "chosen", "rejected"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["pairs"],
    "additionalProperties": False,
}

INVALID_PAIR = "invalid_pair"
ROW_NOT_ASKED = "row_not_asked"
DUPLICATE_PAIR = "duplicate_pair"
CHOSEN_NOT_IN_SET = "chosen_not_in_set"
REJECTED_NOT_IN_SET = "rejected_not_in_set"
CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
CHOSEN_NOT_SFT_LABEL = "chosen_not_sft_label"
NO_PAIR = "no_pair"
INVALID_REPLY = "invalid_reply"
CALL_FAILED = "call_failed"


@dataclass(frozen=True)
class Pair:
    row_id: str | int
    prompt: str
    chosen: str
    rejected: str


@dataclass
class PairsResult:
    pairs: list[Pair] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # reason -> items
    calls: int = 0
    failed_calls: int = 0

    def merge(self, other: PairsResult) -> None:
        self.pairs += other.pairs
        self.rejected.update(other.rejected)
        self.calls += other.calls
        self.failed_calls += other.failed_calls


class _PairIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    row_id: StrictStr | StrictInt
    chosen: StrictStr
    rejected: StrictStr


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    pairs: list[Any]


def render(template: str, label: str) -> str:
    """The completion for a label, as curation renders it (`str.format` with `label`)."""
    return template.format(label=label)


def pairs_block(labels: list[str], items: list[dict], completion_template: str) -> str:
    """The user message: `<pairs>{json}</pairs>` ("</" escaped so a prompt cannot close it)."""
    body = {
        "labels": list(labels),
        "items": [{"row_id": i["row_id"], "prompt": i["prompt"]} for i in items],
        "completion_template": completion_template,
    }
    return "<pairs>" + json.dumps(body, ensure_ascii=False).replace("</", "<\\/") + "</pairs>"


def gate_pair(raw: Any, asked: dict[str, dict], completions: dict[str, str]
              ) -> tuple[Pair | None, str | None]:
    """(pair, None) when `raw` may be kept, else (None, reason).

    `asked` maps str(row_id) -> the batch item {row_id, prompt, completion}; `completions`
    maps each completion the template renders from the label set to its label."""
    try:
        p = _PairIn.model_validate(raw)
    except ValidationError:
        return None, INVALID_PAIR
    item = asked.get(str(p.row_id))
    if item is None:
        return None, ROW_NOT_ASKED
    if p.chosen not in completions:
        return None, CHOSEN_NOT_IN_SET
    if p.rejected not in completions:
        return None, REJECTED_NOT_IN_SET
    if p.chosen == p.rejected:
        return None, CHOSEN_EQUALS_REJECTED
    if p.chosen != item["completion"]:
        return None, CHOSEN_NOT_SFT_LABEL
    return Pair(item["row_id"], item["prompt"], p.chosen, p.rejected), None


class PairWriter:
    def __init__(self, gateway, *, model: str, skill, labels: list[str],
                 completion_template: str = " {label}", description: str = "",
                 temperature: float | None = 0.0, max_tokens: int | None = 4000):
        if not labels or len(labels) < 2:
            raise ValueError("preference pairs need a label set of at least 2 labels")
        self.gateway, self.model, self.skill = gateway, model, skill
        self.labels, self.template = list(labels), completion_template
        self.completions = {render(completion_template, label): label for label in labels}
        if len(self.completions) != len(self.labels):
            raise ValueError(f"completion_template {completion_template!r} renders two labels "
                             f"alike; pairs could not tell them apart")
        self.description = description
        self.temperature, self.max_tokens = temperature, max_tokens

    def system_prompt(self) -> str:
        """The skill's instructions, then the task (the skill expects it in the system prompt)."""
        task = f"\n\n## The task\n{self.description}\n" if self.description else "\n\n"
        return (self.skill.instructions + task
                + f"Labels: {', '.join(self.labels)}\n"
                + f"Completion template: {json.dumps(self.template)}")

    def write(self, items: list[dict], agent: str, slice_id: str | None = None) -> PairsResult:
        """One call for `items` ({row_id, prompt, completion}); the kept pairs in item order."""
        keys = [str(i["row_id"]) for i in items]
        if len(set(keys)) != len(keys):
            raise ValueError("pair items must have distinct row ids")
        result = PairsResult()
        if not items:
            return result
        result.calls = 1
        try:
            reply = self.gateway.complete_json(
                model=self.model,
                messages=[
                    {"role": "system", "content": self.system_prompt()},
                    {"role": "user", "content": pairs_block(self.labels, items, self.template)},
                ],
                schema=PAIRS_SCHEMA,
                schema_name="pairs",
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                agent=agent,
                slice_id=slice_id,
            )
        except ProviderError as e:  # failed after the gateway's retries: counted, not lost
            result.failed_calls = 1
            result.rejected[f"{CALL_FAILED}:{e.kind}"] += len(items)
            return result
        except BudgetExceeded:
            result.failed_calls = 1
            result.rejected[f"{CALL_FAILED}:budget"] += len(items)
            return result
        self._gate(items, reply, result)
        return result

    def _gate(self, items: list[dict], reply: Any, result: PairsResult) -> None:
        try:
            raw = _Reply.model_validate(reply).pairs
        except ValidationError:
            result.rejected[INVALID_REPLY] += len(items)
            return
        asked = {str(i["row_id"]): i for i in items}
        answered = Counter(str(r["row_id"]) for r in raw
                           if isinstance(r, dict) and isinstance(r.get("row_id"), str | int))
        kept: dict[str, Pair] = {}
        for r in raw:
            pair, reason = gate_pair(r, asked, self.completions)
            if pair is not None and answered[str(pair.row_id)] > 1:
                pair, reason = None, DUPLICATE_PAIR
            if pair is None:
                result.rejected[reason] += 1
            else:
                kept[str(pair.row_id)] = pair
        for key in asked:
            if key in kept:
                result.pairs.append(kept[key])
            elif answered[key] == 0:
                result.rejected[NO_PAIR] += 1
