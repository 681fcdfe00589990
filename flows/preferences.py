"""The DPO stage: preference pairs written by sub-agents over the curated SFT data, then TRL
DPO on the SFT model, launched like SFT (`accelerate launch -m training.dpo`).

    pairs = write_pairs(spec, dataset, settings, store_url, run_id, out, mlflow_run_id)
    dpo = train_dpo(spec, pairs, Path(sft["final_dir"]), out, mlflow_uri, mlflow_run_id,
                    progress.id)

`write_pairs` takes the curated examples (the file curate wrote, matched back to the store's
accepted examples for their row ids), asks the generator's model for a chosen and a rejected
completion per prompt (`pairs_per_call` prompts a call, `generation.concurrency` calls at
once), keeps only pairs that pass the gates of `agents.pairs` (chosen must be the curated SFT
completion), and splits them into train and held-out pairs by a hash of the prompt.
`train_dpo` trains policy and reference from the SFT model and reports the reward accuracy
and margin on the held-out pairs.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from agents.pairs import Pair, PairsResult
from flows import tracking
from flows.contamination import guard_examples
from flows.kinds import kind_of
from flows.progress import Progress
from flows.runtime import RuntimeSettings, get_runtime
from flows.spec import Spec
from flows.store import shared_store
from training.launch import launch_training

NOT_IN_STORE = "not_in_store"  # a curated line with no accepted example (so no row id)


def _unit(text: str) -> float:
    """A stable number in [0, 1) from a text (sha256), for sampling and the held-out split."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def pair_sources(curated_path: str | Path, accepted: list[dict], max_pairs: int | None = None
                 ) -> tuple[list[dict], int]:
    """The curated examples with their row ids: ([{row_id, prompt, completion}], unmatched).

    Curate writes only prompt/completion, so each curated line is matched to the store's
    accepted example with the same prompt and completion (first by slice and row id). One
    item per prompt. With `max_pairs`, a sample chosen by a hash of the prompt (the same on a
    re-run, not biased to the first slices)."""
    curated: set[tuple[str, str]] = set()
    with open(curated_path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                curated.add((row["prompt"], row["completion"]))
    items, prompts, rows = [], set(), set()
    for ex in sorted(accepted, key=lambda e: (str(e["slice_id"]), str(e["row_id"]))):
        key = (ex["prompt"], ex["completion"])
        if key in curated and ex["prompt"] not in prompts and str(ex["row_id"]) not in rows:
            items.append({"row_id": ex["row_id"], "prompt": ex["prompt"],
                          "completion": ex["completion"]})
            prompts.add(ex["prompt"])
            rows.add(str(ex["row_id"]))
    unmatched = len({p for p, _ in curated} - prompts)
    items.sort(key=lambda i: (_unit(i["prompt"]), str(i["row_id"])))
    return (items[:max_pairs] if max_pairs else items), unmatched


def split_pairs(pairs: list[Pair], holdout_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, held_out) by a hash of the prompt; the held-out side is never empty (the pair
    with the lowest hash goes there when none falls under the fraction)."""
    if len(pairs) < 2:
        raise RuntimeError(f"DPO needs at least 2 kept preference pairs, got {len(pairs)}")
    ranked = sorted(pairs, key=lambda p: (_unit(p.prompt), str(p.row_id)))
    held = [p for p in ranked if _unit(p.prompt) < holdout_fraction] or ranked[:1]
    if len(held) == len(ranked):
        held = held[:-1]
    held_keys = {id(p) for p in held}
    return [p for p in pairs if id(p) not in held_keys], [p for p in pairs if id(p) in held_keys]


def _write_jsonl(path: Path, pairs: list[Pair]) -> str:
    path.write_text("".join(
        json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected},
                   ensure_ascii=False) + "\n" for p in pairs))
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ── preference pairs ─────────────────────────────────────────────────────────────────────────
@task(name="write-pairs", cache_policy=NO_CACHE)
def write_pairs(spec: Spec, dataset: dict, settings: RuntimeSettings, store_url: str,
                run_id: str, out_dir: Path, mlflow_run_id: str,
                sft_dir: Path | None = None) -> dict:
    """Pairs for the curated examples, gated, split train/held-out, written and logged. The
    task kind makes them (classification: agents write a chosen and a rejected label; text
    answers: the curated answer against the SFT model's own in `sft_dir`, judged)."""
    d = spec.dpo
    items, unmatched = pair_sources(dataset["path"], shared_store(store_url).accepted_examples(
        run_id), d.max_pairs)
    writer = kind_of(spec).pair_writer(get_runtime(settings), sft_dir, items)
    batches = [items[i : i + d.pairs_per_call] for i in range(0, len(items), d.pairs_per_call)]

    def one(numbered: tuple[int, list[dict]]) -> PairsResult:
        n, batch = numbered
        return writer.write(batch, agent=f"pairs/{n}", slice_id="dpo-pairs")

    total = PairsResult()
    with ThreadPoolExecutor(max_workers=spec.generation.concurrency) as pool:
        for result in pool.map(one, enumerate(batches)):  # in batch order: deterministic
            total.merge(result)
    rejected = Counter(total.rejected)
    if unmatched:
        rejected[NOT_IN_STORE] += unmatched
    # a pair near a held-out prompt goes (text answers: its chosen and rejected texts too)
    total.pairs, contamination = guard_examples(
        spec, settings.spec_path, total.pairs,
        texts=(lambda p: [p.prompt]) if spec.task.kind == "classification"
        else (lambda p: [p.prompt, p.chosen, p.rejected]))
    if len(total.pairs) < 2:
        raise RuntimeError(f"DPO: only {len(total.pairs)} preference pairs kept of "
                           f"{len(items)} prompts ({total.failed_calls} of {total.calls} calls "
                           f"failed); rejected: {dict(rejected)}")
    train, held = split_pairs(total.pairs, d.holdout_fraction)

    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = data / "pairs_train.jsonl", data / "pairs_eval.jsonl"
    digest, eval_digest = _write_jsonl(train_path, train), _write_jsonl(eval_path, held)
    tracking.log_dataset(mlflow_run_id, train_path, digest[:16], name=f"{spec.name}-dpo-pairs")
    tracking.log_dataset(mlflow_run_id, eval_path, eval_digest[:16],
                         name=f"{spec.name}-dpo-pairs-heldout", context="evaluation")
    tracking.log_metrics(MlflowClient(), mlflow_run_id, {
        "dpo_pairs_train": len(train), "dpo_pairs_eval": len(held),
        "dpo_pairs_rejected": sum(rejected.values())})
    get_run_logger().info(
        "preference pairs: %d kept of %d prompts (%d train, %d held out), %d calls (%d failed), "
        "rejected %s, %d near-copies of held-out rows dropped, sha256 %s", len(total.pairs),
        len(items), len(train), len(held), total.calls, total.failed_calls, dict(rejected),
        contamination["removed"], digest[:16])
    return {"train_path": str(train_path), "eval_path": str(eval_path), "n_train": len(train),
            "n_eval": len(held), "rejected": dict(rejected), "sha256": digest,
            "eval_sha256": eval_digest, "calls": total.calls,
            "failed_calls": total.failed_calls, "prompts": len(items),
            "contamination": contamination}


# ── DPO ──────────────────────────────────────────────────────────────────────────────────────
def dpo_config(spec: Spec, pairs: dict, sft_dir: Path, out_dir: Path, mlflow_uri: str,
               mlflow_run_id: str) -> dict:
    """The JSON config of `training.dpo` for this spec."""
    d, t = spec.dpo, spec.training
    config = {
        "train_file": pairs["train_path"],
        "eval_file": pairs["eval_path"],
        "model_dir": str(sft_dir),
        "output_dir": str(out_dir / "dpo"),
        "seed": spec.student.seed,
        "beta": d.beta,
        "loss_type": list(d.loss_type),
        "max_steps": d.max_steps,
        "learning_rate": d.learning_rate,
        "batch_size": d.batch_size,
        "max_length": d.max_length,
        "threads": t.threads,
        "bf16": t.bf16,
        "gradient_checkpointing": t.gradient_checkpointing,
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": spec.tracking.experiment,
                   "parent_run_id": mlflow_run_id, "run_name": f"{spec.name}-dpo",
                   "tags": {"posttrain.stage": "dpo"}},
    }
    if t.lora.r > 0:
        config["lora"] = t.lora.model_dump()
    if t.save_steps is not None:  # checkpoints to resume from (default: a tenth of max_steps)
        config["save_steps"] = t.save_steps
    return config


@task(name="train-dpo", cache_policy=NO_CACHE)
def train_dpo(spec: Spec, pairs: dict, sft_dir: Path, out_dir: Path, mlflow_uri: str,
              mlflow_run_id: str, progress_id: str) -> dict:
    """TRL DPO from the SFT model in `sft_dir`; output in out_dir/dpo. Raises
    `TrainingFailed` (its reason one line, e.g. `DPO degenerate: ...`) when the run fails."""
    progress = Progress.get(progress_id)
    config = dpo_config(spec, pairs, sft_dir, out_dir, mlflow_uri, mlflow_run_id)
    result = launch_training("training.dpo", config, out_dir / "dpo",
                             profile=spec.training.accelerate_profile,
                             on_line=progress.training_line, result_name="dpo_result.json")
    tracking.log_metrics(MlflowClient(mlflow_uri), mlflow_run_id, {
        f"dpo_{k}": result[k] for k in ("reward_accuracy", "reward_margin")
        if isinstance(result.get(k), int | float)})
    get_run_logger().info(
        "DPO: %d steps on %d pairs, held-out reward accuracy %.3f, margin %.4f (%d pairs)",
        result["steps"], result["n_train"], result["reward_accuracy"], result["reward_margin"],
        result["n_eval"])
    return result
