"""Bench: sub-agent fan-out at the client's limit (issue 11, "Fan-out").

C sub-agents, one Prefect task per slice inside a real Prefect flow, run the whole agent loop
(the read-only SQL tool, the gates, the judge, every example and LLM call written to the
example store) against the simulated teacher, which runs in ITS OWN PROCESS (`posttrain
teacher`) and answers every request after a fixed latency L. An agent has one LLM call in
flight at a time, so Little's law bounds the throughput at C / L calls a second; a client
that spent no time between calls would reach it. `efficiency` is the calls per second
achieved over that bound while all C agents are running: from the moment the last agent's
first call came back to the moment the first agent's last one did (the ramp of task
creation and the tail of agents finishing are left out; `wall_efficiency` keeps them).
Judge calls count as LLM calls (they are made inside the agent's turn, one at a time).

The bare openai SDK is measured by the same script in the same run for comparison:
`AsyncOpenAI` on the aiohttp transport, C coroutines each calling chat.completions in a loop
with an agent's first request, against a teacher process with the same latency.

    .venv/bin/python bench/fanout.py --quick    # C 8 and 128 at L=1000 ms, 128 at 200 ms
    .venv/bin/python bench/fanout.py            # C 8, 32, 128, 512 at 1000 ms; 128 at 200 ms
    .venv/bin/python bench/fanout.py --runner thread --concurrency 128 --latency 200

Figures: `efficiency_c{C}_l{L}` (targets: c128_l1000 >= 0.9, c512_l1000 >= 0.7),
`sdk_efficiency_c{C}_l{L}`, `cpu_ms_per_call` (CPU of the flow's process per LLM call over
the generate stage, at the largest C measured at L=1000 ms; the teacher's process and
Prefect's API server are reported apart). The warehouse is the demo table grown to C slices
of a `shard` column (indexed), so each agent's reads and row lookups stay slice-sized: this
bench measures fan-out, not table size (bench/scale.py does). The last line printed is one
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import json
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import sqlalchemy as sa
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.failure_modes import base_spec
from bench.warehouses import scaled_warehouse

PAGE = 10          # rows an agent reads per SQL call
# agents points: (C, L in ms, turns each agent makes); SDK points: (C, L, seconds)
QUICK = {"agents": [(8, 1000, 6), (128, 1000, 7), (128, 200, 10)], "sdk": [(128, 200, 5.0)]}
FULL = {"agents": [(8, 1000, 14), (32, 1000, 14), (128, 1000, 14), (512, 1000, 14),
                   (128, 200, 30)],
        "sdk": [(128, 1000, 15.0), (512, 1000, 15.0), (128, 200, 8.0)]}
TARGETS = {"efficiency_c128_l1000": 0.9, "efficiency_c512_l1000": 0.7}


# ── the warehouse and the spec ──────────────────────────────────────────────────────────────
def shard_warehouse(path: Path, shards: int, rows_per_shard: int) -> str:
    """The demo table grown to shards x rows_per_shard rows, with an indexed `shard` column
    (id modulo shards) to slice by."""
    url = scaled_warehouse(path, shards * rows_per_shard)
    con = sqlite3.connect(path)
    try:
        con.execute("ALTER TABLE articles ADD COLUMN shard INTEGER")
        con.execute("UPDATE articles SET shard = id % ?", (shards,))
        con.execute("CREATE INDEX articles_shard ON articles (shard)")
        con.commit()
    finally:
        con.close()
    return url


def bench_spec(warehouse: str, tmp: Path, *, concurrency: int, latency_ms: int, turns: int,
               runner: str) -> dict:
    """The demo spec (simulated generator and judge, 5% wrong and 2% off-spec labels) over
    the first `concurrency` shards, one agent each, every agent making `turns` calls. The
    adaptive rate limit starts and stays at `concurrency`: the bench measures the client, not
    the limiter's ramp."""
    spec = base_spec(warehouse, tmp)
    spec["warehouse"]["tables"]["articles"] = [
        "id", "title", "body", "published_at", "region", "word_count", "shard"]
    spec["slicing"] = {"table": "articles", "id_column": "id", "method": "group_by",
                       "column": "shard", "max_rows_per_slice": 100_000}
    spec["llm"]["simulated"]["latency_ms"] = latency_ms
    spec["llm"]["budget"] = {"max_usd": 100_000.0}
    spec["llm"]["rate_limit"] = {"initial": concurrency, "minimum": 1, "maximum": concurrency}
    spec["generation"].update(concurrency=concurrency, max_slices=concurrency, max_turns=turns,
                              page_size=PAGE, task_runner=runner)
    return spec


# ── the teacher in its own process ──────────────────────────────────────────────────────────
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeacherProcess:
    """`posttrain teacher --spec SPEC` on a free port, in a child process."""

    def __init__(self, spec_path: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "teacher", "--spec", str(spec_path),
                 "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2):
                    break
            except urllib.error.HTTPError:  # it answers (a 401 without a key): it is up
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the teacher did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_others(skip: set[int]) -> float:
    """CPU of this process's other children (Prefect's temporary API server)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        if child.pid in skip:
            continue
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# ── the agents, inside a Prefect flow ───────────────────────────────────────────────────────
def _flow():
    from prefect import flow

    from flows.generation import generate, held_out_prompts
    from flows.planning import plan
    from flows.runtime import RuntimeSettings, get_runtime
    from flows.spec import load_spec
    from flows.store import shared_store

    @flow(name="fanout-bench")
    def fanout(spec_path: str, out_dir: str, teacher_url: str, teacher_pid: int) -> dict:
        """Plan C slices, then the generate stage as the pipeline runs it (one task per
        slice, on the spec's task runner), timed; the LLM calls it made are read back from
        the example store."""
        spec = load_spec(spec_path)
        store_url = f"sqlite:///{Path(out_dir) / 'store.db'}"
        store = shared_store(store_url)
        run_id = store.start_run(spec.name, spec.content_hash(), spec.model_dump_json())
        slices = plan(spec, store_url, run_id)  # the pipeline's own planning task
        settings = RuntimeSettings(spec_path, run_id, store_url, out_dir, (
            ("generator", f"{teacher_url}/v1"), ("judge", teacher_url),
            ("tuner", f"{teacher_url}/v1")))
        held_out_prompts(spec_path)  # once per run, before the stage (as the pipeline's plan)
        get_runtime(settings)
        others = {teacher_pid}
        cpu, api_cpu, wall = _cpu_self(), _cpu_others(others), time.perf_counter()
        results = generate(slices, settings, "", spec.generation.concurrency)
        cpu, api_cpu = _cpu_self() - cpu, _cpu_others(others) - api_cpu
        wall = time.perf_counter() - wall
        return {"results": results, "run_id": run_id, "store_url": store_url,
                "cpu_s": cpu, "api_cpu_s": api_cpu, "wall_s": wall}

    return fanout


def call_times(store_url: str, run_id: str) -> dict[str, list[float]]:
    """slice id -> the times (epoch seconds) its LLM calls came back, in order."""
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as c:
            rows = c.execute(sa.text("SELECT slice_id, created_at FROM llm_calls WHERE run_id "
                                     "= :r ORDER BY created_at"), {"r": run_id}).all()
    finally:
        engine.dispose()
    out: dict[str, list[float]] = {}
    for slice_id, created in rows:
        when = created if isinstance(created, dt.datetime) else dt.datetime.fromisoformat(created)
        when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        out.setdefault(slice_id, []).append(when.timestamp())
    return out


def steady_rate(times: dict[str, list[float]]) -> tuple[float | None, float]:
    """Calls a second while every agent was running (None when no such moment), and the
    window's length: from the last agent's first call back to the first agent's last one.
    Each agent's count of calls is interpolated between its own calls, so the window's edges
    cost no whole call (at C=8 and a few calls each, whole calls made a +-15% noise)."""
    start = max(t[0] for t in times.values())
    end = min(t[-1] for t in times.values())
    if end <= start:
        return None, 0.0
    done = sum(_calls_by(t, end) - _calls_by(t, start) for t in times.values())
    return done / (end - start), end - start


def _calls_by(times: list[float], moment: float) -> float:
    """How many of one agent's calls had come back by `moment`, linear between them."""
    after = bisect.bisect_right(times, moment)
    if after == 0 or after == len(times):
        return float(after)
    before, next_ = times[after - 1], times[after]
    return after + (moment - before) / (next_ - before) if next_ > before else float(after)


def agents_point(tmp: Path, warehouse: str, concurrency: int, latency_ms: int, turns: int,
                 runner: str) -> dict:
    """One (C, L) point: a fresh teacher process, a fresh store, one flow run."""
    name = f"c{concurrency}_l{latency_ms}"
    spec = bench_spec(warehouse, tmp, concurrency=concurrency, latency_ms=latency_ms,
                      turns=turns, runner=runner)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp / name
    out.mkdir()
    teacher = TeacherProcess(path, tmp / f"teacher-{name}.log")
    try:
        teacher_cpu = teacher.cpu()
        run = _flow()(spec_path=str(path), out_dir=str(out), teacher_url=teacher.url,
                      teacher_pid=teacher.proc.pid)
        teacher_cpu = teacher.cpu() - teacher_cpu
    finally:
        teacher.stop()
    times = call_times(run["store_url"], run["run_id"])
    calls = sum(len(t) for t in times.values())
    limit = concurrency / (latency_ms / 1000)
    rate, window = steady_rate(times)
    wall_rate = calls / run["wall_s"]
    failed = [r["stopped_reason"] for r in run["results"] if r["stopped_reason"] != "max_turns"]
    return {
        "concurrency": concurrency, "latency_ms": latency_ms, "turns": turns,
        "agents": len(times), "calls": calls, "limit_calls_per_s": round(limit, 1),
        # no moment with every agent running (the ramp outlasted the first agent): the stage's
        # whole wall time is the only honest basis left
        "calls_per_s": round(wall_rate if rate is None else rate, 1),
        "efficiency": round((wall_rate if rate is None else rate) / limit, 3),
        "efficiency_basis": "wall" if rate is None else "all agents running",
        "window_s": round(window, 2),
        "wall_s": round(run["wall_s"], 2),
        "wall_efficiency": round(wall_rate / limit, 3),
        "cpu_ms_per_call": round(1000 * run["cpu_s"] / calls, 3),
        "prefect_api_cpu_ms_per_call": round(1000 * run["api_cpu_s"] / calls, 3),
        "teacher_cpu_ms_per_call": round(1000 * teacher_cpu / calls, 3),
        "accepted": sum(r["accepted"] for r in run["results"]),
        "agents_not_at_max_turns": len(failed), "stopped": sorted(set(failed))[:5],
    }


# ── the bare SDK ────────────────────────────────────────────────────────────────────────────
def first_request(tmp: Path) -> list[dict]:
    """An agent's first request, exactly as the loop built it: the two pinned messages at the
    top of a transcript the agents points wrote."""
    transcript = next(tmp.glob("c*_l*/transcripts/*.jsonl"))
    return [json.loads(line) for line in transcript.read_text().splitlines()[:2]]


async def _sdk_loop(base_url: str, messages: list[dict], concurrency: int,
                    seconds: float) -> tuple[list[float], float, float]:
    import openai

    from flows.runtime import SIMULATED_KEY

    done: list[float] = []
    stop = time.monotonic() + seconds
    async with openai.AsyncOpenAI(base_url=base_url, api_key=SIMULATED_KEY, max_retries=0,
                                  http_client=openai.DefaultAioHttpClient()) as client:
        async def agent() -> None:
            while time.monotonic() < stop:
                await client.chat.completions.create(model="simulated-teacher",
                                                     messages=messages, max_tokens=4096)
                done.append(time.monotonic())

        started, cpu = time.monotonic(), _cpu_self()
        await asyncio.gather(*(agent() for _ in range(concurrency)))
        cpu = _cpu_self() - cpu
    return done, started, cpu


def sdk_point(tmp: Path, warehouse: str, messages: list[dict], concurrency: int,
              latency_ms: int, seconds: float) -> dict:
    spec = bench_spec(warehouse, tmp, concurrency=concurrency, latency_ms=latency_ms,
                      turns=1, runner="thread")
    path = tmp / f"sdk_c{concurrency}_l{latency_ms}.yaml"
    path.write_text(yaml.safe_dump(spec))
    teacher = TeacherProcess(path, tmp / f"teacher-sdk-{concurrency}-{latency_ms}.log")
    try:
        done, started, cpu = asyncio.run(_sdk_loop(f"{teacher.url}/v1", messages, concurrency,
                                                   seconds))
    finally:
        teacher.stop()
    # steady state: after the first round trip of every coroutine, before the last ones
    lo, hi = started + 1.5 * latency_ms / 1000, started + seconds
    n = sum(lo < t <= hi for t in done)
    limit = concurrency / (latency_ms / 1000)
    return {"concurrency": concurrency, "latency_ms": latency_ms, "calls": len(done),
            "calls_per_s": round(n / (hi - lo), 1),
            "efficiency": round(n / (hi - lo) / limit, 3),
            "cpu_ms_per_call": round(1000 * cpu / len(done), 3)}


# ── main ────────────────────────────────────────────────────────────────────────────────────
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="C 8 and 128 at 1000 ms, 128 at 200 ms, fewer turns")
    ap.add_argument("--runner", default=None,
                    help="generation.task_runner to measure (default: the spec's default)")
    ap.add_argument("--concurrency", type=int, nargs="*", help="C values (with --latency)")
    ap.add_argument("--latency", type=int, nargs="*", help="L values in ms")
    ap.add_argument("--turns", type=int, default=12, help="turns per agent (with --concurrency)")
    ap.add_argument("--no-sdk", action="store_true", help="skip the bare SDK points")
    ap.add_argument("--keep", help="keep the work folder here")
    args = ap.parse_args()

    from flows.spec import Generation

    runner = args.runner or Generation().task_runner
    plan = dict(QUICK if args.quick else FULL)
    if args.concurrency or args.latency:
        cs, ls = args.concurrency or [128], args.latency or [1000]
        plan["agents"] = [(c, lat, args.turns) for lat in ls for c in cs]
        plan["sdk"] = [(max(cs), lat, 8.0) for lat in ls]
    if args.no_sdk:
        plan["sdk"] = []
    shards = max(c for c, *_ in plan["agents"] + plan["sdk"])
    # the rows an agent reads in its turns (every other turn a page), the held-out 18% aside
    rows = int(PAGE * (max(t for *_, t in plan["agents"]) / 2 + 2) / 0.8)

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fanout-"))
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    warehouse = shard_warehouse(tmp / "warehouse.db", shards, rows)

    figures: dict = {"runner": runner, "machine_cpus": os.cpu_count(), "points": {},
                     "sdk_points": {}}
    for c, lat, turns in plan["agents"]:
        p = agents_point(tmp, warehouse, c, lat, turns, runner)
        figures["points"][f"c{c}_l{lat}"] = p
        figures[f"efficiency_c{c}_l{lat}"] = p["efficiency"]
        print(f"agents {runner} C={c} L={lat}ms: {json.dumps(p)}", flush=True)
    messages = first_request(tmp) if plan["sdk"] else []
    for c, lat, seconds in plan["sdk"]:
        p = sdk_point(tmp, warehouse, messages, c, lat, seconds)
        figures["sdk_points"][f"c{c}_l{lat}"] = p
        figures[f"sdk_efficiency_c{c}_l{lat}"] = p["efficiency"]
        print(f"sdk C={c} L={lat}ms: {json.dumps(p)}", flush=True)

    at_1s = [p for p in figures["points"].values() if p["latency_ms"] == 1000] or \
        list(figures["points"].values())
    top = max(at_1s, key=lambda p: p["concurrency"])
    figures["cpu_ms_per_call"] = top["cpu_ms_per_call"]
    figures["cpu_ms_per_call_at"] = f"c{top['concurrency']}_l{top['latency_ms']}"
    figures["targets"] = {k: {"target": v, "value": figures.get(k),
                              "met": figures.get(k) is not None and figures[k] >= v}
                          for k, v in TARGETS.items() if k in figures}
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
