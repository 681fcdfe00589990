"""The task-kind interface (flows/kinds) on the demo spec: the classification kind gives the
gate its rule, the completion its text, the baseline its figures and promotion its verdict,
exactly as the pipeline applied them before kinds existed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.answers import LABEL_NOT_IN_SET, LabelAnswer
from flows.kinds import KINDS, kind_of
from flows.kinds.classification import Classification
from flows.spec import load_spec
from training.evaluate import classification_metrics
from training.registry import decide_promotion

SPEC = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


def test_every_spec_kind_has_a_module(spec):
    from typing import get_args

    from flows.spec import Task

    assert set(get_args(Task.model_fields["kind"].annotation)) == set(KINDS)
    assert isinstance(kind_of(spec), Classification)


def test_the_classification_kind_answers_with_the_labels(spec):
    kind = kind_of(spec)
    rule = kind.answer_rule()
    assert isinstance(rule, LabelAnswer) and rule.labels == spec.task.labels
    assert rule.check("weather", row_id=1).reason == LABEL_NOT_IN_SET
    assert kind.completion("tech") == spec.task.completion_template.format(label="tech")


def scores(predicted: list[str], gold: list[str], labels: list[str]) -> dict:
    return classification_metrics(predicted, gold, labels)


def test_baseline_and_promotion_are_the_spec_rule(spec):
    kind, labels = kind_of(spec), spec.task.labels
    gold = ["tech", "tech", "sport", "business", "tech"]
    rows = [{spec.task.gold_column: g} for g in gold]
    base = kind.baseline(rows)
    assert base["majority_baseline"] == pytest.approx(0.6)  # always "tech": 3 of 5
    good = scores(gold, gold, labels)
    weak = scores(["tech"] * 5, gold, labels)
    rule = spec.evaluation.promotion
    for final, champion in ((good, None), (weak, None), (good, weak), (weak, good)):
        ev = {"n": 5, "final": final, "champion": champion, **base}
        expected = decide_promotion(final, champion, metric=rule.metric,
                                    min_improvement=rule.min_improvement,
                                    max_label_drop=rule.max_label_drop,
                                    max_slice_drop=rule.max_slice_drop,
                                    min_slice_rows=rule.min_slice_rows,
                                    baseline=base["majority_baseline"],
                                    min_over_baseline=rule.min_over_baseline)
        assert kind.decide(ev) == expected
    assert kind.decide({"n": 5, "final": good, "champion": None, **base})["promote"] is True
    assert kind.decide({"n": 5, "final": weak, "champion": None, **base})["promote"] is False
    assert kind.compare({"final": good, "champion": weak}) == (
        f"{rule.metric} {good[rule.metric]:.3f} vs champion {weak[rule.metric]:.3f}")


# ── text kinds ──────────────────────────────────────────────────────────────────────────────
HEADLINES = SPEC.parent.parent / "news_headlines" / "spec.yaml"


@pytest.fixture(scope="module")
def headlines():
    return load_spec(HEADLINES)


def verdicts(wins: int, losses: int, ties: int) -> dict:
    from training.text_eval import win_rate

    return {**win_rate(wins, losses, ties), "per_row": []}


def test_the_generation_kind_asks_for_text_within_the_rules(headlines):
    from agents.answers import FORBIDDEN_PATTERN, TOO_LONG, TextAnswer
    from flows.kinds.generation import Generation

    kind = kind_of(headlines)
    assert isinstance(kind, Generation)
    rule = kind.answer_rule()
    assert isinstance(rule, TextAnswer) and rule.field == "response"
    assert rule.check("Markets rally as rates fall").ok
    assert rule.check(" ".join(["word"] * 13)).reason == TOO_LONG
    assert rule.check('Headline: "Markets rally"').reason == FORBIDDEN_PATTERN
    task = kind.agent_task()
    assert task["kind"] == "generation" and task["rules"]["max_words"] == 12
    assert kind.completion("Markets rally") == " Markets rally"
    assert kind.near_duplicates() is not None


def text_ev(final_rouge: float, base_rouge: float, versus_base: dict,
            versus_champion: dict | None = None, champion_rouge: float | None = None) -> dict:
    return {"n": versus_base["n"], "final": {"rouge_l": final_rouge},
            "base": {"rouge_l": base_rouge},
            "champion": {"rouge_l": champion_rouge} if versus_champion else None,
            "champion_version": "1" if versus_champion else None,
            "versus_base": versus_base, "versus_champion": versus_champion}


def test_text_promotion_reads_the_win_rate_lower_bound_not_the_point(headlines):
    kind = kind_of(headlines)  # min_win_lower_bound 0.5, min_rows 30, max_reference_drop 0.02
    clear = verdicts(60, 20, 20)  # 0.75, lower bound ~0.64
    assert kind.decide(text_ev(0.30, 0.05, clear))["promote"] is True
    # a point estimate over 0.5 whose lower bound is under it: refused, and the reason says so
    close = verdicts(22, 18, 60)  # 0.55, lower bound ~0.40
    decision = kind.decide(text_ev(0.30, 0.05, close))
    assert decision["promote"] is False and "lower bound" in decision["reason"]
    # too few rows compared
    few = verdicts(9, 0, 1)
    assert "fewer than the 30" in kind.decide(text_ev(0.30, 0.05, few))["reason"]
    # a champion: the rule reads the win-rate against it, and the reference metric's drop
    decision = kind.decide(text_ev(0.30, 0.05, clear, close, champion_rouge=0.31))
    assert decision["promote"] is False and "champion" in decision["reason"]
    dropped = kind.decide(text_ev(0.20, 0.05, clear, clear, champion_rouge=0.30))
    assert dropped["promote"] is False and "rouge_l 0.200 < champion 0.300" in dropped["reason"]
    # a judge that ties most rows has not seen a better model, whatever the decided few say
    tied = kind.decide(text_ev(0.30, 0.05, verdicts(30, 0, 70)))
    assert tied["promote"] is False and "decided only 30 of 100 rows" in tied["reason"]
    # never a model that does not beat the base model's reference metric
    weak = kind.decide(text_ev(0.04, 0.05, clear))
    assert weak["promote"] is False and "does not beat the base model" in weak["reason"]
