"""Classification metrics for a causal LM: greedy generation, then match a label.

    metrics = evaluate_classifier("runs/x/final", prompts, gold, labels)

Each prompt is completed greedily (batched, left-padded). The prediction is the label the
generated text starts with after stripping whitespace (the longest such label, so `tech`
and `technology` can coexist), else "<invalid>". Invalid predictions count as wrong.
Macro-F1 averages per-label F1 over the label set (no scikit-learn needed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

INVALID = "<invalid>"


def match_label(text: str, labels: list[str]) -> str:
    """The longest label `text` starts with (after stripping), else INVALID."""
    text = text.strip()
    hits = [label for label in labels if text.startswith(label)]
    return max(hits, key=len) if hits else INVALID


def classification_metrics(predictions: list[str], gold: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 over `labels`, and per-label precision/recall/F1/support."""
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} gold labels")
    n = len(gold)
    correct = sum(p == g for p, g in zip(predictions, gold, strict=True))
    per_label = {}
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predictions, gold, strict=True))
        predicted = sum(p == label for p in predictions)
        support = sum(g == label for g in gold)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {
            "precision": precision, "recall": recall, "f1": f1, "support": support,
        }  # fmt: skip
    return {
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(m["f1"] for m in per_label.values()) / len(labels) if labels else 0.0,
        "per_label": per_label,
        "n": n,
        "invalid": sum(p == INVALID for p in predictions),
    }


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    """Greedy completions (new text only) for `prompts`, in order."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = generated[:, batch["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs


def evaluate_classifier(
    model_dir: str | Path,
    prompts: list[str],
    gold: list[str],
    labels: list[str],
    max_new_tokens: int = 6,
    batch_size: int = 32,
) -> dict:
    """Greedy-decode every prompt with the model in `model_dir` and score it against `gold`.

    Returns accuracy, macro_f1, per_label {precision, recall, f1, support}, n, invalid, and
    predictions (one label or "<invalid>" per prompt)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    texts = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    predictions = [match_label(t, labels) for t in texts]
    return classification_metrics(predictions, gold, labels) | {"predictions": predictions}
