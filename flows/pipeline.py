"""The post-training flow, read top to bottom.

    spec ─> plan slices ─map─> one sub-agent per slice ─> gates ─> example store
      ─> fresh agents over rows left unlabelled ─> top-up ─> coverage floor
      curate ─> tune? (mapped trials) ─> SFT ─> preference pairs + DPO? ─> evaluate
      ─> approval? ─> registry (champion alias)

Each stage is a Prefect task wrapping a plain function from its room (`flows/` for data,
`agents/` for the sub-agents, `training/` for learning). Prefect state carries only small
descriptors (slice queries, file paths, figures), never rows. Everything a run produces
lives under its out folder: the example store, the curated dataset, the models, logs and
summary.json; MLflow holds the parent run, a child run per training job and trial, and the
registry.
"""


# No `from __future__ import annotations` here: `flow.serve` cloudpickles this flow, and
# string annotations lose `Literal` on the way (tests/test_deploy.py checks it).
import hashlib
import json
import os
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from agents.redact import redact
from agents.skills import load_skill
from agents.sql_tool import ensure_reader_role
from agents.teacher import TeacherConfig, TeacherServer
from flows import distribution, tracking
from flows.approval import ask_approval
from flows.coverage import check_coverage, outcome
from flows.generation import cover, generate, held_out_prompts, rebalance, sub_agent_runner
from flows.overrides import pin_overrides
from flows.preferences import train_dpo, write_pairs
from flows.progress import Progress
from flows.reporting import publish_reports
from flows.runtime import RuntimeSettings, check_keys
from flows.spec import Spec, load_spec
from flows.store import Store, shared_store
from flows.train_configs import sft_config
from flows.tuning import default_config, tune
from flows.warehouse import (
    SliceDescriptor,
    data_fingerprint,
    fetch_eval_rows,
    plan_slices,
    render_prompt,
    shared_engine,
)
from training.evaluate import (
    classification_metrics,
    confusion_matrix_png,
    evaluate_classifier,
    per_label_report,
)
from training.launch import OFFLINE_ENV, launch_sft
from training.registry import (
    champion_model_dir,
    champion_version,
    decide_promotion,
    git_commit,
    register_model,
)
from training.registry import promote as promote_model


# ── 1. plan ─────────────────────────────────────────────────────────────────────────────────
@task(name="plan-slices", cache_policy=NO_CACHE)
def plan(spec: Spec, store_url: str, run_id: str) -> list[SliceDescriptor]:
    engine = shared_engine(spec.warehouse.url)
    if engine.dialect.name == "postgresql":  # agents read as a SELECT-only role: make sure of it
        ensure_reader_role(engine, "posttrain_reader", spec.warehouse.tables)
    store = shared_store(store_url)  # holds the slices' row ids (an earlier plan's stay valid)
    slices = plan_slices(spec, engine, members=store, plan_id=run_id)
    store.add_slices(run_id, slices)
    get_run_logger().info(
        "%d slices, %d rows: %s", len(slices), sum(s.row_count for s in slices),
        ", ".join(f"{s.slice_id}({s.row_count})" for s in slices),
    )
    return slices


# ── 2. generate: flows/generation.py (one sub-agent per slice, then top-up) ────────────────

# ── 3. curate ───────────────────────────────────────────────────────────────────────────────
@task(name="curate", cache_policy=NO_CACHE)
def curate(spec: Spec, spec_path: str, store_url: str, run_id: str, out_dir: Path,
           mlflow_run_id: str) -> dict:
    """Exact dedup, drop copies of held-out prompts, balance to the target, write, log."""
    examples = shared_store(store_url).accepted_examples(run_id)
    held_out = held_out_prompts(spec_path)
    seen: set[str] = set()
    kept, duplicates, leaks = [], 0, 0
    for ex in sorted(examples, key=lambda e: (e["slice_id"], e["row_id"])):
        if ex["content_hash"] in seen:  # the same prompt and completion twice
            duplicates += 1
        elif ex["prompt"] in held_out:  # a copy of an evaluation row would inflate accuracy
            leaks += 1
        else:
            kept.append(ex)
        seen.add(ex["content_hash"])
    labels = spec.task.labels
    target = distribution.target_shares(spec.distribution.target, labels)
    counts = Counter(ex["label"] for ex in kept)
    tv_before_quota = distribution.tv_distance(
        distribution.shares(counts, labels), target) if target else None
    if target:  # whatever gap the top-up rounds left, a quota closes
        kept = distribution.quota(kept, target, spec.distribution.tolerance)
    final_counts = Counter(ex["label"] for ex in kept)
    if not kept:
        raise RuntimeError("no accepted examples to train on: see the rejections in the store")
    path = out_dir / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": k["prompt"], "completion": k["completion"]},
                                       ensure_ascii=False) + "\n" for k in kept))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    tracking.log_dataset(mlflow_run_id, path, digest[:16], name=f"{spec.name}-train")
    trimmed = len(examples) - duplicates - leaks - len(kept)
    get_run_logger().info("curated %d examples (%d duplicates, %d copies of held-out rows, "
                          "%d trimmed by the label quota), sha256 %s", len(kept), duplicates,
                          leaks, trimmed, digest[:16])
    return {"path": str(path), "n": len(kept), "duplicates": duplicates, "eval_copies": leaks,
            "quota_trimmed": trimmed, "sha256": digest, "label_counts": dict(final_counts),
            "tv_before_quota": tv_before_quota,
            "tv_after": distribution.tv_distance(distribution.shares(final_counts, labels),
                                                 target) if target else None}


# ── 4. tune (flows/tuning.py), then train ───────────────────────────────────────────────────
@task(name="train-sft", cache_policy=NO_CACHE)
def train(spec: Spec, dataset: dict, out_dir: Path, mlflow_uri: str, mlflow_run_id: str,
          progress_id: str, settings: dict | None = None) -> dict:
    """TRL SFT via Accelerate on the curated data, with the tune stage's chosen settings."""
    config = sft_config(
        spec, train_file=dataset["path"], output_dir=str(out_dir / "model"),
        max_steps=spec.training.max_steps, settings=settings,
        mlflow={"tracking_uri": mlflow_uri, "parent_run_id": mlflow_run_id,
                "run_name": f"{spec.name}-sft"})
    return launch_sft(config, out_dir / "model", profile=spec.training.accelerate_profile,
                      on_line=Progress.get(progress_id).training_line)


# ── 5. evaluate ─────────────────────────────────────────────────────────────────────────────
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


# ── 6. register, decide, (ask a person), promote ─────────────────────────────────────────
@task(name="register-model", cache_policy=NO_CACHE)
def register(spec: Spec, final_dir: Path, mlflow_run_id: str, metrics: dict, tags: dict) -> str:
    return register_model(str(final_dir), mlflow_run_id, spec.tracking.registered_model,
                          metrics=metrics, tags=tags)


@task(name="promote", cache_policy=NO_CACHE)
def promote(spec: Spec, version: str, decision: dict) -> dict:
    """Move `champion` to `version` if `decision` says so; tag the version with the reason."""
    result = promote_model(spec.tracking.registered_model, version, decision)
    get_run_logger().info("registered %s v%s; champion %s: %s", spec.tracking.registered_model,
                          version, "moved to it" if result["promoted"] else "unchanged",
                          result["reason"])
    return {"model_version": version, **result}


def decide(spec: Spec, version: str, ev: dict, mlflow_run_id: str) -> tuple[dict, dict | None]:
    """The spec's rule on this run's held-out rows, then a person's answer when it asks one."""
    rule = spec.evaluation.promotion
    baseline = ev["majority_baseline"] if rule.metric == "accuracy" else ev["majority_macro_f1"]
    decision = decide_promotion(ev["final"], ev["champion"], metric=rule.metric,
                                min_improvement=rule.min_improvement,
                                max_label_drop=rule.max_label_drop, baseline=baseline,
                                min_over_baseline=rule.min_over_baseline)
    if not (decision["promote"] and rule.require_approval):
        return decision, None
    champion = (f"champion {ev['champion'][rule.metric]:.3f}" if ev["champion"]
                else "no champion yet")
    question = (f"Promote {spec.tracking.registered_model} v{version} to champion? "
                f"{rule.metric} {ev['final'][rule.metric]:.3f} vs {champion} on {ev['n']} "
                f"held-out rows; rule: {decision['reason']}. MLflow run {mlflow_run_id}.")
    approval = ask_approval(question, timeout_s=rule.approval_timeout_minutes * 60)
    return approval.applied_to(decision), approval.as_dict()


def _skills(spec: Spec) -> str:
    """The skills this run's agents followed, as name@version (lineage of the data)."""
    names = [spec.task.skill] + (["review-examples"] if spec.llm.judge is not None else [])
    return ",".join(f"{n}@{load_skill(n).version}" for n in names)


# ── the flow ────────────────────────────────────────────────────────────────────────────────
@flow(name="post-training", log_prints=True)
def post_training(
    spec_path: str = "examples/news_topics/spec.yaml",
    out_dir: str = "runs/latest",
    only_if_new_data: bool = False,
    generator_api: Literal["openai", "anthropic"] | None = None,
    generator_model: str | None = None,
    generator_endpoint: str | None = None,
    budget_usd: float | None = None,
    max_steps: int | None = None,
) -> dict:
    """Spec -> slices -> sub-agents -> gates -> store -> curate -> tune? -> SFT -> DPO? ->
    evaluate -> approval? -> registry.

    Args:
        spec_path: The spec YAML (relative to the worker's working directory).
        out_dir: Run folder: example store, datasets, models, summary.json.
        only_if_new_data: Stop early when the warehouse is unchanged since the champion was
            trained (nightly runs).
        generator_api: Override llm.generator.api (openai or anthropic wire format).
        generator_model: Override llm.generator.model, e.g. MiniMax-M2.5.
        generator_endpoint: Override llm.generator.endpoint: a base URL, or simulated.
        budget_usd: Override llm.budget.max_usd: new LLM calls stop past this cost.
        max_steps: Override training.max_steps of the final SFT.
    """
    os.environ.update(OFFLINE_ENV)
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    out = Path(out_dir).resolve()
    spec_path = str(pin_overrides(Path(spec_path).resolve(), out, {
        "llm.generator.api": generator_api, "llm.generator.model": generator_model,
        "llm.generator.endpoint": generator_endpoint, "llm.budget.max_usd": budget_usd,
        "training.max_steps": max_steps}).resolve())
    spec = load_spec(spec_path)
    check_keys(spec)  # a missing API key is one clear error before any work starts
    out.mkdir(parents=True, exist_ok=True)
    store_url = spec.store.url or f"sqlite:///{out / 'store.db'}"
    store = shared_store(store_url)
    mlflow_uri = tracking.tracking_uri(spec.tracking.uri, out)
    mlflow.set_tracking_uri(mlflow_uri)  # also sets $MLFLOW_TRACKING_URI for subprocesses
    client = MlflowClient(mlflow_uri)
    fingerprint = data_fingerprint(spec, shared_engine(spec.warehouse.url))
    if only_if_new_data:
        unchanged = unchanged_since_champion(client, spec, fingerprint)
        if unchanged:
            print(unchanged)
            summary = {"skipped": True, "reason": unchanged, "data_fingerprint": fingerprint,
                       "model_name": spec.tracking.registered_model, "promoted": False,
                       "wall_seconds": round(time.perf_counter() - started, 2)}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            skipped = store.start_run(spec.name, spec.content_hash(), spec.model_dump_json())
            store.finish_run(skipped, "skipped", summary)
            return summary
    experiment_id = tracking.ensure_experiment(client, spec.tracking.experiment, out)
    progress = Progress.create()

    # A killed or failed run of exactly this spec in this folder is resumed, not redone.
    previous = store.resumable_run(spec.name, spec.content_hash())
    if previous:
        run_id, mlflow_run_id = previous["id"], previous["mlflow_run_id"]
        store.reopen_run(run_id)
        print(f"Resuming run {run_id[:8]}: finished slices are kept, completed LLM calls "
              f"come from the call cache.")
    else:
        run_id, mlflow_run_id = store.start_run(spec.name, spec.content_hash(),
                                                spec.model_dump_json()), None

    with ExitStack() as cleanup:
        # The LLMs: real endpoints, or posttrain's simulated teacher (always announced).
        endpoints, simulated = {}, [n for n, r in spec.llm.roles().items() if r.simulated]
        if simulated:
            server = TeacherServer(TeacherConfig(
                warehouse_url=spec.warehouse.url, table=spec.slicing.table,
                id_column=spec.slicing.id_column, gold_column=spec.task.gold_column,
                labels=spec.task.labels, knobs=spec.llm.simulated,
                request_log=str(out / "teacher_requests.jsonl"),
            ))
            base = server.start()  # http://127.0.0.1:PORT/v1
            cleanup.callback(server.stop)
            print(f"No real LLM for {', '.join(simulated)}: posttrain's SIMULATED teacher at "
                  f"{base} answers (gold labels with {spec.llm.simulated.error_rate:.0%} noise).")
        for name, role in spec.llm.roles().items():
            if role.simulated:
                endpoints[name] = base if role.api == "openai" else base.removesuffix("/v1")
            else:
                endpoints[name] = role.endpoint
        teacher_tag = ",".join(f"{n}={'simulated' if r.simulated else r.model}"
                               for n, r in spec.llm.roles().items())

        if mlflow_run_id:
            client.update_run(mlflow_run_id, status="RUNNING")
        else:
            mlflow_run_id = tracking.start_parent_run(
                client, experiment_id, run_name=f"{spec.name}-{run_id[:8]}",
                params=tracking.flatten(redact(spec.model_dump(mode="json"))),
                tags={"posttrain.run_id": run_id, "posttrain.spec_hash": spec.content_hash(),
                      "posttrain.llm": teacher_tag,
                      "posttrain.teacher": "simulated" if simulated else "real",
                      "mlflow.note.content": (
                          f"Roles played by posttrain's SIMULATED teacher: {', '.join(simulated)}."
                          if simulated else f"LLMs: {teacher_tag}.")},
            )
            store.set_mlflow_run(run_id, mlflow_run_id)
        cleanup.push(lambda exc_type, *_: _close_run(client, mlflow_run_id, store, run_id,
                                                     failed=exc_type is not None))
        settings = RuntimeSettings(spec_path, run_id, store_url, str(out),
                                   tuple(sorted(endpoints.items())))

        t = time.perf_counter()
        slices = plan(spec, store_url, run_id)
        stage_seconds["plan"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.start("generate", "sub-agents labelling rows", sum(s.row_count for s in slices))
        with sub_agent_runner(spec) as runner:  # threads here, or a Dask cluster (spec)
            agent_results = generate(slices, settings, progress.id,
                                     spec.generation.concurrency, runner=runner)
            # rows a stopped, failed or short agent left go to fresh agents
            agent_results += cover(spec, store, run_id, slices, agent_results, settings,
                                   progress.id, runner=runner)
            balance = rebalance(spec, store, run_id, slices, settings, progress.id,
                                runner=runner)
        agent_results += balance.pop("topup_results")
        progress.stop("generate")
        stage_seconds["generate"] = time.perf_counter() - t
        covered = check_coverage(spec, store, run_id, slices, agent_results, out, client,
                                 mlflow_run_id)

        t = time.perf_counter()
        dataset = curate(spec, spec_path, store_url, run_id, out, mlflow_run_id)
        stage_seconds["curate"] = time.perf_counter() - t

        tuned = None
        if spec.tuning.enabled:  # short mapped trials; the best by validation loss goes on
            t = time.perf_counter()
            tuned = tune(spec, dataset, settings, out, mlflow_uri, mlflow_run_id, progress.id)
            stage_seconds["tune"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.start("train", "training (TRL SFT via accelerate)", spec.training.max_steps)
        train_result = train(spec, dataset, out, mlflow_uri, mlflow_run_id, progress.id,
                             settings=tuned["chosen_config"] if tuned else None)
        progress.stop("train")
        stage_seconds["train"] = time.perf_counter() - t
        sft_dir = final_dir = Path(train_result["final_dir"])

        pairs = dpo = None
        if spec.dpo.enabled:  # agents write preference pairs; DPO starts from the SFT model
            t = time.perf_counter()
            pairs = write_pairs(spec, dataset, settings, store_url, run_id, out, mlflow_run_id)
            stage_seconds["pairs"] = time.perf_counter() - t
            t = time.perf_counter()
            progress.start("train", "preference training (TRL DPO via accelerate)",
                           spec.dpo.max_steps)
            dpo = train_dpo(spec, pairs, sft_dir, out, mlflow_uri, mlflow_run_id, progress.id)
            progress.stop("train")
            final_dir = Path(dpo["final_dir"])
            stage_seconds["dpo"] = time.perf_counter() - t

        t = time.perf_counter()
        ev = evaluate(spec, out, mlflow_run_id, final_dir, sft_dir)
        stage_seconds["evaluate"] = time.perf_counter() - t
        metrics = {"accuracy": ev["final"]["accuracy"], "macro_f1": ev["final"]["macro_f1"],
                   "base_accuracy": ev["base"]["accuracy"], "sft_accuracy": ev["sft"]["accuracy"],
                   **({"dpo_reward_accuracy": dpo["reward_accuracy"]} if dpo else {})}
        tracking.log_metrics(client, mlflow_run_id, metrics)

        calls = store.call_totals(run_id)
        t = time.perf_counter()
        version = register(spec, final_dir, mlflow_run_id, metrics, tags={
            "posttrain.run_id": run_id, "posttrain.spec_hash": spec.content_hash(),
            "posttrain.dataset_sha256": dataset["sha256"],
            "posttrain.data_fingerprint": fingerprint,
            **({"posttrain.pairs_sha256": pairs["sha256"]} if pairs else {}),
            "posttrain.stages": "sft+dpo" if dpo else "sft",
            "posttrain.cost_usd": f"{calls['cost_usd']:.4f}",
            "posttrain.skills": _skills(spec), "posttrain.git_commit": git_commit(),
            "posttrain.parent_run_id": mlflow_run_id,
        })
        verdict, approval = decide(spec, version, ev, mlflow_run_id)
        decision = {**promote(spec, version, verdict), "approval": approval}
        stage_seconds["promote"] = time.perf_counter() - t

        misuse: Counter = Counter()
        for r in agent_results:
            misuse.update(r.get("misuse") or {})
        summary = {
            "run_id": run_id,
            "mlflow_run_id": mlflow_run_id,
            "mlflow_tracking_uri": mlflow_uri,
            "teacher": "simulated" if simulated else "real",
            "llm": teacher_tag,
            "resumed": bool(previous),
            "skipped": False,
            "data_fingerprint": fingerprint,
            "slices": len(slices),
            "agent_processes": sorted({r["process"] for r in agent_results if r.get("process")}),
            "topup_slices": balance["topup_slices"],
            "agents_stopped": {r["slice_id"]: r["stopped_reason"] for r in agent_results
                               if r["stopped_reason"] != "completed"},
            "agents_failed": sorted(r["slice_id"] for r in agent_results
                                    if r["stopped_reason"].startswith("failed")),
            "agent_retries": sum("+retry" in r["slice_id"] for r in agent_results),
            "coverage": covered["coverage"],
            "coverage_rows": {k: covered[k] for k in ("planned_rows", "labelled_rows",
                                                      "excluded_rows", "unlabelled_rows",
                                                      "disputed_rows")},
            "coverage_by_slice": covered["slices"],
            "labels_normalised": sum(r.get("labels_normalised", 0) for r in agent_results),
            "arguments_unfenced": sum(r.get("arguments_unfenced", 0) for r in agent_results),
            "examples_accepted": sum(r["accepted"] for r in agent_results),
            "examples_rejected": store.rejection_counts(run_id),
            "tool_misuse": dict(misuse),
            "reanchors": sum(r.get("reanchors", 0) for r in agent_results),
            "drift_alarms": [{"slice_id": r["slice_id"], "at_call": r["drift_alarm_call"],
                              "time": r["drift_alarm_time"],
                              "baseline": r.get("drift_baseline")} for r in agent_results
                             if r.get("drift_alarm_call") is not None],
            "max_context_tokens": max((r.get("max_context_tokens", 0) for r in agent_results),
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
            "label_tv_after": dataset["tv_after"],
            "label_counts": dataset["label_counts"],
            "train_examples": dataset["n"],
            "duplicates_dropped": dataset["duplicates"],
            "eval_copies_dropped": dataset["eval_copies"],
            "quota_trimmed": dataset["quota_trimmed"],
            "train_loss": train_result.get("train_loss"),
            "tuning_trials": [{k: t[k] for k in ("trial", "source", "config", "eval_loss",
                                                 "status")} for t in tuned["trials"]]
            if tuned else [],
            "chosen_config": tuned["chosen_config"] if tuned else default_config(spec),
            "tuning_beats_default": tuned["beats_default"] if tuned else None,
            "dpo_pairs": {"train": pairs["n_train"], "held_out": pairs["n_eval"],
                          "rejected": pairs["rejected"]} if pairs else None,
            "dpo_reward_accuracy": dpo["reward_accuracy"] if dpo else None,
            "dpo_reward_margin": dpo["reward_margin"] if dpo else None,
            "sft_accuracy": ev["sft"]["accuracy"],
            "eval_examples": ev["n"],
            "base_accuracy": ev["base"]["accuracy"],
            "majority_baseline": round(ev["majority_baseline"], 4),
            "accuracy": ev["final"]["accuracy"],
            "macro_f1": ev["final"]["macro_f1"],
            "model_name": spec.tracking.registered_model,
            "model_version": decision["model_version"],
            "promoted": decision["promoted"],
            "previous_champion_version": decision.get("previous_champion_version"),
            "champion_accuracy": ev["champion"]["accuracy"] if ev["champion"] else None,
            "promotion_reason": decision["reason"],
            "approval": decision["approval"],
            "stage_seconds": {k: round(v, 2) for k, v in stage_seconds.items()},
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
        summary.update(outcome(summary, covered))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        store.finish_run(run_id, "completed", summary)
        tracking.log_metrics(client, mlflow_run_id, {
            "wall_seconds": summary["wall_seconds"], "cost_usd": summary["cost_usd"],
            "llm_calls": summary["llm_calls"], "cache_hits": summary["cache_hits"],
            **{f"cost_usd.{k}": v for k, v in summary["cost_by_role"].items()},
            **({"label_tv_before": balance["tv_before"]} if balance["tv_before"] is not None
               else {}),
            **({"label_tv_after": dataset["tv_after"]} if dataset["tv_after"] is not None
               else {}),
        })
        client.log_artifact(mlflow_run_id, str(out / "summary.json"))
        # Prefect artifacts (summary, slices, plots) and MLflow pages (plots, model card)
        publish_reports(spec, summary, out, client, mlflow_run_id, slices, balance,
                        train_result, dpo, tuned)
        if (out / "transcripts").is_dir():
            client.log_artifacts(mlflow_run_id, str(out / "transcripts"), "transcripts")
        if summary["warnings"]:  # the flow run's state says so too, not only the logs
            print("Completed with warnings:\n- " + "\n- ".join(summary["warnings"]))
            return Completed(data=summary, name="Completed with warnings",
                             message="; ".join(summary["warnings"])[:2000])
        return summary


def unchanged_since_champion(client: MlflowClient, spec: Spec, fingerprint: str) -> str | None:
    """Why this run can stop early (the champion was trained on exactly this warehouse data),
    or None when there is no champion or the data changed."""
    version = champion_version(spec.tracking.registered_model)
    if version is None:
        return None
    tags = client.get_model_version(spec.tracking.registered_model, str(version)).tags
    if tags.get("posttrain.data_fingerprint") != fingerprint:
        return None
    return (f"No new data since champion v{version} of {spec.tracking.registered_model} "
            f"(warehouse fingerprint {fingerprint}, rows:hash): nothing to retrain, stopping.")


def _close_run(client: MlflowClient, mlflow_run_id: str, store: Store, run_id: str,
               failed: bool) -> None:
    """Mark both records finished; a run that raised is recorded as failed, not lost."""
    client.set_terminated(mlflow_run_id, status="FAILED" if failed else "FINISHED")
    if failed:
        store.finish_run(run_id, "failed", None)
