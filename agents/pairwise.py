"""The pairwise judge: which of two answers does the task better, asked in both orders.

    judge = PairwiseJudge(gateway, model="claude-...", skill=load_skill("compare-answers"),
                          instructions="...", rules={...}, rubric={...})
    result = judge.compare(candidate, other, rows)   # rows[i] = {"row_id", "prompt"}
    result["lower"]                                  # the Wilson lower bound of the win-rate
    keep = judge.prefer(chosen, rejected, rows)      # DPO: the curated answer wins both ways

Every row is shown twice, a=candidate b=other (id "i:ab") and a=other b=candidate ("i:ba"),
so a judge that leans to one position cancels out. Each batch is one `gateway.complete_json`
call (`acompare`: `acomplete_json`): the skill's instructions as the system message, and one
user message, exactly

    <compare>{"instructions": ..., "rules": ..., "rubric": ...,
              "items": [{"id": "0:ab", "row_id": ..., "prompt": "...", "a": ..., "b": ...}]}</compare>

answered by `{"preferences": [{"id": "0:ab", "winner": "a"|"b"|"tie", "reason": "..."}]}`.
A batch holds at most `batch_size` items (at least one row: its two orders always go in the
same batch), all "ab" items first, then the "ba" ones.

A row is a *win* when both orders prefer the candidate, a *loss* when both prefer the other,
and a *tie* otherwise: the judge called a tie, the orders disagree (position bias), or a
preference is missing, answered twice or malformed; those last rows are also counted as
`unanswered`. Answers equal after stripping (or as canonical JSON) are a tie without asking.
The result is `training.text_eval.win_rate` (ties apart, Wilson interval) plus

    position_consistency  share of the rows answered in both orders whose orders agree (the
                          same answer preferred both times, or a tie both times)
    compared              how many rows that share is over
    unanswered            rows with a missing or malformed preference
    per_row               [{"row_id", "outcome": "win"|"loss"|"tie", "reasons": [...]}]

Gateway errors (budget, provider failures after retries) propagate: the caller decides.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from training.text_eval import win_rate

PREFERENCES_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "preferences": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "winner": {"type": "string", "enum": ["a", "b", "tie"]},
                    "reason": {"type": "string"},
                },
                "required": ["id", "winner", "reason"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["preferences"],
    "additionalProperties": False,
}

ORDERS = ("ab", "ba")  # ab: a is the candidate; ba: a is the other


class _PreferenceIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr
    winner: Literal["a", "b", "tie"]
    reason: StrictStr = ""


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    preferences: list[Any]


def canonical_answer(answer: Any) -> str:
    """What two answers are compared by before asking: objects (and JSON text of an object or
    a list) as canonical JSON, other text stripped."""
    if isinstance(answer, str):
        try:
            parsed = json.loads(answer)
        except json.JSONDecodeError:
            return answer.strip()
        return _dumps(parsed) if isinstance(parsed, dict | list) else answer.strip()
    return _dumps(answer)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str)


def compare_block(instructions: str | None, rules: dict | None, rubric: dict | None,
                  items: list[dict]) -> str:
    """The user message: `<compare>{json}</compare>` ("</" escaped so text cannot close it)."""
    body = {"instructions": instructions, "rules": rules, "rubric": rubric,
            "items": [{"id": i["id"], "row_id": i["row_id"], "prompt": i["prompt"],
                       "a": i["a"], "b": i["b"]} for i in items]}
    return ("<compare>" + json.dumps(body, ensure_ascii=False, default=str).replace("</", "<\\/")
            + "</compare>")


class PairwiseJudge:
    def __init__(self, gateway, *, model: str, skill, instructions: str | None = None,
                 rules: dict | None = None, rubric: dict | None = None,
                 temperature: float = 0.0, max_tokens: int = 4000, batch_size: int = 20):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.gateway, self.model, self.skill = gateway, model, skill
        self.instructions, self.rules, self.rubric = instructions, rules, rubric
        self.temperature, self.max_tokens, self.batch_size = temperature, max_tokens, batch_size
        self.calls = 0

    # ── the two drivers ──────────────────────────────────────────────────────────────────
    def compare(self, candidate: list, other: list, rows: list[dict],
                agent: str = "evaluation") -> dict:
        """The candidate's win-rate against `other`, row by row (see the module docstring)."""
        asked, batches = self._plan(candidate, other, rows)
        answers: dict[str, list[_PreferenceIn]] = {}
        for batch in batches:
            reply = self.gateway.complete_json(**self._request(batch, agent))
            self.calls += 1
            self._collect(batch, reply, answers)
        return self._result(candidate, other, rows, asked, answers)

    async def acompare(self, candidate: list, other: list, rows: list[dict],
                       agent: str = "evaluation") -> dict:
        """`compare` for a coroutine (the gateway's `acomplete_json`)."""
        asked, batches = self._plan(candidate, other, rows)
        answers: dict[str, list[_PreferenceIn]] = {}
        for batch in batches:
            reply = await self.gateway.acomplete_json(**self._request(batch, agent))
            self.calls += 1
            self._collect(batch, reply, answers)
        return self._result(candidate, other, rows, asked, answers)

    def prefer(self, chosen: list, rejected: list, rows: list[dict],
               agent: str = "evaluation") -> list[bool]:
        """True where the judge prefers `chosen` in both orders (a DPO pair worth keeping:
        the curated answer beats the model's own); identical answers are never preferred."""
        result = self.compare(chosen, rejected, rows, agent)
        return [r["outcome"] == "win" for r in result["per_row"]]

    async def aprefer(self, chosen: list, rejected: list, rows: list[dict],
                      agent: str = "evaluation") -> list[bool]:
        """`prefer` for a coroutine."""
        result = await self.acompare(chosen, rejected, rows, agent)
        return [r["outcome"] == "win" for r in result["per_row"]]

    # ── request ──────────────────────────────────────────────────────────────────────────
    def _plan(self, candidate: list, other: list, rows: list[dict]
              ) -> tuple[set[int], list[list[dict]]]:
        """The rows to ask about (answers that differ) and their items, batched."""
        if not len(candidate) == len(other) == len(rows):
            raise ValueError(f"{len(candidate)} candidate answers, {len(other)} other answers "
                             f"for {len(rows)} rows: they must match")
        asked = [i for i in range(len(rows))
                 if canonical_answer(candidate[i]) != canonical_answer(other[i])]
        per_batch = max(1, self.batch_size // 2)
        batches = []
        for start in range(0, len(asked), per_batch):
            chunk = asked[start : start + per_batch]
            batches.append([self._item(i, order, candidate, other, rows)
                            for order in ORDERS for i in chunk])
        return set(asked), batches

    @staticmethod
    def _item(i: int, order: str, candidate: list, other: list, rows: list[dict]) -> dict:
        a, b = (candidate[i], other[i]) if order == "ab" else (other[i], candidate[i])
        return {"id": f"{i}:{order}", "row_id": rows[i]["row_id"], "prompt": rows[i]["prompt"],
                "a": a, "b": b}

    def _request(self, batch: list[dict], agent: str) -> dict:
        """The gateway call for one batch: the skill, then exactly one <compare> block."""
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.skill.instructions},
                {"role": "user", "content": compare_block(self.instructions, self.rules,
                                                          self.rubric, batch)},
            ],
            "schema": PREFERENCES_SCHEMA, "schema_name": "preferences",
            "temperature": self.temperature, "max_tokens": self.max_tokens,
            "agent": agent, "slice_id": None,
        }

    @staticmethod
    def _collect(batch: list[dict], reply: Any, answers: dict[str, list[_PreferenceIn]]) -> None:
        """The valid preferences for this batch's ids (others are ignored)."""
        try:
            raw = _Reply.model_validate(reply).preferences
        except ValidationError:
            return  # every item of the batch stays unanswered
        ids = {item["id"] for item in batch}
        for r in raw:
            try:
                p = _PreferenceIn.model_validate(r)
            except ValidationError:
                continue
            if p.id in ids:
                answers.setdefault(p.id, []).append(p)

    # ── outcome ──────────────────────────────────────────────────────────────────────────
    def _result(self, candidate: list, other: list, rows: list[dict], asked: set[int],
                answers: dict[str, list[_PreferenceIn]]) -> dict:
        wins = losses = ties = unanswered = compared = consistent = 0
        per_row = []
        for i, row in enumerate(rows):
            if i not in asked:
                ties += 1
                per_row.append({"row_id": row["row_id"], "outcome": "tie",
                                "reasons": ["identical answers: not asked"]})
                continue
            picks, reasons = [], []
            for order in ORDERS:
                got = answers.get(f"{i}:{order}", [])
                if len(got) != 1:
                    picks.append(None)
                    reasons.append(f"{order}: " + ("no valid preference" if not got
                                                   else "answered more than once"))
                    continue
                pick = _for_candidate(order, got[0].winner)
                picks.append(pick)
                why = got[0].reason.strip()
                reasons.append(f"{order} -> {pick}: {why}" if why else f"{order} -> {pick}")
            if None in picks:
                unanswered += 1
                outcome = "tie"
            else:
                compared += 1
                consistent += picks[0] == picks[1]
                outcome = {"candidate": "win", "other": "loss"}.get(picks[0], "tie") \
                    if picks[0] == picks[1] else "tie"
            wins += outcome == "win"
            losses += outcome == "loss"
            ties += outcome == "tie"
            per_row.append({"row_id": row["row_id"], "outcome": outcome, "reasons": reasons})
        return {**win_rate(wins, losses, ties),
                "position_consistency": consistent / compared if compared else 0.0,
                "compared": compared, "unanswered": unanswered, "per_row": per_row}


def _for_candidate(order: str, winner: str) -> str:
    """The judge's pick in one order, as "candidate", "other" or "tie"."""
    if winner == "tie":
        return "tie"
    return "candidate" if (winner == "a") == (order == "ab") else "other"
