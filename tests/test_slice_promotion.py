"""Figures by slice and the promotion rule on them: a candidate that gains overall but fails
one slice of the warehouse the champion handled is not promoted (`max_slice_drop`)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from flows.kinds import kind_of
from flows.slicing import plan_slices, slice_group
from flows.spec import Spec, load_spec
from flows.warehouse import fetch_eval_rows, make_engine
from training.evaluate import metrics_by_group, per_group_report
from training.registry import decide_promotion

DEMO = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"
LABELS = ["a", "b"]


def _spec(tmp: Path, warehouse_url: str, **slicing) -> Spec:
    data = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    data["warehouse"]["url"] = warehouse_url
    data["slicing"].update(slicing)
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)


def _result(accuracy: float, by_slice: dict[str, tuple[int, float]]) -> dict:
    per_label = {label: {"f1": accuracy} for label in LABELS}
    return {"accuracy": accuracy, "macro_f1": accuracy, "per_label": per_label,
            "by_slice": {g: {"n": n, "accuracy": a, "macro_f1": a}
                         for g, (n, a) in by_slice.items()}}


def test_metrics_by_group_scores_each_group_on_its_own_rows():
    predictions = ["a", "a", "b", "b", "a"]
    gold = ["a", "b", "b", "b", "a"]
    groups = ["x", "x", "y", "y", "y"]
    by = metrics_by_group(predictions, gold, groups, LABELS)
    assert by["x"] == {"n": 2, "accuracy": 0.5, "macro_f1": pytest.approx((2 / 3 + 0) / 2)}
    assert by["y"]["n"] == 3 and by["y"]["accuracy"] == 1.0 and by["y"]["macro_f1"] == 1.0
    report = per_group_report(by, {"x": {"n": 2, "accuracy": 1.0, "macro_f1": 1.0}})
    assert "| x | 2 | 0.500 |" in report and "| y | 3 | 1.000 | 1.000 | — | — |" in report


def test_a_gain_overall_bought_with_one_slice_is_not_promoted():
    champion = _result(0.70, {"region=uk": (120, 0.80), "region=asia": (40, 0.60),
                              "region=tiny": (5, 0.80)})
    candidate = _result(0.80, {"region=uk": (120, 0.70), "region=asia": (40, 0.95),
                               "region=tiny": (5, 0.20)})
    rule = {"metric": "accuracy", "min_improvement": 0.0, "max_label_drop": None}
    assert decide_promotion(candidate, champion, **rule)["promote"]  # no slice rule: it wins
    refused = decide_promotion(candidate, champion, **rule, max_slice_drop=0.05)
    assert not refused["promote"]
    # uk fell 0.10; 'tiny' fell more but has 5 held-out rows, under min_slice_rows: noise
    assert refused["reason"] == "slice 'region=uk' accuracy 0.700 < champion 0.800 - 0.05 (120 rows)"
    assert "tiny" not in refused["reason"]
    strict = decide_promotion(candidate, champion, **rule, max_slice_drop=0.05, min_slice_rows=5)
    assert "slice 'region=tiny'" in strict["reason"]
    allowed = decide_promotion(candidate, champion, **rule, max_slice_drop=0.15)
    assert allowed["promote"] and "no slice's accuracy dropped by more than 0.15" in \
        allowed["reason"]


def test_the_kind_applies_the_specs_slice_limit(tmp_path, small_warehouse_url):
    spec = _spec(tmp_path, small_warehouse_url)
    spec.evaluation.promotion.max_slice_drop = 0.05
    ev = {"final": _result(0.80, {"region=uk": (60, 0.70)}),
          "champion": _result(0.70, {"region=uk": (60, 0.80)}),
          "majority_baseline": 0.3, "majority_macro_f1": 0.1}
    decision = kind_of(spec).decide(ev)
    assert not decision["promote"] and "slice 'region=uk'" in decision["reason"]


@pytest.mark.parametrize("slicing", [{}, {"method": "hash", "buckets": 3, "column": None}])
def test_held_out_rows_get_the_group_their_slice_would_have(tmp_path, small_warehouse_url,
                                                            slicing):
    """Held-out rows are in no slice; their group is the one planning would give them, so
    figures by slice and the plan's slices name the same groups."""
    spec = _spec(tmp_path, small_warehouse_url, **slicing)
    engine = make_engine(spec.warehouse.url)
    rows = fetch_eval_rows(spec, engine)
    groups = {slice_group(spec, r) for r in rows}
    planned = {s.slice_id.split("#")[0] for s in plan_slices(spec, engine)}
    assert len(rows) > 20 and groups <= planned and len(groups) >= 2
    if not slicing:
        assert {g.split("=")[0] for g in groups} == {"region"}
    else:
        assert all(g.startswith("bucket=") for g in groups)


def test_text_kinds_read_the_judges_verdicts_by_slice():
    from flows.kinds.text import verdicts_by_slice

    per_row = [{"outcome": o} for o in ("win", "loss", "loss", "tie", "win", "win")]
    by = verdicts_by_slice(per_row, ["x", "x", "x", "x", "y", "y"])
    assert by["x"] == {"n": 4, "wins": 1, "losses": 2, "ties": 1, "net": -0.25}
    assert by["y"] == {"n": 2, "wins": 2, "losses": 0, "ties": 0, "net": 1.0}


def test_a_text_model_the_judge_prefers_overall_but_not_on_one_slice_is_not_promoted(tmp_path):
    from training.text_eval import win_rate

    root = DEMO.parent.parent / "news_headlines" / "spec.yaml"
    spec = load_spec(root)
    spec.evaluation.promotion.max_slice_drop = 0.1
    spec.evaluation.promotion.max_reference_drop = None
    overall = win_rate(wins=150, losses=40, ties=10)
    ev = {"final": {"valid_share": 1.0}, "base": {"valid_share": 1.0},
          "champion": {"valid_share": 1.0}, "versus_base": overall, "versus_champion": overall,
          "versus_champion_by_slice": {
              "region=uk": {"n": 60, "wins": 20, "losses": 35, "ties": 5, "net": -0.25},
              "region=asia": {"n": 8, "wins": 0, "losses": 8, "ties": 0, "net": -1.0}}}
    decision = kind_of(spec).decide(ev)
    assert not decision["promote"]
    assert "slice 'region=uk'" in decision["reason"] and "asia" not in decision["reason"]
    spec.evaluation.promotion.max_slice_drop = None
    assert kind_of(spec).decide(ev)["promote"]
