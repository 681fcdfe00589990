"""Bench: a hot group (one value holding half the rows) does not leave one agent working
while the others idle (issue 11, "Hot slices").

The demo table grown to N rows (bench/warehouses.py), then every even id moved to region
`hot`: one group value holds half the table. The spec slices by region with a row cap, so
the plan must split `hot` into parts under the cap. The generate stage then runs as the
pipeline runs it, in a real Prefect flow (one task per slice, every slice), against the
simulated teacher in its own process with a fixed latency. Each agent's wall time is its
Prefect task run's run time. Wanted: the longest agent within 2x the median
(`longest_over_median` <= 2).

    .venv/bin/python bench/hot_slices.py --quick    # 5,000 rows, cap 250 (~20 agents)
    .venv/bin/python bench/hot_slices.py            # 20,000 rows, cap 500

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workdir import workdir

TARGET = 2.0


def hot_warehouse(path: Path, rows: int) -> str:
    """The demo table grown to `rows` rows, half of them (even ids) in region `hot`."""
    from bench.warehouses import scaled_warehouse

    url = scaled_warehouse(path, rows)
    con = sqlite3.connect(path)
    try:
        con.execute("UPDATE articles SET region = 'hot' WHERE id % 2 = 0")
        con.commit()
    finally:
        con.close()
    return url


def agent_seconds() -> dict[str, float]:
    """slice id -> its agent task's run time, from this process's Prefect API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    return {r.name.removeprefix("agent "): r.total_run_time.total_seconds()
            for r in runs if r.name.startswith("agent ")}


def slice_rows(store_url: str, run_id: str) -> dict[str, int]:
    """slice id -> planned rows, from the example store."""
    import sqlalchemy as sa

    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as c:
            return dict(c.execute(sa.text("SELECT slice_id, row_count FROM slices WHERE "
                                          "run_id = :r"), {"r": run_id}).all())
    finally:
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 rows, cap 250")
    ap.add_argument("--rows", type=int, help="warehouse rows (default 20,000)")
    ap.add_argument("--cap", type=int, help="generation rows per slice (default 500)")
    ap.add_argument("--latency", type=int, default=100, help="teacher latency, ms")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--keep", help="keep the run folder here (default: a temp folder)")
    args = ap.parse_args()
    rows = args.rows or (5_000 if args.quick else 20_000)
    cap = args.cap or (250 if args.quick else 500)
    tmp = workdir(args.keep, "posttrain-hot-")
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))

    from bench.failure_modes import base_spec
    from bench.fanout import TeacherProcess, _flow

    try:
        spec = base_spec(hot_warehouse(tmp / "warehouse.db", rows), tmp)
        spec["slicing"] = {"table": "articles", "id_column": "id", "method": "group_by",
                           "column": "region", "max_rows_per_slice": cap}
        spec["llm"]["simulated"]["latency_ms"] = args.latency
        spec["llm"]["budget"] = {"max_usd": 10_000.0}
        spec["generation"].update(concurrency=args.concurrency, max_turns=400)
        path = tmp / "hot.yaml"
        path.write_text(yaml.safe_dump(spec))
        out = tmp / "hot"
        out.mkdir()
        teacher = TeacherProcess(path, tmp / "teacher.log")
        try:
            run = _flow()(spec_path=str(path), out_dir=str(out), teacher_url=teacher.url,
                          teacher_pid=teacher.proc.pid)
        finally:
            teacher.stop()
        seconds = agent_seconds()
        planned = slice_rows(run["store_url"], run["run_id"])
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results = run["results"]
    hot = {k: n for k, n in planned.items() if k.startswith("region=hot")}
    times = sorted(seconds.values())
    median = statistics.median(times)
    longest = max(seconds, key=seconds.get)
    figures = {
        "rows": rows, "cap": cap, "agents": len(results), "hot_parts": len(hot),
        "hot_rows": sum(hot.values()), "hot_part_rows_max": max(hot.values()),
        "slice_rows_max": max(planned.values()),
        "slice_rows_median": statistics.median(planned.values()),
        "agent_seconds_median": round(median, 2), "agent_seconds_max": round(times[-1], 2),
        "agent_seconds_min": round(times[0], 2), "longest_agent": longest,
        "longest_over_median": round(times[-1] / median, 3),
        "accepted": sum(r["accepted"] for r in results),
        "stopped": sorted({r["stopped_reason"] for r in results}),
        "wall_s": round(run["wall_s"], 1),
    }
    figures["target_met"] = figures["longest_over_median"] <= TARGET
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
