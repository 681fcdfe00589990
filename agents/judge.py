"""The judge: a second model reviews a sample of accepted examples (structured output).

    judge = Judge(gateway, model="claude-...", skill=load_skill("review-examples"), labels=L)
    verdicts = judge.review([{"row_id": 7, "label": "tech", "text": "..."}], agent, slice_id)

Each batch of `batch_size` items is one `gateway.complete_json` call (`areview`: the same
through `acomplete_json`, for agents on an event loop): the skill's
instructions as the system message, and one user message, exactly

    <review>{"labels": [...], "items": [{"row_id": ..., "label": ..., "text": "..."}]}</review>

answered by `{"verdicts": [{"row_id": ..., "agree": bool, "label": "..."}]}`. The reply is
validated with pydantic, per verdict. An item is *unreviewed* (`agree=None`, with a
`reason`) when the judge left it out, answered it twice, answered it contradictorily
(agree=true with another label, agree=false with the same label) or malformed; nothing is
ever agreed by default. Verdicts for row ids not in the batch are ignored. A disagreement
whose proposed label is not in the label set keeps `agree=False` with `label=None`.
Gateway errors (budget, provider failures after retries) propagate: the caller decides.

`should_sample(row_id, rate, seed)` picks the rows to review: a hash, so the same rows are
picked on a re-run and the call cache serves them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

VERDICTS_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "verdicts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "row_id": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    "agree": {"type": "boolean"},
                    "label": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
                "required": ["row_id", "agree", "label"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["verdicts"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Verdict:
    row_id: str | int
    agree: bool | None  # None: unreviewed
    label: str | None  # the label the judge holds right (the item's own when it agrees)
    reason: str | None = None  # why unreviewed, or a note on the judge's answer


class _VerdictIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    row_id: StrictStr | StrictInt
    agree: StrictBool
    label: StrictStr | None = None


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    verdicts: list[Any]


def should_sample(row_id: str | int, rate: float, seed: int | str = 0) -> bool:
    """True for about `rate` of row ids, the same ones for the same seed."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def review_block(labels: list[str], items: list[dict]) -> str:
    """The user message: `<review>{json}</review>` ("</" escaped so text cannot close it)."""
    body = {
        "labels": list(labels),
        "items": [{"row_id": i["row_id"], "label": i["label"], "text": i["text"]} for i in items],
    }
    return "<review>" + json.dumps(body, ensure_ascii=False).replace("</", "<\\/") + "</review>"


class Judge:
    def __init__(self, gateway, *, model: str, skill, labels: list[str],
                 temperature: float = 0.0, max_tokens: int = 2000, batch_size: int = 20):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not labels:
            raise ValueError("the judge needs the task's label set")
        self.gateway, self.model, self.skill = gateway, model, skill
        self.labels = list(labels)
        self.temperature, self.max_tokens, self.batch_size = temperature, max_tokens, batch_size
        self.calls = 0

    def review(self, items: list[dict], agent: str, slice_id: str | None) -> list[Verdict]:
        """One verdict per item, in the items' order."""
        out: list[Verdict] = []
        for batch in self._batches(items):
            reply = self.gateway.complete_json(**self._request(batch, agent, slice_id))
            self.calls += 1
            out += self._verdicts(batch, reply)
        return out

    async def areview(self, items: list[dict], agent: str,
                      slice_id: str | None) -> list[Verdict]:
        """`review` for a coroutine (the gateway's `acomplete_json`)."""
        out: list[Verdict] = []
        for batch in self._batches(items):
            reply = await self.gateway.acomplete_json(**self._request(batch, agent, slice_id))
            self.calls += 1
            out += self._verdicts(batch, reply)
        return out

    def _batches(self, items: list[dict]) -> list[list[dict]]:
        keys = [str(i["row_id"]) for i in items]
        if len(set(keys)) != len(keys):
            raise ValueError("review items must have distinct row ids")
        return [items[start : start + self.batch_size]
                for start in range(0, len(items), self.batch_size)]

    def _request(self, batch: list[dict], agent: str, slice_id: str | None) -> dict:
        """The gateway call for one batch: the skill, then exactly one <review> block."""
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.skill.instructions},
                {"role": "user", "content": review_block(self.labels, batch)},
            ],
            "schema": VERDICTS_SCHEMA, "schema_name": "verdicts",
            "temperature": self.temperature, "max_tokens": self.max_tokens,
            "agent": agent, "slice_id": slice_id,
        }

    def _verdicts(self, batch: list[dict], reply: Any) -> list[Verdict]:
        try:
            raw = _Reply.model_validate(reply).verdicts
        except ValidationError as e:
            why = f"reply invalid: {e.errors()[0]['msg']}"
            return [Verdict(i["row_id"], None, None, why) for i in batch]
        answers: dict[str, list[_VerdictIn]] = {}
        for r in raw:
            try:
                v = _VerdictIn.model_validate(r)
            except ValidationError:
                continue  # its item stays unanswered
            answers.setdefault(str(v.row_id), []).append(v)
        out = []
        for item in batch:
            got = answers.get(str(item["row_id"]), [])
            out.append(self._one(item, got))
        return out

    def _one(self, item: dict, got: list[_VerdictIn]) -> Verdict:
        row_id, label = item["row_id"], item["label"]
        if not got:
            return Verdict(row_id, None, None, "no valid verdict in the reply")
        if len(got) > 1:
            return Verdict(row_id, None, None, "answered more than once")
        v = got[0]
        if v.agree:
            if v.label is not None and v.label != label:
                return Verdict(row_id, None, None, f"contradictory: agree with label {v.label!r}")
            return Verdict(row_id, True, label)
        if v.label == label:
            return Verdict(row_id, None, None, "contradictory: disagree with the same label")
        if v.label is not None and v.label not in self.labels:
            return Verdict(row_id, False, None, f"proposed label {v.label!r} is not in the set")
        return Verdict(row_id, False, v.label)
