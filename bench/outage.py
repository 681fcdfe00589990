"""Bench: a provider down for minutes mid-run; the stage ends with the reason, the rerun resumes.

The simulated teacher (a real HTTP server) answers behind the independent fault-injecting
proxy (agents/teacher/fault_proxy.py); the spec's generator and judge point at the proxy as at
any OpenAI/Anthropic-compatible provider (the same set-up as bench/transient_faults.py). Once
the run has some answers, the proxy answers 90% of requests 429 (retry-after 1 s) for
`--outage-s` seconds, then recovers. `llm.outage.budget_s` is shorter than the outage, so:

    run 1   rides the trouble out one call at a time for budget_s, then the breaker opens:
            the generate stage ends with one reason, `posttrain run` exits non-zero, the
            accepted examples stay in the store, nothing is trained or registered
    run 2   started once the provider is back, same command: resumes the run, sends no
            answered request again, stores no example twice, trains and registers one version

Figures (the last line printed, one JSON object): outage_s, budget_s, stage_ended_after_s
(from the start of the outage to run 1's exit), run1_exit_code, stopped_by, reason,
log_says_in_trouble, kept_examples, model_dir_after_outage, versions_after_outage,
resumed, coverage_after_resume, repeated_answered_requests, duplicate_examples,
versions_after_resume, promoted, wall_s.

    .venv/bin/python bench/outage.py --quick    # 150 rows, 20 s outage, budget 5 s (~2 min)
    .venv/bin/python bench/outage.py            # 2,225 rows, 300 s outage, budget 120 s
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import argparse
import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.teacher.fault_proxy import FaultProxy
from bench.transient_faults import (
    DEMO,
    KEY_ENV,
    accepted_pairs,
    clean_answers,
    log_lines,
    posttrain_exe,
    prefect_server,
    query,
    spec_for,
    teacher_for,
)
from bench.workdir import workdir
from examples.news_topics.build_warehouse import build


def go_down_after(proxy: FaultProxy, forwarded: int, outage_s: float, marks: dict,
                  stop: threading.Event) -> None:
    """90% 429 once `forwarded` requests went through; healthy again `outage_s` later."""
    while not stop.wait(0.05):
        if proxy.snapshot()["forwarded"] >= forwarded:
            break
    else:
        return
    proxy.set_profile(rate_429=0.9, retry_after_s=1.0)
    marks["down"] = time.monotonic()
    if not stop.wait(outage_s):
        proxy.set_profile()
    marks["up"] = time.monotonic()


def versions(tracking_uri: str, name: str) -> int:
    try:
        return len(MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'"))
    except Exception:  # noqa: BLE001 - no registry yet: no version
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="150 rows, 20 s outage, budget 5 s")
    ap.add_argument("--outage-s", type=float, help="seconds of 90%% 429 (default 20 / 300)")
    ap.add_argument("--budget-s", type=float, help="llm.outage.budget_s (default 5 / 120)")
    ap.add_argument("--keep", help="keep the run folders here (default: a temp folder)")
    args = ap.parse_args()
    quick = args.quick
    outage_s = args.outage_s or (20.0 if quick else 300.0)
    budget_s = args.budget_s or (5.0 if quick else 120.0)
    started = time.perf_counter()
    tmp = workdir(args.keep, "posttrain-outage-")
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    warehouse = build(tmp / "warehouse.db", per_label=30 if quick else None)
    rows = query(Path(warehouse.removeprefix("sqlite:///")), "SELECT count(*) FROM articles")[0][0]
    labels = yaml.safe_load(DEMO.read_text())["task"]["labels"]
    secret = f"sk-test-{uuid.uuid4()}"
    out, proxy_log = tmp / "run", tmp / "proxy.jsonl"
    with prefect_server(tmp / "prefect-server") as api, \
            teacher_for(warehouse, labels, tmp / "teacher.jsonl", secret,
                        100 if quick else 20) as teacher, \
            FaultProxy(teacher.base_url, seed=0, log_path=proxy_log) as proxy:
        env = {**os.environ, KEY_ENV: secret, "PREFECT_API_URL": api}
        spec = spec_for(warehouse, proxy.url, tmp, "outage", quick=quick)
        data = yaml.safe_load(spec.read_text())
        data["llm"]["outage"] = {"budget_s": budget_s}
        spec.write_text(yaml.safe_dump(data))
        tracking, name = data["tracking"]["uri"], data["tracking"]["registered_model"]
        command = [posttrain_exe(), "run", str(spec), "--out", str(out)]

        # run 1: the provider goes down a little way into generation
        marks, stop = {}, threading.Event()
        watcher = threading.Thread(target=go_down_after, daemon=True, args=(
            proxy, max(20, rows // 10), outage_s, marks, stop))
        watcher.start()
        with (tmp / "run1.log").open("w") as log:
            first = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=ROOT, check=False, timeout=3600)
        ended = time.monotonic()
        if "down" not in marks:
            stop.set()
            raise SystemExit(f"run 1 ended ({first.returncode}) before the outage began:\n"
                             + (tmp / "run1.log").read_text()[-3000:])
        log1 = (tmp / "run1.log").read_text()
        summary1 = json.loads((out / "summary.json").read_text())
        kept = accepted_pairs(out)
        after_outage = {"model_dir": (out / "model").exists(),
                        "versions": versions(tracking, name)}

        # run 2: once the provider is back, the same command
        watcher.join()
        second = subprocess.run(command, env=env, stdout=(tmp / "run2.log").open("w"),
                                stderr=subprocess.STDOUT, cwd=ROOT, check=False,
                                timeout=7200)
        if second.returncode != 0:
            raise SystemExit("run 2 failed:\n" + (tmp / "run2.log").read_text()[-3000:])
        summary2 = json.loads((out / "summary.json").read_text())
        faults = proxy.snapshot()["fault_429"]

    answered = Counter(x["request_sha256"] for x in clean_answers(log_lines(proxy_log)))
    pairs = accepted_pairs(out)
    print(json.dumps({
        "rows": rows, "outage_s": outage_s, "budget_s": budget_s, "faults_429": faults,
        "stage_ended_after_s": round(ended - marks["down"], 1),
        "run1_exit_code": first.returncode,
        "stopped_by": summary1.get("stopped_by"),
        "reason": (summary1.get("reason") or "")[:300],
        "log_says_in_trouble": "in trouble" in log1,
        "log_says_stopped": "generate stopped: provider outage" in log1,
        "kept_examples": len(kept),
        "model_dir_after_outage": after_outage["model_dir"],
        "versions_after_outage": after_outage["versions"],
        "resumed": summary2.get("resumed"),
        "kept_examples_still_there": set(kept) <= set(pairs),
        "coverage_after_resume": summary2.get("coverage"),
        "repeated_answered_requests": sum(n - 1 for n in answered.values()),
        "duplicate_examples": len(pairs) - len({r for r, _ in pairs}),
        "versions_after_resume": versions(tracking, name),
        "promoted": summary2.get("promoted"),
        "wall_s": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
