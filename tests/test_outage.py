"""A provider that goes down mid-run (docs/RELIABILITY.md, "Sustained outage"): an
independent fault-injecting proxy (agents/teacher/fault_proxy.py) in front of the simulated
teacher, both real HTTP servers, the flow's real SDK clients pointed at the proxy as at any
OpenAI/Anthropic-compatible provider.

Run 1: once the agents have two dozen answers, the proxy answers every request 429. The
gateway rides it out one call at a time for `llm.outage.budget_s`, then the breaker opens:
the generate stage ends with that one reason (flow run Failed, summary.json, MLflow tag),
accepted work stays in the store, nothing is trained, registered or promoted.
Run 2, the provider back: the same command resumes the run, pays no completed call twice,
stores no example twice, trains and registers one version."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import sqlalchemy as sa
import yaml
from mlflow.tracking import MlflowClient

from agents.teacher import TeacherConfig, TeacherServer
from agents.teacher.fault_proxy import FaultProxy
from tests.teacher_helpers import LABELS
from tests.test_pipeline import tiny_spec

KEY_ENV = "POSTTRAIN_TEST_PROVIDER_KEY"


def _down_after(proxy: FaultProxy, forwarded: int, stop: threading.Event) -> None:
    """Turn the provider off (429 to everything) once `forwarded` requests went through."""
    while not stop.wait(0.05):
        if proxy.snapshot()["forwarded"] >= forwarded:
            proxy.set_profile(rate_429=1.0, retry_after_s=0.2)
            return


def _accepted(store_db) -> list[tuple[str, str]]:
    with sa.create_engine(f"sqlite:///{store_db}").connect() as c:
        return [tuple(r) for r in c.execute(sa.text(
            "SELECT row_id, label FROM examples WHERE status = 'accepted'"))]


def test_an_outage_ends_generate_keeps_the_work_and_the_rerun_resumes(
        small_warehouse_url, tmp_path, prefect_api, monkeypatch):
    from flows.generation import GenerationStopped
    from flows.pipeline import post_training

    monkeypatch.setenv(KEY_ENV, "sk-test-outage-0123456789")
    teacher = TeacherServer(TeacherConfig(
        small_warehouse_url, "articles", "id", "topic", LABELS,
        models=["simulated-teacher", "simulated-judge"],
        request_log=str(tmp_path / "teacher.jsonl")))
    base = teacher.start()  # http://127.0.0.1:PORT/v1
    proxy = FaultProxy(base.removesuffix("/v1"), seed=1,
                       log_path=tmp_path / "proxy.jsonl").start()
    try:
        spec = tiny_spec(small_warehouse_url, tmp_path, max_steps=20)
        data = yaml.safe_load(spec.read_text())
        data["llm"]["generator"].update(endpoint=proxy.url + "/v1", api_key_env=KEY_ENV)
        data["llm"]["judge"].update(endpoint=proxy.url, api_key_env=KEY_ENV)
        data["llm"]["outage"] = {"budget_s": 3, "window": 8}
        spec.write_text(yaml.safe_dump(data))
        out = tmp_path / "run"

        # 1. the provider goes down after 25 requests and stays down
        stop = threading.Event()
        watcher = threading.Thread(target=_down_after, args=(proxy, 25, stop), daemon=True)
        watcher.start()
        started = time.monotonic()
        state = post_training(spec_path=str(spec), out_dir=str(out), return_state=True)
        stopped_after = time.monotonic() - started
        stop.set()
        assert state.is_failed()
        assert "generate stopped: provider outage at" in state.message
        assert "past llm.outage.budget_s 3 s" in state.message
        assert "Run the same command again to resume" in state.message
        try:
            state.result()
            raise AssertionError("the failed run's result should raise")
        except GenerationStopped as e:
            assert e.reason in state.message

        summary = json.loads((out / "summary.json").read_text())
        assert summary["failed"] is True and summary["stopped_by"] == "outage"
        assert summary["promoted"] is False
        assert any(v.startswith("outage: provider outage") for v in
                   summary["agents_stopped"].values())
        kept = _accepted(out / "store.db")
        assert len(kept) > 0 and summary["coverage_rows"]["labelled_rows"] == len(
            {r for r, _ in kept})
        assert not (out / "model").exists()  # nothing trained
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        name = yaml.safe_load(spec.read_text())["tracking"]["registered_model"]
        assert client.search_model_versions(f"name = '{name}'") == []
        parent = client.get_run(summary["mlflow_run_id"])
        assert parent.info.status == "FAILED"
        assert parent.data.tags["posttrain.stopped"].startswith("generate stopped")
        faults = proxy.snapshot()["fault_429"]

        # 2. the provider is back: the same command resumes and finishes
        proxy.set_profile()
        second = post_training(spec_path=str(spec), out_dir=str(out))
        assert second["resumed"] is True and second["run_id"] == summary["run_id"]
        assert second["coverage"] >= 0.9 and second["model_version"] == "1"
        accepted = _accepted(out / "store.db")
        assert max(Counter(r for r, _ in accepted).values()) == 1  # no example stored twice
        assert set(kept) <= set(accepted)  # what run 1 accepted was kept, as it was
        assert len(client.search_model_versions(f"name = '{name}'")) == 1

        # no request that had been answered was sent again: completed calls came from the
        # call cache (the 429s were never answered, so their retries are not repeats)
        lines = [json.loads(x) for x in (tmp_path / "proxy.jsonl").read_text().splitlines()]
        answered = Counter(x["request_sha256"] for x in lines
                           if x["fault"] is None and x["status"] == 200)
        assert answered and max(answered.values()) == 1
        figures = {"outage_stopped_after_s": round(stopped_after, 1), "faults_429": faults,
                   "kept_examples": len(kept), "resumed_examples": len(accepted),
                   "answered_requests": sum(answered.values()), "repeated_requests": 0}
        print(json.dumps(figures))
    finally:
        proxy.stop()
        teacher.stop()
