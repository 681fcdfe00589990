"""Bench: held-out accuracy of the tiny SFT model on the BBC articles with noisy labels.

The demo's claim, measured end to end without agents: hold out rows by the pipeline's hash
rule, flip a share of the train labels (a teacher that is 95% right), train through
`launch_sft` (a real `accelerate launch`), and evaluate the untrained and trained models on
the held-out rows with `evaluate_classifier`. The last line printed is one JSON object.

    .venv/bin/python bench/sft_accuracy.py [--steps 600 --lr 1e-3 --hidden 128 ...]
    .venv/bin/python bench/sft_accuracy.py --quick    # 200 articles, 300 steps (tests)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.news_topics.build_warehouse import read_articles
from training.evaluate import evaluate_classifier
from training.launch import launch_sft, parse_progress

PROMPT = "Title: {title}\nLead: {body:.300}\nTopic:"


def is_holdout(row_id: int, fraction: float = 0.18) -> bool:
    """The pipeline's rule: a hash of the id, before any slicing."""
    return int(hashlib.md5(str(row_id).encode()).hexdigest()[:8], 16) % 10000 < fraction * 10000


def flip_labels(rows: list[dict], labels: list[str], rate: float, seed: int) -> int:
    """Give `rate` of the rows a wrong (but valid) label, deterministically; return how many."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(rows)), round(rate * len(rows)))
    for i in chosen:
        rows[i]["label"] = rng.choice([x for x in labels if x != rows[i]["label"]])
    return len(chosen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--scheduler", default="cosine")
    ap.add_argument("--warmup", type=float, default=0.03)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--noise", type=float, default=0.05, help="share of train labels flipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-label", type=int, default=None,
                    help="only the first N articles of each topic (small-data runs)")
    ap.add_argument("--holdout", type=float, default=0.18)
    ap.add_argument("--quick", action="store_true",
                    help="a small run for the tests: 40 articles a topic, 300 steps (flags "
                    "given explicitly still win)")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = ap.parse_args()
    if args.quick:
        given = {a.split("=")[0] for a in sys.argv[1:]}
        for flag, value in {"--per-label": 40, "--steps": 300, "--vocab": 1000,
                            "--batch": 8, "--holdout": 0.2}.items():
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")

    rows = read_articles(args.per_label)
    labels = sorted({r["topic"] for r in rows})
    train = [{"row": r, "label": r["topic"]} for r in rows
             if not is_holdout(r["id"], args.holdout)]
    held = [r for r in rows if is_holdout(r["id"], args.holdout)]
    flipped = flip_labels(train, labels, args.noise, args.seed)

    out = Path(args.out or tempfile.mkdtemp(prefix="sft_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train.jsonl"
    with train_file.open("w") as f:
        for t in train:
            example = {"prompt": PROMPT.format(**t["row"]), "completion": " " + t["label"]}
            f.write(json.dumps(example) + "\n")

    config = {
        "train_file": str(train_file),
        "tiny": {
            "hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
            "intermediate_size": args.intermediate, "vocab_size": args.vocab,
            "max_position_embeddings": 512,
        },
        "seed": args.seed, "max_steps": args.steps, "learning_rate": args.lr,
        "batch_size": args.batch, "lr_scheduler": args.scheduler, "warmup_ratio": args.warmup,
        "max_length": args.max_length, "threads": args.threads,
    }  # fmt: skip

    def show(line: str) -> None:
        p = parse_progress(line)
        if p and "loss" in p and p["step"] % max(1, args.steps // 10) == 0:
            print(f"  step {p['step']}/{p['max_steps']} loss {p['loss']:.3f}", flush=True)

    started = time.perf_counter()
    result = launch_sft(config, out, on_line=show)
    wall = time.perf_counter() - started

    prompts = [PROMPT.format(**r) for r in held]
    gold = [r["topic"] for r in held]
    started = time.perf_counter()
    base = evaluate_classifier(out / "base", prompts, gold, labels)
    final = evaluate_classifier(out / "final", prompts, gold, labels)
    eval_seconds = time.perf_counter() - started
    print(
        json.dumps({"per_label_f1": {k: round(v["f1"], 3) for k, v in final["per_label"].items()}})
    )
    majority = max(gold.count(x) for x in labels) / len(gold)
    print(json.dumps({
        "base_accuracy": round(base["accuracy"], 4),
        "majority_baseline": round(majority, 4),
        "accuracy": round(final["accuracy"], 4),
        "macro_f1": round(final["macro_f1"], 4),
        "invalid": final["invalid"],
        "train_seconds": round(result["train_runtime"], 1),
        "launch_seconds": round(wall, 1),
        "eval_seconds": round(eval_seconds, 1),
        "steps": result["steps"],
        "train_loss": round(result["train_loss"], 4),
        "n_train": len(train),
        "n_eval": len(held),
        "flipped": flipped,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
