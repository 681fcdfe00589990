"""A killed run resumes: kill `posttrain run` mid-generation (SIGKILL, no cleanup), run it
again, and nothing that completed is paid for twice, and every example is stored once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
import yaml

from tests.test_pipeline import tiny_spec

EXE = shutil.which("posttrain") or str(Path(sys.executable).parent / "posttrain")


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_killed_run_resumes_without_repeating_completed_calls(small_warehouse_url, tmp_path):
    spec = tiny_spec(small_warehouse_url, tmp_path, max_steps=30)
    data = yaml.safe_load(spec.read_text())
    data["llm"]["simulated"]["latency_ms"] = 60  # slow enough to kill mid-generation
    data["generation"]["concurrency"] = 2
    spec.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    log, store_db = out / "teacher_requests.jsonl", out / "store.db"

    # 1. start, and kill the whole process group once some slices are done
    proc = subprocess.Popen([EXE, "run", str(spec), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(_lines(log)) >= 30:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    store = sa.create_engine(f"sqlite:///{store_db}")
    with store.connect() as c:
        run_id, status = c.execute(sa.text("SELECT id, status FROM runs")).one()
        completed = set(c.execute(sa.text(
            "SELECT request_hash FROM llm_calls WHERE status = 'ok' AND cached = 0")).scalars())
        cached_keys = set(c.execute(sa.text("SELECT request_hash FROM call_cache")).scalars())
        done_before = c.execute(sa.text(
            "SELECT count(*) FROM slices WHERE status = 'done'")).scalar_one()
        last_call = c.execute(sa.text("SELECT max(id) FROM llm_calls")).scalar_one()
    assert status == "running" and completed and completed <= cached_keys
    teacher_before = _lines(log)

    # 2. run again: it resumes the same run
    proc = subprocess.run([EXE, "run", str(spec), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] is True and summary["run_id"] == run_id
    assert summary["cache_hits"] > 0

    with store.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM runs")).scalar_one() == 1
        new_calls = c.execute(sa.text(
            "SELECT request_hash FROM llm_calls WHERE cached = 0 AND id > :last"),
            {"last": last_call}).scalars().all()
        accepted = c.execute(sa.text(
            "SELECT row_id FROM examples WHERE status = 'accepted'")).scalars().all()
    # no provider call after the restart repeats one that had completed before the kill
    assert not set(new_calls) & completed
    # the teacher saw no completed request twice: only the few in flight at the kill
    before = {x["request_hash"] for x in teacher_before}
    after = [x["request_hash"] for x in _lines(log)[len(teacher_before):]]
    repeated = [h for h in after if h in before]
    assert len(repeated) <= 4, f"{len(repeated)} requests re-sent after the restart"
    # each example once, every row accounted for
    assert len(accepted) == len(set(accepted)) == summary["examples_accepted"]
    with sa.create_engine(small_warehouse_url).connect() as c:
        total = c.execute(sa.text("SELECT count(*) FROM articles")).scalar_one()
    copies = summary["examples_rejected"].get("copy_of_eval_row", 0)
    assert summary["examples_accepted"] + summary["eval_examples"] + copies == total
    print(f"resume: {done_before} slices done before the kill, {len(completed)} completed "
          f"calls, {summary['cache_hits']} cache hits after, {len(repeated)} in-flight "
          f"requests re-sent")
