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
                                    baseline=base["majority_baseline"],
                                    min_over_baseline=rule.min_over_baseline)
        assert kind.decide(ev) == expected
    assert kind.decide({"n": 5, "final": good, "champion": None, **base})["promote"] is True
    assert kind.decide({"n": 5, "final": weak, "champion": None, **base})["promote"] is False
    assert kind.compare({"final": good, "champion": weak}) == (
        f"{rule.metric} {good[rule.metric]:.3f} vs champion {weak[rule.metric]:.3f}")
