"""Classification: one label of a closed set per row.

The answer is a label (agents.answers.LabelAnswer: an unambiguous case or whitespace slip is
fixed); the completion is the spec's `completion_template` with it (`" {label}"`). A model
is scored by greedy decoding and matching the longest label its text starts with: accuracy,
macro-F1, per-label precision/recall/F1 and the confusion matrix; the trivial baseline always
answers the commonest gold label. Promotion follows `evaluation.promotion`: beat that
baseline by `min_over_baseline`, the champion by `min_improvement` on `metric`, and lose no
more than `max_label_drop` F1 on any label.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from agents.answers import LabelAnswer
from flows.render import render_completion, render_prompt
from flows.spec import Spec
from training.evaluate import (
    classification_metrics,
    confusion_matrix_png,
    evaluate_classifier,
    per_label_report,
)
from training.registry import decide_promotion


class Classification:
    name = "classification"

    def __init__(self, spec: Spec):
        self.spec = spec
        self.labels = spec.task.labels

    def answer_rule(self) -> LabelAnswer:
        return LabelAnswer(self.labels)

    def completion(self, answer: str) -> str:
        return render_completion(self.spec, answer)

    def _gold(self, rows: list[dict]) -> list[str]:
        return [str(r[self.spec.task.gold_column]) for r in rows]

    def score(self, model_dir: str | Path, rows: list[dict]) -> dict:
        return evaluate_classifier(str(model_dir), [render_prompt(self.spec, r) for r in rows],
                                   self._gold(rows), labels=self.labels,
                                   max_new_tokens=self.spec.evaluation.max_new_tokens)

    def baseline(self, rows: list[dict]) -> dict:
        """Always answering the commonest gold label: context for the base model's figure,
        and the floor promotion must clear."""
        gold = self._gold(rows)
        if not gold:
            return {"majority_baseline": 0.0, "majority_macro_f1": 0.0}
        commonest = Counter(gold).most_common(1)[0][0]
        trivial = classification_metrics([commonest] * len(gold), gold, self.labels)
        return {"majority_baseline": trivial["accuracy"],
                "majority_macro_f1": trivial["macro_f1"]}

    def write_reports(self, ev: dict, rows: list[dict], eval_dir: Path) -> list[Path]:
        report = f"# Trained model on {len(rows)} held-out rows\n\n{per_label_report(ev['final'])}"
        if ev.get("champion"):
            report += (f"\n# Champion v{ev['champion_version']} on the same rows\n\n"
                       f"{per_label_report(ev['champion'])}")
        (eval_dir / "per_label.md").write_text(report)
        confusion_matrix_png(ev["final"], self.labels, eval_dir / "confusion_matrix.png")
        return [eval_dir / "per_label.md", eval_dir / "confusion_matrix.png"]

    def describe(self, ev: dict) -> str:
        champion = ev.get("champion")
        return (f"held-out accuracy: base {ev['base']['accuracy']:.3f} -> SFT "
                f"{ev['sft']['accuracy']:.3f} -> final {ev['final']['accuracy']:.3f} (macro-F1 "
                f"{ev['final']['macro_f1']:.3f}) on {ev['n']} rows; "
                + (f"champion v{ev['champion_version']} {champion['accuracy']:.3f}" if champion
                   else "no champion"))

    def compare(self, ev: dict) -> str:
        metric = self.spec.evaluation.promotion.metric
        champion = (f"champion {ev['champion'][metric]:.3f}" if ev.get("champion")
                    else "no champion yet")
        return f"{metric} {ev['final'][metric]:.3f} vs {champion}"

    def metrics(self, ev: dict, dpo: dict | None) -> dict[str, float]:
        return {"accuracy": ev["final"]["accuracy"], "macro_f1": ev["final"]["macro_f1"],
                "base_accuracy": ev["base"]["accuracy"], "sft_accuracy": ev["sft"]["accuracy"],
                **({"dpo_reward_accuracy": dpo["reward_accuracy"]} if dpo else {})}

    def decide(self, ev: dict) -> dict:
        rule = self.spec.evaluation.promotion
        baseline = (ev["majority_baseline"] if rule.metric == "accuracy"
                    else ev["majority_macro_f1"])
        return decide_promotion(ev["final"], ev.get("champion"), metric=rule.metric,
                                min_improvement=rule.min_improvement,
                                max_label_drop=rule.max_label_drop, baseline=baseline,
                                min_over_baseline=rule.min_over_baseline)
