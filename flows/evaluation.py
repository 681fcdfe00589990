"""The evaluate stage: every model that matters, scored on the same held-out rows.

The base model, the final model (after DPO when it ran), the SFT-only model and the current
champion are scored on the rows the holdout hash kept away from every agent; the commonest
gold label gives the baseline a model must clearly beat. The final model's per-label report
and confusion matrix go to `<out>/eval/` and to the parent MLflow run.
"""

import json
from collections import Counter
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.render import render_prompt
from flows.spec import Spec
from flows.warehouse import fetch_eval_rows, shared_engine
from training.evaluate import (
    classification_metrics,
    confusion_matrix_png,
    evaluate_classifier,
    per_label_report,
)
from training.registry import champion_model_dir, champion_version


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(spec: Spec, out_dir: Path, mlflow_run_id: str, final_dir: Path,
             sft_dir: Path | None = None) -> dict:
    """Base, final (after DPO when it ran), SFT-only and current champion models on the same
    held-out rows; the final model's per-label report and confusion matrix go to out/eval/
    and the parent run."""
    rows = fetch_eval_rows(spec, shared_engine(spec.warehouse.url))
    prompts = [render_prompt(spec, r) for r in rows]
    gold = [str(r[spec.task.gold_column]) for r in rows]
    labels = spec.task.labels
    kw = {"labels": labels, "max_new_tokens": spec.evaluation.max_new_tokens}
    base = evaluate_classifier(str(out_dir / "model" / "base"), prompts, gold, **kw)
    final = evaluate_classifier(str(final_dir), prompts, gold, **kw)
    sft = (evaluate_classifier(str(sft_dir), prompts, gold, **kw)
           if sft_dir and Path(sft_dir) != Path(final_dir) else final)
    # the champion is judged on these very rows, not by the figure it got on its own
    champion_v = champion_version(spec.tracking.registered_model)
    champion_dir = champion_model_dir(spec.tracking.registered_model, out_dir / "champion")
    champion = (evaluate_classifier(str(champion_dir), prompts, gold, **kw)
                if champion_dir else None)
    # context for the base model's figure: always answering the commonest gold label
    commonest = Counter(gold).most_common(1)[0][0] if gold else None
    trivial = classification_metrics([commonest] * len(gold), gold, labels) if gold else None
    majority = trivial["accuracy"] if trivial else 0.0
    (out_dir / "eval.json").write_text(json.dumps(
        {"base": base, "sft": sft, "final": final, "champion": champion,
         "champion_version": champion_v, "majority_baseline": majority}, indent=2))
    eval_dir = out_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    report = f"# Trained model on {len(rows)} held-out rows\n\n{per_label_report(final)}"
    if champion:
        report += (f"\n# Champion v{champion_v} on the same rows\n\n"
                   f"{per_label_report(champion)}")
    (eval_dir / "per_label.md").write_text(report)
    confusion_matrix_png(final, labels, eval_dir / "confusion_matrix.png")
    client = MlflowClient()
    for name in ("per_label.md", "confusion_matrix.png"):
        client.log_artifact(mlflow_run_id, str(eval_dir / name), "eval")
    get_run_logger().info(
        "held-out accuracy: base %.3f -> SFT %.3f -> final %.3f (macro-F1 %.3f) on %d rows; %s",
        base["accuracy"], sft["accuracy"], final["accuracy"], final["macro_f1"], len(rows),
        f"champion v{champion_v} {champion['accuracy']:.3f}" if champion
        else "no champion")
    return {"n": len(rows), "base": base, "sft": sft, "final": final, "champion": champion,
            "majority_baseline": majority,
            "majority_macro_f1": trivial["macro_f1"] if trivial else 0.0}


def model_metrics(ev: dict, dpo: dict | None) -> dict[str, float]:
    """The final model's figures, as logged on the parent run and its registered version."""
    return {"accuracy": ev["final"]["accuracy"], "macro_f1": ev["final"]["macro_f1"],
            "base_accuracy": ev["base"]["accuracy"], "sft_accuracy": ev["sft"]["accuracy"],
            **({"dpo_reward_accuracy": dpo["reward_accuracy"]} if dpo else {})}
