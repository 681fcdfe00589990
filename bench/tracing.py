"""Bench: what MLflow tracing of the agents costs (issue 15, flows/agent_traces.py).

N labelling agents (`agents.loop.arun_agent`, the demo spec's generation settings, at most
`generation.concurrency` of them at once on one event loop, one generator gateway and one
judge shared, as the async runner runs them) label N id-range slices of the demo warehouse
through the real openai and anthropic SDKs against the simulated teacher (a local HTTP server
on a background thread, the demo spec's `llm.simulated` knobs, no transport faults). The SAME
work runs twice per repeat: tracing off (`tracer=None`) and on (an `MlflowTracer` per agent
into a fresh SQLite MLflow store, linked to a parent run), in alternating order (off first on
even repeats, on first on odd ones), after one untimed warm-up pair; medians are reported.
Each side gets a fresh call cache, so both make every LLM call for real (checked: the calls
the gateway recorded, none cached, and the requests the teacher received are equal).

The timed "on" measurement includes making each agent's tracer and `agent_traces.flush()`
(MLflow writes traces on a background thread): the cost is not hidden after the clock stops.
Two teacher latencies: 0 ms (an instant teacher: the worst case for the relative overhead)
and the teacher's `latency_ms` knob at a hosted model's pace (500 ms a call; --quick: 200).

Figures, per latency L (keys suffixed `_l{L}`): off_s, on_s (median wall seconds),
overhead_s, overhead_pct, cpu_off_s, cpu_on_s, cpu_overhead_s (this process's CPU, the
teacher's thread included: a steadier figure than wall on a loaded machine), llm_calls (per
side), teacher_requests_off/on, calls_equal, spans (written and read back with
`mlflow.search_traces`), traces (== agents), overhead_ms_per_span, overhead_ms_per_call,
cpu_ms_per_span, store_bytes (growth of the store: the SQLite file and artifacts),
bytes_per_span, and every repeat's walls (`walls_off`, `walls_on`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/tracing.py --quick   # 2 agents x 20 rows (~40 s)
    OMP_NUM_THREADS=1 .venv/bin/python bench/tracing.py           # 8 agents x 150 rows (~4 min)

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workdir import workdir

DEMO_SPEC = ROOT / "examples" / "news_topics" / "spec.yaml"
COLUMNS = ["id", "title", "body", "published_at", "region", "word_count"]


def demo() -> dict:
    """The demo spec's generation settings, teacher knobs and task."""
    spec = yaml.safe_load(DEMO_SPEC.read_text())
    g = spec["generation"]
    return {"concurrency": int(g.get("concurrency", 4)), "max_turns": int(g.get("max_turns", 60)),
            "page_size": int(g.get("page_size", 25)),
            "judge_sample_rate": float(g.get("judge_sample_rate", 0.2)),
            "memory_budget_tokens": int(g.get("memory_budget_tokens", 16000)),
            "knobs": dict(spec["llm"].get("simulated") or {}),
            "rate_limit": dict(spec["llm"].get("rate_limit") or {}),
            "description": spec["task"]["description"], "labels": spec["task"]["labels"]}


def id_slices(url: str, n: int) -> list[dict]:
    """The table's ids cut into `n` contiguous ranges of (nearly) equal size."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM articles ORDER BY id"))]
    engine.dispose()
    size = -(-len(ids) // n)
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)]
    return [{"slice_id": f"s{k}", "lo": c[0], "hi": c[-1], "rows": len(c)}
            for k, c in enumerate(chunks)]


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def new_store(folder: Path):
    """A fresh SQLite MLflow store (set as the tracking URI), its experiment and parent run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("tracing-bench",
                                   artifact_location=(folder / "art").as_uri())
    parent = client.create_run(exp, run_name="parent").info.run_id
    return exp, parent


def run_agents(teacher_url: str, engine, slices: list[dict], d: dict,
               store: tuple[str, str] | None) -> dict:
    """The agents over `slices` once, with a fresh call cache: tracing on when `store`
    (experiment id, parent run id) is given. Timed from the first agent started to the last
    finished, plus the tracer's flush."""
    from agents.agent_types import AgentConfig
    from agents.answers import LabelAnswer
    from agents.gates import Gate
    from agents.gateway import LLMGateway, MemoryCache
    from agents.judge import Judge
    from agents.ledger import CostLedger
    from agents.loop import arun_agent
    from agents.provider_factory import make_provider
    from agents.providers import run_on_own_loop
    from agents.ratelimit import AdaptiveLimiter
    from agents.skills import load_skill
    from agents.sql_tool import ScopedTable, SQLTool
    from flows import agent_traces
    from flows.agent_traces import MlflowTracer

    cache, calls = MemoryCache(), []
    rl = d["rate_limit"]
    generator = LLMGateway(
        make_provider("openai", base_url=f"{teacher_url}/v1", api_key="k", timeout=60),
        role="generator", cache=cache, ledger=CostLedger(),
        limiter=AdaptiveLimiter(initial=rl.get("initial", 8), maximum=rl.get("maximum", 64)),
        on_call=calls.append, max_retries=4, backoff_base=0.01)
    judge = Judge(LLMGateway(make_provider("anthropic", base_url=teacher_url, api_key="k",
                                           timeout=60),
                             role="judge", cache=cache, on_call=calls.append),
                  model="simulated-judge", skill=load_skill("review-examples"),
                  labels=d["labels"])
    label_skill, review = load_skill("label-examples"), LabelAnswer(d["labels"])
    config = AgentConfig(model="simulated-teacher", max_turns=d["max_turns"],
                         memory_budget_tokens=d["memory_budget_tokens"],
                         judge_sample_rate=d["judge_sample_rate"],
                         seed=int(d["knobs"].get("seed", 0)))
    where = "SELECT * FROM articles WHERE id BETWEEN :lo AND :hi"

    async def one(s: dict, gate: asyncio.Semaphore):
        async with gate:
            tool = SQLTool(engine, ScopedTable("articles", COLUMNS, where,
                                               {"lo": s["lo"], "hi": s["hi"]}, "id"),
                           row_limit=200)
            tracer = (MlflowTracer(store[0], store[1], {"slice_id": s["slice_id"]})
                      if store else None)
            return await arun_agent(
                generator, config=config, skill=label_skill,
                task={"description": d["description"], "labels": d["labels"],
                      "slice_id": s["slice_id"], "rows": s["rows"],
                      "page_size": d["page_size"]},
                sql_tool=tool, gate=Gate(review), row_lookup=tool.lookup_row,
                on_example=lambda e: None, agent_name=f"labeler/{s['slice_id']}",
                slice_id=s["slice_id"], judge=judge, tracer=tracer)

    async def fanout():
        gate = asyncio.Semaphore(d["concurrency"])
        return await asyncio.gather(*(one(s, gate) for s in slices))

    cpu0, started = time.process_time(), time.perf_counter()
    results = run_on_own_loop(fanout())  # closes the SDKs' sessions (both sides)
    agents_done = time.perf_counter()
    if store:
        agent_traces.flush()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    return {"wall": wall, "cpu": cpu, "agents_s": agents_done - started,
            "flush_s": time.perf_counter() - agents_done, "calls": len(calls),
            "cached": sum(bool(c.get("cached")) for c in calls),
            "errors": sum(c.get("status") != "ok" for c in calls),
            "accepted": sum(r.accepted for r in results),
            "completed": sum(r.stopped_reason == "completed" for r in results)}


def measure(args, d: dict, url: str, engine, slices: list[dict], latency_ms: float,
            tmp: Path, stores: list[int]) -> dict:
    """Off and on, `args.repeats` times in alternating order, against one teacher."""
    import mlflow

    from agents.teacher import TeacherConfig, TeacherKnobs, TeacherServer

    knobs = TeacherKnobs(**{**d["knobs"], "latency_ms": latency_ms})
    runs: dict[bool, list[dict]] = {False: [], True: []}
    with TeacherServer(TeacherConfig(url, "articles", "id", "topic", d["labels"],
                                     knobs=knobs)) as teacher:
        for rep in range(args.repeats):
            for traced in ((False, True) if rep % 2 == 0 else (True, False)):
                store, folder = None, None
                if traced:
                    stores[0] += 1
                    folder = tmp / f"store{stores[0]}"
                    store = new_store(folder)
                    before = dir_bytes(folder)
                requests0 = teacher.stats()["requests"]
                r = run_agents(teacher.url, engine, slices, d, store)
                r["teacher_requests"] = teacher.stats()["requests"] - requests0
                if traced:
                    r["store_bytes"] = dir_bytes(folder) - before
                    traces = mlflow.search_traces(run_id=store[1], locations=[store[0]],
                                                  return_type="list", max_results=1000)
                    r["traces"] = len(traces)
                    r["spans"] = sum(len(t.data.spans) for t in traces)
                    r["llm_spans"] = sum(s.span_type == "LLM" for t in traces
                                         for s in t.data.spans)
                runs[traced].append(r)
                print(f"  L={latency_ms:g} ms repeat {rep} {'on ' if traced else 'off'}: "
                      f"{r['wall']:.2f} s wall, {r['cpu']:.2f} s cpu, {r['calls']} calls"
                      + (f", {r['spans']} spans, flush {r['flush_s']:.2f} s" if traced
                         else ""), flush=True)
    off, on = runs[False], runs[True]
    off_s = statistics.median(r["wall"] for r in off)
    on_s = statistics.median(r["wall"] for r in on)
    cpu_off = statistics.median(r["cpu"] for r in off)
    cpu_on = statistics.median(r["cpu"] for r in on)
    agents_on = statistics.median(r["agents_s"] for r in on)
    calls, spans = on[0]["calls"], on[0]["spans"]
    overhead = on_s - off_s
    return {
        "off_s": round(off_s, 3), "on_s": round(on_s, 3), "overhead_s": round(overhead, 3),
        "overhead_pct": round(100 * overhead / off_s, 1),
        "agents_on_s": round(agents_on, 3),
        "flush_s": round(statistics.median(r["flush_s"] for r in on), 3),
        "overhead_before_flush_s": round(agents_on - off_s, 3),
        "cpu_off_s": round(cpu_off, 3), "cpu_on_s": round(cpu_on, 3),
        "cpu_overhead_s": round(cpu_on - cpu_off, 3),
        "llm_calls": calls, "llm_calls_off": off[0]["calls"],
        "teacher_requests_off": off[0]["teacher_requests"],
        "teacher_requests_on": on[0]["teacher_requests"],
        "cached_calls": sum(r["cached"] for r in off + on),
        "calls_equal": len({(r["calls"], r["teacher_requests"]) for r in off + on}) == 1
        and all(r["calls"] == r["teacher_requests"] for r in off + on),
        "accepted_off": off[0]["accepted"], "accepted_on": on[0]["accepted"],
        "completed_agents": min(r["completed"] for r in off + on),
        "traces": min(r["traces"] for r in on), "spans": spans,
        "spans_equal": len({r["spans"] for r in on}) == 1,
        "llm_spans": on[0]["llm_spans"],
        "overhead_ms_per_span": round(1000 * overhead / spans, 3) if spans else None,
        "overhead_ms_per_call": round(1000 * overhead / calls, 3) if calls else None,
        "overhead_before_flush_ms_per_span": round(1000 * (agents_on - off_s) / spans, 3)
        if spans else None,
        "cpu_ms_per_span": round(1000 * (cpu_on - cpu_off) / spans, 3) if spans else None,
        "store_bytes": statistics.median(r["store_bytes"] for r in on),
        "bytes_per_span": round(statistics.median(r["store_bytes"] for r in on) / spans)
        if spans else None,
        "walls_off": [round(r["wall"], 3) for r in off],
        "walls_on": [round(r["wall"], 3) for r in on],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 agents x 20 rows, latencies 0 and 200 ms")
    p.add_argument("--agents", type=int, help="slices (one agent each); default 8 (quick 2)")
    p.add_argument("--rows", type=int, help="rows a slice; default 150 (quick 20)")
    p.add_argument("--latency", type=float, nargs="+",
                   help="teacher latencies in ms; default 0 500 (quick 0 200)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", help="work in this folder (kept) instead of a temporary one")
    args = p.parse_args()
    agents = args.agents or (2 if args.quick else 8)
    rows = args.rows or (20 if args.quick else 150)
    latencies = args.latency or ([0.0, 200.0] if args.quick else [0.0, 500.0])
    tmp = workdir(args.keep, "tracing-bench-")
    logging.basicConfig(level=logging.WARNING)

    import sqlalchemy as sa

    from examples.news_topics.build_warehouse import build

    d = demo()
    if args.quick:
        d["page_size"] = 10  # a few pages a slice, so an agent makes more than a call or two
    per_label = -(-agents * rows // len(d["labels"]))
    url = build(tmp / "warehouse.db", per_label=per_label)
    slices = id_slices(url, agents)
    engine = sa.create_engine(url)
    print(f"{len(slices)} agents x ~{rows} rows, concurrency {d['concurrency']}, page "
          f"{d['page_size']}, latencies {latencies} ms, {args.repeats} repeats; in {tmp}",
          flush=True)

    stores = [0]
    started = time.perf_counter()
    # warm-up, untimed: imports, the SDKs' clients, MLflow's tracing set-up, SQLite caches
    warm = argparse.Namespace(repeats=1)
    measure(warm, d, url, engine, slices[:1], 0.0, tmp, stores)
    figures: dict = {"quick": args.quick, "agents": len(slices), "rows_per_agent": rows,
                     "rows": sum(s["rows"] for s in slices),
                     "concurrency": d["concurrency"], "page_size": d["page_size"],
                     "repeats": args.repeats, "latencies_ms": latencies}
    for latency in latencies:
        m = measure(args, d, url, engine, slices, latency, tmp, stores)
        figures.update({f"{k}_l{latency:g}": v for k, v in m.items()})
    engine.dispose()
    figures["traces_equal_agents"] = all(figures[f"traces_l{lat:g}"] == len(slices)
                                         for lat in latencies)
    figures["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
