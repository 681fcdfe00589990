"""Every agent's calls as an MLflow trace (flows/agent_traces.py): two agents on one event
loop against the simulated teacher over HTTP (the real openai and anthropic SDKs), a judge,
a real SQLite MLflow store, each trace linked to a parent run and read back with
`mlflow.search_traces(run_id=...)`; then the same run again, served from the call cache."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from types import SimpleNamespace

import mlflow
import pytest
import sqlalchemy as sa
from mlflow.tracking import MlflowClient

from agents.agent_types import AgentConfig
from agents.answers import LabelAnswer
from agents.gates import Gate
from agents.gateway import LLMGateway, MemoryCache
from agents.judge import Judge
from agents.ledger import CostLedger
from agents.loop import arun_agent, run_agent
from agents.provider_factory import make_provider
from agents.ratelimit import AdaptiveLimiter
from agents.skills import load_skill
from agents.sql_tool import ScopedTable, SQLTool
from agents.teacher import TeacherConfig, TeacherKnobs, TeacherServer
from flows import agent_traces
from flows.agent_traces import MlflowTracer

LABELS = ["business", "entertainment", "politics", "sports", "tech"]
COLUMNS = ["id", "title", "body", "published_at", "region", "word_count"]
REGIONS = ["europe", "asia"]
# secrets a careless prompt could carry: none may reach the trace store
ENV_SECRET = "env-held-secret-value-4d2c9"
SECRETS = ["sk-live-0123456789abcdefSECRET", "hunter2pass", ENV_SECRET]
MARKER = "TRACE-MARKER-7f3a"  # stored beside them: proves the store's text is searchable
DESCRIPTION = (f"Label a BBC News article with its topic. {MARKER} (ops notes: key "
               f"{SECRETS[0]}, db postgresql://bob:{SECRETS[1]}@db.internal/wh, "
               f"token {ENV_SECRET})")


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A fresh SQLite MLflow store, its experiment and two parent runs (a run, its rerun)."""
    tmp_path = tmp_path_factory.mktemp("traces")
    patch = pytest.MonkeyPatch()
    patch.setenv("TRACES_TEST_API_KEY", ENV_SECRET)  # redact() masks *_API_KEY values
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("traces", artifact_location=(tmp_path / "art").as_uri())
    runs = [client.create_run(exp, run_name=n).info.run_id for n in ("first", "rerun")]
    yield SimpleNamespace(uri=uri, client=client, experiment_id=exp, runs=runs,
                          db=tmp_path / "mlflow.db")
    agent_traces.flush()
    mlflow.set_tracking_uri(before)
    patch.undo()


def agents_once(url: str, engine, cache: MemoryCache, experiment_id: str, parent: str,
                calls: list[dict]) -> dict:
    """Two agents (europe, asia) at once on one event loop, each with its own tracer, one
    generator gateway and one judge shared, as the async runner does."""
    generator = LLMGateway(make_provider("openai", base_url=f"{url}/v1", api_key="k",
                                         timeout=10),
                           role="generator", cache=cache, ledger=CostLedger(),
                           limiter=AdaptiveLimiter(), on_call=calls.append, max_retries=4,
                           backoff_base=0.01)
    judge = Judge(LLMGateway(make_provider("anthropic", base_url=url, api_key="k", timeout=10),
                             role="judge", cache=cache, on_call=calls.append),
                  model="simulated-judge", skill=load_skill("review-examples"), labels=LABELS)

    async def one(region: str):
        where = "SELECT * FROM articles WHERE region = :r"
        tool = SQLTool(engine, ScopedTable("articles", COLUMNS, where, {"r": region}, "id"),
                       row_limit=200)
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT count(*) FROM ({where}) s"),
                                {"r": region}).scalar_one()
        return await arun_agent(
            generator,
            config=AgentConfig(model="simulated-teacher", max_turns=40, judge_sample_rate=1.0),
            skill=load_skill("label-examples"),
            task={"description": DESCRIPTION, "labels": LABELS, "slice_id": region,
                  "rows": rows, "page_size": 10},
            sql_tool=tool, gate=Gate(LabelAnswer(LABELS)), row_lookup=tool.lookup_row,
            on_example=lambda e: None, agent_name=f"labeler/{region}", slice_id=region,
            judge=judge,
            tracer=MlflowTracer(experiment_id, parent, {"slice_id": region}))

    async def both():
        return await asyncio.gather(*(one(r) for r in REGIONS))

    results = asyncio.run(both())
    agent_traces.flush()
    return dict(zip(REGIONS, results, strict=True))


@pytest.fixture(scope="module")
def traced(small_warehouse_url, engine, mlflow_store):
    """The two agents run twice (a run, then its rerun on the same call cache): the results,
    the calls recorded, and each parent run's traces by slice."""
    cache = MemoryCache()
    out = []
    knobs = TeacherKnobs(error_rate=0.15, off_spec_rate=0.2, fault_500_rate=0.1, seed=3)
    with TeacherServer(TeacherConfig(small_warehouse_url, "articles", "id", "topic", LABELS,
                                     knobs=knobs)) as teacher:
        for parent in mlflow_store.runs:
            calls: list[dict] = []
            results = agents_once(teacher.url, engine, cache, mlflow_store.experiment_id,
                                  parent, calls)
            traces = mlflow.search_traces(run_id=parent, return_type="list",
                                          locations=[mlflow_store.experiment_id])
            out.append(SimpleNamespace(results=results, calls=calls, traces={
                t.info.tags.get("slice_id"): t for t in traces}, all=traces))
    return SimpleNamespace(store=mlflow_store, first=out[0], rerun=out[1])


def spans_of(trace, span_type: str | None = None, name: str | None = None) -> list:
    return [s for s in trace.data.spans if (span_type is None or s.span_type == span_type)
            and (name is None or s.name == name)]


def test_one_trace_per_agent_linked_to_the_run(traced):
    first = traced.first
    assert len(first.all) == len(REGIONS) and set(first.traces) == set(REGIONS)
    for region, trace in first.traces.items():
        assert trace.info.trace_metadata["mlflow.sourceRun"] == traced.store.runs[0]
        assert trace.info.experiment_id == traced.store.experiment_id
        root = next(s for s in trace.data.spans if s.parent_id is None)
        result = first.results[region]
        assert root.name == f"agent {region}" and root.span_type == "AGENT"
        assert root.attributes["slice_id"] == region and root.attributes["rows"] > 0
        assert root.outputs["accepted"] == result.accepted > 0
        assert root.outputs["stopped_reason"] == result.stopped_reason == "completed"
        assert root.outputs["calls"] == result.calls
        # every span is this agent's: the two agents shared one loop and one gateway
        llm = spans_of(trace, "LLM")
        assert {s.attributes["slice_id"] for s in llm} == {region}
        assert len(llm) == sum(c["slice_id"] == region for c in first.calls)


def test_llm_spans_carry_tokens_cost_timing_and_errors(traced):
    for trace in traced.first.traces.values():
        llm = spans_of(trace, "LLM")
        generator = [s for s in llm if s.attributes["role"] == "generator"]
        ok = [s for s in generator if s.attributes["status"] == "ok"]
        assert ok and all(s.attributes["input_tokens"] > 0 and s.attributes["output_tokens"] > 0
                          and s.attributes["cost_usd"] > 0 and s.attributes["cached"] is False
                          and s.attributes["model"] == "simulated-teacher"
                          and s.attributes["api"] == "openai" for s in ok)
        for s in ok:  # the span lasts the call's latency
            took_ms = (s.end_time_ns - s.start_time_ns) / 1e6
            assert abs(took_ms - s.attributes["latency_ms"]) < 1.0
            assert s.inputs["messages"] and s.inputs["tools"] == ["sql", "submit_examples"]
            assert s.outputs.get("tool_calls") or s.outputs["text"]
        assert all("cache_read_tokens" in s.attributes and "attempt" in s.attributes
                   for s in ok)
    # the teacher answers 10% of requests 500: each failed attempt is an ERROR span with its reason
    failed = [s for t in traced.first.all for s in spans_of(t, "LLM")
              if s.attributes["status"] == "error"]
    assert failed and all(s.status.status_code == "ERROR" and s.attributes["error"]
                          for s in failed)
    assert len(failed) == sum(c["status"] == "error" for c in traced.first.calls)


def test_tool_spans_show_the_sql_and_the_verdicts(traced):
    for region, trace in traced.first.traces.items():
        sql = spans_of(trace, "TOOL", "sql")
        assert sql and all("select" in s.inputs["query"].lower() for s in sql)
        read = [s for s in sql if s.status.status_code == "OK"]
        assert read and all(s.outputs["rows"] == s.attributes["rows"] for s in read)
        assert sum(s.attributes["rows"] for s in read) >= traced.first.results[region].accepted
        submits = spans_of(trace, "TOOL", "submit_examples")
        assert sum(s.outputs["accepted"] for s in submits) >= traced.first.results[region].accepted
        rejected = sum((Counter(s.outputs["rejected_by_reason"]) for s in submits), Counter())
        result = traced.first.results[region]  # a quarantined row is refused on reading
        assert rejected == {k: v for k, v in result.rejected.items() if k != "hostile_row"}
        statuses = {v["status"] for s in submits for v in s.outputs["verdicts"]}
        assert "accepted" in statuses
        # the judge reviews under the submission it judged; its LLM call under the review
        by_id = {s.span_id: s for s in trace.data.spans}
        reviews = spans_of(trace, "EVALUATOR", "judge review")
        assert reviews and all(by_id[r.parent_id].name == "submit_examples" for r in reviews)
        assert all(r.outputs["verdicts"] and r.attributes["reviewed"] > 0 for r in reviews)
        judged = [s for s in spans_of(trace, "LLM") if s.attributes["role"] == "judge"]
        assert judged and all(by_id[s.parent_id].name == "judge review" for s in judged)
    # off-spec labels were rejected by the gate, and the spans say why
    reasons = {r for t in traced.first.all for s in spans_of(t, "TOOL", "submit_examples")
               for r in s.outputs["rejected_by_reason"]}
    assert reasons


def test_a_rerun_shows_its_calls_as_cache_hits(traced):
    rerun = traced.rerun
    assert set(rerun.traces) == set(REGIONS)
    for region, trace in rerun.traces.items():
        assert trace.info.trace_metadata["mlflow.sourceRun"] == traced.store.runs[1]
        llm = spans_of(trace, "LLM")
        assert llm and all(s.attributes["cached"] is True and s.attributes["cost_usd"] == 0
                           and s.name.endswith("(cached)") for s in llm)
        assert all(s.end_time_ns - s.start_time_ns < 5_000_000 for s in llm)  # < 5 ms
        assert rerun.results[region].accepted == traced.first.results[region].accepted


def test_no_secret_reaches_the_trace_store(traced):
    agent_traces.flush()
    stored = traced.store.db.read_bytes()
    assert MARKER.encode() in stored  # the prompt's text is there, searchable
    for secret in SECRETS:
        assert secret.encode() not in stored, secret
    assert b"[REDACTED]" in stored


class Broken:
    """A tracer whose store is down: every call fails."""

    def open(self, *a, **k):
        raise ConnectionError("tracking store down")

    close = llm_call = open


def test_a_broken_tracer_never_fails_an_agent(small_warehouse_url, engine, caplog):
    scoped = ScopedTable("articles", COLUMNS, "SELECT * FROM articles WHERE region = :r",
                         {"r": "asia"}, "id")
    tool = SQLTool(engine, scoped, row_limit=200)
    with TeacherServer(TeacherConfig(small_warehouse_url, "articles", "id", "topic", LABELS,
                                     error_rate=0.0, off_spec_rate=0.0)) as teacher:
        gateway = LLMGateway(make_provider("openai", base_url=teacher.base_url, api_key="k"),
                             role="generator")
        result = run_agent(
            gateway, config=AgentConfig(model="simulated-teacher", max_turns=20),
            skill=load_skill("label-examples"),
            task={"description": "Label it.", "labels": LABELS, "slice_id": "asia",
                  "rows": 11, "page_size": 10},
            sql_tool=tool, gate=Gate(LabelAnswer(LABELS)), row_lookup=tool.lookup_row,
            on_example=lambda e: None, agent_name="labeler/asia", slice_id="asia",
            tracer=Broken())
    assert result.stopped_reason == "completed" and result.accepted == 11


def test_the_spec_switch_turns_traces_off(tmp_path, mlflow_store):
    """`tracking.traces` decides, for a run whose store names its MLflow parent run."""
    from flows.spec import Tracking
    from flows.store import shared_store

    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = shared_store(store_url)
    run_id = store.start_run("x", "hash", "{}")
    store.set_mlflow_run(run_id, mlflow_store.runs[0])
    settings = SimpleNamespace(out_dir=str(tmp_path), store_url=store_url, run_id=run_id)
    on = Tracking(uri=mlflow_store.uri, registered_model="m")
    assert on.traces is True  # the default
    tracer = agent_traces.run_tracer(SimpleNamespace(tracking=on), settings)
    assert isinstance(tracer, MlflowTracer)
    assert tracer.experiment_id == mlflow_store.experiment_id
    assert tracer.source_run == mlflow_store.runs[0]
    off = Tracking(uri=mlflow_store.uri, registered_model="m", traces=False)
    assert agent_traces.run_tracer(SimpleNamespace(tracking=off), settings) is None


def test_the_tuner_is_one_trace_with_its_call_and_proposals(small_warehouse_url, tmp_path,
                                                            mlflow_store):
    """flows/tuning.py's `propose_trials` with the tuner LLM (the simulated teacher over HTTP)
    on a run whose store names its MLflow parent run: one trace `tuner` in that run."""
    from flows import tuning
    from flows.runtime import RuntimeSettings
    from flows.spec import load_spec
    from flows.store import shared_store
    from tests.test_tuning import tune_spec

    spec_path = tune_spec(small_warehouse_url, tmp_path, tuner=True)
    spec = load_spec(spec_path)
    spec.tracking.uri = mlflow_store.uri  # the module's store (a fresh one costs seconds)
    exp = mlflow_store.experiment_id
    parent = mlflow_store.client.create_run(exp, run_name="tuning").info.run_id
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = shared_store(store_url)
    run_id = store.start_run(spec.name, spec.content_hash(), "{}")
    store.set_mlflow_run(run_id, parent)
    with TeacherServer(TeacherConfig(small_warehouse_url, "articles", "id", "topic",
                                     LABELS)) as teacher:
        settings = RuntimeSettings(str(spec_path), run_id, store_url, str(tmp_path / "out"),
                                   (("generator", teacher.base_url), ("judge", teacher.url),
                                    ("tuner", teacher.base_url)))
        out = tuning.propose_trials.fn(spec, settings, {"n": 80}, [])
    agent_traces.flush()
    traces = mlflow.search_traces(run_id=parent, locations=[exp], return_type="list")
    assert len(traces) == 1
    (root,) = [s for s in traces[0].data.spans if s.parent_id is None]
    assert root.name == "tuner" and root.span_type == "AGENT"
    kept = [p["config"] for p in root.outputs["proposals"] if p["config"] is not None]
    tuned = [c["config"] for c in out["configs"] if c["source"] == "tuner"]
    assert kept and len(kept) == len(tuned)  # the proposals the trials took, as proposed
    assert all(k.items() <= t.items() for k, t in zip(kept, tuned, strict=True))
    (llm,) = spans_of(traces[0], "LLM")
    assert llm.attributes["role"] == "tuner" and llm.attributes["input_tokens"] > 0
    assert llm.outputs["json"]["configs"] and llm.inputs["schema_name"] == "configs"


def test_an_unreachable_tracking_server_leaves_agents_untraced(tmp_path, monkeypatch, caplog):
    """The tracking server down when an agent starts: no tracer, one warning, and the next
    agents of the process are not made to wait out the server's retries again."""
    from flows.store import shared_store
    from tests.servers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setattr(agent_traces, "_warned", False)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = shared_store(store_url)
    run_id = store.start_run("x", "hash", "{}")
    store.set_mlflow_run(run_id, "0123456789abcdef")
    spec = SimpleNamespace(tracking=SimpleNamespace(
        traces=True, uri=f"http://127.0.0.1:{free_port()}"))
    settings = SimpleNamespace(out_dir=str(tmp_path), store_url=store_url, run_id=run_id)
    before = mlflow.get_tracking_uri()
    assert agent_traces.run_tracer(spec, settings) is None
    started = time.monotonic()
    assert agent_traces.run_tracer(spec, settings) is None
    assert time.monotonic() - started < 0.1  # off for this process: no second wait
    assert mlflow.get_tracking_uri() == before
    assert len([r for r in caplog.records if "agent traces off" in r.message]) == 1
