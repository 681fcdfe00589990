"""RubricJudge: the exact <review> block, the schema from the criteria, mean vs threshold, and
every bad reply left unreviewed (never agreed by default)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest

from agents.judge import RubricJudge, Verdict, rubric_block, rubric_schema
from agents.skills import Skill, load_skill

SKILL = Skill("review-answers", "Score answers.", "Score each answer.",
              Path("skills/review-answers/SKILL.md"), "0" * 12)
CRITERIA = [{"name": "faithful", "description": "Only what the row supports."},
            {"name": "clear", "description": "Clear and specific."}]
RULES = {"max_words": 40, "forbidden": ["(?i)click here"]}


class StubGateway:
    """Answers `complete_json` / `acomplete_json` from a function of the parsed <review>
    block; records every request."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []

    def _reply(self, kw):
        self.requests.append(kw)
        content = kw["messages"][1]["content"]
        assert content.startswith("<review>") and content.endswith("</review>")
        return self.answer(json.loads(content[len("<review>"):-len("</review>")]))

    def complete_json(self, **kw):
        return self._reply(kw)

    async def acomplete_json(self, **kw):
        return self._reply(kw)


def scored(faithful, clear, reason="ok"):
    return lambda block: {"verdicts": [
        {"row_id": i["row_id"], "scores": {"faithful": faithful, "clear": clear},
         "reason": reason} for i in block["items"]]}


def items(n, start=0):
    return [{"row_id": start + i, "label": f"answer {i}", "text": f"row {i}"} for i in range(n)]


def judge(gateway, **kw):
    settings = {"model": "judge-model", "skill": SKILL, "kind": "generation",
                "criteria": CRITERIA, "threshold": 3.5, "instructions": "One sentence.",
                "rules": RULES} | kw
    return RubricJudge(gateway, **settings)


def test_batches_and_the_exact_request():
    gw = StubGateway(scored(4, 4))
    j = judge(gw, batch_size=2)
    verdicts = j.review(items(5), agent="agent-1", slice_id="region=asia")
    assert j.calls == 3 and len(gw.requests) == 3
    assert [v.agree for v in verdicts] == [True] * 5
    first = gw.requests[0]
    assert first["messages"][0] == {"role": "system", "content": "Score each answer."}
    assert first["messages"][1]["content"] == (
        '<review>{"kind": "generation", "instructions": "One sentence.", '
        '"rules": {"max_words": 40, "forbidden": ["(?i)click here"]}, '
        '"rubric": {"criteria": [{"name": "faithful", "description": "Only what the row '
        'supports."}, {"name": "clear", "description": "Clear and specific."}], '
        '"threshold": 3.5}, "items": [{"row_id": 0, "answer": "answer 0", "text": "row 0"}, '
        '{"row_id": 1, "answer": "answer 1", "text": "row 1"}]}</review>')
    assert {k: v for k, v in first.items() if k != "messages"} == {
        "model": "judge-model", "schema": rubric_schema(["faithful", "clear"]),
        "schema_name": "rubric_verdicts", "temperature": 0.0, "max_tokens": 2000,
        "agent": "agent-1", "slice_id": "region=asia"}


def test_the_schema_is_built_from_the_criteria():
    schema = rubric_schema(["faithful", "clear"])
    jsonschema.Draft202012Validator.check_schema(schema)
    item = schema["properties"]["verdicts"]["items"]
    assert item["required"] == ["row_id", "scores", "reason"]
    scores = item["properties"]["scores"]
    assert scores["required"] == ["faithful", "clear"]
    assert scores["additionalProperties"] is False
    assert set(scores["properties"]) == {"faithful", "clear"}
    ok = {"verdicts": [{"row_id": 1, "scores": {"faithful": 1, "clear": 5}, "reason": ""}]}
    jsonschema.validate(ok, schema)
    for bad in ({"faithful": 0, "clear": 5}, {"faithful": 6, "clear": 5},
                {"faithful": 2.5, "clear": 5}, {"faithful": 3}, {"faithful": 3, "clear": 3,
                                                                  "extra": 3}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"verdicts": [{"row_id": 1, "scores": bad, "reason": ""}]},
                                schema)


@pytest.mark.parametrize(("faithful", "clear", "agree"), [
    (2, 4, False), (3, 4, True), (5, 5, True), (1, 1, False), (4, 3, True)])
def test_the_mean_against_the_threshold(faithful, clear, agree):
    [v] = judge(StubGateway(scored(faithful, clear, "invents a date"))).review(
        items(1), agent="a", slice_id=None)
    mean = (faithful + clear) / 2
    sign = ">=" if agree else "<"
    assert v == Verdict(0, agree, None, f"scores faithful {faithful}, clear {clear} "
                                        f"(mean {mean} {sign} 3.5): invents a date")


def test_a_mean_exactly_at_a_non_round_threshold_is_agreed():
    three = [{"name": n, "description": n} for n in ("x", "y", "z")]

    def answer(block):
        return {"verdicts": [{"row_id": 0, "scores": {"x": 3, "y": 4, "z": 4}, "reason": ""}]}

    [v] = judge(StubGateway(answer), criteria=three, threshold=11 / 3).review(
        items(1), agent="a", slice_id=None)
    assert v.agree is True and v.reason == "scores x 3, y 4, z 4 (mean 3.67 >= 3.67)"


def test_every_bad_verdict_is_unreviewed():
    def answer(block):
        ids = [i["row_id"] for i in block["items"]]
        return {"verdicts": [
            {"row_id": ids[0], "scores": {"faithful": 4, "clear": 4}, "reason": "fine"},
            {"row_id": str(ids[1]), "scores": {"faithful": 2, "clear": 2}, "reason": "bad"},
            # ids[2] missing
            {"row_id": ids[3], "scores": {"faithful": 4}, "reason": "x"},           # missing
            {"row_id": ids[4], "scores": {"faithful": 6, "clear": 4}, "reason": "x"},  # range
            {"row_id": ids[5], "scores": {"faithful": 0, "clear": 4}, "reason": "x"},  # range
            {"row_id": ids[6], "scores": {"faithful": 4.0, "clear": 4}, "reason": "x"},  # float
            {"row_id": ids[7], "scores": {"faithful": "4", "clear": 4}, "reason": "x"},  # str
            {"row_id": ids[8], "scores": {"faithful": True, "clear": 4}, "reason": "x"},  # bool
            {"row_id": ids[9], "scores": {"faithful": 4, "clear": 4}, "reason": "x"},  # twice
            {"row_id": ids[9], "scores": {"faithful": 4, "clear": 4}, "reason": "x"},
            {"row_id": ids[10], "scores": "high", "reason": "x"},                   # malformed
            {"row_id": ids[11], "scores": {"faithful": 4, "clear": 4}},             # no reason
            {"row_id": 999, "scores": {"faithful": 5, "clear": 5}, "reason": "x"},  # not asked
            "garbage",
        ]}

    v = judge(StubGateway(answer)).review(items(12), agent="a", slice_id=None)
    assert [x.agree for x in v] == [True, False] + [None] * 10
    assert all(x.label is None for x in v)
    assert v[1].reason == "scores faithful 2, clear 2 (mean 2.0 < 3.5): bad"
    assert "no valid verdict" in v[2].reason
    assert v[3].reason == "no score for clear"
    assert "outside 1..5" in v[4].reason and "outside 1..5" in v[5].reason
    assert all("not an integer" in v[k].reason for k in (6, 7, 8))
    assert "more than once" in v[9].reason
    assert "no valid verdict" in v[10].reason and "no valid verdict" in v[11].reason


@pytest.mark.parametrize("reply", [None, [], {"verdicts": "no"}, {"answers": []}, "text"])
def test_an_unusable_reply_leaves_the_whole_batch_unreviewed(reply):
    v = judge(StubGateway(lambda block: reply), batch_size=3).review(
        items(4), agent="a", slice_id=None)
    assert [x.agree for x in v] == [None] * 4 and all(x.reason for x in v)


def test_extraction_answers_go_as_objects_and_close_tags_are_escaped():
    gw = StubGateway(scored(5, 5))
    rows = [{"row_id": "a", "label": '{"name": "Ada", "year": 1843}', "text": "x </review> y"},
            {"row_id": "b", "label": "not json {", "text": "y"},
            {"row_id": "c", "label": {"name": "Bo"}, "text": "z"}]
    judge(gw, kind="extraction", rules=None).review(rows, agent="a", slice_id=None)
    content = gw.requests[0]["messages"][1]["content"]
    assert content.count("</review>") == 1
    body = json.loads(content[len("<review>"):-len("</review>")])
    assert body["kind"] == "extraction" and body["rules"] is None
    assert [i["answer"] for i in body["items"]] == [
        {"name": "Ada", "year": 1843}, "not json {", {"name": "Bo"}]
    assert body["items"][0]["text"] == "x </review> y"
    block = rubric_block("generation", None, None, CRITERIA, 3.0,
                         [{"row_id": 1, "label": '{"a": 1}', "text": "t"}])
    assert json.loads(block[8:-9])["items"][0]["answer"] == '{"a": 1}'  # text stays text


def test_areview_matches_review_and_gateway_errors_propagate():
    gw = StubGateway(scored(2, 5))
    j = judge(gw, batch_size=2)
    got = asyncio.run(j.areview(items(3), agent="a", slice_id="s"))
    assert got == judge(StubGateway(scored(2, 5))).review(items(3), agent="a", slice_id="s")
    assert j.calls == 2

    class Down(StubGateway):
        def complete_json(self, **kw):
            raise RuntimeError("provider down")

    with pytest.raises(RuntimeError, match="provider down"):
        judge(Down(None)).review(items(1), agent="a", slice_id=None)


def test_bad_settings_and_duplicate_items_are_refused():
    gw = StubGateway(scored(4, 4))
    with pytest.raises(ValueError, match="distinct row ids"):
        judge(gw).review(items(2) + items(1), agent="a", slice_id=None)
    with pytest.raises(ValueError):
        judge(gw, batch_size=0)
    with pytest.raises(ValueError):
        judge(gw, criteria=[])
    with pytest.raises(ValueError, match="unique"):
        judge(gw, criteria=CRITERIA + CRITERIA[:1])
    with pytest.raises(ValueError):
        judge(gw, threshold=6)
    assert judge(gw).review([], agent="a", slice_id=None) == []
    assert gw.requests == []


def test_the_skill_loads():
    skill = load_skill("review-answers")
    assert skill.name == "review-answers" and '"verdicts"' in skill.instructions
