"""Bench: an error-driven retrain against a plain one, on the same champion and LLM budget.

On the demo warehouse (regions are label-skewed: uk politics-heavy, americas business and
entertainment-heavy, europe sports-heavy):

  (a) a champion is trained on the first HALF of the planned slices (`generation.max_slices`);
  (b) retrains over ALL slices start from copies of that champion's MLflow store (the
      sqlite file is copied; the champion's artifacts stay where the champion run wrote them
      and are only read), with the SAME seed and the SAME LLM budget, small enough that only
      part of the warehouse gets labelled (`--budget-share` x the estimated cost of labelling
      every slice, from the champion run's cost per planned row; `generation.min_coverage` 0,
      so each trains on what it got): a plain run, and an error-driven one
      (`error_driven.enabled`: probe, worst groups first with more turns, weak-label top-up,
      and the SFT fine-tunes the champion's weights; `--from-scratch`: a fresh student, as
      the plain run trains). `--init-arm` adds a third: a plain run that fine-tunes the
      champion's weights, the error-driven run's start without its focus.

Figures per run: the share of LLM calls spent on the champion's weak labels, accepted
examples per label, the final model's per-label F1 on the held-out rows, its worst-label F1
and accuracy, cost and wall time. The weak labels are the error-driven run's (its probe map);
the plain run is measured against the same labels.

    share of calls on weak labels: every LLM call recorded with a slice id (the agent's own
    calls and the judge's reviews of its examples) is attributed to that agent; an agent's
    calls are split over labels in proportion to the labels of the examples it got accepted
    (an agent with none accepted: "unattributed"); a targeted agent (`+weak` slice, wanting
    only the weak labels) counts wholly to the weak labels. share = weak-attributed calls /
    all calls with a slice id.

Acceptance (issue 15): the error-driven run spends a larger share of its calls on the weak
labels and its worst-label F1 is higher than the plain run's, per seed.

    .venv/bin/python bench/error_driven.py --quick      # 150 rows, tiny model, one seed
    .venv/bin/python bench/error_driven.py --seeds 0,1  # the demo warehouse, 300 steps

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import os

# before prefect is imported (the flows import it): a loaded machine can take more than
# Prefect's default 20 s to start its temporary API server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import argparse
import copy
import json
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workdir import workdir
from examples.news_topics.build_warehouse import build

DEMO = ROOT / "examples" / "news_topics" / "spec.yaml"
FULL = {"per_label": None, "max_rows_per_slice": 150, "max_steps": 300, "batch_size": 16,
        "student": {"hidden_size": 128, "num_layers": 2, "num_heads": 4,
                    "intermediate_size": 512, "vocab_size": 1000},
        "probe_rows": 20}
QUICK = {"per_label": 30, "max_rows_per_slice": 25, "max_steps": 5, "batch_size": 8,
         "student": {"hidden_size": 64, "num_layers": 1, "num_heads": 2,
                     "intermediate_size": 128, "vocab_size": 400},
         "probe_rows": 4}


def base_spec(warehouse: str, size: dict, seed: int) -> dict:
    """The demo spec, tuning and DPO off (the bench measures where the labels go, and what
    the SFT model learns from them), modest training, every run on the same seed."""
    spec = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    spec["warehouse"]["url"] = warehouse
    spec["llm"].pop("tuner", None)
    spec["llm"]["simulated"]["seed"] = seed
    spec["tuning"]["enabled"] = spec["dpo"]["enabled"] = False
    spec["slicing"]["max_rows_per_slice"] = size["max_rows_per_slice"]
    spec["student"].update(tiny=size["student"], seed=seed)
    spec["training"].update(max_steps=size["max_steps"], batch_size=size["batch_size"])
    spec["generation"]["min_coverage"] = 0.0  # a budgeted run trains on what it got
    return spec


def run_flow(name: str, spec: dict, folder: Path) -> tuple[dict, Path, float]:
    """One `post_training` flow run in `folder/run` (its MLflow store is `folder/mlflow.db`)."""
    from flows.pipeline import post_training

    spec = copy.deepcopy(spec)
    spec["tracking"]["uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    result = post_training(spec_path=str(path), out_dir=str(folder / "run"))
    summary = getattr(result, "data", None) or result
    if not isinstance(summary, dict):  # a Completed state with warnings: the file has it
        summary = json.loads((folder / "run" / "summary.json").read_text())
    return summary, folder / "run", round(time.perf_counter() - started, 1)


def plan_rows(spec: dict) -> list[int]:
    """The planned slices' row counts of `spec` (the plan the flow will make)."""
    from flows.slicing import plan_slices
    from flows.spec import parse_spec
    from flows.warehouse import make_engine

    parsed = parse_spec(copy.deepcopy(spec))
    return [s.row_count for s in plan_slices(parsed, make_engine(parsed.warehouse.url))]


def call_shares(out: Path, weak: list[str], labels: list[str]) -> dict:
    """Every call with a slice id attributed to labels (see the module docstring)."""
    store = sa.create_engine(f"sqlite:///{out / 'store.db'}")
    with store.connect() as c:
        calls = dict(c.execute(sa.text(
            "SELECT slice_id, count(*) FROM llm_calls WHERE slice_id IS NOT NULL AND cached = 0 "
            "GROUP BY slice_id")).all())
        accepted = c.execute(sa.text(
            "SELECT slice_id, label FROM examples WHERE status = 'accepted'")).all()
    by_agent: dict[str, Counter] = defaultdict(Counter)
    for sid, label in accepted:
        by_agent[sid][label] += 1
    spent: Counter = Counter()
    for sid, n in calls.items():
        if "+weak" in sid:
            for label in weak:
                spent[label] += n / len(weak)
            continue
        got = by_agent.get(sid)
        if not got:
            spent["<unattributed>"] += n
            continue
        total = sum(got.values())
        for label, k in got.items():
            spent[label] += n * k / total
    all_calls = sum(calls.values())
    return {"calls_with_slice": all_calls,
            "calls_by_label": {k: round(spent.get(k, 0.0), 1)
                               for k in [*labels, "<unattributed>"]},
            "weak_call_share": round(sum(spent[k] for k in weak) / all_calls, 4)
            if all_calls else 0.0}


def figures(summary: dict, out: Path, weak: list[str], labels: list[str], wall: float) -> dict:
    final = json.loads((out / "eval.json").read_text())["final"]
    f1 = {k: round(m["f1"], 4) for k, m in final["per_label"].items()}
    store = sa.create_engine(f"sqlite:///{out / 'store.db'}")
    with store.connect() as c:
        per_label = dict(c.execute(sa.text(
            "SELECT label, count(*) FROM examples WHERE status = 'accepted' GROUP BY label"))
            .all())
    return {**call_shares(out, weak, labels),
            "accepted_by_label": {k: per_label.get(k, 0) for k in labels},
            "accepted": sum(per_label.values()),
            "coverage": summary.get("coverage"), "cost_usd": summary.get("cost_usd"),
            "f1": f1, "worst_label_f1": min(f1.values()),
            "worst_label": min(f1, key=f1.get), "weak_labels_f1": {k: f1[k] for k in weak},
            "accuracy": round(final["accuracy"], 4), "macro_f1": round(final["macro_f1"], 4),
            "champion_accuracy_same_rows": summary.get("champion_accuracy"),
            "wall_s": wall}


def champion_weights(folder: Path, registered: str) -> Path:
    """The champion's model folder (weights and tokenizer) from `folder`'s MLflow store."""
    import mlflow

    from training.registry import champion_model_dir

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    return champion_model_dir(registered, folder / "champion_init")


def one_seed(warehouse: str, size: dict, seed: int, tmp: Path, budget_share: float,
             arms: tuple[str, ...], start_from_champion: bool, quick: bool = False) -> dict:
    spec = base_spec(warehouse, size, seed)
    labels = spec["task"]["labels"]
    rows = plan_rows(spec)
    n_slices, half = len(rows), max(1, len(rows) // 2)

    # (a) the champion: the first half of the slices
    champ = tmp / f"champion_s{seed}"
    champ.mkdir(parents=True, exist_ok=True)
    spec_a = copy.deepcopy(spec)
    spec_a["generation"]["max_slices"] = half
    s_a, _, wall_a = run_flow("champion", spec_a, champ)
    if not s_a.get("promoted"):
        if not quick:
            raise SystemExit(f"the champion run was not promoted: {s_a['promotion_reason']}")
        # --quick checks the mechanics: 5 steps learn nothing, the bench names it champion
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{champ / 'mlflow.db'}").set_registered_model_alias(
            spec["tracking"]["registered_model"], "champion", s_a["model_version"])
    planned_a = s_a["coverage_rows"]["planned_rows"]
    full_cost = s_a["cost_usd"] / max(1, planned_a) * sum(rows)
    budget = round(budget_share * full_cost, 4)

    # (b) plain and error-driven runs from copies of the champion's MLflow store
    results = {}
    for name in arms:
        folder = tmp / f"{name}_s{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(champ / "mlflow.db", folder / "mlflow.db")
        spec_b = copy.deepcopy(spec)
        spec_b["llm"]["budget"] = {"max_usd": budget}
        if name == "error_driven":
            spec_b["error_driven"] = {"enabled": True, "probe_rows": size["probe_rows"],
                                      "start_from_champion": start_from_champion}
        if name == "plain_from_champion":  # the init alone, without the focus
            spec_b["student"].update(source="pretrained", name_or_path=str(
                champion_weights(folder, spec["tracking"]["registered_model"])))
        results[name] = run_flow(name, spec_b, folder)
    ed_out = results["error_driven"][1]
    emap = json.loads((ed_out / "error_map_before.json").read_text())
    weak = emap["weak_labels"]
    runs = {name: figures(s, out, weak, labels, wall) for name, (s, out, wall)
            in results.items()}
    ed, plain = runs["error_driven"], runs["plain"]
    extra = {name: runs[name] for name in arms if name not in ("plain", "error_driven")}
    return {"seed": seed, "slices": n_slices, "champion_slices": half,
            "champion": {"accuracy": s_a.get("accuracy"), "promoted": s_a.get("promoted"),
                         "cost_usd": s_a["cost_usd"],
                         "planned_rows": planned_a, "wall_s": wall_a},
            "budget_usd": budget, "estimated_full_cost_usd": round(full_cost, 4),
            "weak_labels": weak,
            "champion_probe": {"n": emap["n"], "accuracy": emap["accuracy"],
                               "f1": {k: v["f1"] for k, v in emap["per_label"].items()},
                               "by_slice": {k: v["error"] for k, v in emap["by_slice"].items()},
                               "confusions": emap["confusions"][:5],
                               "focus_groups": emap["focus"]["focus_groups"]},
            "plain": plain, "error_driven": ed, **extra,
            "error_driven_start_from_champion": start_from_champion,
            "weak_share_higher": ed["weak_call_share"] > plain["weak_call_share"],
            "worst_f1_higher": ed["worst_label_f1"] > plain["worst_label_f1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="150 rows, a tiny model, 5 training steps, one seed")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--budget-share", type=float, default=0.5,
                    help="the retrains' LLM budget as a share of the estimated cost of "
                    "labelling every slice (default 0.5)")
    ap.add_argument("--init-arm", action="store_true",
                    help="also a plain run that fine-tunes the champion's weights (the "
                    "error-driven run's start without its focus), to tell the two apart")
    ap.add_argument("--from-scratch", action="store_true",
                    help="the error-driven run trains a fresh student "
                    "(error_driven.start_from_champion false)")
    ap.add_argument("--keep", help="keep the run folders here (default: a temp folder)")
    args = ap.parse_args()
    started = time.perf_counter()
    tmp = workdir(args.keep, "posttrain-error-driven-")
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    size = QUICK if args.quick else FULL
    warehouse = build(tmp / "warehouse.db", per_label=size["per_label"])
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = []
    for seed in seeds:
        arms = ("plain", "error_driven", *(("plain_from_champion",) if args.init_arm else ()))
        per_seed.append(one_seed(warehouse, size, seed, tmp / f"seed{seed}", args.budget_share,
                                 arms, not args.from_scratch, args.quick))
        print(json.dumps(per_seed[-1]), flush=True)
    print(json.dumps({
        "quick": args.quick, "seeds": seeds, "budget_share": args.budget_share,
        "per_seed": per_seed,
        "weak_share_higher_all_seeds": all(s["weak_share_higher"] for s in per_seed),
        "worst_f1_higher_all_seeds": all(s["worst_f1_higher"] for s in per_seed),
        "wall_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
