"""Bench: a run through transient transport faults and a kill -9, against a clean run.

The simulated teacher (a real HTTP server, its own faults all off) answers behind an
independent fault-injecting proxy (agents/teacher/fault_proxy.py) that answers 10% of requests
429 (retry-after), 5% 500, cuts 5% of bodies short and replaces 5% with HTML. The spec's
generator (OpenAI SDK) and judge (Anthropic SDK) point at the proxy as a real provider would
be configured (`endpoint: http://...`, `api_key_env` naming a variable that holds a random fake
secret `sk-test-<uuid>`). `posttrain run SPEC --out DIR` runs as a subprocess, is killed with
SIGKILL of its process group once a third of the rows are accepted, and is run again to
completion (the same pinned spec in the same folder resumes). The kill lands while the proxy
holds its answers back (`FaultProxy.paused`) and the store has recorded every answer the proxy
had delivered: requests in flight stay in flight (their answers go to a dead client), and no
answer can be in the client's hands unrecorded, the one window no resumption can close. A
reference run of the same spec with no faults (its own teacher and a clean proxy, another
folder) runs alongside and gives the accepted set to match. All runs share one Prefect API
server (`prefect server start`), so no run waits for a temporary one.

Figures (the last line printed, one JSON object):
    requests, faults, faults_by_kind   what the proxy saw on the faulted run (both attempts)
    clean_requests_repeated   clean answers (no fault, status < 400) to a request body
                              (SHA-256) whose clean answer had already reached the client
                              (answers written between the kill and the restart reached no
                              one): a completed call paid twice. Wanted: 0
    answered_unrecorded_at_kill   clean answers delivered before the kill minus the completed
                              calls the store held then (0 when the kill waited for them)
    in_flight_at_kill         answers the proxy wrote after the kill, to the dead client
    in_flight_drained         the proxy had answered every request of the killed run
                              before the restart (the restart time is taken after them)
    kill_with_every_answer_recorded   false if no such moment came within 60 s (killed anyway)
    duplicate_examples        accepted examples stored more than once. Wanted: 0
    accepted_set_equal_to_clean_run   the (row_id, label) pairs accepted equal the clean run's
    secret_hits               occurrences of the fake secret in every file of the bench's
                              folder (run folders, example stores, MLflow stores and
                              artifacts, Prefect server home, proxy and teacher logs, the
                              runs' output) and of PREFECT_HOME. Wanted: 0
    wall_s

    .venv/bin/python bench/transient_faults.py --quick     # 150 rows, tiny training (~2-3 min)
    .venv/bin/python bench/transient_faults.py             # 2,225 rows (the demo table)
"""

from __future__ import annotations

import os

# before prefect is imported anywhere (the runs are subprocesses and inherit it): a loaded
# machine can take more than Prefect's default 20 s to start an ephemeral API server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import argparse
import copy
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.teacher import TeacherConfig, TeacherKnobs, TeacherServer
from agents.teacher.fault_proxy import FaultProxy
from bench.workdir import workdir
from examples.news_topics.build_warehouse import build

DEMO = ROOT / "examples" / "news_topics" / "spec.yaml"
PROFILE = {"rate_429": 0.10, "rate_500": 0.05, "rate_truncated": 0.05, "rate_not_json": 0.05}
KEY_ENV = "POSTTRAIN_BENCH_FAKE_KEY"
KILL_PATIENCE_S = 60  # how long to wait for a moment with every delivered answer recorded


def posttrain_exe() -> str:
    beside = Path(sys.executable).parent / "posttrain"
    return str(beside) if beside.exists() else (shutil.which("posttrain") or "posttrain")


@contextmanager
def prefect_server(home: Path, timeout: float = 120.0) -> Iterator[str]:
    """One `prefect server start` (API only, no services, no UI) for every run of the bench:
    each `posttrain run` would otherwise start its own temporary server (16-26 s apiece on a
    loaded 2-core machine). Yields its API URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    with (home / "server.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port), "--no-services", "--no-ui"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(api + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("prefect server did not start:\n"
                                     + (home / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spec_for(warehouse: str, endpoint: str, tmp: Path, name: str, *, quick: bool) -> Path:
    """The demo spec through `endpoint` (a proxy: OpenAI base .../v1, Anthropic the root),
    a key from $POSTTRAIN_BENCH_FAKE_KEY; no tuning, no DPO, a short training run (the bench
    measures generation through faults and a kill)."""
    spec = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    spec["warehouse"]["url"] = warehouse
    spec["llm"]["generator"] = {"api": "openai", "model": "simulated-teacher",
                                "endpoint": endpoint, "api_key_env": KEY_ENV}
    spec["llm"]["judge"] = {"api": "anthropic", "model": "simulated-judge",
                            "endpoint": endpoint.removesuffix("/v1"), "api_key_env": KEY_ENV,
                            "temperature": 0.0}
    spec["llm"].pop("tuner", None)
    spec["llm"].pop("simulated", None)  # no role is simulated: the bench runs the teacher
    spec["tuning"]["enabled"] = spec["dpo"]["enabled"] = False
    spec["slicing"]["max_rows_per_slice"] = 40 if quick else 150
    spec["generation"].update(concurrency=3 if quick else 4, page_size=10 if quick else 25)
    spec["student"]["tiny"] = {"hidden_size": 64, "num_layers": 1, "num_heads": 2,
                               "intermediate_size": 128, "vocab_size": 400 if quick else 600}
    spec["training"].update(max_steps=5 if quick else 60, batch_size=8, max_length=256)
    spec["evaluation"].update(holdout_fraction=0.2, max_rows=40 if quick else 200)
    spec["tracking"]["uri"] = f"sqlite:///{tmp / f'mlflow-{name}.db'}"
    path = tmp / f"spec-{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def teacher_for(warehouse: str, labels: list[str], log: Path, key: str,
                latency_ms: float) -> TeacherServer:
    """The simulated teacher with the demo's label noise and none of its own transport faults
    (faults come from the proxy only); it checks the key."""
    knobs = TeacherKnobs(error_rate=0.05, off_spec_rate=0.02, judge_error_rate=0.02, seed=0,
                         latency_ms=latency_ms, fault_429_rate=0, fault_500_rate=0,
                         fault_529_rate=0, timeout_rate=0, truncated_rate=0)
    return TeacherServer(TeacherConfig(
        warehouse_url=warehouse, table="articles", id_column="id", gold_column="topic",
        labels=labels, knobs=knobs, api_key=key, request_log=str(log)))


def query(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(sql))]
    except sa.exc.OperationalError:  # not created yet, or locked for a moment
        return []
    finally:
        engine.dispose()


def log_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_to_end(spec: Path, out: Path, env: dict, tag: str, tmp: Path, timeout: int) -> dict:
    with (tmp / f"{tag}.log").open("w") as log:
        proc = subprocess.run([posttrain_exe(), "run", str(spec), "--out", str(out)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              check=False, cwd=ROOT)
    if proc.returncode != 0:
        tail = (tmp / f"{tag}.log").read_text()[-4000:]
        raise SystemExit(f"posttrain run ({tag}) failed with {proc.returncode}:\n{tail}")
    return json.loads((out / "summary.json").read_text())


def clean_answers(lines: list[dict]) -> list[dict]:
    """Answers that reached the client whole: no fault, a status under 400."""
    return [x for x in lines if x["fault"] is None and x["status"] < 400]


def run_and_kill(spec: Path, out: Path, env: dict, tmp: Path, proxy: FaultProxy,
                 proxy_log: Path, kill_at: int, timeout: int) -> dict:
    """Start the run; SIGKILL its process group once `kill_at` examples are accepted, at a
    moment when the store holds every clean answer the proxy has delivered (checked and
    killed while the proxy holds its answers back, so none lands in between). Requests in
    flight then stay in flight: their answers go to a dead client."""
    store = out / "store.db"
    started = time.perf_counter()
    with (tmp / "faulted-killed.log").open("w") as log:
        proc = subprocess.Popen([posttrain_exe(), "run", str(spec), "--out", str(out)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    killed_at = ready = None
    consistent = False
    while time.perf_counter() - started < timeout and proc.poll() is None:
        rows = query(store, "SELECT count(*) FROM examples WHERE status = 'accepted'")
        if rows and rows[0][0] >= kill_at:
            ready = ready or time.perf_counter()
            with proxy.paused():
                delivered = len(clean_answers(log_lines(proxy_log)))
                recorded = query(store, "SELECT count(*) FROM llm_calls WHERE status = 'ok' "
                                        "AND cached = 0")
                consistent = bool(recorded) and recorded[0][0] == delivered
                late = time.perf_counter() - ready > KILL_PATIENCE_S
                if consistent or late:  # (late: kill anyway, and say so)
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = time.time()
            if killed_at is not None:
                break
            time.sleep(0.02)
        else:
            time.sleep(0.1)
    if killed_at is None:
        tail = (tmp / "faulted-killed.log").read_text()[-4000:]
        raise SystemExit(f"the run ended ({proc.poll()}) before it could be killed:\n{tail}")
    proc.wait(timeout=60)
    slices = dict(query(store, "SELECT status, count(*) FROM slices GROUP BY status"))
    return {
        "killed_after_s": round(time.perf_counter() - started, 1), "killed_at": killed_at,
        "kill_with_every_answer_recorded": consistent,
        "accepted_at_kill": query(store, "SELECT count(*) FROM examples WHERE status = "
                                         "'accepted'")[0][0],
        "slices_at_kill": slices,
        "completed_calls_at_kill": query(store, "SELECT count(*) FROM llm_calls WHERE status "
                                                "= 'ok' AND cached = 0")[0][0],
    }


def repeated_clean(lines: list[dict], dead: tuple[float, float]) -> int:
    """Clean answers to a body whose clean answer had already reached the client. Answers
    written between the kill and the restart (`dead`) reached no one: not counted as had."""
    had: set[str] = set()
    repeated = 0
    for x in clean_answers(lines):
        repeated += x["request_sha256"] in had
        if not dead[0] < x["t"] < dead[1]:
            had.add(x["request_sha256"])
    return repeated


def accepted_pairs(out: Path) -> list[tuple[str, str]]:
    return [(str(r), str(label)) for r, label in query(
        out / "store.db", "SELECT row_id, label FROM examples WHERE status = 'accepted'")]


def secret_hits(secret: bytes, folders: list[Path]) -> tuple[int, int]:
    """(occurrences of `secret`, files read) in every file under `folders`."""
    hits = files = 0
    seen: set[Path] = set()
    for folder in folders:
        for path in folder.rglob("*"):
            real = path.resolve()
            if real in seen or not path.is_file() or path.is_symlink():
                continue
            seen.add(real)
            files += 1
            try:
                hits += path.read_bytes().count(secret)
            except OSError:
                pass
    return hits, files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="150 rows, 5 training steps")
    ap.add_argument("--per-label", type=int, help="rows per topic (default 30 quick, else all)")
    ap.add_argument("--kill-at", type=int,
                    help="accepted examples before the kill (default: a third of the rows)")
    ap.add_argument("--latency-ms", type=float, help="teacher latency (default 100 quick, 20)")
    ap.add_argument("--retry-after", type=float, default=1.0, help="retry-after of a 429")
    ap.add_argument("--seed", type=int, default=0, help="the proxy's fault seed")
    ap.add_argument("--keep", help="keep the run folders here (default: a temp folder)")
    args = ap.parse_args()
    started = time.perf_counter()
    tmp = workdir(args.keep, "posttrain-transient-faults-")
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    per_label = args.per_label or (30 if args.quick else None)
    warehouse = build(tmp / "warehouse.db", per_label=per_label)
    rows = query(Path(warehouse.removeprefix("sqlite:///")), "SELECT count(*) FROM articles")[0][0]
    secret = f"sk-test-{uuid.uuid4()}"
    with prefect_server(tmp / "prefect-server") as api:
        figures = measure(args, tmp, warehouse, rows, secret,
                          {**os.environ, KEY_ENV: secret, "PREFECT_API_URL": api})
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))


def measure(args: argparse.Namespace, tmp: Path, warehouse: str, rows: int, secret: str,
            env: dict) -> dict:
    """The clean run and the faulted run (killed, then resumed), and their figures."""
    labels = yaml.safe_load(DEMO.read_text())["task"]["labels"]
    quick = args.quick
    latency = args.latency_ms if args.latency_ms is not None else (100 if quick else 20)
    timeout = 900 if quick else 7200

    # the clean reference, alongside (its own teacher, a proxy with no faults, its own
    # folder): the faulted run's accepted set must equal its
    clean_out = tmp / "clean"

    def clean_run() -> tuple[dict, dict]:
        with teacher_for(warehouse, labels, tmp / "teacher-clean.jsonl", secret, latency) as t, \
                FaultProxy(t.base_url, seed=args.seed, log_path=tmp / "proxy-clean.jsonl") as p:
            spec = spec_for(warehouse, p.url, tmp, "clean", quick=quick)
            return run_to_end(spec, clean_out, env, "clean", tmp, timeout), p.snapshot()

    # the faulted run: killed once some examples are stored, then run again to the end
    out, proxy_log = tmp / "faulted", tmp / "proxy-faulted.jsonl"
    kill_at = args.kill_at or max(5, rows // 3)
    with ThreadPoolExecutor(1) as pool, \
            teacher_for(warehouse, labels, tmp / "teacher-faulted.jsonl", secret, latency) as t, \
            FaultProxy(t.base_url, seed=args.seed, log_path=proxy_log) as p:
        clean_future = pool.submit(clean_run)
        p.set_profile(**PROFILE, retry_after_s=args.retry_after)
        spec = spec_for(warehouse, p.url, tmp, "faulted", quick=quick)
        kill = run_and_kill(spec, out, env, tmp, p, proxy_log, kill_at, timeout)
        print(json.dumps({k: v for k, v in kill.items() if k != "killed_at"}), flush=True)
        # the killed run's requests in flight are answered to its dead sockets first (a
        # held answer can be logged a moment after the kill): the restart comes after them
        kill["in_flight_drained"] = p.wait_idle(60)
        restarted = time.time()
        summary = run_to_end(spec, out, env, "faulted-resumed", tmp, timeout)
        stats, teacher_stats = p.snapshot(), t.stats()
        clean, clean_proxy = clean_future.result()
    print(json.dumps({"clean_accepted": clean["examples_accepted"],
                      "clean_requests": clean_proxy["requests"],
                      "clean_wall_s": clean["wall_seconds"]}), flush=True)

    lines = log_lines(proxy_log)
    dead = (kill["killed_at"], restarted)
    before = [x for x in clean_answers(lines) if x["t"] <= kill["killed_at"]]
    pairs, clean_pairs = accepted_pairs(out), accepted_pairs(clean_out)
    hits, files = secret_hits(secret.encode(), [tmp, Path(os.environ["PREFECT_HOME"])])
    faults = {k.removeprefix("fault_"): v for k, v in stats.items() if k.startswith("fault_")}
    return {
        "rows": rows,
        "requests": stats["requests"],
        "faults": sum(faults.values()),
        "faults_by_kind": faults,
        "upstream_errors": stats["upstream_errors"],
        "clean_requests_repeated": repeated_clean(lines, dead),
        "answered_unrecorded_at_kill": len(before) - kill["completed_calls_at_kill"],
        "in_flight_at_kill": sum(1 for x in lines if dead[0] < x["t"] < dead[1]),
        "in_flight_drained": kill["in_flight_drained"],
        "kill_with_every_answer_recorded": kill["kill_with_every_answer_recorded"],
        "duplicate_examples": len(pairs) - len({r for r, _ in pairs}),
        "accepted": len(pairs),
        "clean_run_accepted": len(clean_pairs),
        "accepted_set_equal_to_clean_run": set(pairs) == set(clean_pairs),
        "accepted_set_difference": len(set(pairs) ^ set(clean_pairs)),
        "secret_hits": hits,
        "files_scanned": files,
        "resumed": summary.get("resumed"),
        "cache_hits": summary.get("cache_hits"),
        "killed_after_s": kill["killed_after_s"],
        "accepted_at_kill": kill["accepted_at_kill"],
        "slices_at_kill": kill["slices_at_kill"],
        "teacher_requests": teacher_stats["requests"],
        "clean_run_requests": clean_proxy["requests"],
        "outcome": summary.get("outcome"),
    }


if __name__ == "__main__":
    main()
