"""The spec's learning sections: the student model, SFT, DPO and the tune stage.

Split from `flows/spec.py` (which imports and re-exports them) so that file stays about the
data, the task and how the run is assembled. Same rules: every field has help text, unknown
keys are errors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from flows.spec_base import Strict


# ── the student model ────────────────────────────────────────────────────────────────────────
class TinyModel(Strict):
    architecture: Literal["llama", "qwen2"] = Field(
        "llama", description="Model family the config builds (transformers model_type)."
    )
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention); null: num_heads."
    )
    intermediate_size: int = Field(512, ge=8)
    vocab_size: int = Field(2000, ge=300, description="BPE vocabulary trained on the train set.")
    max_position_embeddings: int = Field(512, ge=32)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModel:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size: must be a multiple of num_heads ({self.num_heads}), "
                f"got {self.hidden_size}"
            )
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: must divide num_heads ({self.num_heads}), got {self.num_kv_heads}"
            )
        return self


class Student(Strict):
    source: Literal["tiny", "pretrained"] = Field(
        "tiny", description="tiny: a small causal LM built from a config with a locally "
        "trained tokenizer (no hub). pretrained: load `name_or_path` (a Hugging Face model "
        "name, from the local cache when offline, or a local folder) with its own tokenizer."
    )
    name_or_path: str | None = Field(
        None, description="source pretrained: e.g. Qwen/Qwen2.5-0.5B or /models/my-base."
    )
    tiny: TinyModel = Field(default_factory=TinyModel)
    seed: int = Field(0, description="Seed for model init and training.")

    @model_validator(mode="after")
    def _source_needs_name(self) -> Student:
        if self.source == "pretrained" and not self.name_or_path:
            raise ValueError("name_or_path: required when source is pretrained, add it")
        return self


# ── how it learns ────────────────────────────────────────────────────────────────────────────
class Lora(Strict):
    r: int = Field(0, ge=0, description="LoRA rank; 0 trains every weight (no adapter).")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: all-linear or a list of names."
    )


class Training(Strict):
    accelerate_profile: str = Field(
        "cpu", description="Accelerate config under training/accelerate/ (without .yaml)."
    )
    max_steps: int = Field(600, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0, lt=1.0)
    batch_size: int = Field(16, ge=1, description="Per-device train batch size.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    max_length: int = Field(256, ge=16, description="Tokens per example after truncation.")
    threads: int = Field(1, ge=1, description="torch threads for CPU training.")
    lora: Lora = Field(default_factory=Lora)
    packing: bool = Field(
        False, description="Pack examples into max_length rows, padding-free (TRL's BFD)."
    )
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 mixed precision: auto = on a GPU that supports it."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory)."
    )
    liger: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger kernels: auto = when liger-kernel is installed and on a GPU; "
        "on = required (a clear error when missing)."
    )
    save_steps: int | None = Field(
        None, ge=0, description="Steps between checkpoints of every training job (SFT, DPO, "
        "tuning trials), the last two kept: a crashed or killed run resumes from the newest. "
        "null: a tenth of the job's max_steps; 0: no checkpoints (a killed job starts over)."
    )


class DPO(Strict):
    enabled: bool = Field(False, description="Run DPO on agent-written preference pairs after SFT.")
    required: bool = Field(
        False, description="false (default): when the pairs or DPO stage fails, or DPO is "
        "stopped as degenerate, the run goes on with the SFT model and says so (summary, "
        "model card, the flow run's state `Degraded`); true: the run fails.")
    pairs_per_call: int = Field(10, ge=1, description="Prompts per write-preference-pairs call.")
    max_pairs: int | None = Field(None, ge=2, description="Most pairs to write; null: one per "
                                  "curated SFT example.")
    holdout_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="Pairs held out (by a hash of the prompt) to measure "
        "reward accuracy."
    )
    beta: float = Field(0.1, gt=0.0, description="DPO temperature: how far from the reference.")
    loss_type: list[str] = Field(
        ["sigmoid", "sft"], min_length=1,
        description="TRL DPO loss types (summed); sft keeps the chosen completion likely.",
    )
    max_steps: int = Field(150, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0, lt=1.0)
    batch_size: int = Field(8, ge=1, description="Per-device pairs per step.")
    max_length: int = Field(256, ge=16, description="Tokens per prompt+completion.")


class Tuning(Strict):
    enabled: bool = Field(False, description="Run tuning trials before the final SFT.")
    required: bool = Field(
        False, description="false (default): when tuning fails, the final SFT uses the "
        "default config and the run says so (flow run state `Degraded`); true: the run fails.")
    trials: int = Field(4, ge=1, description="Configs tried, the spec's own config included.")
    max_steps: int = Field(100, ge=1, description="Training steps per trial (a short budget).")
    concurrency: int = Field(1, ge=1, description="Trials training at once.")
    validation_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="Curated examples held out (by a hash of the prompt) "
        "for each trial's eval loss; never the evaluation rows."
    )
    seed: int = Field(0, description="Seed of the search when no tuner LLM is configured.")
    bounds: dict[Literal["learning_rate", "batch_size", "warmup_ratio", "lora_r"],
                 tuple[float, float]] = Field(
        default_factory=lambda: {"learning_rate": (2e-4, 3e-3), "batch_size": (8, 32),
                                 "warmup_ratio": (0.0, 0.1)},
        description="Inclusive [low, high] per tunable setting; proposals outside are clamped.",
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Tuning:
        for name, (low, high) in self.bounds.items():
            if low > high:
                raise ValueError(f"bounds.{name}: low {low:g} is above high {high:g}")
        return self
