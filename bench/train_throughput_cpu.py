"""Bench: CPU training throughput of posttrain's SFT stage vs a bare TRL script.

The claim measured: on CPU, posttrain's training stage (`launch_sft`, a real
`accelerate launch` of `training.sft` with MLflow logging to a SQLite store) reaches
>= 0.95 of the tokens/s of a minimal TRL script (one plain `python` process, no accelerate
launch, no MLflow) on the same data, tokenizer, model and SFTConfig numbers. Tokens/s is
`num_tokens / train_runtime`, both from the Trainer itself, so process start-up, data
loading, tokenizer training and model saving are excluded on both sides; the wall seconds of
each whole run are reported too. The two are alternated (A B A B ...) to cancel drift. The
last line printed is one JSON object.

    .venv/bin/python bench/train_throughput_cpu.py [--steps 150 --examples 1000 --repeats 2]
    .venv/bin/python bench/train_throughput_cpu.py --quick   # 5 steps, 200 examples, 1 repeat

`--quick` checks that both sides run and agree on what they trained (a smoke test, well
under a minute of training; its ratio is noise at 5 steps, not a figure to quote).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from training.launch import OFFLINE_ENV, launch_sft, parse_progress

PROMPT = "Title: {title}\nLead: {body:.300}\nTopic:"

# The bare script: the same tokenizer/model factories, the same SFTConfig numbers as
# training/sft.py, one process, no accelerate launch, no MLflow, no saving. On a GPU
# (bench/train_throughput.py) it honours the config's packing and bf16 too.
BARE_SCRIPT = r"""
import json, sys, time
import datasets, torch, transformers
from datasets import Dataset
from transformers import set_seed
from trl import SFTConfig, SFTTrainer
from training.sft import no_activation_checkpointing
from training.tiny_model import build_tiny_model, train_tokenizer

cfg = json.loads(open(sys.argv[1]).read())
tiny = cfg["tiny"]
torch.set_num_threads(int(cfg["threads"]))
set_seed(int(cfg["seed"]))
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()
rows = [json.loads(line) for line in open(cfg["train_file"]) if line.strip()]
train = Dataset.from_list(rows)
tokenizer = train_tokenizer(
    (p + c for p, c in zip(train["prompt"], train["completion"])),
    vocab_size=int(tiny["vocab_size"]),
)
model = build_tiny_model(
    tokenizer, hidden_size=tiny["hidden_size"], num_layers=tiny["num_layers"],
    num_heads=tiny["num_heads"], intermediate_size=tiny["intermediate_size"],
    max_position_embeddings=tiny["max_position_embeddings"], seed=int(cfg["seed"]),
    architecture=tiny.get("architecture", "llama"), num_kv_heads=tiny.get("num_kv_heads"),
    model_vocab_size=tiny.get("model_vocab_size"),
)
steps = int(cfg["max_steps"])
args = SFTConfig(
    output_dir=cfg["output_dir"],
    max_steps=steps,
    learning_rate=float(cfg["learning_rate"]),
    per_device_train_batch_size=int(cfg["batch_size"]),
    lr_scheduler_type=cfg["lr_scheduler"],
    warmup_steps=round(float(cfg["warmup_ratio"]) * steps),
    max_length=int(cfg["max_length"]),
    seed=int(cfg["seed"]),
    data_seed=int(cfg["seed"]),
    bf16=cfg.get("bf16") == "on",
    use_cpu=not torch.cuda.is_available(),
    packing=bool(cfg.get("packing")),
    **no_activation_checkpointing(),
    logging_steps=max(1, min(10, steps // 10)),
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    dataloader_num_workers=0,
)
trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
out = trainer.train()
tokens = next(h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h)
print("BARE_RESULT " + json.dumps({
    "num_tokens": tokens,
    "train_runtime": out.metrics["train_runtime"],
    "steps": out.global_step,
    "train_loss": out.training_loss,
}), flush=True)
"""


def write_examples(path: Path, n: int, seed: int) -> int:
    from examples.news_topics.build_warehouse import read_articles  # the corpus, not on a GPU box

    rows = read_articles()
    chosen = random.Random(seed).sample(rows, min(n, len(rows)))  # topics mixed, not in order
    with path.open("w") as f:
        for r in chosen:
            f.write(json.dumps({"prompt": PROMPT.format(**r), "completion": " " + r["topic"]}))
            f.write("\n")
    return len(chosen)


def run_posttrain(config: dict, run_dir: Path, steps: int, profile: str = "cpu") -> dict:
    def show(line: str) -> None:
        p = parse_progress(line)
        if p and "loss" in p and p["step"] % max(1, steps // 3) == 0:
            print(f"    step {p['step']}/{p['max_steps']} loss {p['loss']:.3f}", flush=True)

    started = time.perf_counter()
    result = launch_sft(config, run_dir, profile, on_line=show)
    wall = time.perf_counter() - started
    return {
        "num_tokens": result["num_tokens"],
        "train_runtime": result["train_runtime"],
        "steps": result["steps"],
        "train_loss": result["train_loss"],
        "wall_seconds": wall,
    }


def run_bare(config: dict, work: Path) -> dict:
    config_path = work / "bare_config.json"
    config_path.write_text(json.dumps({**config, "output_dir": str(work / "bare_out")}))
    script = work / "bare_trl.py"
    script.write_text(BARE_SCRIPT)
    threads = str(config["threads"])
    env = dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), str(config_path)],
        check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BARE_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"bare TRL run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(line[len("BARE_RESULT ") :]), "wall_seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="5 steps, 200 examples, 1 repeat (unless given explicitly)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--examples", type=int)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, help="runs of each side, alternated (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    defaults = {"steps": 5, "examples": 200, "repeats": 1} if args.quick else \
        {"steps": 150, "examples": 1000, "repeats": 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    started = time.perf_counter()
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)

    work = Path(tempfile.mkdtemp(prefix="throughput_bench_"))
    train_file = work / "train.jsonl"
    n = write_examples(train_file, args.examples, args.seed)

    import mlflow  # the stage logs to a SQLite store; artifacts stay in the temp folder

    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.create_experiment("throughput_bench", artifact_location=str(work / "artifacts"))

    config = {
        "train_file": str(train_file),
        "tiny": {
            "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 512,
            "vocab_size": 2000, "max_position_embeddings": 512,
        },
        "seed": args.seed, "max_steps": args.steps, "learning_rate": args.lr,
        "batch_size": args.batch, "lr_scheduler": "cosine", "warmup_ratio": 0.03,
        "max_length": args.max_length, "threads": args.threads,
    }  # fmt: skip
    posttrain_config = {
        **config,
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "throughput_bench"},
    }

    print(f"{n} examples, {args.steps} steps, batch {args.batch}, threads {args.threads}")
    runs = []
    for i in range(args.repeats):
        for side in ("posttrain", "bare_trl"):
            print(f"run {i + 1}/{args.repeats} {side} ...", flush=True)
            if side == "posttrain":
                r = run_posttrain(posttrain_config, work / f"posttrain_{i}", args.steps)
            else:
                r = run_bare(config, work)
            r = {"side": side, "repeat": i + 1, **r}
            r["tokens_per_s"] = r["num_tokens"] / r["train_runtime"]
            runs.append(r)
            print(
                f"  {side}: {r['num_tokens']:,} tokens in {r['train_runtime']:.1f} s train "
                f"= {r['tokens_per_s']:,.0f} tokens/s; whole run {r['wall_seconds']:.1f} s",
                flush=True,
            )

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["side"] == side)

    # ratio per repeat (each posttrain run against the bare run next to it), then the median
    ratios = [
        p["tokens_per_s"] / b["tokens_per_s"] for p, b in zip(runs[0::2], runs[1::2], strict=True)
    ]
    print(json.dumps({
        "posttrain_tokens_per_s": round(median("posttrain", "tokens_per_s"), 1),
        "bare_trl_tokens_per_s": round(median("bare_trl", "tokens_per_s"), 1),
        "ratio": round(statistics.median(ratios), 4),
        "ratios": [round(x, 4) for x in ratios],
        "posttrain_wall_s": round(median("posttrain", "wall_seconds"), 1),
        "bare_trl_wall_s": round(median("bare_trl", "wall_seconds"), 1),
        "runs": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs
        ],
        "steps": args.steps,
        "examples": n,
        "batch": args.batch,
        "max_length": args.max_length,
        "threads": args.threads,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
