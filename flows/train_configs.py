"""The JSON config `training.sft` runs with, built from the spec in one place, so the final SFT
and every tuning trial train alike (see training/sft.py's docstring for the keys).

    config = sft_config(spec, train_file=..., output_dir=..., max_steps=600,
                        mlflow={"tracking_uri": ..., "run_name": ...},
                        settings={"learning_rate": 3e-3, "batch_size": 16})
"""

from __future__ import annotations

from flows.spec import Spec


def sft_config(spec: Spec, *, train_file: str, output_dir: str, max_steps: int, mlflow: dict,
               settings: dict | None = None, eval_file: str | None = None) -> dict:
    """`settings` (learning_rate, batch_size, warmup_ratio, lora_r: a tuning trial's or the
    chosen config) override the spec's training values."""
    t, s = spec.training, settings or {}
    return {
        "train_file": train_file,
        **({"eval_file": eval_file} if eval_file else {}),
        "output_dir": output_dir,
        "model": {"source": spec.student.source, "name_or_path": spec.student.name_or_path},
        "tiny": spec.student.tiny.model_dump(),
        "seed": spec.student.seed,
        "max_steps": max_steps,
        "learning_rate": float(s.get("learning_rate", t.learning_rate)),
        "batch_size": int(s.get("batch_size", t.batch_size)),
        "lr_scheduler": t.lr_scheduler,
        "warmup_ratio": float(s.get("warmup_ratio", t.warmup_ratio)),
        "max_length": t.max_length,
        "threads": t.threads,
        "lora": {**t.lora.model_dump(), "r": int(s.get("lora_r", t.lora.r))},
        "packing": t.packing,
        "bf16": t.bf16,
        "gradient_checkpointing": t.gradient_checkpointing,
        "liger": t.liger,
        **({"save_steps": t.save_steps} if t.save_steps is not None else {}),
        "mlflow": {"experiment": spec.tracking.experiment, **mlflow},
    }
