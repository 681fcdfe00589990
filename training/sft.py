"""Supervised fine-tuning of the student causal LM with TRL, the script Accelerate launches.

    accelerate launch --config_file training/accelerate/cpu.yaml \\
        -m training.sft --config RUN_DIR/sft_config.json

The JSON config (written by `training.launch.launch_sft`) holds:
    train_file      JSONL of {"prompt", "completion"}
    eval_file       optional JSONL of the same shape: eval loss is reported at the end
    output_dir      gets base/ (the untrained model), final/ (the trained one),
                    adapter/ (LoRA only: the adapter alone), train_result.json, done.json
                    (written last: the job finished), and while it trains checkpoints/
    model           optional {source: tiny | pretrained, name_or_path}: see
                    training.model_source (default tiny)
    tiny            {architecture, hidden_size, num_layers, num_heads, num_kv_heads,
                     intermediate_size, max_position_embeddings, vocab_size}
    seed, max_steps, learning_rate, batch_size, lr_scheduler, warmup_ratio, max_length,
    threads, logging_steps (optional)
    batch_size      PER DEVICE (per process): one optimizer step sees
                    batch_size x gradient_accumulation_steps x processes examples
    gradient_accumulation_steps   optional, default 1
    processes       optional, read by training.launch for the cpu_ddp profile (default 2)
    lora            optional {r, alpha, dropout, target_modules}: r > 0 trains a peft LoRA
                    adapter (logged to MLflow alone; final/ holds the merged model)
    packing         optional bool: pack examples into max_length rows, padding-free (BFD)
    bf16            optional auto | on | off (auto: on a GPU that supports bf16)
    gradient_checkpointing  optional bool
    liger           optional auto | on | off (auto: when liger-kernel is installed, on GPU)
    mlflow          optional {tracking_uri, experiment, parent_run_id, run_name, tags}: the run
                    is logged as a child of parent_run_id (rank 0 only); tags are added to it
    save_steps      optional: a checkpoint every that many steps (default max(1, max_steps //
                    10); 0: none, so no resume); save_total_limit (default 2) are kept
    keep_checkpoints  optional bool: keep checkpoints/ after the job finished (default: removed
                    once final/, the result and done.json are written)
    fingerprint     written by training.launch (`job_fingerprint`); computed here when absent

Crash safety: checkpoints go to output_dir/checkpoints/ with job.json (the fingerprint and the
MLflow child run). A new start of the same job (same fingerprint) resumes from the last
complete checkpoint (`[resume] SFT resumes from checkpoint-40 (step 40 of 100)`) and logs
into the same child run; checkpoints of another config or data are cleared (their child run
marked KILLED). final/ is written as final.partial/ and renamed; done.json comes last.
The result holds `resumed_from_step` (0: a fresh start).

Progress goes to stdout as lines `[progress] {"step": .., "max_steps": .., "loss": ..}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import PartialState
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import TrainOutput
from trl import SFTConfig, SFTTrainer

from training.launch import (
    CHECKPOINTS,
    DONE,
    PROGRESS_PREFIX,
    RESUME_PREFIX,
    STAGES,
    job_fingerprint,
    write_json_atomic,
)
from training.model_source import load_student

JOB = "job.json"  # beside the checkpoints: the fingerprint they were made under, the child run
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class ProgressPrinter(TrainerCallback):
    """One parseable stdout line per logging step, for the launcher's progress feed."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = {"step": state.global_step, "max_steps": state.max_steps}
            line.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
            print(PROGRESS_PREFIX + json.dumps(line), flush=True)


def read_examples(path: str) -> Dataset:
    """A JSONL file of {"prompt", "completion"} as a Dataset (no datasets cache involved)."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                example = {k: row.get(k) for k in ("prompt", "completion")}
                if not all(isinstance(v, str) for v in example.values()):
                    raise ValueError(f"{path}:{n}: needs string fields prompt and completion")
                rows.append(example)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return Dataset.from_list(rows)


def no_activation_checkpointing(on: bool = False) -> dict:
    """Checkpointing off unless asked (TRL defaults it on); transformers 5.24 renamed the field."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    new = "activation_checkpointing"
    return {new if new in names else "gradient_checkpointing": on}


def use_bf16(setting: str | bool | None) -> bool:
    """bf16 mixed precision for `setting` auto | on | off on this machine."""
    supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting in (True, "on"):
        if not supported:
            raise SystemExit("training.bf16: on needs a CUDA GPU with bf16 support; "
                             "none here: use auto or off")
        return True
    return bool(supported and setting in (None, "auto"))


def use_liger(setting: str | bool | None) -> bool:
    """Liger kernels for `setting` auto | on | off: auto = installed and on a GPU."""
    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting in (True, "on"):
        if not installed:
            raise SystemExit("training.liger: on needs `pip install liger-kernel` (GPU only); "
                             "use auto or off")
        return True
    return bool(installed and torch.cuda.is_available() and setting in (None, "auto"))


def lora_config(lora: dict | None):
    """A peft LoraConfig when `lora.r` > 0, else None (every weight trains)."""
    if not lora or not int(lora.get("r") or 0):
        return None
    from peft import LoraConfig

    return LoraConfig(r=int(lora["r"]), lora_alpha=int(lora.get("alpha", 32)),
                      lora_dropout=float(lora.get("dropout", 0.05)),
                      target_modules=lora.get("target_modules") or "all-linear",
                      task_type="CAUSAL_LM")


def prepare_process(cfg: dict) -> None:
    """The same start for every training script: torch threads, the seed, no progress bars."""
    torch.set_num_threads(int(cfg.get("threads", 1)))
    set_seed(int(cfg.get("seed", 0)))
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def save_steps(cfg: dict) -> int:
    """Steps between checkpoints: the config's `save_steps`, else a tenth of max_steps (at
    least 1); 0 means no checkpoints."""
    value = cfg.get("save_steps")
    return max(1, int(cfg["max_steps"]) // 10) if value is None else int(value)


def common_args(cfg: dict, out: Path, stage: str, warmup_ratio: float = 0.0) -> dict:
    """The TrainingArguments both TRL configs (SFTConfig, DPOConfig) take from the JSON
    config: TRL's GPU-minded defaults overridden. `warmup_ratio` is the stage's default."""
    max_steps = int(cfg["max_steps"])
    mlflow_cfg = cfg.get("mlflow") or None
    every = save_steps(cfg)
    return dict(
        output_dir=str(out / CHECKPOINTS),
        max_steps=max_steps,
        learning_rate=float(cfg["learning_rate"]),
        per_device_train_batch_size=int(cfg["batch_size"]),  # per process, see docstring
        gradient_accumulation_steps=int(cfg.get("gradient_accumulation_steps") or 1),
        lr_scheduler_type=cfg.get("lr_scheduler", "cosine"),
        warmup_steps=round(float(cfg.get("warmup_ratio", warmup_ratio)) * max_steps),
        seed=int(cfg.get("seed", 0)),
        data_seed=int(cfg.get("seed", 0)),
        # bf16 only where the machine has it (TRL defaults it on); the device from the profile
        bf16=use_bf16(cfg.get("bf16")),
        use_cpu=not torch.cuda.is_available(),
        **no_activation_checkpointing(bool(cfg.get("gradient_checkpointing"))),
        logging_steps=int(cfg.get("logging_steps") or max(1, min(10, max_steps // 10))),
        # a checkpoint every `every` steps and at the last one (the Trainer's own rule), the
        # newest `save_total_limit` kept: what a killed job resumes from (see `prepare_resume`)
        save_strategy="steps" if every > 0 else "no",
        **({"save_steps": every, "save_total_limit": int(cfg.get("save_total_limit") or 2)}
           if every > 0 else {}),
        eval_strategy="no",
        report_to=["mlflow"] if mlflow_cfg else "none",
        run_name=(mlflow_cfg or {}).get("run_name") or stage,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every parameter is used; skips a graph walk
    )


def start_child_run(cfg: dict, stage: str = "sft", resume_run_id: str | None = None):
    """Start (on rank 0) the MLflow run the Trainer's MLflowCallback will log into, tagged
    `posttrain.stage` = `stage` (the config's tags win).

    An already active run makes the callback log there and leave ending it to us. The run is
    created under `parent_run_id` (in the parent's experiment) when one is given.
    `resume_run_id` (the child run of a killed attempt of this same job) is reopened instead,
    so a resumed job keeps one child run; a new one is started only when it is gone."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # A stale MLFLOW_RUN_ID would hijack start_run; nesting is explicit here.
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_NESTED_RUN", None)
    if cfg.get("tracking_uri"):
        mlflow.set_tracking_uri(cfg["tracking_uri"])
    if resume_run_id:
        try:
            run = mlflow.start_run(run_id=resume_run_id)
            if run.data.params:  # the first attempt logged the Trainer's params: MLflow
                os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"  # refuses a changed value, so skip
            return run
        except MlflowException as e:
            print(f"{RESUME_PREFIX}MLflow run {resume_run_id} cannot be reopened ({e}); "
                  "starting a new one", flush=True)
    parent = cfg.get("parent_run_id")
    if parent:
        experiment_id = mlflow.MlflowClient().get_run(parent).info.experiment_id
    else:
        experiment_id = mlflow.set_experiment(cfg.get("experiment") or "posttrain").experiment_id
    return mlflow.start_run(
        experiment_id=experiment_id,
        run_name=cfg.get("run_name") or stage,
        parent_run_id=parent,
        tags={"posttrain.stage": stage, **(cfg.get("tags") or {})},
    )


# ── crash safety: checkpoints, resume, a final/ that is whole or absent ─────────────────────────
@dataclasses.dataclass
class Resume:
    """Where a job starts: `checkpoint` (None: step 0) at `step`, and the MLflow child run of
    an earlier attempt of the same job to reopen."""

    checkpoint: str | None = None
    step: int = 0
    mlflow_run_id: str | None = None
    job_path: Path | None = None

    def record_run(self, run_id: str) -> None:
        """Note the child run beside the checkpoints (rank 0), for the next attempt."""
        if self.job_path is not None:
            job = _read_json(self.job_path) or {}
            write_json_atomic(self.job_path, {**job, "mlflow_run_id": run_id})


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoints_in(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N folder in `folder`, by step."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without it was cut short."""
    return (checkpoint / "trainer_state.json").is_file()


def _close_stale_run(run_id: str | None, mlflow_cfg: dict | None) -> None:
    """Mark the child run of cleared checkpoints KILLED if a kill left it RUNNING."""
    if not (run_id and mlflow_cfg):
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(mlflow_cfg.get("tracking_uri"))
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
    except Exception as e:  # noqa: BLE001 - bookkeeping must not stop training
        print(f"{RESUME_PREFIX}could not close MLflow run {run_id}: {e}", flush=True)


def prepare_resume(cfg: dict, out: Path, module: str) -> Resume:
    """Decide, on every rank alike, where this job starts, and tidy its checkpoints (rank 0).

    Checkpoints in out/checkpoints made under the same fingerprint (job.json) are resumed from
    the last complete one (an incomplete newer one is removed); checkpoints of a different
    config or data are cleared and their child run closed. Prints one `[resume]` line."""
    state = PartialState()
    stage = STAGES.get(module, module)
    folder = out / CHECKPOINTS
    fingerprint = cfg.get("fingerprint") or job_fingerprint(
        module, cfg, num_processes=state.num_processes)
    job = _read_json(folder / JOB) or {}
    same = job.get("fingerprint") == fingerprint
    found = checkpoints_in(folder)
    complete = [(step, path) for step, path in found if is_complete(path)] if same else []
    step, last = complete[-1] if complete else (0, None)
    resume = Resume(str(last) if last else None, step,
                    job.get("mlflow_run_id") if same else None, folder / JOB)
    state.wait_for_everyone()  # every rank has decided before rank 0 changes anything
    if state.is_main_process:
        if not same and (found or job):
            print(f"{RESUME_PREFIX}{stage}: {len(found)} checkpoint(s) in {folder} were made "
                  "by a different config or data: cleared, training from step 0", flush=True)
            _close_stale_run(job.get("mlflow_run_id"), cfg.get("mlflow"))
            shutil.rmtree(folder, ignore_errors=True)
        for _, path in found:
            if same and not is_complete(path):  # a save the kill cut short
                shutil.rmtree(path, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / JOB, {"fingerprint": fingerprint,
                                         "mlflow_run_id": resume.mlflow_run_id})
        if last is not None:
            print(f"{RESUME_PREFIX}{stage} resumes from {last.name} (step {step} of "
                  f"{int(cfg['max_steps'])})", flush=True)
    state.wait_for_everyone()
    return resume


def save_final(trainer, out: Path, peft_config, tokenizer) -> None:
    """final/ (and adapter/ for LoRA) written whole or not at all: into final.partial/, then
    renamed (rank 0), so a kill during the save never leaves a final/ that looks finished.
    Every rank calls it (sharded models gather); only the main one writes."""
    rank0 = trainer.is_world_process_zero()
    partial = out / "final.partial"
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
    if peft_config is None:
        trainer.save_model(str(partial))
    else:  # the adapter alone, then a merged copy that evaluation and DPO load like any model
        trainer.save_model(str(out / "adapter"))
        if rank0:
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(
                partial)
    trainer.accelerator.wait_for_everyone()
    if rank0:
        tokenizer.save_pretrained(partial)
        shutil.rmtree(out / "final", ignore_errors=True)
        os.replace(partial, out / "final")


def finish_job(cfg: dict, out: Path, result_name: str, result: dict) -> None:
    """The result file, then done.json (the job finished: training.launch reuses it), then
    the checkpoints go unless `keep_checkpoints`. Rank 0 only."""
    write_json_atomic(out / result_name, result)
    fingerprint = cfg.get("fingerprint") or (_read_json(out / CHECKPOINTS / JOB) or {}).get(
        "fingerprint")
    write_json_atomic(out / DONE, {"fingerprint": fingerprint, "result": result_name,
                                   "final_dir": result.get("final_dir"),
                                   "mlflow_run_id": result.get("mlflow_run_id")})
    if not cfg.get("keep_checkpoints"):
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


class _AlreadyTrained(Exception):
    """Raised by `StopAtMaxSteps`: the resumed checkpoint is the last step."""


class StopAtMaxSteps(TrainerCallback):
    """transformers 5.23 resumed from a checkpoint at max_steps in the middle of an epoch
    trains one step more (its loop checks the step count only after a step): stop it before."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise _AlreadyTrained


def train_from(trainer, resume: Resume) -> TrainOutput:
    """`trainer.train()` from `resume.checkpoint`; a checkpoint of the last step (a kill
    during evaluation or the final save) trains nothing and comes back as it was."""
    if resume.checkpoint is None:
        return trainer.train()
    started = time.time()
    trainer.add_callback(StopAtMaxSteps())
    try:
        return trainer.train(resume_from_checkpoint=resume.checkpoint)
    except _AlreadyTrained:
        state = trainer.state
        return TrainOutput(state.global_step, run_loss(state.log_history, float("nan")),
                           {"train_runtime": time.time() - started})
    finally:
        trainer.remove_callback(StopAtMaxSteps)


def run_loss(history: list[dict], fallback: float) -> float:
    """The mean training loss over the whole run from the logged windows: after a resume the
    Trainer's own train_loss covers only the steps since the checkpoint."""
    total, previous = 0.0, 0
    for h in history:
        if "loss" in h and h.get("step", 0) > previous:
            total += float(h["loss"]) * (h["step"] - previous)
            previous = h["step"]
    return total / previous if previous else fallback


def main(config_path: str) -> dict:
    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["output_dir"])
    prepare_process(cfg)

    # ── data ──────────────────────────────────────────────────────────────────────────────────
    train = read_examples(cfg["train_file"])
    evaluation = read_examples(cfg["eval_file"]) if cfg.get("eval_file") else None

    # ── tokenizer and model (tiny: built locally and seeded, every rank the same; or pretrained)
    model_cfg = {**(cfg.get("model") or {"source": "tiny"}), "tiny": cfg.get("tiny"),
                 "seed": cfg.get("seed", 0)}
    model, tokenizer = load_student(
        model_cfg, (p + c for p, c in zip(train["prompt"], train["completion"], strict=True))
    )
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them

    # ── training config: overrides of TRL's GPU-minded defaults ───────────────────────────────
    mlflow_cfg = cfg.get("mlflow") or None
    args = SFTConfig(
        **common_args(cfg, out, "sft"),
        max_length=int(cfg.get("max_length", 256)),
        packing=bool(cfg.get("packing")),  # BFD packing: padding-free, no cross-example attention
        use_liger_kernel=use_liger(cfg.get("liger")),
    )
    # the untrained model, so the pipeline can report how far training moved it (saved before
    # peft wraps it in place)
    if PartialState().is_main_process:
        model.save_pretrained(out / "base")
        tokenizer.save_pretrained(out / "base")
    peft_config = lora_config(cfg.get("lora"))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        callbacks=[ProgressPrinter()],
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressPrinter says it once, parseably
    rank0 = trainer.is_world_process_zero()
    attention = getattr(trainer.model.config, "_attn_implementation", None)
    if args.packing and rank0 and "flash" not in str(attention):
        print(f"warning: packing with {attention} attention: a padding-free batch is one long "
              "sequence, so attention costs grow with its square (bench/RESULTS.md); install "
              "flash-attn for varlen kernels, or turn packing off")
    trainable_parameters = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # packed rows hold several examples (BFD truncates an overlong one instead of dropping it)
    n_dropped = 0 if args.packing else len(train) - len(trainer.train_dataset)
    if n_dropped == len(train):
        raise SystemExit(
            f"training.max_length: all {len(train)} examples were dropped because their prompts "
            f"alone fill max_length={args.max_length} tokens; raise max_length"
        )
    if n_dropped and rank0:
        print(f"warning: {n_dropped} of {len(train)} examples dropped: prompt fills max_length")

    # Only rank 0 writes files and talks to MLflow: one base/, one final/, one child run per job
    # (the Trainer's MLflowCallback also logs from the world-process-zero only). A killed
    # attempt of this same job is resumed: its last checkpoint, its child run.
    resume = prepare_resume(cfg, out, "training.sft")
    run = (start_child_run(mlflow_cfg, resume_run_id=resume.mlflow_run_id)
           if (rank0 and mlflow_cfg) else None)
    if run is not None:
        resume.record_run(run.info.run_id)

    # ── train ─────────────────────────────────────────────────────────────────────────────────
    started = time.perf_counter()
    try:
        output = train_from(trainer, resume)
    except BaseException:
        if run is not None:
            import mlflow

            mlflow.end_run(status="FAILED")
        raise
    train_seconds = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"] if evaluation is not None else None

    # ── save and report ───────────────────────────────────────────────────────────────────────
    save_final(trainer, out, peft_config, tokenizer)  # final/ whole or absent
    if not rank0:
        return {}
    history = trainer.state.log_history
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
    # tokens per second of this attempt: a resumed job counts from its checkpoint
    tokens_before = next((h["num_tokens"] for h in reversed(history)
                          if "num_tokens" in h and h.get("step", 0) <= resume.step), 0)
    attempt_tokens = (tokens or 0) - (tokens_before if resume.step else 0)
    result = {
        "train_loss": (run_loss(history, float(output.training_loss)) if resume.step
                       else float(output.training_loss)),
        "final_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
        ),
        "eval_loss": eval_loss,
        "steps": int(output.global_step),
        "train_runtime": float(output.metrics.get("train_runtime", train_seconds)),
        "train_seconds": train_seconds,
        "num_tokens": tokens,
        "tokens_per_second": (attempt_tokens / output.metrics["train_runtime"]
                              if attempt_tokens > 0 else None),
        "n_train": len(train) - n_dropped,
        "train_rows": len(trainer.train_dataset),  # fewer than n_train when packed
        "num_processes": trainer.accelerator.num_processes,
        "global_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * trainer.accelerator.num_processes,
        "n_dropped": n_dropped,
        "num_parameters": num_parameters,
        "trainable_parameters": trainable_parameters,
        "packing": bool(args.packing),
        "bf16": bool(args.bf16),
        "lora_r": peft_config.r if peft_config else 0,
        "adapter_dir": str(out / "adapter") if peft_config else None,
        "vocab_size": len(tokenizer),
        "base_dir": str(out / "base"),
        "final_dir": str(out / "final"),
        "mlflow_run_id": run.info.run_id if run else None,
        "resumed_from_step": resume.step,
    }
    if run is not None:
        import mlflow

        numbers = {k: v for k, v in result.items() if isinstance(v, int | float) and k != "steps"}
        mlflow.log_metrics({f"result/{k}": float(v) for k, v in numbers.items()})
        if model_cfg.get("source", "tiny") == "tiny":
            mlflow.log_params({f"tiny.{k}": v for k, v in (cfg.get("tiny") or {}).items()})
        else:
            mlflow.log_param("model.name_or_path", model_cfg.get("name_or_path"))
        if peft_config is not None:  # the adapter, not a copy of the base
            mlflow.log_artifacts(str(out / "adapter"), "adapter")
        mlflow.flush_async_logging()
        mlflow.end_run()
    finish_job(cfg, out, "train_result.json", result)  # the result, then done.json
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="TRL SFT of a tiny causal LM")
    parser.add_argument("--config", required=True, help="path to the JSON run config")
    main(parser.parse_args().config)
