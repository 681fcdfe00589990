"""Bench: `posttrain preview` (issue 15): how long a person waits to see what the agents will
write, and how much of what the preview paid the following full run gets back free.

1. `posttrain preview SPEC --out DIR` as a user runs it (a subprocess, a fresh out folder, a
   fresh PREFECT_HOME: cold), timed wall to wall. Wanted: under 60 s on the demo. `--quick`
   runs the CLI's `main` in this process instead, so the full run after it shares its
   temporary Prefect API (one start, not two: the quick bench stays under a minute).
2. The full run's generate stage restricted to the previewed slices, in the same folder: the
   pipeline's own run lifecycle, LLM endpoints, planning task and `generate` (one agent task
   per slice, uncapped, as `posttrain run` starts them), in a Prefect flow. Its LLM calls on
   those slices are read back from the example store: cache hits, and which of the preview's
   paid calls (by request hash) came back as hits, with the dollars the preview paid for
   them (a cache hit costs nothing). Wanted: every previewed call reused.

    .venv/bin/python bench/preview.py --quick     # 100-row warehouse, 10 rows a slice (~1 min)
    .venv/bin/python bench/preview.py             # the demo spec and warehouse, 25 rows a slice

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import os

# before prefect is imported: a loaded machine can take more than Prefect's default 20 s to
# start an ephemeral API server (the preview subprocess gets the same from the CLI)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workdir import workdir

DEMO = ROOT / "examples" / "news_topics" / "spec.yaml"


def quick_spec(tmp: Path) -> Path:
    """The demo spec on a 100-row warehouse (20 articles a topic), small slices and pages."""
    from examples.news_topics.build_warehouse import build

    data = yaml.safe_load(DEMO.read_text())
    data["warehouse"]["url"] = build(tmp / "warehouse.db", per_label=20)
    data["slicing"]["max_rows_per_slice"] = 30
    data["generation"].update(page_size=10)
    data["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def preview(spec: Path, out: Path, slices: int, rows: int, in_process: bool) -> float:
    """`posttrain preview`'s wall seconds: in a subprocess (as a user runs it, cold), or
    `in_process` (the CLI's `main` here: Python's start-up and the first imports not counted;
    the temporary Prefect API it starts serves the full run after it, for a quick bench)."""
    args = ["preview", str(spec), "--out", str(out), "--slices", str(slices), "--rows",
            str(rows)]
    if in_process:
        import contextlib
        import io

        from flows.cli import main as posttrain

        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = posttrain(args)
        if code != 0:
            raise SystemExit(f"posttrain preview failed ({code})")
        return time.perf_counter() - started
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # cold: its own temporary Prefect API
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("posttrain")), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"posttrain preview failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def _flow():
    from prefect import flow

    from flows.generation import generate
    from flows.llm_endpoints import llm_endpoints
    from flows.planning import plan
    from flows.run_lifecycle import prepare_run

    @flow(name="preview-bench-full-run")
    def restricted_full_run(spec_path: str, out_dir: str, slice_ids: list[str]) -> dict:
        """`post_training`'s first steps in the previewed folder (its run, endpoints, plan),
        then the generate stage's first pass over the previewed slices only."""
        run = prepare_run(spec_path, out_dir, overrides={})
        with run.recorded(), llm_endpoints(run.spec, run.out) as endpoints:
            settings = run.settings(endpoints)
            slices = [s for s in plan(run.spec, run.store_url, run.id)
                      if s.slice_id in slice_ids]
            started = time.perf_counter()
            results = generate(slices, settings, run.progress.id,
                               run.spec.generation.concurrency)
            wall = time.perf_counter() - started
            run.store.finish_run(run.id, "skipped", {"reason": "bench/preview.py: the generate "
                                                     "stage on the previewed slices only"})
        return {"run_id": run.id, "resumed": run.resumed, "results": results,
                "generate_s": wall}

    return restricted_full_run


def calls(store_url: str, run_id: str, slice_ids: list[str]) -> list[dict]:
    import sqlalchemy as sa

    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as c:
            return [dict(r) for r in c.execute(sa.text(
                "SELECT slice_id, role, request_hash, cached, cost_usd FROM llm_calls "
                "WHERE run_id = :r"), {"r": run_id}).mappings() if r["slice_id"] in slice_ids]
    finally:
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100-row warehouse, 10 rows a slice")
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--rows", type=int, help="rows per previewed slice (default 25; quick 10)")
    ap.add_argument("--keep", help="keep the run folder here (default: a temp folder)")
    args = ap.parse_args()
    rows = args.rows or (10 if args.quick else 25)
    tmp = workdir(args.keep, "posttrain-preview-")
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    try:
        spec = quick_spec(tmp) if args.quick else DEMO
        out = tmp / "run"
        shutil.rmtree(out, ignore_errors=True)  # cold: a fresh out folder
        preview_wall = preview(spec, out, args.slices, rows, in_process=args.quick)

        from flows.store import Store

        store_url = f"sqlite:///{out / 'store.db'}"
        store = Store(store_url)
        (pv,) = [r for r in store.list_runs() if r["status"] == "preview"]
        store.close()
        slice_ids = [s["slice_id"] for s in pv["summary"]["slices"]]
        full = _flow()(spec_path=str(spec), out_dir=str(out), slice_ids=slice_ids)
        paid = [c for c in calls(store_url, pv["id"], slice_ids) if not c["cached"]]
        after = calls(store_url, full["run_id"], slice_ids)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    hits = {c["request_hash"] for c in after if c["cached"]}
    reused = [c for c in paid if c["request_hash"] in hits]
    s = pv["summary"]
    figures = {
        "spec": "quick" if args.quick else "examples/news_topics/spec.yaml",
        "slices": slice_ids, "rows_per_slice": rows, "planned_slices": s["planned_slices"],
        "preview_wall_s": round(preview_wall, 1),
        "preview_measured": "in-process" if args.quick else "subprocess, cold",
        "preview_in_flow_s": s["wall_seconds"],
        "preview_accepted": s["examples_accepted"],
        "preview_rejected": sum(s["examples_rejected"].values()),
        "preview_calls": len(paid), "preview_cost_usd": round(sum(c["cost_usd"] for c in paid), 6),
        "full_resumed_the_preview": full["resumed"],
        "full_calls_on_previewed_slices": len(after),
        "full_cache_hits_on_previewed_slices": sum(bool(c["cached"]) for c in after),
        "full_paid_calls_on_previewed_slices": sum(not c["cached"] for c in after),
        "full_accepted_on_previewed_slices": sum(r["accepted"] for r in full["results"]),
        "previewed_calls_reused": len(reused),
        "reused_fraction": round(len(reused) / len(paid), 3) if paid else None,
        "usd_not_paid": round(sum(c["cost_usd"] for c in reused), 6),
        "full_generate_s": round(full["generate_s"], 1),
    }
    figures["target_met"] = (figures["preview_wall_s"] < 60
                             and figures["previewed_calls_reused"] == len(paid) > 0)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
