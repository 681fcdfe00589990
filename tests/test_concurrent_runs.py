"""Two runs at once on one example store and one MLflow registry (issue 14, item 4): no
cross-run contamination, and the `champion` alias ends on the better model whichever run
finishes last (flows/champion_lock.py). Real processes, a real SQLite or PostgreSQL store,
a real MLflow registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from flows.champion_lock import ChampionLockTimeout, champion_lock, lock_file

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("posttrain") or str(Path(sys.executable).parent / "posttrain")


# ── the lock itself ──────────────────────────────────────────────────────────────────────────
def test_file_lock_is_shared_by_runs_on_one_registry(tmp_path):
    """Two runs in different folders using one SQLite registry share one lock file (beside the
    database); a second holder waits (here: gives up after its timeout), then gets it."""
    mlflow_uri = f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}"
    a, b = tmp_path / "runs-a" / "one", tmp_path / "runs-b" / "two"
    assert lock_file("m", mlflow_uri, a) == lock_file("m", mlflow_uri, b)
    assert lock_file("m", mlflow_uri, a).parent == tmp_path / "registry"
    assert lock_file("m", mlflow_uri, a) != lock_file("other", mlflow_uri, a)
    with champion_lock("m", out=a, mlflow_uri=mlflow_uri):
        with (pytest.raises(ChampionLockTimeout),
              champion_lock("m", out=b, mlflow_uri=mlflow_uri, timeout_s=0.3)):
            pass
        with champion_lock("other", out=b, mlflow_uri=mlflow_uri, timeout_s=0.3):
            pass  # another model's champion is not held up
    with champion_lock("m", out=b, mlflow_uri=mlflow_uri, timeout_s=0.3):
        pass


def test_postgres_advisory_lock_spans_machines(tmp_path, pg_server_url):
    """Runs that share no file (two machines: different folders, an MLflow server) but one
    PostgreSQL store exclude each other through the advisory lock."""
    here, there = tmp_path / "machine-1" / "run", tmp_path / "machine-2" / "run"
    uri = "http://mlflow.example:5000"
    assert lock_file("m", uri, here) != lock_file("m", uri, there)
    with (champion_lock("m", out=here, store_url=pg_server_url, mlflow_uri=uri),
          pytest.raises(ChampionLockTimeout, match="PostgreSQL advisory lock"),
          champion_lock("m", out=there, store_url=pg_server_url, mlflow_uri=uri,
                        timeout_s=0.3)):
        pass
    with champion_lock("m", out=there, store_url=pg_server_url, mlflow_uri=uri, timeout_s=0.3):
        pass


# Each process: the promotion decision of a run whose evaluation saw no champion (so on its
# own it says "promote"). The order is made certain by signal files, not by timing:
#   locked   the first signals from inside the lock, while its rule runs (`hold_s`), and the
#            second only then asks for the lock;
#   no lock  the same steps without the lock, interleaved as a race does: both read the
#            champion (none), then the first moves the alias, then the second.
WORKER = r"""
import json, sys, time
from pathlib import Path

a = json.loads(sys.argv[1])
import mlflow
mlflow.set_tracking_uri(a["mlflow"])
from flows.champion_lock import against_current_champion, settle_champion
from flows.spec import load_spec
from training.registry import decide_promotion, promote

spec = load_spec(a["spec"])
name, version, quality = spec.tracking.registered_model, a["version"], a["quality"]
rule, signals, first = spec.evaluation.promotion, Path(a["signals"]), a["first"]

def scores(v):  # what model version v scores on the held-out rows
    return {"accuracy": quality[str(v)], "macro_f1": quality[str(v)], "per_label": {}}

def signal(what):
    (signals / what).touch()

def wait(what):
    while not (signals / what).exists():
        time.sleep(0.01)

def rule_says(current):  # the classification kind's rule (flows/kinds/classification.py)
    return decide_promotion(current["final"], current["champion"], metric="accuracy",
                            min_improvement=rule.min_improvement,
                            max_label_drop=rule.max_label_drop,
                            baseline=current["majority_baseline"],
                            min_over_baseline=rule.min_over_baseline)

def decide(current):
    if first:
        signal("inside")
        time.sleep(a["hold_s"])
    return rule_says(current), None

ev = {"final": scores(version), "champion": None, "champion_version": None,
      "majority_baseline": 0.2, "majority_macro_f1": 0.1}
signal(f"ready-{version}")
wait("go")
out = Path(a["out"])
if a["lock"]:
    if not first:
        wait("inside")
    result, _ = settle_champion(spec, ev, out=out, store_url=a["store"], mlflow_uri=a["mlflow"],
                                decide=decide, apply=lambda v: promote(name, version, v),
                                score=scores)
else:
    if not first:
        wait("read-first")
    current, _ = against_current_champion(spec, out, ev, score=scores)
    signal("read-first" if first else "read-second")
    wait("read-second" if first else "applied-first")
    result = promote(name, version, rule_says(current))
    if first:
        signal("applied-first")
print(json.dumps(result))
"""


def lock_spec(tmp: Path, warehouse_url: str, model: str, mlflow_uri: str) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "news_topics" / "spec.yaml").read_text())
    data["warehouse"]["url"] = warehouse_url
    data["tracking"].update(uri=mlflow_uri, registered_model=model)
    path = tmp / f"spec-{model}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def race(tmp: Path, warehouse_url: str, store_url: str | None,
         scenarios: dict[str, tuple[bool, bool]]) -> dict[str, tuple[str, dict[str, dict]]]:
    """Per scenario (model name -> (better first?, locked?)): register v1 (better, 0.80) and v2
    (worse, 0.60), start one process per version, release them all together; return the
    champion each model ends with and what each version's process returned."""
    from mlflow import MlflowClient

    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(mlflow_uri)
    quality = {"1": 0.80, "2": 0.60}
    procs = {}
    for model, (better_first, locked) in scenarios.items():
        client.create_registered_model(model)
        for v in quality:
            client.create_model_version(model, source=str(tmp / f"{model}-v{v}"))
        spec = lock_spec(tmp, warehouse_url, model, mlflow_uri)
        signals = tmp / f"signals-{model}"
        signals.mkdir()
        for v in quality:
            args = {"spec": str(spec), "version": v, "quality": quality, "mlflow": mlflow_uri,
                    "store": store_url, "out": str(tmp / model / f"run-v{v}"), "lock": locked,
                    "first": (v == "1") == better_first, "hold_s": 1.0,
                    "signals": str(signals)}
            procs[model, v] = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)],
                                               cwd=ROOT, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not all((tmp / f"signals-{m}" / f"ready-{v}").exists() for m, v in procs):
        assert time.monotonic() < deadline, "workers never got ready"
        assert all(p.poll() is None for p in procs.values()), [
            p.communicate()[1][-2000:] for p in procs.values() if p.poll() is not None]
        time.sleep(0.1)
    for model in scenarios:
        (tmp / f"signals-{model}" / "go").touch()
    results: dict[str, dict[str, dict]] = {m: {} for m in scenarios}
    for (model, v), proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        results[model][v] = json.loads(stdout.strip().splitlines()[-1])
    return {m: (str(client.get_model_version_by_alias(m, "champion").version), results[m])
            for m in scenarios}


def _check_orders(ends: dict, better_first: str, worse_first: str) -> None:
    """v1 (0.80) ends as champion in both orders, and the second to decide compared itself
    with the first's model, not with the "no champion" its evaluation saw."""
    champion, results = ends[better_first]
    assert champion == "1", results
    assert not results["2"]["promoted"] and results["2"]["previous_champion_version"] == "1"
    assert results["2"]["reason"] == "accuracy 0.600 <= champion 0.800 + 0", results
    champion, results = ends[worse_first]
    assert champion == "1", results
    assert results["1"]["promoted"] and results["1"]["previous_champion_version"] == "2"
    assert results["1"]["reason"].startswith("accuracy 0.800 > champion 0.600 + 0"), results


def test_champion_lock_keeps_the_better_model_in_either_order(tmp_path, small_warehouse_url):
    """SQLite store (the file lock). Without the lock, the worse model deciding second ends as
    champion (both compared with "no champion"): the race is real and this test sees it. With
    it, in both orders, the better model ends as champion."""
    ends = race(tmp_path, small_warehouse_url, None, {
        "better-first": (True, True), "worse-first": (False, True),
        "no-lock": (True, False)})
    champion, results = ends["no-lock"]
    assert champion == "2" and results["2"]["reason"].startswith("no champion yet"), results
    _check_orders(ends, "better-first", "worse-first")


def test_champion_lock_on_a_postgres_store(tmp_path, small_warehouse_url, pg_schema_url):
    """PostgreSQL store (the file lock and the advisory lock): the better model in both
    orders."""
    ends = race(tmp_path, small_warehouse_url, pg_schema_url, {
        "pg-better-first": (True, True), "pg-worse-first": (False, True)})
    _check_orders(ends, "pg-better-first", "pg-worse-first")


# ── two whole runs at once ───────────────────────────────────────────────────────────────────
def _store_url(tmp: Path, request) -> str:
    """A fresh PostgreSQL schema when $POSTTRAIN_TEST_POSTGRES_URL reaches a server, else one
    SQLite file both runs share."""
    try:
        return request.getfixturevalue("pg_schema_url")
    except pytest.skip.Exception:
        return f"sqlite:///{tmp / 'shared-store.db'}"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_runs_at_once_share_store_and_registry(tmp_path, small_warehouse_url, prefect_api,
                                                   request):
    """Two `posttrain run` processes started together on one store and one MLflow registry,
    two students trained alike but for the learning rate (models of different accuracy that
    reach promotion at about the same time): each run's rows in the store, its summary, its
    MLflow run and its registered version are its own, each run's counts are a solo run's
    (every row labelled once, or held out, or a copy of a held-out row), and the champion
    alias ends on the model with the higher accuracy on the (shared) held-out rows, whichever
    run decided last. Which one that is, the test reads from the runs, not from the rates."""
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from tests.test_pipeline import LEARNS, tiny_spec

    store_url = _store_url(tmp_path, request)
    specs = {}
    # the same steps (so both reach promotion at about the same time), another learning rate;
    # promotion on accuracy alone (on 42 held-out rows one label's F1 swings too much for the
    # per-label floor to say which model is better)
    lr = LEARNS["training"]["learning_rate"]
    for who, rate in (("a", lr), ("b", lr / 10)):
        path = tiny_spec(small_warehouse_url, tmp_path, LEARNS["student"],
                         **{**LEARNS["training"], "learning_rate": rate})
        data = yaml.safe_load(path.read_text())
        data["store"] = {"url": store_url}
        data["evaluation"]["promotion"]["max_label_drop"] = None
        path.write_text(yaml.safe_dump(data))
        specs[who] = path
    mlflow_uri = yaml.safe_load(specs["a"].read_text())["tracking"]["uri"]
    client = MlflowClient(mlflow_uri)
    client.search_experiments()  # the registry exists before the runs (its tables made once)

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), OMP_NUM_THREADS="1")
    procs = {who: subprocess.Popen([EXE, "run", str(spec), "--out", str(tmp_path / who)],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
             for who, spec in specs.items()}
    logs = {who: proc.communicate(timeout=1500)[0] for who, proc in procs.items()}
    for who, proc in procs.items():
        assert proc.returncode == 0, f"{who}:\n{logs[who][-4000:]}"
    summaries = {who: json.loads((tmp_path / who / "summary.json").read_text())
                 for who in procs}
    a, b = summaries["a"], summaries["b"]
    assert a["run_id"] != b["run_id"]
    assert a["model_version"] != b["model_version"]
    assert not a["resumed"] and not b["resumed"]

    # the store: two completed runs, each one's examples and calls under its own id
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        runs = dict(conn.execute(sa.text("SELECT id, status FROM runs")).all())
        accepted = dict(conn.execute(sa.text(
            "SELECT run_id, count(*) FROM examples WHERE status = 'accepted' GROUP BY run_id"
        )).all())
        twice = conn.execute(sa.text(
            "SELECT run_id, row_id FROM examples WHERE status = 'accepted' "
            "GROUP BY run_id, row_id HAVING count(*) > 1")).all()
        calls = dict(conn.execute(sa.text(
            "SELECT run_id, count(*) FROM llm_calls GROUP BY run_id")).all())
        total = conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
    engine.dispose()
    with sa.create_engine(small_warehouse_url).connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM articles")).scalar_one()
    assert total == 2 and runs == {a["run_id"]: "completed", b["run_id"]: "completed"}
    assert twice == []
    for s in (a, b):
        assert accepted[s["run_id"]] == s["examples_accepted"], s["run_id"]
        # its own call records: paid calls, and replies the shared call cache already held
        # (the other run's, when both asked the same: the cache is keyed by the request)
        assert calls[s["run_id"]] == s["llm_calls"] + s["cache_hits"]
        copies = s["examples_rejected"].get("copy_of_eval_row", 0)
        assert s["examples_accepted"] + s["eval_examples"] + copies == rows  # as a solo run

    # MLflow: each summary's parent run and registered version carry that run's id and data
    for who, s in summaries.items():
        parent = client.get_run(s["mlflow_run_id"])
        assert parent.data.tags["posttrain.run_id"] == s["run_id"]
        tags = client.get_model_version(s["model_name"], s["model_version"]).tags
        assert tags["posttrain.run_id"] == s["run_id"]
        assert tags["posttrain.parent_run_id"] == s["mlflow_run_id"]
        (train,) = (tmp_path / who).rglob("train.jsonl")
        assert tags["posttrain.dataset_sha256"] == _sha256(train)

    # the champion: the model with the higher accuracy, whichever run finished (decided) last
    champion = str(client.get_model_version_by_alias(a["model_name"], "champion").version)
    for who, s in summaries.items():
        print(f"\n{who}: v{s['model_version']} accuracy {s['accuracy']:.3f}, LLM calls "
              f"{s['llm_calls']} paid + {s['cache_hits']} cached, promoted={s['promoted']} "
              f"({s['promotion_reason']})", end="")
    moved = [who for who in procs if "The champion moved to" in logs[who]]
    print(f"\nchampion v{champion}; re-scored a champion that moved during its run: "
          f"{moved or 'neither'}")
    assert a["accuracy"] != b["accuracy"]  # else the test cannot tell which is better
    assert min(a["accuracy"], b["accuracy"]) > a["majority_baseline"] + 0.05  # each promotable
    best = max(summaries.values(), key=lambda s: s["accuracy"])
    assert champion == str(best["model_version"])
    assert sum(s["promoted"] for s in summaries.values()) in (1, 2)
