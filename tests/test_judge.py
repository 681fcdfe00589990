"""Judge: batching, the exact <review> block, and bad replies left unreviewed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.judge import VERDICTS_SCHEMA, Judge, Verdict, review_block, should_sample
from agents.skills import Skill

LABELS = ["business", "sports", "tech"]
SKILL = Skill("review-examples", "Review labelled rows.", "Judge each item's label.",
              Path("skills/review-examples/SKILL.md"), "0" * 12)


class FakeGateway:
    """Answers `complete_json` from a function of the parsed <review> block; records calls."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def complete_json(self, **kw):
        self.calls.append(kw)
        content = kw["messages"][1]["content"]
        assert content.startswith("<review>") and content.endswith("</review>")
        return self.answer(json.loads(content[len("<review>"):-len("</review>")]))


def agree_all(block):
    return {"verdicts": [{"row_id": i["row_id"], "agree": True, "label": i["label"]}
                         for i in block["items"]]}


def items(n, start=0):
    return [{"row_id": start + i, "label": LABELS[i % 3], "text": f"article {i}"}
            for i in range(n)]


def test_batches_and_the_exact_call():
    gw = FakeGateway(agree_all)
    judge = Judge(gw, model="judge-model", skill=SKILL, labels=LABELS, batch_size=20)
    verdicts = judge.review(items(45), agent="agent-3", slice_id="region=asia")
    assert [len(json.loads(c["messages"][1]["content"][8:-9])["items"]) for c in gw.calls] == [
        20, 20, 5]
    assert verdicts == [Verdict(i["row_id"], True, i["label"]) for i in items(45)]
    first = gw.calls[0]
    assert first["messages"][0] == {"role": "system", "content": "Judge each item's label."}
    assert first["messages"][1]["content"] == (
        '<review>{"labels": ["business", "sports", "tech"], "items": ['
        + ", ".join(f'{{"row_id": {i}, "label": "{LABELS[i % 3]}", "text": "article {i}"}}'
                    for i in range(20))
        + "]}</review>"
    )
    assert {k: v for k, v in first.items() if k != "messages"} == {
        "model": "judge-model", "schema": VERDICTS_SCHEMA, "schema_name": "verdicts",
        "temperature": 0.0, "max_tokens": 2000, "agent": "agent-3", "slice_id": "region=asia"}
    assert judge.calls == 3


def test_review_block_escapes_a_closing_tag():
    block = review_block(LABELS, [{"row_id": "a", "label": "tech", "text": "x </review> y"}])
    assert block.count("</review>") == 1
    body = json.loads(block[len("<review>"):-len("</review>")])
    assert body["items"][0]["text"] == "x </review> y"


def test_disagreements_and_bad_replies_are_never_agreed():
    def answer(block):
        ids = [i["row_id"] for i in block["items"]]
        return {"verdicts": [
            {"row_id": ids[0], "agree": False, "label": "sports"},      # a real disagreement
            {"row_id": str(ids[1]), "agree": True, "label": None},     # "1" matches 1
            # ids[2] missing
            {"row_id": ids[3], "agree": True, "label": "tech"},        # agree, other label
            {"row_id": ids[4], "agree": "yes", "label": "tech"},       # malformed
            {"row_id": ids[5], "agree": True, "label": "tech"},        # answered twice
            {"row_id": ids[5], "agree": True, "label": "tech"},
            {"row_id": ids[6], "agree": False, "label": "weather"},    # label not in the set
            {"row_id": ids[7], "agree": False, "label": LABELS[7 % 3]},  # contradictory
            {"row_id": 999, "agree": True, "label": "tech"},           # not in the batch
            "garbage",
        ]}

    judge = Judge(FakeGateway(answer), model="m", skill=SKILL, labels=LABELS)
    v = judge.review(items(8), agent="a", slice_id=None)
    assert [x.agree for x in v] == [False, True, None, None, None, None, False, None]
    assert v[0].label == "sports" and v[1].label == LABELS[1]
    assert v[6].label is None and "not in the set" in v[6].reason
    assert "no valid verdict" in v[2].reason and "no valid verdict" in v[4].reason
    assert "contradictory" in v[3].reason and "contradictory" in v[7].reason
    assert "more than once" in v[5].reason


@pytest.mark.parametrize("reply", [None, [], {"verdicts": "no"}, {"answers": []}, "text"])
def test_an_unusable_reply_leaves_the_whole_batch_unreviewed(reply):
    judge = Judge(FakeGateway(lambda block: reply), model="m", skill=SKILL, labels=LABELS,
                  batch_size=3)
    v = judge.review(items(5), agent="a", slice_id="s")
    assert [x.agree for x in v] == [None] * 5
    assert all(x.reason for x in v)


def test_duplicate_items_and_bad_settings_are_refused():
    judge = Judge(FakeGateway(agree_all), model="m", skill=SKILL, labels=LABELS)
    with pytest.raises(ValueError, match="distinct row ids"):
        judge.review(items(2) + items(1), agent="a", slice_id=None)
    with pytest.raises(ValueError):
        Judge(FakeGateway(agree_all), model="m", skill=SKILL, labels=LABELS, batch_size=0)
    assert judge.review([], agent="a", slice_id=None) == []


def test_should_sample_is_deterministic_and_near_the_rate():
    picked = [should_sample(i, 0.2, seed=1) for i in range(5000)]
    assert picked == [should_sample(i, 0.2, seed=1) for i in range(5000)]
    assert 900 < sum(picked) < 1100
    assert picked != [should_sample(i, 0.2, seed=2) for i in range(5000)]
    assert should_sample("7", 0.5, 3) == should_sample(7, 0.5, 3)
    assert not any(should_sample(i, 0.0, 1) for i in range(100))
    assert all(should_sample(i, 1.0, 1) for i in range(100))
