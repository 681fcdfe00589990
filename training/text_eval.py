"""Scores for tasks whose answer is text or JSON: reference metrics, extraction fields, and a
pairwise win-rate with a confidence bound (what promotion of a generative model rests on).

    reference_scores(predictions, references)   ROUGE-L F1 (Google's rouge-score, stemmed) and
                                                chrF (sacrebleu), means over the rows
    extraction_scores(predictions, gold)        exact match and field-level F1 of JSON records
    win_rate(wins, losses, ties)                the candidate's share of decided comparisons,
                                                with a Wilson score interval; ties apart

Plain functions over lists: no model, no Prefect, no MLflow.
"""

from __future__ import annotations

import json
import math
from statistics import NormalDist
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def reference_scores(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-L F1 and chrF of each prediction against its reference, averaged (0..1 both;
    an empty prediction scores 0). Returns {rouge_l, chrf, n, per_row: [{rouge_l, chrf}]}."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    per_row = []
    for prediction, reference in zip(predictions, references, strict=True):
        rouge = _ROUGE.score(reference, prediction)["rougeL"].fmeasure if prediction.strip() \
            else 0.0
        chrf = sacrebleu.sentence_chrf(prediction, [reference]).score / 100.0
        per_row.append({"rouge_l": rouge, "chrf": chrf})
    n = len(per_row)
    return {"n": n, "per_row": per_row,
            "rouge_l": sum(r["rouge_l"] for r in per_row) / n if n else 0.0,
            "chrf": sum(r["chrf"] for r in per_row) / n if n else 0.0}


def _record(value: Any) -> dict | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def extraction_scores(predictions: list[Any], gold: list[Any]) -> dict:
    """Each predicted record (an object, or JSON text) against its gold record: exact match
    (every field equal, nothing extra), and field-level precision/recall/F1 pooled over the
    rows (a field counts when its key and value both match). Unparsable predictions count as
    empty records and are reported as `invalid`. Returns {exact_match, field_precision,
    field_recall, field_f1, invalid, n, per_field: {key: {f1, support}}}."""
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} gold records")
    exact = invalid = hit = predicted = expected = 0
    fields: dict[str, dict[str, int]] = {}
    for raw, truth_raw in zip(predictions, gold, strict=True):
        record, truth = _record(raw), _record(truth_raw)
        if truth is None:
            raise ValueError(f"gold record is not a JSON object: {truth_raw!r}")
        if record is None:
            invalid += 1
            record = {}
        exact += _canonical(record) == _canonical(truth)
        predicted += len(record)
        expected += len(truth)
        for key in set(record) | set(truth):
            f = fields.setdefault(key, {"tp": 0, "fp": 0, "fn": 0, "support": 0})
            f["support"] += key in truth
            if key in record and key in truth and _canonical(record[key]) == _canonical(truth[key]):
                hit += 1
                f["tp"] += 1
            else:
                f["fp"] += key in record
                f["fn"] += key in truth
    n = len(gold)
    precision = hit / predicted if predicted else 0.0
    recall = hit / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0

    def field_f1(f: dict[str, int]) -> float:
        denominator = 2 * f["tp"] + f["fp"] + f["fn"]
        return 2 * f["tp"] / denominator if denominator else 0.0

    return {"n": n, "exact_match": exact / n if n else 0.0, "field_precision": precision,
            "field_recall": recall, "field_f1": f1, "invalid": invalid,
            "per_field": {k: {"f1": field_f1(f), "support": f["support"]}
                          for k, f in sorted(fields.items())}}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (well behaved at 0, 1 and small n)."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(wins: int, losses: int, ties: int, confidence: float = 0.95) -> dict:
    """The candidate's win-rate over the comparisons a judge decided (ties counted apart, not
    as half wins), with its Wilson interval: promotion reads the lower bound, not the point.
    Returns {win_rate, lower, upper, wins, losses, ties, decided, n, confidence}."""
    if min(wins, losses, ties) < 0:
        raise ValueError("counts must be >= 0")
    decided = wins + losses
    lower, upper = wilson_interval(wins, decided, confidence)
    return {"win_rate": wins / decided if decided else 0.0, "lower": lower, "upper": upper,
            "wins": wins, "losses": losses, "ties": ties, "decided": decided,
            "n": decided + ties, "confidence": confidence}
