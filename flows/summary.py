"""The run's summary: one dictionary of what the run did and what it is worth.

    summary = summarise(run, slices=..., agents=..., ..., stage_seconds=stage.seconds)
    return publish(run, summary, ...)

`summarise` gathers the stages' results (coverage, stopped agents, gate rejections, tool
misuse, drift alarms, cost, label distances, training and evaluation figures, the promotion
decision) and the `outcome` with its warnings. `publish` writes `summary.json`, closes the
store's record, logs the figures and files to the parent MLflow run, makes the reports
(flows/reports), and returns the flow's result: the summary, or a Completed state named
"Completed with warnings" so the flow run's state says what limits the data.
"""

import json
from collections import Counter

from prefect.states import Completed, State

from flows import tracking
from flows.contamination import contamination_summary
from flows.coverage import outcome
from flows.error_map import error_map_summary
from flows.kinds import kind_of
from flows.llm_endpoints import llm_tag, simulated_roles
from flows.reports import publish_reports
from flows.run_lifecycle import PostTrainingRun
from flows.slicing import SliceDescriptor
from flows.tuning import default_config


def summarise(run: PostTrainingRun, *, slices: list[SliceDescriptor], agents: list[dict],
              balance: dict, covered: dict, dataset: dict, sft: dict, tuned: dict | None,
              pairs: dict | None, dpo: dict | None, ev: dict, decision: dict,
              stage_seconds: dict[str, float], degraded: list[dict] = (),
              error_map: dict | None = None) -> dict:
    spec = run.spec
    calls = run.store.call_totals(run.id)
    misuse: Counter = Counter()
    for r in agents:
        misuse.update(r.get("misuse") or {})
    summary = {
        "run_id": run.id,
        "mlflow_run_id": run.mlflow_run_id,
        "mlflow_tracking_uri": run.mlflow_uri,
        "teacher": "simulated" if simulated_roles(spec) else "real",
        "llm": llm_tag(spec),
        "resumed": run.resumed,
        "skipped": False,
        "data_fingerprint": run.fingerprint,
        "slices": len(slices),
        "agent_processes": sorted({r["process"] for r in agents if r.get("process")}),
        "topup_slices": balance["topup_slices"],
        "agents_stopped": {r["slice_id"]: r["stopped_reason"] for r in agents
                           if r["stopped_reason"] != "completed"},
        "agents_failed": sorted(r["slice_id"] for r in agents
                                if r["stopped_reason"].startswith("failed")),
        "agent_retries": sum("+retry" in r["slice_id"] for r in agents),
        "coverage": covered["coverage"],
        "coverage_rows": {k: covered[k] for k in ("planned_rows", "labelled_rows",
                                                  "excluded_rows", "unlabelled_rows",
                                                  "disputed_rows")},
        "coverage_by_slice": covered["slices"],
        "labels_normalised": sum(r.get("labels_normalised", 0) for r in agents),
        "arguments_unfenced": sum(r.get("arguments_unfenced", 0) for r in agents),
        # rows whose text spoke to the agent: their agents were judged on everything after
        "hostile_rows_read": sum(r.get("hostile_rows", 0) for r in agents),
        "hostile_rows_mode": spec.generation.hostile_rows,
        "examples_accepted": sum(r["accepted"] for r in agents),
        "examples_rejected": run.store.rejection_counts(run.id),
        "tool_misuse": dict(misuse),
        "reanchors": sum(r.get("reanchors", 0) for r in agents),
        "drift_alarms": [{"slice_id": r["slice_id"], "at_call": r["drift_alarm_call"],
                          "time": r["drift_alarm_time"],
                          "baseline": r.get("drift_baseline")} for r in agents
                         if r.get("drift_alarm_call") is not None],
        "max_context_tokens": max((r.get("max_context_tokens", 0) for r in agents),
                                  default=0),
        "llm_calls": calls["calls"],
        "llm_errors": calls["errors"],
        "cache_hits": calls["cache_hits"],
        "input_tokens": calls["input_tokens"],
        "output_tokens": calls["output_tokens"],
        "cost_usd": calls["cost_usd"],
        "cost_by_role": {k: round(v["cost_usd"], 6) for k, v in calls["by_role"].items()},
        "label_tv_before": balance["tv_before"],
        "label_tv_after_topup": balance["tv_after"],
        "train_examples": dataset["n"],
        "duplicates_dropped": dataset["duplicates"],
        "eval_copies_dropped": dataset["eval_copies"],
        "quota_trimmed": dataset["quota_trimmed"],
        "contamination": contamination_summary(dataset, pairs),  # near-copies of held-out rows
        "train_loss": sft.get("train_loss"),
        "tuning_trials": [{k: t[k] for k in ("trial", "source", "config", "eval_loss",
                                             "status")} for t in tuned["trials"]]
        if tuned else [],
        "chosen_config": tuned["chosen_config"] if tuned else default_config(spec),
        "tuning_beats_default": tuned["beats_default"] if tuned else None,
        "dpo_pairs": {"train": pairs["n_train"], "held_out": pairs["n_eval"],
                      "rejected": pairs["rejected"]} if pairs else None,
        "dpo_reward_accuracy": dpo["reward_accuracy"] if dpo else None,
        "dpo_reward_margin": dpo["reward_margin"] if dpo else None,
        "eval_examples": ev["n"],
        "model_name": spec.tracking.registered_model,
        "model_version": decision["model_version"],
        "promoted": decision["promoted"],
        "previous_champion_version": decision.get("previous_champion_version"),
        "promotion_reason": decision["reason"],
        "approval": decision["approval"],
        "degraded": list(degraded),  # optional stages that failed, and what went on instead
        "task_kind": spec.task.kind,
        **kind_of(spec).summary(ev, dataset),  # accuracy and labels, or win-rates and ROUGE-L
        # an error-driven run: the champion's map on the probes, and both models after
        "error_map": error_map_summary(error_map, ev),
        "stage_seconds": dict(stage_seconds),
        "wall_seconds": run.elapsed(),
    }
    summary.update(outcome(summary, covered))
    return summary


def publish(run: PostTrainingRun, summary: dict, *, slices: list[SliceDescriptor],
            balance: dict, sft: dict, dpo: dict | None, tuned: dict | None) -> dict | State:
    """Write, record and log the summary, make the reports, and return the flow's result."""
    out, client, mlflow_run_id = run.out, run.client, run.mlflow_run_id
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    run.store.finish_run(run.id, "completed", summary)
    tracking.log_metrics(client, mlflow_run_id, {
        "wall_seconds": summary["wall_seconds"], "cost_usd": summary["cost_usd"],
        "llm_calls": summary["llm_calls"], "cache_hits": summary["cache_hits"],
        **{f"cost_usd.{k}": v for k, v in summary["cost_by_role"].items()},
        **({"label_tv_before": balance["tv_before"]} if balance["tv_before"] is not None
           else {}),
        **({"label_tv_after": summary["label_tv_after"]}
           if summary.get("label_tv_after") is not None else {}),
    })
    client.log_artifact(mlflow_run_id, str(out / "summary.json"))
    # Prefect artifacts (summary, slices, plots) and MLflow pages (plots, model card)
    publish_reports(run.spec, summary, out, client, mlflow_run_id, slices, balance, sft, dpo,
                    tuned)
    if (out / "transcripts").is_dir():
        client.log_artifacts(mlflow_run_id, str(out / "transcripts"), "transcripts")
    if summary["warnings"]:  # the flow run's state says so too, not only the logs
        name = "Degraded" if summary.get("degraded") else "Completed with warnings"
        print(f"{name}:\n- " + "\n- ".join(summary["warnings"]))
        return Completed(data=summary, name=name,
                         message="; ".join(summary["warnings"])[:2000])
    return summary
