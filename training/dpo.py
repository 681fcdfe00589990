"""Direct preference optimisation (TRL DPO) of the SFT model, the script Accelerate launches.

    accelerate launch --config_file training/accelerate/cpu.yaml \\
        -m training.dpo --config RUN_DIR/dpo_config.json

The JSON config (written by `flows.preferences.train_dpo` through
`training.launch.launch_training`) holds:
    train_file      JSONL of {"prompt", "chosen", "rejected"}
    eval_file       JSONL of the same shape, held-out pairs: reward accuracy and margin are
                    measured on them at the end
    model_dir       the SFT model (its final/ folder): the policy AND the reference are both
                    loaded from it (a config-built model has no hub id, so TRL cannot build
                    the reference itself), with its tokenizer
    output_dir      gets final/ (model + tokenizer), dpo_result.json and done.json (written
                    last), and while it trains checkpoints/
    beta, loss_type (a list, summed), max_steps, learning_rate, batch_size (PER DEVICE),
    max_length, seed, threads; optional lr_scheduler (default cosine), warmup_ratio
    (default 0.1), gradient_accumulation_steps, logging_steps, bf16 (auto | on | off),
    gradient_checkpointing (as training.sft)
    lora            optional {r, alpha, dropout, target_modules}: r > 0 trains a LoRA adapter
                    (the reference is then the policy with its adapter disabled: no second
                    model); adapter/ holds the adapter alone, final/ the merged model
    sanity          optional, default true: stop when DPO degenerates (training.dpo_sanity)
    mlflow          optional {tracking_uri, experiment, parent_run_id, run_name, tags}: a
                    child run of parent_run_id (rank 0 only)
    save_steps, save_total_limit, keep_checkpoints, fingerprint: as training.sft

Checkpoints and resume work as in training.sft: a killed job of the same fingerprint (which
covers the SFT model's files) resumes from its last checkpoint in the same child run
(`[resume] DPO resumes from checkpoint-30 (step 30 of 150)`); the result holds
`resumed_from_step`.

Progress goes to stdout as `[progress] {"step", "max_steps", "loss", "rewards/margins", ...}`.
A degenerate run ends with one line `DPO degenerate: ...` and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
)
from trl import DPOConfig, DPOTrainer

from training.dpo_sanity import dpo_health
from training.sft import (
    ProgressPrinter,
    common_args,
    finish_job,
    lora_config,
    prepare_process,
    prepare_resume,
    run_loss,
    save_final,
    start_child_run,
    train_from,
)

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class DPODegenerate(RuntimeError):
    """The sanity check stopped the run; the message is the one line to report."""


class DPOSanity(TrainerCallback):
    """Feeds every training log to `dpo_health`; raises `DPODegenerate` when it answers.

    Every rank sees the same (gathered) DPO metrics, so every rank stops at the same step."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run judges the whole run: the logs its checkpoint restored come first
        self.history = [dict(h) for h in state.log_history
                        if "step" in h and not any(k.startswith("eval_") for k in h)]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or any(k.startswith("eval_") for k in logs):
            return
        self.history.append({"step": state.global_step, **logs})
        message = dpo_health(self.history, state.max_steps)
        if message:
            raise DPODegenerate(message)


def read_pairs(path: str) -> Dataset:
    """A JSONL file of {"prompt", "chosen", "rejected"} as a Dataset."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                pair = {k: row.get(k) for k in PAIR_FIELDS}
                if not all(isinstance(v, str) for v in pair.values()):
                    raise ValueError(f"{path}:{n}: needs string fields prompt, chosen, rejected")
                rows.append(pair)
    if not rows:
        raise ValueError(f"{path}: no preference pairs")
    return Dataset.from_list(rows)


def main(config_path: str) -> dict:
    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["output_dir"])
    prepare_process(cfg)

    # ── data ──────────────────────────────────────────────────────────────────────────────────
    train = read_pairs(cfg["train_file"])
    held_out = read_pairs(cfg["eval_file"])

    # ── policy and reference, both from the SFT model ─────────────────────────────────────────
    model_dir = cfg["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = lora_config(cfg.get("lora"))
    ref_model = (None if peft_config is not None
                 else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))

    # ── DPO config: overrides of TRL's GPU-minded defaults ────────────────────────────────────
    mlflow_cfg = cfg.get("mlflow") or None
    batch_size = int(cfg["batch_size"])
    args = DPOConfig(
        **common_args(cfg, out, "dpo", warmup_ratio=0.1),
        per_device_eval_batch_size=batch_size,
        beta=float(cfg["beta"]),
        loss_type=list(cfg["loss_type"]),
        max_length=int(cfg["max_length"]),
    )
    callbacks: list[TrainerCallback] = [ProgressPrinter()]
    if cfg.get("sanity", True):
        callbacks.append(DPOSanity())
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)
    rank0 = trainer.is_world_process_zero()
    n_train, n_eval = len(trainer.train_dataset), len(trainer.eval_dataset)
    if n_train == 0 or n_eval == 0:
        raise SystemExit(
            f"dpo.max_length: every {'training' if n_train == 0 else 'held-out'} pair was "
            f"dropped because its prompt alone fills max_length={args.max_length} tokens; "
            f"raise dpo.max_length")

    resume = prepare_resume(cfg, out, "training.dpo")  # a killed attempt: its checkpoint, run
    run = (start_child_run(mlflow_cfg, stage="dpo", resume_run_id=resume.mlflow_run_id)
           if (rank0 and mlflow_cfg) else None)
    if run is not None:
        resume.record_run(run.info.run_id)

    # ── train, then measure on the held-out pairs ─────────────────────────────────────────────
    started = time.perf_counter()
    try:
        output = train_from(trainer, resume)
        train_seconds = time.perf_counter() - started
        metrics = trainer.evaluate()
    except BaseException as e:
        if run is not None:
            import mlflow

            mlflow.end_run(status="FAILED")
        if isinstance(e, DPODegenerate):
            raise SystemExit(str(e)) from None  # the message is the process's last line
        raise

    # ── save and report ───────────────────────────────────────────────────────────────────────
    save_final(trainer, out, peft_config, tokenizer)  # final/ whole or absent
    if not rank0:
        return {}
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "rewards/margins" in h), {})
    result = {
        "reward_accuracy": metrics.get("eval_rewards/accuracies"),
        "reward_margin": metrics.get("eval_rewards/margins"),
        "eval_rewards_chosen": metrics.get("eval_rewards/chosen"),
        "eval_rewards_rejected": metrics.get("eval_rewards/rejected"),
        "eval_loss": metrics.get("eval_loss"),
        "train_loss": (run_loss(history, float(output.training_loss)) if resume.step
                       else float(output.training_loss)),
        "final_loss": last.get("loss"),
        "train_reward_accuracy": last.get("rewards/accuracies"),
        "train_reward_margin": last.get("rewards/margins"),
        "steps": int(output.global_step),
        "train_seconds": train_seconds,
        "n_train": n_train,
        "n_eval": n_eval,
        "num_processes": trainer.accelerator.num_processes,
        "beta": args.beta,
        "loss_type": list(args.loss_type),
        "lora": peft_config is not None,
        "final_dir": str(out / "final"),
        "mlflow_run_id": run.info.run_id if run else None,
        "resumed_from_step": resume.step,
    }
    if run is not None:
        import mlflow

        numbers = {k: v for k, v in result.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k != "steps"}
        mlflow.log_metrics({f"result/{k}": float(v) for k, v in numbers.items()})
        mlflow.log_params({"dpo.beta": args.beta, "dpo.loss_type": ",".join(args.loss_type),
                           "dpo.model_dir": model_dir})
        mlflow.flush_async_logging()
        mlflow.end_run()
    finish_job(cfg, out, "dpo_result.json", result)  # the result, then done.json
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="TRL DPO of the SFT model")
    parser.add_argument("--config", required=True, help="path to the JSON run config")
    main(parser.parse_args().config)
