"""Bench: the four production failures, each injected through the simulated teacher's knobs
on the demo spec, and what posttrain's answer to each achieves.

Each scenario is one real `post_training` flow run (real Prefect, the teacher over HTTP
through the official SDKs, real SQL, a short real training run so the flow completes):

    drift    noise 5% -> 40% after 200 labelling calls: when the first agent's alarm fires
             (in labelling calls after the change, from the teacher's request log) and how
             right the accepted labels stay (against the gold column)
    bias     two labels produced 3x too often: label TV distance to the target (uniform)
             after generation, after top-up, and of the curated set
    memory   one agent, 1,000 turns on a small context budget: the largest context it sent
             and whether the pinned spec was in every request (teacher-side check)
    misuse   10% of tool calls harmful SQL or invalid arguments: how many the teacher sent,
             how many the agents counted, and whether the warehouse changed

    .venv/bin/python bench/failure_modes.py [--only drift,bias,memory,misuse] [--keep DIR]
    .venv/bin/python bench/failure_modes.py --quick     # bias and misuse, 150 rows (~2 min)

`--quick` runs on a 150-row warehouse (30 articles a topic) with 5 training steps, and by
default only the bias and misuse scenarios (each a whole flow run with training; drift and
memory are scaled down too when named with --only: the drift starts after 20 labelling
calls, the memory agent gets 150 turns). The spec every scenario starts from has tuning and
DPO off: the bench measures generation, not training stages.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import os

# before prefect is imported (the flows import it): a loaded machine can take more than
# Prefect's default 20 s to start its temporary API server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import sqlalchemy as sa
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workdir import workdir
from examples.news_topics.build_warehouse import build

DEMO = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"
DRIFT_AFTER = 200
# --quick: 30 articles a topic, 5 training steps, the drift after 20 labelling calls, the
# memory agent 150 turns
QUICK = {"per_label": 30, "max_steps": 5, "drift_after": 20, "drift_page_size": 5,
         "memory_turns": 150}


def base_spec(warehouse: str, tmp: Path, max_steps: int = 20) -> dict:
    """The demo spec with a short training run and no tuning or DPO: the bench measures
    generation, not training stages (a DPO stage after 20 SFT steps is stopped as degenerate
    by its sanity check, and the whole flow with it)."""
    spec = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    spec["warehouse"]["url"] = warehouse
    spec["student"]["tiny"] = {"hidden_size": 64, "num_layers": 1, "num_heads": 2,
                               "intermediate_size": 128, "vocab_size": 600}
    spec["training"].update(max_steps=max_steps, batch_size=8)
    spec["tuning"]["enabled"] = False
    spec["dpo"]["enabled"] = False
    spec["evaluation"]["max_rows"] = 50
    spec["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    return spec


def run(name: str, spec: dict, tmp: Path) -> tuple[dict, Path]:
    """One flow run; a run stopped by the coverage floor is a result too (its summary.json)."""
    from flows.coverage import CoverageError
    from flows.pipeline import post_training

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp / name
    started = time.perf_counter()
    try:
        summary = post_training(spec_path=str(path), out_dir=str(out))
    except CoverageError:
        summary = json.loads((out / "summary.json").read_text())
    summary["bench_seconds"] = round(time.perf_counter() - started, 1)
    return summary, out


def teacher_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "teacher_requests.jsonl").read_text().splitlines()]


def accepted_accuracy(out: Path, warehouse: str) -> tuple[float, int]:
    with sa.create_engine(f"sqlite:///{out / 'store.db'}").connect() as c:
        accepted = c.execute(sa.text(
            "SELECT row_id, label FROM examples WHERE status = 'accepted'")).all()
    with sa.create_engine(warehouse).connect() as c:
        gold = {str(i): t for i, t in c.execute(sa.text("SELECT id, topic FROM articles"))}
    right = sum(gold[r] == label for r, label in accepted)
    return right / len(accepted), len(accepted)


def _steps(quick: bool) -> dict:
    return {"max_steps": QUICK["max_steps"]} if quick else {}


def drift(warehouse: str, tmp: Path, quick: bool = False) -> dict:
    after_calls = QUICK["drift_after"] if quick else DRIFT_AFTER
    spec = base_spec(warehouse, tmp, **_steps(quick))
    spec["llm"]["simulated"].update(error_rate=0.05, drift_after_calls=after_calls,
                                    drift_error_rate=0.4)
    # more, smaller calls: the change lands mid-run. The teacher never recovers here, so
    # agents keep being stopped: measure the labels, not the coverage floor
    spec["generation"].update(page_size=QUICK["drift_page_size"] if quick else 10,
                              min_coverage=0.0)
    summary, out = run("drift", spec, tmp)
    log = [x for x in teacher_log(out) if x["kind"] == "label"]
    change = next((x["time"] for x in log if x["labelling_calls_so_far"] > after_calls),
                  float("inf"))  # inf: the run ended before the change
    after = sorted(a["time"] for a in summary["drift_alarms"] if a["time"] >= change)
    first = after[0] if after else None
    calls_at_alarm = max((x["labelling_calls_so_far"] for x in log if x["time"] <= first),
                         default=None) if first else None
    accuracy, n = accepted_accuracy(out, warehouse)
    return {"drift_after_calls": after_calls,
            "drift_alarm_after_calls": None if calls_at_alarm is None
            else calls_at_alarm - after_calls,
            "drift_false_alarms_before_change": sum(a["time"] < change
                                                    for a in summary["drift_alarms"]),
            "drift_accepted_label_accuracy": round(accuracy, 4),
            "drift_accepted": n, "drift_reanchors": summary["reanchors"],
            "drift_examples_rejected": summary["examples_rejected"],
            "drift_seconds": summary["bench_seconds"]}


def bias(warehouse: str, tmp: Path, quick: bool = False) -> dict:
    spec = base_spec(warehouse, tmp, **_steps(quick))
    spec["llm"]["simulated"].update(bias_labels=["sports", "business"], bias_factor=3.0)
    spec["distribution"] = {"target": "uniform", "tolerance": 0.05, "max_topup_rounds": 2}
    summary, _ = run("bias", spec, tmp)
    return {"bias_tv_before": round(summary["label_tv_before"], 4),
            "bias_tv_after_topup": round(summary["label_tv_after_topup"], 4),
            "bias_tv_after": round(summary["label_tv_after"], 4),
            "bias_topup_slices": summary["topup_slices"],
            "bias_train_examples": summary["train_examples"],
            "bias_label_counts": summary["label_counts"],
            "bias_seconds": summary["bench_seconds"]}


def memory(warehouse: str, tmp: Path, quick: bool = False, turns: int | None = None,
           budget: int = 4000) -> dict:
    turns = turns or (QUICK["memory_turns"] if quick else 1000)
    spec = base_spec(warehouse, tmp, **_steps(quick))
    spec["slicing"] = {"table": "articles", "id_column": "id", "method": "hash", "buckets": 1,
                       "max_rows_per_slice": 100000}  # one agent over every row
    spec["llm"]["judge"] = None
    spec["generation"].update(page_size=2, max_turns=turns, memory_budget_tokens=budget,
                              concurrency=1)
    summary, out = run("memory", spec, tmp)
    log = [x for x in teacher_log(out) if x["kind"] == "label"]
    return {"memory_turns": len(log), "memory_max_tokens": summary["max_context_tokens"],
            "memory_budget": budget,
            "memory_pinned_always_present": all(x["pinned_present"] for x in log),
            "memory_max_request_tokens_teacher_side": max(x["context_tokens"] for x in log),
            "memory_accepted": summary["examples_accepted"],
            "memory_seconds": summary["bench_seconds"]}


def checksum(path: str) -> str:
    return hashlib.sha256(Path(path.removeprefix("sqlite:///")).read_bytes()).hexdigest()


def misuse(warehouse: str, tmp: Path, quick: bool = False) -> dict:
    spec = base_spec(warehouse, tmp, **_steps(quick))
    # harmful SQL on SQL calls plus invalid arguments on any call: about 10% of tool calls
    spec["llm"]["simulated"].update(misuse_rate=0.2, malformed_rate=0.09)
    before = checksum(warehouse)
    summary, out = run("misuse", spec, tmp)
    log = [x for x in teacher_log(out) if x["kind"] == "label"]
    attempts = sum(1 for x in log if x["misuse"] and x["misuse"]["kind"] in
                   ("misuse", "malformed"))
    counted = sum(summary["tool_misuse"].values())
    return {"misuse_attempts": attempts, "misuse_counted": counted,
            "misuse_executed": max(0, attempts - counted),
            "misuse_by_kind": summary["tool_misuse"],
            "misuse_tool_calls": len(log),
            "misuse_share_of_tool_calls": round(attempts / len(log), 4),
            "misuse_warehouse_unchanged": checksum(warehouse) == before,
            "misuse_accepted": summary["examples_accepted"],
            "misuse_seconds": summary["bench_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="150 rows, 5 training steps; only bias,misuse unless --only says")
    ap.add_argument("--only", help="scenarios (default drift,bias,memory,misuse)")
    ap.add_argument("--keep", help="keep the run folders here (default: a temp folder)")
    args = ap.parse_args()
    only = args.only or ("bias,misuse" if args.quick else "drift,bias,memory,misuse")
    started = time.perf_counter()
    tmp = workdir(args.keep, "posttrain-failures-")
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    warehouse = build(tmp / "warehouse.db", per_label=QUICK["per_label"] if args.quick else None)
    figures: dict = {"quick": args.quick}
    for name in only.split(","):
        figures.update({"drift": drift, "bias": bias, "memory": memory,
                        "misuse": misuse}[name](warehouse, tmp, quick=args.quick))
        print(json.dumps({k: v for k, v in figures.items() if k.startswith(name)}), flush=True)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
