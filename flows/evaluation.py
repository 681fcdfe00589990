"""The evaluate stage: every model that matters, scored on the same held-out rows.

The base model, the final model (after DPO when it ran), the SFT-only model and the current
champion are scored by the task's kind (flows/kinds) on the rows the holdout hash kept away
from every agent, beside what a trivial answer scores there. The kind's reports on the final
model (for classification: per-label figures and the confusion matrix) go to `<out>/eval/`
and to the parent MLflow run; `eval.json` holds every model's scores.
"""

import json
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.kinds import kind_of
from flows.kinds.text import OUTPUTS
from flows.runtime import RuntimeSettings, get_runtime
from flows.spec import Spec
from flows.warehouse import fetch_eval_rows, shared_engine
from training.registry import champion_model_dir, champion_version


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(spec: Spec, out_dir: Path, mlflow_run_id: str, final_dir: Path,
             sft_dir: Path | None = None, settings: RuntimeSettings | None = None) -> dict:
    """Base, final, SFT-only and champion models on the same held-out rows; returns
    {n, base, sft, final, champion, champion_version, <the kind's baseline figures>,
    <the kind's judged comparisons: versus_base, versus_champion for text answers>}.
    `settings`: the run's LLM runtime, for a kind whose models a judge compares."""
    kind = kind_of(spec)
    rows = fetch_eval_rows(spec, shared_engine(spec.warehouse.url))
    base = kind.score(out_dir / "model" / "base", rows)
    final = kind.score(final_dir, rows)
    sft = (kind.score(sft_dir, rows) if sft_dir and Path(sft_dir) != Path(final_dir)
           else final)
    # the champion is judged on these very rows, not by the figure it got on its own
    champion_v = champion_version(spec.tracking.registered_model)
    champion_dir = champion_model_dir(spec.tracking.registered_model, out_dir / "champion")
    champion = kind.score(champion_dir, rows) if champion_dir else None
    ev = {"n": len(rows), "base": base, "sft": sft, "final": final, "champion": champion,
          "champion_version": champion_v, **kind.baseline(rows)}
    ev |= kind.head_to_head(ev, rows, get_runtime(settings) if settings else None)
    (out_dir / "eval.json").write_text(json.dumps(
        {k: _figures(v) for k, v in ev.items() if k != "n"}, indent=2, default=str))
    eval_dir = out_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient()
    for path in kind.write_reports(ev, rows, eval_dir):
        client.log_artifact(mlflow_run_id, str(path), "eval")
    get_run_logger().info(kind.describe(ev))
    return ev


def _figures(value):
    """A model's scores without its decoded answers (eval/outputs.jsonl holds those), a
    judged comparison without its per-row verdicts."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in (OUTPUTS, "per_row")}
    return value
