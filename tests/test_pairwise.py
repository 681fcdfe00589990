"""PairwiseJudge: both orders asked, win/loss/tie per row, position bias cancelled, identical
answers not asked, and the Wilson bound from training.text_eval.win_rate."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest

from agents.pairwise import PREFERENCES_SCHEMA, PairwiseJudge, canonical_answer, compare_block
from agents.skills import Skill, load_skill
from training.text_eval import win_rate

SKILL = Skill("compare-answers", "Compare answers.", "Pick the better answer.",
              Path("skills/compare-answers/SKILL.md"), "0" * 12)


class StubGateway:
    """Answers from a function of the parsed <compare> block; records every request."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []

    def _reply(self, kw):
        self.requests.append(kw)
        content = kw["messages"][1]["content"]
        assert content.startswith("<compare>") and content.endswith("</compare>")
        return self.answer(json.loads(content[len("<compare>"):-len("</compare>")]))

    def complete_json(self, **kw):
        return self._reply(kw)

    async def acomplete_json(self, **kw):
        return self._reply(kw)


def by_quality(block):
    """A fair judge: the answer with more '+' wins, equal is a tie."""
    out = []
    for i in block["items"]:
        qa, qb = i["a"].count("+"), i["b"].count("+")
        winner = "a" if qa > qb else "b" if qb > qa else "tie"
        out.append({"id": i["id"], "winner": winner, "reason": f"{qa} vs {qb}"})
    return {"preferences": out}


def always(winner):
    return lambda block: {"preferences": [{"id": i["id"], "winner": winner, "reason": "x"}
                                          for i in block["items"]]}


def rows(n):
    return [{"row_id": 100 + i, "prompt": f"prompt {i}"} for i in range(n)]


def judge(gateway, **kw):
    return PairwiseJudge(gateway, **{"model": "judge-model", "skill": SKILL} | kw)


def test_both_orders_are_sent_in_one_exact_block():
    gw = StubGateway(by_quality)
    j = judge(gw, instructions="Be brief.", rules={"max_words": 9}, rubric={"threshold": 3})
    j.compare(["good +", "x"], ["bad", "y +"], rows(2), agent="eval-1")
    assert j.calls == 1 and len(gw.requests) == 1
    request = gw.requests[0]
    assert request["messages"][0] == {"role": "system", "content": "Pick the better answer."}
    assert request["messages"][1]["content"] == (
        '<compare>{"instructions": "Be brief.", "rules": {"max_words": 9}, '
        '"rubric": {"threshold": 3}, "items": ['
        '{"id": "0:ab", "row_id": 100, "prompt": "prompt 0", "a": "good +", "b": "bad"}, '
        '{"id": "1:ab", "row_id": 101, "prompt": "prompt 1", "a": "x", "b": "y +"}, '
        '{"id": "0:ba", "row_id": 100, "prompt": "prompt 0", "a": "bad", "b": "good +"}, '
        '{"id": "1:ba", "row_id": 101, "prompt": "prompt 1", "a": "y +", "b": "x"}]}'
        '</compare>')
    assert {k: v for k, v in request.items() if k != "messages"} == {
        "model": "judge-model", "schema": PREFERENCES_SCHEMA, "schema_name": "preferences",
        "temperature": 0.0, "max_tokens": 4000, "agent": "eval-1", "slice_id": None}
    jsonschema.Draft202012Validator.check_schema(PREFERENCES_SCHEMA)


def test_win_loss_tie_and_the_wilson_bound():
    candidate = ["a ++", "b ++", "c ++", "d", "e +"]
    other = ["a +", "b", "c +", "d ++", "e +  x"]  # the last: equal quality, not identical
    result = judge(StubGateway(by_quality)).compare(candidate, other, rows(5))
    assert [r["outcome"] for r in result["per_row"]] == ["win", "win", "win", "loss", "tie"]
    assert {k: result[k] for k in win_rate(3, 1, 1)} == win_rate(3, 1, 1)
    assert result["lower"] == win_rate(3, 1, 1)["lower"] < result["win_rate"] == 0.75
    assert result["position_consistency"] == 1.0 and result["compared"] == 5
    assert result["unanswered"] == 0
    assert result["per_row"][0] == {"row_id": 100, "outcome": "win",
                                    "reasons": ["ab -> candidate: 2 vs 1",
                                                "ba -> candidate: 1 vs 2"]}


@pytest.mark.parametrize("winner", ["a", "b"])
def test_a_position_biased_judge_gives_all_ties(winner):
    result = judge(StubGateway(always(winner))).compare(
        ["better ++"] * 4, ["worse"] * 4, rows(4))
    assert [r["outcome"] for r in result["per_row"]] == ["tie"] * 4
    assert (result["wins"], result["losses"], result["ties"]) == (0, 0, 4)
    assert result["position_consistency"] == 0.0 and result["unanswered"] == 0


def test_identical_answers_tie_without_a_call():
    gw = StubGateway(by_quality)
    j = judge(gw)
    result = j.compare(["  same ", {"b": 1, "a": [1, 2]}, '{"a": 1, "b": 2}'],
                       ["same", {"a": [1, 2], "b": 1}, '{"b":2,"a":1}'], rows(3))
    assert gw.requests == [] and j.calls == 0
    assert [r["outcome"] for r in result["per_row"]] == ["tie"] * 3
    assert result["ties"] == 3 and result["decided"] == 0 and result["compared"] == 0
    assert canonical_answer("42 ") == canonical_answer("42")
    # a mix: only the differing row is asked
    j.compare(["same", "x ++"], ["same", "y"], rows(2))
    [request] = gw.requests
    assert [i["id"] for i in json.loads(request["messages"][1]["content"][9:-10])["items"]] == [
        "1:ab", "1:ba"]


def test_missing_and_malformed_preferences_are_unanswered_ties():
    def answer(block):
        return {"preferences": [
            {"id": "0:ab", "winner": "a", "reason": "r"},       # 0:ba missing
            {"id": "1:ab", "winner": "first", "reason": "r"},   # malformed
            {"id": "1:ba", "winner": "b", "reason": "r"},
            {"id": "2:ab", "winner": "a", "reason": "r"},       # 2:ba twice
            {"id": "2:ba", "winner": "b", "reason": "r"},
            {"id": "2:ba", "winner": "b", "reason": "r"},
            {"id": "3:ab", "winner": "tie", "reason": "r"},     # a real tie, both orders
            {"id": "3:ba", "winner": "tie", "reason": "r"},
            {"id": "4:ab", "winner": "a", "reason": "r"},       # inconsistent: a tie
            {"id": "4:ba", "winner": "tie", "reason": "r"},
            {"id": "9:ab", "winner": "a", "reason": "r"},       # not asked
            "garbage",
        ]}

    result = judge(StubGateway(answer)).compare(["c +"] * 5, ["o"] * 5, rows(5))
    assert [r["outcome"] for r in result["per_row"]] == ["tie"] * 5
    assert result["unanswered"] == 3 and result["compared"] == 2
    assert result["position_consistency"] == 0.5
    assert result["per_row"][0]["reasons"] == ["ab -> candidate: r", "ba: no valid preference"]
    assert "more than once" in result["per_row"][2]["reasons"][1]


@pytest.mark.parametrize("reply", [None, [], {"preferences": "no"}, {"verdicts": []}, "text"])
def test_an_unusable_reply_leaves_its_rows_unanswered(reply):
    result = judge(StubGateway(lambda block: reply)).compare(["a"] * 3, ["b"] * 3, rows(3))
    assert result["unanswered"] == 3 and result["ties"] == 3 and result["decided"] == 0


def test_batches_keep_each_pair_together():
    gw = StubGateway(by_quality)
    j = judge(gw, batch_size=4)
    result = j.compare(["x ++"] * 5, ["y"] * 5, rows(5))
    assert j.calls == 3
    batches = [[i["id"] for i in json.loads(r["messages"][1]["content"][9:-10])["items"]]
               for r in gw.requests]
    assert batches == [["0:ab", "1:ab", "0:ba", "1:ba"], ["2:ab", "3:ab", "2:ba", "3:ba"],
                       ["4:ab", "4:ba"]]
    assert result["wins"] == 5
    j1 = judge(StubGateway(by_quality), batch_size=1)  # still one row, both orders, per call
    assert j1.compare(["x ++"] * 2, ["y"] * 2, rows(2))["wins"] == 2 and j1.calls == 2


def test_acompare_and_prefer():
    candidate, other = ["a ++", "b", "c +", "same"], ["a", "b ++", "c +  ", "same"]
    sync = judge(StubGateway(by_quality)).compare(candidate, other, rows(4))
    assert asyncio.run(judge(StubGateway(by_quality)).acompare(candidate, other, rows(4))) == sync
    j = judge(StubGateway(by_quality))
    assert j.prefer(candidate, other, rows(4)) == [True, False, False, False]
    assert asyncio.run(j.aprefer(candidate, other, rows(4))) == [True, False, False, False]


def test_close_tags_are_escaped_and_objects_sent_as_objects():
    block = compare_block(None, None, None, [{"id": "0:ab", "row_id": 1, "prompt": "p </compare>",
                                              "a": {"k": "</compare>"}, "b": "t"}])
    assert block.count("</compare>") == 1
    item = json.loads(block[9:-10])["items"][0]
    assert item["prompt"] == "p </compare>" and item["a"] == {"k": "</compare>"}


def test_mismatched_lengths_bad_settings_and_gateway_errors():
    with pytest.raises(ValueError, match="must match"):
        judge(StubGateway(by_quality)).compare(["a"], ["b", "c"], rows(2))
    with pytest.raises(ValueError):
        judge(StubGateway(by_quality), batch_size=0)

    class Down(StubGateway):
        def complete_json(self, **kw):
            raise RuntimeError("provider down")

    with pytest.raises(RuntimeError, match="provider down"):
        judge(Down(None)).compare(["a"], ["b"], rows(1))
    empty = judge(StubGateway(by_quality)).compare([], [], [])
    assert empty["n"] == 0 and empty["per_row"] == [] and empty["position_consistency"] == 0.0


def test_the_skill_loads():
    skill = load_skill("compare-answers")
    assert skill.name == "compare-answers" and '"preferences"' in skill.instructions
