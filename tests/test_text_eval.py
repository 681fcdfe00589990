"""Scores for text and JSON answers (training/text_eval.py), against figures worked by hand
or published: ROUGE-L and chrF from their maintained libraries, extraction fields, and the
Wilson interval of a win-rate."""

from __future__ import annotations

import pytest

from training.text_eval import extraction_scores, reference_scores, wilson_interval, win_rate


def test_reference_scores_from_rouge_score_and_sacrebleu():
    same = reference_scores(["Carmaker shares jump"], ["Carmaker shares jump"])
    assert same["rouge_l"] == pytest.approx(1.0) and same["chrf"] == pytest.approx(1.0)
    # LCS "carmaker ... shares" / "carmaker ... profits": 2 of 4 predicted, 2 of 6 reference
    # words -> P 0.5, R 1/3, F1 0.4
    some = reference_scores(["Carmaker profits lift shares"],
                            ["Carmaker shares jump on record profits"])
    assert some["rouge_l"] == pytest.approx(0.4)
    assert 0.3 < some["chrf"] < 0.6
    none = reference_scores(["", "zzz qqq"], ["Carmaker shares jump", "Carmaker shares jump"])
    assert none["rouge_l"] == 0.0 and none["per_row"][0] == {"rouge_l": 0.0, "chrf": 0.0}
    assert none["n"] == 2
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        reference_scores(["a"], ["a", "b"])


def test_extraction_scores_exact_match_and_pooled_field_f1():
    gold = [{"company": "Acme", "change": "up"}, {"company": "Initech", "change": "down"},
            {"company": "Globex", "change": "flat", "percent": 0}]
    predictions = [
        {"company": "Acme", "change": "up"},                    # exact: 2 hits
        '{"company": "Initech", "change": "up", "ceo": "B"}',   # 1 hit, 2 wrong predicted
        "{not json",                                            # invalid: 3 gold fields missed
    ]
    s = extraction_scores(predictions, gold)
    assert s["exact_match"] == pytest.approx(1 / 3) and s["invalid"] == 1
    assert s["field_precision"] == pytest.approx(3 / 5)  # 3 hits of 5 predicted fields
    assert s["field_recall"] == pytest.approx(3 / 7)     # of 7 gold fields
    assert s["field_f1"] == pytest.approx(2 * (3 / 5) * (3 / 7) / (3 / 5 + 3 / 7))
    assert s["per_field"]["company"] == {"f1": pytest.approx(2 * 2 / (4 + 0 + 1)), "support": 3}
    assert s["per_field"]["ceo"]["support"] == 0
    with pytest.raises(ValueError, match="gold record is not a JSON object"):
        extraction_scores(["{}"], ["[1]"])


def test_wilson_interval_matches_the_published_figures():
    lower, upper = wilson_interval(8, 10)  # 95%: 0.4902 to 0.9433 (Newcombe 1998, table I)
    assert lower == pytest.approx(0.4902, abs=1e-4) and upper == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_win_rate_counts_ties_apart_and_bounds_the_rate():
    w = win_rate(wins=30, losses=10, ties=20)
    assert w["win_rate"] == pytest.approx(0.75) and w["decided"] == 40 and w["n"] == 60
    assert w["lower"] == pytest.approx(wilson_interval(30, 40)[0])
    assert 0.5 < w["lower"] < 0.75 < w["upper"]
    few = win_rate(wins=3, losses=1, ties=0)  # the same 75%, on 4 comparisons
    assert few["win_rate"] == pytest.approx(0.75) and few["lower"] < 0.5
    with pytest.raises(ValueError):
        win_rate(-1, 0, 0)


def test_promotion_reads_the_win_rates_lower_bound_not_the_point():
    from training.registry import decide_win_rate_promotion

    rule = {"min_rows": 30, "min_lower_bound": 0.5}
    # 75% of 4 decided comparisons: the point clears 0.5, the bound does not
    few = decide_win_rate_promotion(None, win_rate(3, 1, 0), **rule)
    assert few["promote"] is False
    assert "fewer than the 30 the rule needs" in few["reason"]
    assert "lower bound 0.301 < 0.5" in few["reason"]
    # 60% of 200: the bound (0.531) clears 0.5 against the base model, no champion yet
    ok = decide_win_rate_promotion(None, win_rate(120, 80, 10), **rule)
    assert ok["promote"] is True and ok["reason"].endswith("(no champion yet)")
    # with a champion, the champion is the opponent: 52% of 200 has a bound under 0.5
    close = decide_win_rate_promotion(win_rate(104, 96, 0), win_rate(150, 50, 0), **rule)
    assert close["promote"] is False and "against the champion" in close["reason"]
    # and the reference metric may not fall more than the rule allows
    dropped = decide_win_rate_promotion(
        win_rate(150, 50, 0), win_rate(150, 50, 0), **rule, candidate_reference=0.30,
        champion_reference=0.36, max_reference_drop=0.05)
    assert dropped["promote"] is False
    assert dropped["reason"] == "rouge_l 0.300 < champion 0.360 - 0.05"
