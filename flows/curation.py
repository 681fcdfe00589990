"""The curate stage: the store's accepted examples made into the training set.

Exact duplicates go, copies of held-out prompts go (they would inflate accuracy), and so do
near-copies of them (paraphrases, light edits: flows/contamination.py), then the task kind's
own curation (classification: the label quota closes whatever gap to the spec's target the
top-up rounds left; generation: near-duplicate answers go); the set is written as
`<out>/data/train.jsonl` and logged to the parent MLflow run as a dataset with its digest.
"""

import hashlib
import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import tracking
from flows.contamination import guard_examples
from flows.generation import held_out_prompts
from flows.kinds import kind_of
from flows.spec import Spec
from flows.store import shared_store


@task(name="curate", cache_policy=NO_CACHE)
def curate(spec: Spec, spec_path: str, store_url: str, run_id: str, out_dir: Path,
           mlflow_run_id: str) -> dict:
    """Exact dedup, drop copies of held-out prompts, balance to the target, write, log."""
    examples = shared_store(store_url).accepted_examples(run_id)
    held_out = held_out_prompts(spec_path)
    seen: set[str] = set()
    kept, duplicates, leaks = [], 0, 0
    for ex in sorted(examples, key=lambda e: (e["slice_id"], e["row_id"])):
        if ex["content_hash"] in seen:  # the same prompt and completion twice
            duplicates += 1
        elif ex["prompt"] in held_out:  # a copy of an evaluation row would inflate accuracy
            leaks += 1
        else:
            kept.append(ex)
        seen.add(ex["content_hash"])
    # near-copies of held-out rows (paraphrases, light edits) go too: flows/contamination.py
    kept, contamination = guard_examples(spec, spec_path, kept)
    before_kind = len(kept)
    kept, figures = kind_of(spec).curate(kept)  # a label quota, near-duplicate answers ...
    if not kept:
        raise RuntimeError("no accepted examples to train on: see the rejections in the store")
    path = out_dir / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": k["prompt"], "completion": k["completion"]},
                                       ensure_ascii=False) + "\n" for k in kept))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    tracking.log_dataset(mlflow_run_id, path, digest[:16], name=f"{spec.name}-train")
    trimmed = before_kind - len(kept)
    get_run_logger().info("curated %d examples (%d duplicates, %d copies of held-out rows, "
                          "%d near-copies of held-out rows at similarity >= %s, %d trimmed "
                          "by the %s task's curation), sha256 %s", len(kept), duplicates, leaks,
                          contamination["removed"], contamination["threshold"], trimmed,
                          spec.task.kind, digest[:16])
    return {"path": str(path), "n": len(kept), "duplicates": duplicates, "eval_copies": leaks,
            "quota_trimmed": trimmed, "sha256": digest, "label_counts": {}, "tv_after": None,
            **figures, "contamination": contamination}
