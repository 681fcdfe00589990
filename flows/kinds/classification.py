"""Classification: one label of a closed set per row.

The answer is a label (agents.answers.LabelAnswer: an unambiguous case or whitespace slip is
fixed); the completion is the spec's `completion_template` with it (`" {label}"`). A model
is scored by greedy decoding and matching the longest label its text starts with: accuracy,
macro-F1, per-label precision/recall/F1 and the confusion matrix; the trivial baseline always
answers the commonest gold label. Promotion follows `evaluation.promotion`: beat that
baseline by `min_over_baseline`, the champion by `min_improvement` on `metric`, and lose no
more than `max_label_drop` F1 on any label, nor more than `max_slice_drop` of `metric` on
any slice group with `min_slice_rows` held-out rows (`score` gives figures `by_slice`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from agents.answers import LabelAnswer
from agents.judge import Judge
from agents.pairs import PairWriter
from agents.skills import load_skill
from flows import distribution
from flows.render import render_completion, render_prompt
from flows.reports.markdown import label_table, num, table
from flows.slicing import slice_group
from flows.spec import Spec
from training.evaluate import (
    classification_metrics,
    confusion_matrix_png,
    evaluate_classifier,
    metrics_by_group,
    per_group_report,
    per_label_report,
)
from training.registry import decide_promotion


class Classification:
    name = "classification"
    judge_skills = ("review-examples",)
    curation_name = "the label quota"

    def __init__(self, spec: Spec):
        self.spec = spec
        self.labels = spec.task.labels

    def answer_rule(self) -> LabelAnswer:
        return LabelAnswer(self.labels)

    def agent_task(self) -> dict:
        return {"labels": self.labels}

    def near_duplicates(self) -> None:
        return None  # many rows share a label by design

    def judge(self, gateway, role) -> Judge:
        return Judge(gateway, model=role.model, skill=load_skill("review-examples"),
                     labels=self.labels, temperature=role.temperature,
                     max_tokens=role.max_tokens)

    def head_to_head(self, ev: dict, rows: list[dict], runtime) -> dict:
        return {}  # labels are scored against the gold column; no judge needed

    def curate(self, kept: list[dict]) -> tuple[list[dict], dict]:
        """The label quota closes whatever gap to the spec's target the top-ups left."""
        target = distribution.target_shares(self.spec.distribution.target, self.labels)
        counts = Counter(ex["label"] for ex in kept)
        tv_before = distribution.tv_distance(
            distribution.shares(counts, self.labels), target) if target else None
        if target:
            kept = distribution.quota(kept, target, self.spec.distribution.tolerance)
        final = Counter(ex["label"] for ex in kept)
        return kept, {"label_counts": dict(final), "tv_before_quota": tv_before,
                      "tv_after": distribution.tv_distance(
                          distribution.shares(final, self.labels), target) if target else None}

    def pair_writer(self, runtime, sft_dir, items: list[dict]) -> PairWriter:
        """Agents write a chosen and a rejected label per prompt (write-preference-pairs)."""
        role = self.spec.llm.generator  # the bulk goes to the cheap model
        return PairWriter(runtime.gateways["generator"], model=role.model,
                          skill=load_skill("write-preference-pairs"), labels=self.labels,
                          completion_template=self.spec.task.completion_template,
                          description=self.spec.task.description,
                          temperature=role.temperature, max_tokens=role.max_tokens)

    def summary(self, ev: dict, dataset: dict) -> dict:
        """The run summary's figures for this kind."""
        return {"label_tv_after": dataset["tv_after"], "label_counts": dataset["label_counts"],
                "sft_accuracy": ev["sft"]["accuracy"], "base_accuracy": ev["base"]["accuracy"],
                "majority_baseline": round(ev["majority_baseline"], 4),
                "accuracy": ev["final"]["accuracy"], "macro_f1": ev["final"]["macro_f1"],
                "champion_accuracy": ev["champion"]["accuracy"] if ev["champion"] else None}

    def completion(self, answer: str) -> str:
        return render_completion(self.spec, answer)

    def _gold(self, rows: list[dict]) -> list[str]:
        return [str(r[self.spec.task.gold_column]) for r in rows]

    def score(self, model_dir: str | Path, rows: list[dict]) -> dict:
        """The kind's figures on `rows`, overall, per label and per slice group."""
        gold = self._gold(rows)
        result = evaluate_classifier(str(model_dir), [render_prompt(self.spec, r) for r in rows],
                                     gold, labels=self.labels,
                                     max_new_tokens=self.spec.evaluation.max_new_tokens)
        groups = [slice_group(self.spec, r) for r in rows]
        return result | {"by_slice": metrics_by_group(result["predictions"], gold, groups,
                                                      self.labels)}

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
        champion = (ev.get("champion") or {}).get("by_slice")
        report += ("\n# By slice (trained model" + (", champion beside it" if champion else "")
                   + f")\n\n{per_group_report(ev['final']['by_slice'], champion)}")
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
                                min_over_baseline=rule.min_over_baseline,
                                max_slice_drop=rule.max_slice_drop,
                                min_slice_rows=rule.min_slice_rows)

    # ── the run's pages ─────────────────────────────────────────────────────────────────
    def report_metrics(self, s: dict, ev: dict) -> list[str]:
        """The summary page's metrics: accuracy and macro-F1 by model, and the baseline."""
        def f1(key: str):
            return (ev.get(key) or {}).get("macro_f1")

        rows = [["base (untrained)", num(s.get("base_accuracy")), num(f1("base"))],
                ["after SFT", num(s.get("sft_accuracy")), num(f1("sft"))],
                ["**final**" + (" (SFT + DPO)" if s.get("dpo_reward_accuracy") is not None
                                else ""),
                 f"**{num(s.get('accuracy'))}**", f"**{num(s.get('macro_f1'))}**"]]
        if s.get("champion_accuracy") is not None:
            rows.append([f"champion v{s.get('previous_champion_version')} (same rows)",
                         num(s["champion_accuracy"]), num(f1("champion"))])
        rows.append(["always the commonest label", num(s.get("majority_baseline")), "—"])
        return table(["model", "accuracy", "macro-F1"], rows)

    def report_data(self, s: dict, stages: dict[str, dict]) -> list[str]:
        """The label distribution by stage and its distance to the spec's target."""
        spec = self.spec
        lines = ["", "## Label distribution", ""]
        lines += label_table(stages, self.labels)
        tv = [("before top-up", s.get("label_tv_before")),
              ("after top-up", s.get("label_tv_after_topup")),
              ("curated", s.get("label_tv_after"))]
        if any(v is not None for _, v in tv):
            target = spec.distribution.target
            lines += ["", f"Distance to the target "
                      f"({target if isinstance(target, str) else 'custom'} shares, total "
                      f"variation, tolerance {spec.distribution.tolerance:g}): "
                      + ", ".join(f"{n} {num(v)}" for n, v in tv) + "."]
        else:
            lines += ["", "No target distribution in the spec: labels measured, not balanced."]
        return lines
