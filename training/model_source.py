"""Where the student model comes from: built tiny from a config, or a pretrained checkpoint.

    model, tokenizer = load_student({"source": "tiny", "tiny": {...}, "seed": 0}, texts)
    model, tokenizer = load_student({"source": "pretrained",
                                     "name_or_path": "Qwen/Qwen2.5-0.5B"}, texts)

`tiny` trains a BPE tokenizer on `texts` (the training set) and builds a random model from
`tiny` (see training.tiny_model). `pretrained` loads a Hugging Face model name or a local
folder with its own tokenizer. posttrain runs offline (HF_HUB_OFFLINE=1), so a hub name works
only when it is already in the local Hugging Face cache; otherwise `ModelUnavailable` says
what was looked for and how to fix it, instead of a network traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from training.tiny_model import build_tiny_model, train_tokenizer


class ModelUnavailable(RuntimeError):
    """The configured student model cannot be loaded here; the message says why and the fix."""


def load_student(model_cfg: dict, texts: Iterable[str]):
    """(model, tokenizer) for `model_cfg` = {"source", "name_or_path"?, "tiny"?, "seed"?}."""
    source = model_cfg.get("source", "tiny")
    if source == "tiny":
        tiny = model_cfg["tiny"]
        tokenizer = train_tokenizer(texts, vocab_size=int(tiny["vocab_size"]))
        model = build_tiny_model(
            tokenizer,
            architecture=tiny.get("architecture", "llama"),
            hidden_size=int(tiny["hidden_size"]),
            num_layers=int(tiny["num_layers"]),
            num_heads=int(tiny["num_heads"]),
            num_kv_heads=tiny.get("num_kv_heads"),
            intermediate_size=int(tiny["intermediate_size"]),
            max_position_embeddings=int(tiny.get("max_position_embeddings", 512)),
            model_vocab_size=tiny.get("model_vocab_size"),
            seed=int(model_cfg.get("seed", 0)),
        )
        return model, tokenizer
    if source == "pretrained":
        return load_pretrained(model_cfg["name_or_path"])
    raise ValueError(f"student.source: must be tiny or pretrained, got {source!r}")


def load_pretrained(name_or_path: str) -> tuple[PreTrainedModel, object]:
    """Model and tokenizer from a local folder, or a hub name found in the local cache."""
    local = Path(name_or_path).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    where = str(local) if local.is_dir() else name_or_path
    looks_local = name_or_path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise ModelUnavailable(
            f"student.name_or_path: {name_or_path!r} is not a folder; point it at a saved "
            "model folder (config.json, weights, tokenizer) or a Hugging Face model name"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where)
    except (OSError, ValueError) as e:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        hint = (
            f"it is not in the local Hugging Face cache ({cache}) and posttrain runs offline: "
            f"download it where there is internet (`hf download {name_or_path}`) and copy the "
            "cache here, or set student.name_or_path to a local folder"
            if offline and not local.is_dir()
            else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        raise ModelUnavailable(f"student.name_or_path: cannot load {name_or_path!r}: {hint}") from e
    if tokenizer.pad_token is None:  # many causal LMs ship without one; padding reuses EOS
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
