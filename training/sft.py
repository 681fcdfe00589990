"""Supervised fine-tuning of the student causal LM with TRL, the script Accelerate launches.

    accelerate launch --config_file training/accelerate/cpu.yaml \\
        -m training.sft --config RUN_DIR/sft_config.json

The JSON config (written by `training.launch.launch_sft`) holds:
    train_file      JSONL of {"prompt", "completion"}
    eval_file       optional JSONL of the same shape: eval loss is reported at the end
    output_dir      gets base/ (the untrained model), final/ (the trained one),
                    adapter/ (LoRA only: the adapter alone), train_result.json
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

Progress goes to stdout as lines `[progress] {"step": .., "max_steps": .., "loss": ..}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import PartialState
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed
from trl import SFTConfig, SFTTrainer

from training.launch import PROGRESS_PREFIX
from training.model_source import load_student


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


def common_args(cfg: dict, out: Path, stage: str, warmup_ratio: float = 0.0) -> dict:
    """The TrainingArguments both TRL configs (SFTConfig, DPOConfig) take from the JSON
    config: TRL's GPU-minded defaults overridden. `warmup_ratio` is the stage's default."""
    max_steps = int(cfg["max_steps"])
    mlflow_cfg = cfg.get("mlflow") or None
    return dict(
        output_dir=str(out / "checkpoints"),
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
        save_strategy="no",
        eval_strategy="no",
        report_to=["mlflow"] if mlflow_cfg else "none",
        run_name=(mlflow_cfg or {}).get("run_name") or stage,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every parameter is used; skips a graph walk
    )


def start_child_run(cfg: dict, stage: str = "sft"):
    """Start (on rank 0) the MLflow run the Trainer's MLflowCallback will log into, tagged
    `posttrain.stage` = `stage` (the config's tags win).

    An already active run makes the callback log there and leave ending it to us. The run is
    created under `parent_run_id` (in the parent's experiment) when one is given."""
    import mlflow

    # A stale MLFLOW_RUN_ID would hijack start_run; nesting is explicit here.
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_NESTED_RUN", None)
    if cfg.get("tracking_uri"):
        mlflow.set_tracking_uri(cfg["tracking_uri"])
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
    # (the Trainer's MLflowCallback also logs from the world-process-zero only).
    run = start_child_run(mlflow_cfg) if (rank0 and mlflow_cfg) else None

    # ── train ─────────────────────────────────────────────────────────────────────────────────
    started = time.perf_counter()
    try:
        output = trainer.train()
    except BaseException:
        if run is not None:
            import mlflow

            mlflow.end_run(status="FAILED")
        raise
    train_seconds = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"] if evaluation is not None else None

    # ── save and report ───────────────────────────────────────────────────────────────────────
    if peft_config is None:
        trainer.save_model(str(out / "final"))  # every rank calls it; only the main one writes
    else:  # the adapter alone, then a merged copy that evaluation and DPO load like any model
        trainer.save_model(str(out / "adapter"))
        if rank0:
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(
                out / "final")
    trainer.accelerator.wait_for_everyone()
    if not rank0:
        return {}
    tokenizer.save_pretrained(out / "final")
    tokens = next(
        (h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h), None
    )
    result = {
        "train_loss": float(output.training_loss),
        "final_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
        ),
        "eval_loss": eval_loss,
        "steps": int(output.global_step),
        "train_runtime": float(output.metrics.get("train_runtime", train_seconds)),
        "train_seconds": train_seconds,
        "num_tokens": tokens,
        "tokens_per_second": tokens / output.metrics["train_runtime"] if tokens else None,
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
    }
    (out / "train_result.json").write_text(json.dumps(result, indent=2))
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
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="TRL SFT of a tiny causal LM")
    parser.add_argument("--config", required=True, help="path to the JSON run config")
    main(parser.parse_args().config)
