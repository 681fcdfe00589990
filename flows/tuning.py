"""The tune stage: a few short SFT trials in parallel; the best by validation loss goes on.

    result = tune(spec, dataset, settings, out_dir, mlflow_uri, mlflow_run_id, progress_id)

1. **split**: the curated examples (never the evaluation rows: curate already dropped those)
   are cut into trial-train and validation by a hash of the prompt (`tuning.
   validation_fraction`), written to `out/tune/train.jsonl` and `out/tune/validation.jsonl`.
2. **past trials**: finished MLflow runs tagged `posttrain.stage=trial` for this spec name in
   the parent run's experiment, with their configs and eval losses; never this parent run's
   own trials, so a resumed run proposes the same trials as its killed attempt (the tuner's
   request comes from the call cache) and finds them again.
3. **propose**: trial 0 is the spec's own training config (the default). Trials 1..K-1 come
   from the tuner LLM (`llm.tuner`, agents/tuner.py, each proposal gated by `clamp_config`)
   or, with no tuner, from the seeded Optuna search (training/search.py). Places a tuner
   left empty (its call failed after the gateway's retries, or it gave too few valid
   proposals) are filled by the search, and the reason is recorded in `fill_reason`.
4. **trials**: one Prefect task per trial, `tuning.concurrency` at a time, each a real
   `launch_sft` of `tuning.max_steps` steps with `eval_file` = the validation split, logged
   as an MLflow child run of the pipeline run (tags `posttrain.stage=trial`,
   `posttrain.trial`, `posttrain.spec_name`, `posttrain.trial_config`). A failed trial is
   recorded with its error; only all of them failing stops the stage. In a resumed run a
   trial that had finished is not trained again (`training.launch` returns its stored result,
   `reused`), and one that was killed resumes from its checkpoint in its own child run.
5. **choose**: the lowest eval loss (ties go to the lower trial number, so the default wins
   a tie). Figures and the trials table go to the parent run (`tune/*` metrics,
   `tune/trials.json`, `tune/trials.md`).

A trial config holds `learning_rate`, `batch_size`, `warmup_ratio` and `lora_r`; settings
without bounds keep the spec's values. `chosen_config` is that dict for the winner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections import Counter
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.task_runners import ThreadPoolTaskRunner

from agents.skills import load_skill
from agents.tracing import AGENT, step, use
from agents.tuner import clamp_config, propose
from flows import agent_traces, train_configs
from flows.progress import Progress
from flows.runtime import RuntimeSettings, get_runtime
from flows.spec import Spec
from training.launch import launch_sft
from training.search import suggest

MAX_PAST_TRIALS = 50


# ── the data: trial-train and validation, by a hash of the prompt ──────────────────────────────
def _jsonl_lines(path: str | Path) -> list[str]:
    """The lines of a JSONL file: split at "\n" only (str.splitlines also splits at U+2028 and
    U+2029, which JSON text written with ensure_ascii=False may hold inside a string)."""
    return Path(path).read_text().split("\n")


def _hash_share(prompt: str) -> float:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64


def split_examples(path: str | Path, fraction: float, out: Path) -> dict:
    """Write out/train.jsonl and out/validation.jsonl; the same prompt always lands on the
    same side. When no prompt hashes under `fraction`, the lowest-hashing one is validation."""
    lines = [line for line in _jsonl_lines(path) if line.strip()]
    rows = [(_hash_share(json.loads(line)["prompt"]), line) for line in lines]
    validation = [r for r in rows if r[0] < fraction]
    if not validation and len(rows) > 1:
        lowest = min(r[0] for r in rows)
        validation = [r for r in rows if r[0] == lowest]
    train = [r for r in rows if r not in validation]
    if not train or not validation:
        raise RuntimeError(f"tuning: {len(rows)} curated examples are too few to split into "
                           "trial-train and validation")
    out.mkdir(parents=True, exist_ok=True)
    train_path, validation_path = out / "train.jsonl", out / "validation.jsonl"
    train_path.write_text("".join(line + "\n" for _, line in train))
    validation_path.write_text("".join(line + "\n" for _, line in validation))
    return {"train_path": str(train_path), "validation_path": str(validation_path),
            "n_train": len(train), "n_validation": len(validation),
            "validation_sha256": hashlib.sha256(validation_path.read_bytes()).hexdigest()}


def dataset_stats(path: str | Path, max_labels: int = 20) -> dict:
    """What the tuner is told about the data: size, label shares, prompt length."""
    rows = [json.loads(line) for line in _jsonl_lines(path) if line.strip()]
    labels = Counter(r["completion"].strip() for r in rows)
    n = len(rows)
    return {"n": n,
            "label_shares": {k: round(v / n, 4) for k, v in labels.most_common(max_labels)},
            "distinct_labels": len(labels),
            "mean_prompt_chars": round(sum(len(r["prompt"]) for r in rows) / n, 1) if n else 0}


# ── configs ──────────────────────────────────────────────────────────────────────────────────
def default_config(spec: Spec) -> dict:
    t = spec.training
    return {"learning_rate": t.learning_rate, "batch_size": t.batch_size,
            "warmup_ratio": t.warmup_ratio, "lora_r": t.lora.r}


def _bounds(spec: Spec) -> dict[str, tuple[float, float]]:
    return {k: (float(lo), float(hi)) for k, (lo, hi) in spec.tuning.bounds.items()}


def sft_config(spec: Spec, trial: int, config: dict, split: dict, run_dir: Path,
               mlflow_uri: str, mlflow_run_id: str) -> dict:
    """The training.sft config of one trial: the final SFT's (flows/train_configs.py) with the
    trial's settings, the short budget and the validation file."""
    return train_configs.sft_config(
        spec, train_file=split["train_path"], eval_file=split["validation_path"],
        output_dir=str(run_dir), max_steps=spec.tuning.max_steps, settings=config,
        mlflow={"tracking_uri": mlflow_uri, "parent_run_id": mlflow_run_id,
                "run_name": f"{spec.name}-trial-{trial}",
                "tags": _trial_tags(spec, trial, config)},
    )


def _trial_tags(spec: Spec, trial: int, config: dict) -> dict[str, str]:
    return {"posttrain.stage": "trial", "posttrain.trial": str(trial),
            "posttrain.spec_name": spec.name,
            "posttrain.trial_config": json.dumps(config, sort_keys=True)}


# ── past trials, from MLflow ───────────────────────────────────────────────────────────────────
def past_trials(client: MlflowClient, spec: Spec, mlflow_run_id: str) -> list[dict]:
    """Finished trial runs of this spec name in the parent run's experiment, oldest first:
    `[{"config", "eval_loss", "mlflow_run_id"}]` (runs without a config or a finite eval loss
    are left out, and so are the parent run's own: a resumed run is told what its killed
    attempt was told)."""
    experiment_id = client.get_run(mlflow_run_id).info.experiment_id
    name = spec.name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=("tags.`posttrain.stage` = 'trial' AND "
                       f"tags.`posttrain.spec_name` = '{name}' AND attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=MAX_PAST_TRIALS,
    )
    out = []
    for run in reversed(runs):
        if run.data.tags.get("mlflow.parentRunId") == mlflow_run_id:
            continue  # this run's own trial, finished before a kill: not a past one
        loss = run.data.metrics.get("result/eval_loss", run.data.metrics.get("eval_loss"))
        try:
            config = json.loads(run.data.tags.get("posttrain.trial_config") or "null")
        except json.JSONDecodeError:
            config = None
        if isinstance(config, dict) and isinstance(loss, int | float) and math.isfinite(loss):
            out.append({"config": config, "eval_loss": float(loss),
                        "mlflow_run_id": run.info.run_id})
    return out


# ── proposing ──────────────────────────────────────────────────────────────────────────────────
@task(name="propose-trials", cache_policy=NO_CACHE)
def propose_trials(spec: Spec, settings: RuntimeSettings | None, stats: dict,
                   past: list[dict]) -> dict:
    """K-1 trial configs (settings in the bounds; the rest from the spec), each with its
    source: the tuner LLM when `llm.tuner` is set, the seeded search for the rest."""
    k = spec.tuning.trials - 1
    bounds = _bounds(spec)
    default = default_config(spec)
    seen = [{n: default[n] for n in bounds}]
    chosen: list[dict] = []
    notes: list[dict] = []
    fill_reason = None
    if k > 0 and spec.llm.tuner is not None:
        role = spec.llm.tuner
        # one MLflow trace `tuner` in the run's Traces tab: its LLM call, the proposals
        tracer = agent_traces.run_tracer(spec, settings, agent="tuner")
        try:
            with use(tracer), step(tracer, "tuner", AGENT, inputs={
                    "k": k, "bounds": bounds, "stats": stats, "past_trials": past}) as span:
                answers = propose(get_runtime(settings).gateways["tuner"], role.model,
                                  load_skill("propose-training-config"), k, bounds, stats,
                                  past, seen=seen, temperature=role.temperature,
                                  max_tokens=role.max_tokens)
                span.outputs = {"proposals": answers}
                span.attributes = {"kept": sum(a["config"] is not None for a in answers)}
        except Exception as e:  # noqa: BLE001 - any failure after the gateway's retries
            answers = []
            fill_reason = f"tuner call failed: {e.__class__.__name__}: {str(e)[:300]}"
        for a in answers:
            if a["config"] is not None:
                chosen.append({"config": a["config"], "source": "tuner", "clamped": a["notes"]})
            else:
                notes.append({"proposal": a["proposal"], "notes": a["notes"]})
        if fill_reason is None and len(chosen) < k:
            fill_reason = (f"tuner gave {len(chosen)} valid proposals of {k} "
                           f"({len(notes)} rejected)")
    missing = k - len(chosen)
    if missing > 0:
        exclude = seen + [c["config"] for c in chosen]
        for config in suggest(missing, bounds, past, seed=spec.tuning.seed, exclude=exclude):
            gated, why = clamp_config(config, bounds, seen=exclude)
            if gated is not None:
                exclude.append(gated)
                chosen.append({"config": gated, "source": "search", "clamped": why})
    if len(chosen) < k:
        fill_reason = ((fill_reason + "; ") if fill_reason else "") + (
            f"only {len(chosen)} distinct configs in the bounds besides the default")
    configs = [{"config": {**default, **c["config"]}, "source": c["source"],
                **({"clamped": c["clamped"]} if c["clamped"] else {})} for c in chosen]
    if fill_reason:
        _logger().warning("tuning: %s; the search filled the rest", fill_reason)
    return {"configs": configs, "rejected": notes, "fill_reason": fill_reason}


# ── one trial ──────────────────────────────────────────────────────────────────────────────────
@task(name="tune-trial", cache_policy=NO_CACHE, task_run_name="trial {trial}")
def run_trial(spec: Spec, trial: int, config: dict, split: dict, out_dir: Path,
              mlflow_uri: str, mlflow_run_id: str, progress_id: str) -> dict:
    """One short SFT run on the trial-train split; its eval loss on the validation split."""
    run_dir = out_dir / "tune" / f"trial-{trial}"
    result = launch_sft(sft_config(spec, trial, config, split, run_dir, mlflow_uri,
                                   mlflow_run_id), run_dir,
                        profile=spec.training.accelerate_profile)
    if result.get("mlflow_run_id"):  # the tags, whether or not training.sft applied them
        client = MlflowClient(mlflow_uri)
        for key, value in _trial_tags(spec, trial, config).items():
            client.set_tag(result["mlflow_run_id"], key, value)
    Progress.get(progress_id).advance("tune", note=f"trial {trial}: eval loss "
                                      f"{result.get('eval_loss') or float('nan'):.3f}")
    how = ("reused: it had finished before the run was resumed" if result.get("reused") else
           f"resumed from step {result['resumed_from_step']}"
           if result.get("resumed_from_step") else "trained")
    get_run_logger().info("trial %d %s: eval loss %s (%s)", trial, config,
                          result.get("eval_loss"), how)
    return {"eval_loss": result.get("eval_loss"), "mlflow_run_id": result.get("mlflow_run_id"),
            "train_loss": result.get("train_loss"), "steps": result.get("steps"),
            "reused": bool(result.get("reused")),
            "resumed_from_step": result.get("resumed_from_step") or 0}


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow or task run (tests, a notebook)
        return logging.getLogger(__name__)


# ── the stage ──────────────────────────────────────────────────────────────────────────────────
def tune(spec: Spec, dataset: dict, settings: RuntimeSettings, out_dir: Path, mlflow_uri: str,
         mlflow_run_id: str, progress_id: str) -> dict:
    """Split, propose, run the trials (mapped, `tuning.concurrency` at once), choose, log.
    Call it from a flow. Raises RuntimeError only when every trial failed."""
    out_dir = Path(out_dir)
    split = split_examples(dataset["path"], spec.tuning.validation_fraction, out_dir / "tune")
    stats = {**dataset_stats(dataset["path"]), "n_trial_train": split["n_train"],
             "n_validation": split["n_validation"], "max_steps_per_trial": spec.tuning.max_steps}
    client = MlflowClient(mlflow_uri)
    past = past_trials(client, spec, mlflow_run_id)
    proposed = propose_trials(spec, settings if spec.llm.tuner is not None else None, stats,
                              past)
    trials = [{"trial": 0, "source": "default", "config": default_config(spec)}]
    trials += [{"trial": i, **c} for i, c in enumerate(proposed["configs"], start=1)]

    progress = Progress.get(progress_id)
    progress.start("tune", f"tuning: {len(trials)} trials of {spec.tuning.max_steps} steps",
                   len(trials))
    try:
        with ThreadPoolTaskRunner(max_workers=spec.tuning.concurrency) as runner:
            futures = runner.map(run_trial, {
                "spec": unmapped(spec), "trial": [t["trial"] for t in trials],
                "config": [t["config"] for t in trials], "split": unmapped(split),
                "out_dir": unmapped(out_dir), "mlflow_uri": unmapped(mlflow_uri),
                "mlflow_run_id": unmapped(mlflow_run_id), "progress_id": unmapped(progress_id)})
            outcomes = [f.result(raise_on_failure=False) for f in futures]
    finally:
        progress.stop("tune")
    for t, outcome in zip(trials, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            reason = getattr(outcome, "reason", None) or f"{outcome.__class__.__name__}: {outcome}"
            t.update(status="failed", error=str(reason)[:500], eval_loss=None,
                     mlflow_run_id=None)
        elif not isinstance(outcome.get("eval_loss"), int | float) or not math.isfinite(
                outcome["eval_loss"]):
            t.update(status="failed", error="no finite eval loss", eval_loss=None,
                     mlflow_run_id=outcome.get("mlflow_run_id"))
        else:
            t.update(status="ok", eval_loss=float(outcome["eval_loss"]),
                     mlflow_run_id=outcome.get("mlflow_run_id"),
                     reused=bool(outcome.get("reused")))  # finished before a resume
    ok = [t for t in trials if t["status"] == "ok"]
    if not ok:
        raise RuntimeError("tuning: every trial failed; first error: " + trials[0]["error"])
    best = min(ok, key=lambda t: (t["eval_loss"], t["trial"]))
    default_loss = trials[0]["eval_loss"]
    result = {
        "trials": trials,
        "chosen_trial": best["trial"],
        "chosen_config": dict(best["config"]),
        "default_eval_loss": default_loss,
        "best_eval_loss": best["eval_loss"],
        "beats_default": best["trial"] != 0 and (default_loss is None
                                                 or best["eval_loss"] < default_loss),
        "proposer": "tuner" if spec.llm.tuner is not None else "search",
        "fill_reason": proposed["fill_reason"],
        "rejected_proposals": proposed["rejected"],
        "past_trials": len(past),
        "past_trial_run_ids": [p["mlflow_run_id"] for p in past],
        "stats": stats,
        "validation_path": split["validation_path"],
        "train_path": split["train_path"],
        "n_validation": split["n_validation"],
        "n_train": split["n_train"],
    }
    _log(client, mlflow_run_id, result, out_dir / "tune")
    get_run_logger().info(
        "tuning: %d/%d trials ok; best trial %d (%s) eval loss %.4f vs default %s; %s",
        len(ok), len(trials), best["trial"], best["source"], best["eval_loss"],
        "failed" if default_loss is None else f"{default_loss:.4f}",
        "chosen beats the default" if result["beats_default"] else "the default stays")
    return result


def _log(client: MlflowClient, run_id: str, result: dict, folder: Path) -> None:
    """Tuning figures on the parent run: tune/* metrics, the trials as a table and markdown."""
    metrics = {"tune/best_eval_loss": result["best_eval_loss"],
               "tune/trials": len(result["trials"]),
               "tune/trials_failed": sum(t["status"] != "ok" for t in result["trials"]),
               "tune/beats_default": float(result["beats_default"]),
               "tune/past_trials": result["past_trials"]}
    if result["default_eval_loss"] is not None:
        metrics["tune/default_eval_loss"] = result["default_eval_loss"]
    for name, value in metrics.items():
        client.log_metric(run_id, name, float(value))
    with warnings.catch_warnings():  # mlflow's own pandas dtype check warns under pandas 3
        warnings.simplefilter("ignore")
        client.log_table(run_id, data=_table(result), artifact_file="tune/trials.json")
    names = sorted(result["chosen_config"])
    rows = result["trials"]
    lines = ["| trial | source | " + " | ".join(names) + " | eval loss | status |",
             "|" + "---|" * (len(names) + 4)]
    for t in rows:
        loss = "" if t["eval_loss"] is None else f"{t['eval_loss']:.4f}"
        mark = " **chosen**" if t["trial"] == result["chosen_trial"] else ""
        lines.append(f"| {t['trial']}{mark} | {t['source']} | "
                     + " | ".join(f"{t['config'][n]:g}" for n in names)
                     + f" | {loss} | {t['status']} |")
    lines += ["", f"Default eval loss {result['default_eval_loss']}, best "
              f"{result['best_eval_loss']}: "
              + ("the chosen config beats the default." if result["beats_default"]
                 else "the default config stays."),
              f"Proposer: {result['proposer']}; past trials told: {result['past_trials']}."]
    if result["fill_reason"]:
        lines.append(f"Filled by the search: {result['fill_reason']}.")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trials.md").write_text("\n".join(lines) + "\n")
    (folder / "result.json").write_text(json.dumps(result, indent=2, default=str))
    client.log_artifact(run_id, str(folder / "trials.md"), "tune")


def _table(result: dict) -> dict[str, list]:
    names, rows = sorted(result["chosen_config"]), result["trials"]
    return {
        "trial": [t["trial"] for t in rows], "source": [t["source"] for t in rows],
        **{n: [t["config"][n] for t in rows] for n in names},
        "eval_loss": [t["eval_loss"] for t in rows], "status": [t["status"] for t in rows],
        "mlflow_run_id": [t["mlflow_run_id"] for t in rows],
        "notes": ["; ".join(t.get("clamped", [])) or t.get("error", "") for t in rows],
    }
