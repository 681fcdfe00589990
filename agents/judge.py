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

`RubricJudge` is the judge for text kinds (generation, extraction), with the same interface
(`review`, `areview`, `calls`, batches of `batch_size`, distinct row ids), so the agent loop
takes either (`Reviewer`). Its user message is exactly

    <review>{"kind": ..., "instructions": ..., "rules": {...}|null,
             "rubric": {"criteria": [{"name", "description"}], "threshold": 3.0},
             "items": [{"row_id": ..., "answer": <text, or the parsed JSON object>, "text": ...}]}</review>

answered by `{"verdicts": [{"row_id": ..., "scores": {<criterion>: 1..5}, "reason": "..."}]}`
(the schema is built from the criteria: `rubric_schema`). An answer is agreed when its mean
score reaches the threshold; the verdict's `label` is None and its `reason` leads with the
scores, e.g. "scores faithful 2, clear 4 (mean 3.0 < 3.5): invents a date". Unreviewed
(`agree=None`, with a reason) as for `Judge`, and also when a criterion's score is missing,
not an integer or outside 1..5.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

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


# ── the rubric judge: answers that are text or JSON, scored on criteria ──────────────────────

SCORES = (1, 2, 3, 4, 5)


class Reviewer(Protocol):
    """What the agent loop needs of a judge: `Judge` and `RubricJudge` both are one."""

    calls: int

    def review(self, items: list[dict], agent: str,
               slice_id: str | None) -> list[Verdict]: ...

    async def areview(self, items: list[dict], agent: str,
                      slice_id: str | None) -> list[Verdict]: ...


def rubric_schema(criteria: list[str]) -> dict:
    """The structured-output schema for these criterion names: every criterion scored, as an
    integer 1..5. The range is an `enum` (not minimum/maximum: Anthropic's structured outputs
    refuse numeric bounds, both providers take an enum); `RubricJudge` checks it again."""
    score = {"type": "integer", "enum": list(SCORES)}
    return {
        "type": "object",
        "properties": {
            "verdicts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "row_id": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                        "scores": {
                            "type": "object",
                            "properties": {name: dict(score) for name in criteria},
                            "required": list(criteria),
                            "additionalProperties": False,
                        },
                        "reason": {"type": "string"},
                    },
                    "required": ["row_id", "scores", "reason"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["verdicts"],
        "additionalProperties": False,
    }


def _criterion(c: Any) -> dict:
    """{"name", "description"} from a dict or an object with those attributes (a pydantic
    `Criterion`)."""
    if not isinstance(c, dict):
        c = {"name": getattr(c, "name", None), "description": getattr(c, "description", None)}
    name, description = c.get("name"), c.get("description")
    if not isinstance(name, str) or not name.strip() or not isinstance(description, str):
        raise ValueError(f"a rubric criterion needs a name and a description, got {c!r}")
    return {"name": name, "description": description}


def rubric_answer(label: Any, kind: str) -> Any:
    """The answer as the judge sees it: text as given; for extraction, JSON text parsed back
    to its object (text that does not parse is shown as it is)."""
    if kind == "extraction" and isinstance(label, str):
        try:
            return json.loads(label)
        except json.JSONDecodeError:
            return label
    return label


def rubric_block(kind: str, instructions: str | None, rules: dict | None,
                 criteria: list[dict], threshold: float, items: list[dict]) -> str:
    """The user message: `<review>{json}</review>` ("</" escaped so text cannot close it)."""
    body = {
        "kind": kind,
        "instructions": instructions,
        "rules": rules,
        "rubric": {"criteria": [dict(c) for c in criteria], "threshold": threshold},
        "items": [{"row_id": i["row_id"], "answer": rubric_answer(i["label"], kind),
                   "text": i["text"]} for i in items],
    }
    return "<review>" + json.dumps(body, ensure_ascii=False).replace("</", "<\\/") + "</review>"


class _ScoredIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    row_id: StrictStr | StrictInt
    scores: dict[str, Any]
    reason: StrictStr


class RubricJudge(Judge):
    """The judge of text and JSON answers: each answer scored 1-5 on every criterion, agreed
    when the mean reaches `threshold`. The interface of `Judge` (see the module docstring):
    `review`/`areview` take items `{"row_id", "label": the answer, "text"}` and batch them
    as it does; the request and the verdicts are the rubric's."""

    def __init__(self, gateway, *, model: str, skill, kind: str, criteria: list[dict],
                 threshold: float, instructions: str | None = None, rules: dict | None = None,
                 temperature: float = 0.0, max_tokens: int = 2000, batch_size: int = 20):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        criteria = [_criterion(c) for c in criteria or []]
        if not criteria:
            raise ValueError("the rubric judge needs at least one criterion")
        names = [c["name"] for c in criteria]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"criteria names must be unique, {', '.join(repeated)} repeated")
        if not SCORES[0] <= threshold <= SCORES[-1]:
            raise ValueError(f"threshold must be within 1..5, got {threshold}")
        self.gateway, self.model, self.skill, self.kind = gateway, model, skill, kind
        self.criteria, self.names, self.threshold = criteria, names, threshold
        self.instructions, self.rules = instructions, rules
        self.schema = rubric_schema(names)
        self.temperature, self.max_tokens, self.batch_size = temperature, max_tokens, batch_size
        self.calls = 0

    def _request(self, batch: list[dict], agent: str, slice_id: str | None) -> dict:
        """The gateway call for one batch: the skill, then exactly one <review> block."""
        block = rubric_block(self.kind, self.instructions, self.rules, self.criteria,
                             self.threshold, batch)
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.skill.instructions},
                {"role": "user", "content": block},
            ],
            "schema": self.schema, "schema_name": "rubric_verdicts",
            "temperature": self.temperature, "max_tokens": self.max_tokens,
            "agent": agent, "slice_id": slice_id,
        }

    def _verdicts(self, batch: list[dict], reply: Any) -> list[Verdict]:
        try:
            raw = _Reply.model_validate(reply).verdicts
        except ValidationError as e:
            why = f"reply invalid: {e.errors()[0]['msg']}"
            return [Verdict(i["row_id"], None, None, why) for i in batch]
        answers: dict[str, list[_ScoredIn]] = {}
        for r in raw:
            try:
                v = _ScoredIn.model_validate(r)
            except ValidationError:
                continue  # its item stays unanswered
            answers.setdefault(str(v.row_id), []).append(v)
        return [self._one(item, answers.get(str(item["row_id"]), [])) for item in batch]

    def _one(self, item: dict, got: list[_ScoredIn]) -> Verdict:
        row_id = item["row_id"]
        if not got:
            return Verdict(row_id, None, None, "no valid verdict in the reply")
        if len(got) > 1:
            return Verdict(row_id, None, None, "answered more than once")
        v = got[0]
        scores = []
        for name in self.names:
            if name not in v.scores:
                return Verdict(row_id, None, None, f"no score for {name}")
            s = v.scores[name]
            if not isinstance(s, int) or isinstance(s, bool):
                return Verdict(row_id, None, None, f"score for {name} is not an integer: {s!r}")
            if s not in SCORES:
                return Verdict(row_id, None, None, f"score for {name} is outside 1..5: {s}")
            scores.append(s)
        mean = sum(scores) / len(scores)
        agree = mean >= self.threshold - 1e-9
        shown = ", ".join(f"{n} {s}" for n, s in zip(self.names, scores, strict=True))
        head = (f"scores {shown} (mean {round(mean, 2)} {'>=' if agree else '<'} "
                f"{round(float(self.threshold), 2)})")
        reason = v.reason.strip()
        return Verdict(row_id, agree, None, f"{head}: {reason}" if reason else head)
