"""The post-training flow, read top to bottom.

    spec ─> plan slices ─map─> one sub-agent per slice ─> gates ─> example store
      registry <─ promote? <─ evaluate <─ train (TRL SFT via Accelerate) <─ curate

Each stage is a Prefect task wrapping a plain function from its room (`flows/` for data,
`agents/` for the sub-agents, `training/` for learning). Prefect state carries only small
descriptors (slice queries, file paths, figures), never rows. Everything a run produces
lives under its out folder: the example store, the curated dataset, the models, logs and
summary.json; MLflow holds the parent run, the training child run and the registry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from agents.gates import Gate
from agents.loop import run_agent
from agents.providers import make_openai_client
from agents.skills import load_skill
from agents.sql_tool import ScopedTable, SQLTool
from agents.teacher import TeacherConfig, TeacherServer
from flows import tracking
from flows.progress import Progress
from flows.spec import Spec, load_spec
from flows.store import Store
from flows.warehouse import (
    SliceDescriptor,
    fetch_eval_rows,
    fetch_slice_row,
    make_engine,
    plan_slices,
    render_completion,
    render_prompt,
)
from training.evaluate import evaluate_classifier
from training.launch import launch_sft
from training.registry import promote_if_better, register_model

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


@functools.cache
def _store(url: str) -> Store:
    """One store (one connection pool) per process, shared by the agent threads."""
    return Store(url)


@functools.cache
def _engine(url: str):
    return make_engine(url)


@dataclass(frozen=True)
class AgentSettings:
    """What every sub-agent task needs, small and picklable (no clients, no engines)."""

    spec_path: str
    run_id: str
    store_url: str
    base_url: str | None
    api_key_env: str
    progress_id: str


# ── 1. plan ─────────────────────────────────────────────────────────────────────────────────
@task(name="plan-slices", cache_policy=NO_CACHE)
def plan(spec: Spec, store_url: str, run_id: str) -> list[SliceDescriptor]:
    slices = plan_slices(spec, _engine(spec.warehouse.url))
    _store(store_url).add_slices(run_id, slices)
    get_run_logger().info(
        "%d slices, %d rows: %s", len(slices), sum(s.row_count for s in slices),
        ", ".join(f"{s.slice_id}({s.row_count})" for s in slices),
    )
    return slices


# ── 2. generate: one sub-agent per slice ────────────────────────────────────────────────────
@task(name="generate-slice", cache_policy=NO_CACHE, task_run_name="agent {descriptor.slice_id}")
def generate_slice(descriptor: SliceDescriptor, settings: AgentSettings) -> dict:
    spec = load_spec(settings.spec_path)
    store = _store(settings.store_url)
    engine = _engine(spec.warehouse.url)
    agent = f"labeler/{descriptor.slice_id}"
    progress = Progress.get(settings.progress_id)
    store.update_slice(settings.run_id, descriptor.slice_id, status="running", agent=agent)

    def row_lookup(row_id):
        return fetch_slice_row(engine, descriptor, row_id)

    def on_example(event: dict) -> None:
        row = event.get("row") or {}
        prompt = render_prompt(spec, row) if row else ""
        completion = render_completion(spec, event["label"]) if event.get("label") else ""
        store.add_example(
            run_id=settings.run_id, slice_id=descriptor.slice_id, row_id=str(event["row_id"]),
            prompt=prompt, completion=completion,
            label=None if event.get("label") is None else str(event["label"]),
            status=event["status"], reason=event.get("reason"), agent=agent,
            model=spec.teacher.model,
        )
        if event["status"] == "accepted":
            progress.advance("generate")

    def on_call(call: dict) -> None:
        store.record_call(run_id=settings.run_id, slice_id=descriptor.slice_id, agent=agent, **call)

    client = make_openai_client(settings.base_url, os.environ.get(settings.api_key_env, ""))
    result = run_agent(
        client,
        model=spec.teacher.model,
        temperature=spec.teacher.temperature,
        skill=load_skill(spec.task.skill),
        task={
            "slice_id": descriptor.slice_id, "table": descriptor.table,
            "columns": descriptor.columns, "id_column": descriptor.id_column,
            "rows": descriptor.row_count, "labels": spec.task.labels,
            "page_size": spec.generation.page_size, "description": spec.task.description,
        },
        sql_tool=SQLTool(engine, ScopedTable(
            name=descriptor.table, columns=descriptor.columns, source_sql=descriptor.sql,
            params=descriptor.params, id_column=descriptor.id_column,
        ), row_limit=spec.generation.sql_row_limit),
        gate=Gate(spec.task.labels),
        row_lookup=row_lookup,
        on_example=on_example,
        on_call=on_call,
        max_turns=spec.generation.max_turns,
        agent_name=agent,
    )
    rejected = sum(result.rejected.values())
    store.update_slice(
        settings.run_id, descriptor.slice_id, status="done", accepted=result.accepted,
        rejected=rejected, stopped_reason=result.stopped_reason,
    )
    get_run_logger().info(
        "%s: %d accepted, %d rejected %s, %d calls, stopped: %s", descriptor.slice_id,
        result.accepted, rejected, dict(result.rejected), result.calls, result.stopped_reason,
    )
    return {"slice_id": descriptor.slice_id, "accepted": result.accepted,
            "rejected": rejected, "stopped_reason": result.stopped_reason}


# ── 3. curate ───────────────────────────────────────────────────────────────────────────────
@task(name="curate", cache_policy=NO_CACHE)
def curate(spec: Spec, store_url: str, run_id: str, out_dir: Path, mlflow_run_id: str) -> dict:
    """Exact dedup, drop anything identical to a held-out prompt, write the JSONL, log it."""
    examples = _store(store_url).accepted_examples(run_id)
    held_out = {render_prompt(spec, r) for r in fetch_eval_rows(spec, _engine(spec.warehouse.url))}
    seen: set[str] = set()
    kept, duplicates, leaks = [], 0, 0
    for ex in sorted(examples, key=lambda e: (e["slice_id"], e["row_id"])):
        if ex["content_hash"] in seen:  # the same prompt and completion twice
            duplicates += 1
        elif ex["prompt"] in held_out:  # a copy of an evaluation row would inflate accuracy
            leaks += 1
        else:
            kept.append({"prompt": ex["prompt"], "completion": ex["completion"]})
        seen.add(ex["content_hash"])
    if not kept:
        raise RuntimeError("no accepted examples to train on: see the rejections in the store")
    path = out_dir / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    tracking.log_train_dataset(mlflow_run_id, path, digest[:16], name=f"{spec.name}-train")
    get_run_logger().info("curated %d examples (%d duplicates, %d copies of held-out rows "
                          "dropped), sha256 %s", len(kept), duplicates, leaks, digest[:16])
    return {"path": str(path), "n": len(kept), "duplicates": duplicates,
            "eval_copies": leaks, "sha256": digest}


# ── 4. train ────────────────────────────────────────────────────────────────────────────────
@task(name="train-sft", cache_policy=NO_CACHE)
def train(spec: Spec, dataset: dict, out_dir: Path, mlflow_uri: str, mlflow_run_id: str,
          progress_id: str) -> dict:
    progress = Progress.get(progress_id)
    t = spec.training
    config = {
        "train_file": dataset["path"],
        "output_dir": str(out_dir / "model"),
        "tiny": spec.student.tiny.model_dump(),
        "seed": spec.student.seed,
        "max_steps": t.max_steps,
        "learning_rate": t.learning_rate,
        "batch_size": t.batch_size,
        "lr_scheduler": t.lr_scheduler,
        "warmup_ratio": t.warmup_ratio,
        "max_length": t.max_length,
        "threads": t.threads,
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": spec.tracking.experiment,
                   "parent_run_id": mlflow_run_id, "run_name": f"{spec.name}-sft"},
    }
    return launch_sft(config, out_dir / "model", profile=t.accelerate_profile,
                      on_line=progress.training_line)


# ── 5. evaluate ─────────────────────────────────────────────────────────────────────────────
@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(spec: Spec, out_dir: Path) -> dict:
    rows = fetch_eval_rows(spec, _engine(spec.warehouse.url))
    prompts = [render_prompt(spec, r) for r in rows]
    gold = [str(r[spec.task.gold_column]) for r in rows]
    kw = {"labels": spec.task.labels, "max_new_tokens": spec.evaluation.max_new_tokens}
    base = evaluate_classifier(str(out_dir / "model" / "base"), prompts, gold, **kw)
    final = evaluate_classifier(str(out_dir / "model" / "final"), prompts, gold, **kw)
    # context for the base model's figure: always answering the commonest gold label
    majority = max(Counter(gold).values()) / len(gold) if gold else 0.0
    (out_dir / "eval.json").write_text(json.dumps({"base": base, "final": final,
                                                   "majority_baseline": majority}, indent=2))
    get_run_logger().info("held-out accuracy: base %.3f -> trained %.3f (macro-F1 %.3f) on %d rows",
                          base["accuracy"], final["accuracy"], final["macro_f1"], len(rows))
    return {"n": len(rows), "base": base, "final": final, "majority_baseline": majority}


# ── 6. promote ──────────────────────────────────────────────────────────────────────────────
@task(name="register-and-promote", cache_policy=NO_CACHE)
def promote(spec: Spec, out_dir: Path, mlflow_run_id: str, metrics: dict, tags: dict) -> dict:
    rule = spec.evaluation.promotion
    version = register_model(str(out_dir / "model" / "final"), mlflow_run_id,
                             spec.tracking.registered_model, metrics=metrics, tags=tags)
    decision = promote_if_better(spec.tracking.registered_model, version, rule.metric,
                                 metrics[rule.metric], rule.min_improvement)
    get_run_logger().info("registered %s v%s; champion %s", spec.tracking.registered_model,
                          version, "moved to it" if decision["promoted"] else "unchanged")
    return {"model_version": version, **decision}


# ── the flow ────────────────────────────────────────────────────────────────────────────────
@flow(name="post-training", log_prints=True)
def post_training(spec_path: str, out_dir: str = "runs/latest") -> dict:
    """Spec -> slices -> sub-agents -> gates -> store -> curate -> SFT -> evaluate -> registry."""
    os.environ.update(OFFLINE_ENV)
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    spec = load_spec(spec_path)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store_url = spec.store.url or f"sqlite:///{out / 'store.db'}"
    store = _store(store_url)
    run_id = store.start_run(spec.name, spec.content_hash(), spec.model_dump_json())
    progress = Progress.create()

    mlflow_uri = tracking.tracking_uri(spec.tracking.uri, out)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    client = MlflowClient(mlflow_uri)
    experiment_id = tracking.ensure_experiment(client, spec.tracking.experiment, out)

    with ExitStack() as cleanup:
        # The teacher: a real endpoint, or posttrain's simulated one (always announced).
        base_url = spec.teacher.base_url
        simulated = spec.teacher.provider == "simulated"
        if simulated:
            server = TeacherServer(TeacherConfig(
                warehouse_url=spec.warehouse.url, table=spec.slicing.table,
                id_column=spec.slicing.id_column, gold_column=spec.task.gold_column,
                labels=spec.task.labels, error_rate=spec.teacher.error_rate,
                off_spec_rate=spec.teacher.off_spec_rate, seed=spec.teacher.seed,
                request_log=str(out / "teacher_requests.jsonl"),
            ))
            base_url = server.start()
            cleanup.callback(server.stop)
            os.environ.setdefault(spec.teacher.api_key_env, "simulated-teacher-key")
            print(f"No LLM provider configured: labels come from posttrain's SIMULATED teacher "
                  f"at {base_url} (gold labels with {spec.teacher.error_rate:.0%} noise).")
        elif not os.environ.get(spec.teacher.api_key_env):
            raise RuntimeError(f"teacher.api_key_env: ${spec.teacher.api_key_env} is not set")

        mlflow_run_id = tracking.start_parent_run(
            client, experiment_id, run_name=f"{spec.name}-{run_id[:8]}",
            params=tracking.flatten(spec.model_dump(mode="json")),
            tags={"posttrain.run_id": run_id, "posttrain.spec_hash": spec.content_hash(),
                  "posttrain.teacher": "simulated" if simulated else spec.teacher.provider,
                  "mlflow.note.content": (
                      "Labels written by posttrain's SIMULATED teacher (gold labels + noise)."
                      if simulated else f"Labels written by {spec.teacher.model}.")},
        )
        store.set_mlflow_run(run_id, mlflow_run_id)
        cleanup.push(lambda exc_type, *_: _close_run(client, mlflow_run_id, store, run_id,
                                                     failed=exc_type is not None))

        t = time.perf_counter()
        slices = plan(spec, store_url, run_id)
        stage_seconds["plan"] = time.perf_counter() - t

        t = time.perf_counter()
        settings = AgentSettings(str(Path(spec_path).resolve()), run_id, store_url, base_url,
                                 spec.teacher.api_key_env, progress.id)
        progress.start("generate", "sub-agents labelling rows", sum(s.row_count for s in slices))
        with ThreadPoolTaskRunner(max_workers=spec.generation.concurrency) as runner:
            futures = runner.map(generate_slice, {"descriptor": slices,
                                                  "settings": unmapped(settings)})
            agent_results = [f.result() for f in futures]
        progress.stop("generate")
        stage_seconds["generate"] = time.perf_counter() - t

        t = time.perf_counter()
        dataset = curate(spec, store_url, run_id, out, mlflow_run_id)
        stage_seconds["curate"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.start("train", "training (TRL SFT via accelerate)", spec.training.max_steps)
        train_result = train(spec, dataset, out, mlflow_uri, mlflow_run_id, progress.id)
        progress.stop("train")
        stage_seconds["train"] = time.perf_counter() - t

        t = time.perf_counter()
        ev = evaluate(spec, out)
        stage_seconds["evaluate"] = time.perf_counter() - t
        metrics = {"accuracy": ev["final"]["accuracy"], "macro_f1": ev["final"]["macro_f1"],
                   "base_accuracy": ev["base"]["accuracy"]}
        tracking.log_metrics(client, mlflow_run_id, metrics)

        t = time.perf_counter()
        decision = promote(spec, out, mlflow_run_id, metrics, tags={
            "posttrain.run_id": run_id, "posttrain.spec_hash": spec.content_hash(),
            "posttrain.dataset_sha256": dataset["sha256"],
        })
        stage_seconds["promote"] = time.perf_counter() - t

        calls = store.call_totals(run_id)
        rejected = store.rejection_counts(run_id)
        summary = {
            "run_id": run_id,
            "mlflow_run_id": mlflow_run_id,
            "mlflow_tracking_uri": mlflow_uri,
            "teacher": "simulated" if simulated else spec.teacher.provider,
            "slices": len(slices),
            "agents_stopped": {r["slice_id"]: r["stopped_reason"] for r in agent_results
                               if r["stopped_reason"] != "completed"},
            "examples_accepted": sum(r["accepted"] for r in agent_results),
            "examples_rejected": rejected,
            "llm_calls": calls["calls"],
            "input_tokens": calls["input_tokens"],
            "output_tokens": calls["output_tokens"],
            "train_examples": dataset["n"],
            "duplicates_dropped": dataset["duplicates"],
            "eval_copies_dropped": dataset["eval_copies"],
            "train_loss": train_result.get("train_loss"),
            "eval_examples": ev["n"],
            "base_accuracy": ev["base"]["accuracy"],
            "majority_baseline": round(ev["majority_baseline"], 4),
            "accuracy": ev["final"]["accuracy"],
            "macro_f1": ev["final"]["macro_f1"],
            "model_name": spec.tracking.registered_model,
            "model_version": decision["model_version"],
            "promoted": decision["promoted"],
            "previous_champion_version": decision.get("previous_champion_version"),
            "stage_seconds": {k: round(v, 2) for k, v in stage_seconds.items()},
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        store.finish_run(run_id, "completed", summary)
        tracking.log_metrics(client, mlflow_run_id, {"wall_seconds": summary["wall_seconds"]})
        client.log_artifact(mlflow_run_id, str(out / "summary.json"))
        return summary


def _close_run(client: MlflowClient, mlflow_run_id: str, store: Store, run_id: str,
               failed: bool) -> None:
    """Mark both records finished; a run that raised is recorded as failed, not lost."""
    client.set_terminated(mlflow_run_id, status="FAILED" if failed else "FINISHED")
    if failed:
        store.finish_run(run_id, "failed", None)
