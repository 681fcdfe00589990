"""Classification metrics for a causal LM: greedy generation, then match a label (and
`generate_texts`, the same greedy decoding for answers written as text).

    metrics = evaluate_classifier("runs/x/final", prompts, gold, labels)

Each prompt is completed greedily (batched, left-padded). The prediction is the label the
generated text starts with after stripping whitespace (the longest such label, so `tech`
and `technology` can coexist), else "<invalid>". Invalid predictions count as wrong.
Macro-F1 averages per-label F1 over the label set (no scikit-learn needed). The result also
holds a confusion matrix, {gold: {predicted or "<invalid>": count}}, which
`confusion_matrix_png` draws and `per_label_report` sums up as a markdown table.
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
    """Accuracy, macro-F1 over `labels`, per-label precision/recall/F1/support, confusion."""
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
    columns = [*labels, *sorted(set(predictions) - set(labels) - {INVALID}), INVALID]
    rows = [*labels, *sorted(set(gold) - set(labels))]
    confusion = {g: dict.fromkeys(columns, 0) for g in rows}
    for p, g in zip(predictions, gold, strict=True):
        confusion[g][p] += 1
    return {
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(m["f1"] for m in per_label.values()) / len(labels) if labels else 0.0,
        "per_label": per_label,
        "n": n,
        "invalid": sum(p == INVALID for p in predictions),
        "confusion": confusion,
    }


def metrics_by_group(predictions: list[str], gold: list[str], groups: list[str],
                     labels: list[str]) -> dict[str, dict]:
    """{group: {n, accuracy, macro_f1}}: the same figures within each group of rows (a slice
    of the warehouse), so a model that gains overall but fails one slice shows it."""
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    out = {}
    for group in sorted(rows):
        m = classification_metrics([predictions[i] for i in rows[group]],
                                   [gold[i] for i in rows[group]], labels)
        out[group] = {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
    return out


def per_group_report(by_group: dict[str, dict], champion: dict[str, dict] | None = None) -> str:
    """A markdown table of accuracy and macro-F1 per slice group (beside the champion's)."""
    head = "| slice | rows | accuracy | macro-F1 |" + (" champion acc. | champion F1 |"
                                                     if champion else "")
    lines = [head, "|---|---:|---:|---:|" + ("---:|---:|" if champion else "")]
    for group, m in by_group.items():
        line = f"| {group} | {m['n']} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} |"
        if champion:
            c = champion.get(group) or {}
            line += (f" {c['accuracy']:.3f} | {c['macro_f1']:.3f} |" if c else " — | — |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def per_label_report(result: dict) -> str:
    """A markdown table of precision, recall, F1 and support per label, then the totals."""
    lines = ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label, m in result["per_label"].items():
        lines.append(
            f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} "
            f"| {m['support']} |"
        )
    lines.append(
        f"\naccuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}, "
        f"{result['invalid']} invalid of {result['n']}"
    )
    return "\n".join(lines) + "\n"


def confusion_matrix_png(result: dict, labels: list[str], path: str | Path) -> Path:
    """Draw `result["confusion"]` (rows gold, columns predicted, counts annotated) to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    confusion = result["confusion"]
    rows = [*labels, *(g for g in confusion if g not in labels)]
    columns = [*labels, *(c for r in confusion.values() for c in r if c not in labels)]
    columns = list(dict.fromkeys(columns)) or [INVALID]
    counts = [[confusion.get(g, {}).get(c, 0) for c in columns] for g in rows]
    fig = Figure(figsize=(1.1 * len(columns) + 2.5, 0.8 * len(rows) + 2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    top = max((max(r) for r in counts), default=0)
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                color="white" if top and count > top / 2 else "black",
            )
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"accuracy {result['accuracy']:.3f} on {result['n']} rows")
    fig.colorbar(image, ax=ax, shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


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

    Returns accuracy, macro_f1, per_label {precision, recall, f1, support}, n, invalid,
    confusion {gold: {predicted: count}} and predictions (one label or "<invalid>" per
    prompt)."""
    texts = generate_texts(model_dir, prompts, max_new_tokens, batch_size)
    predictions = [match_label(t, labels) for t in texts]
    return classification_metrics(predictions, gold, labels) | {"predictions": predictions}


def generate_texts(model_dir: str | Path, prompts: list[str], max_new_tokens: int = 32,
                   batch_size: int = 32) -> list[str]:
    """Greedy completions (the new text only, special tokens dropped) of the model in
    `model_dir` for `prompts`, in order: what a generation or extraction task scores."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    return generate(model, tokenizer, prompts, max_new_tokens, batch_size)
