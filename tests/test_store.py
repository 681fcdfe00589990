"""The example store on real SQLite files and (when configured) a real PostgreSQL server:
round trips, the figures the pipeline reports, and concurrent writers."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from flows.slicing import MembersRef, SliceDescriptor
from flows.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'nested' / 'dir' / 'store.db'}"  # parent dirs created
    else:
        url = request.getfixturevalue("pg_schema_url")
    s = Store(url)
    yield s
    s.close()


def descriptor(slice_id: str, n: int = 10) -> SliceDescriptor:
    return SliceDescriptor(
        slice_id=slice_id, key={"region": slice_id}, table="articles", id_column="id",
        columns=["id", "title"],
        members=MembersRef(url="memory:none", plan_id="p", part=slice_id, lo=0, hi=n),
        row_count=n,
    )


def test_slice_members_are_chunks_read_back_by_position(store):
    """Planning writes a part's ids in chunks; any position range reads back in order, and a
    plan or part never sees another's ids."""
    ids = [f"{i}" for i in range(1, 101)]
    store.add_members("run1/a", [("bucket=0", 0, ids[:40]), ("bucket=1", 0, ["x", "y"])])
    store.add_members("run1/a", [("bucket=0", 40, ids[40:95]), ("bucket=0", 95, ids[95:])])
    store.add_members("run1/b", [("bucket=0", 0, ["other"])])
    for lo, hi in [(0, 100), (0, 40), (39, 41), (10, 96), (95, 100), (99, 200), (100, 120)]:
        assert store.members("run1/a", "bucket=0", lo, hi) == ids[lo:hi], (lo, hi)
    assert store.members("run1/a", "bucket=1", 0, 5) == ["x", "y"]
    assert store.members("run1/b", "bucket=0", 0, 5) == ["other"]
    assert store.members("run1/a", "bucket=9", 0, 5) == []


def test_round_trip(store):
    run = store.start_run("news", "abc123", {"name": "news"})
    other = store.start_run("other", "def456", "{}")
    store.add_slices(run, [descriptor("region=uk#1", 12), descriptor("region=asia", 7)])
    store.add_slices(run, [descriptor("region=asia", 7)])  # a retried plan adds nothing
    store.update_slice(run, "region=uk#1", status="running", agent="agent-0")
    store.update_slice(run, "region=uk#1", status="done", accepted=2, rejected=1,
                       stopped_reason="finished")

    first = store.add_example(run, slice_id="region=uk#1", row_id=42, prompt="Title: A\nTopic:",
                              completion=" tech", label="tech", agent="agent-0", model="sim")
    store.add_example(run, slice_id="region=uk#1", row_id="43", prompt="Title: B\nTopic:",
                      completion=" sports", label="sports", agent="agent-0", model="sim")
    store.add_example(run, slice_id="region=uk#1", row_id=44, prompt="Title: C\nTopic:",
                      completion=" weather", label="weather", status="rejected",
                      reason="label_not_in_set", agent="agent-0", model="sim")
    store.add_example(run, slice_id="region=uk#1", row_id=999, prompt=None, completion=None,
                      label="tech", status="rejected", reason="row_not_in_slice")
    store.add_example(run, slice_id="region=uk#1", row_id=998, prompt=None, completion=None,
                      label="tech", status="rejected", reason="row_not_in_slice")
    store.add_example(other, slice_id="x", row_id=1, prompt="p", completion="c", label="tech")

    got = store.accepted_examples(run)
    assert [e["row_id"] for e in got] == ["42", "43"] and got[0]["id"] == first
    assert got[0]["content_hash"] == hashlib.sha256(b"Title: A\nTopic:\x00 tech").hexdigest()
    assert got[0]["label"] == "tech" and got[0]["agent"] == "agent-0"
    assert isinstance(got[0]["created_at"], str)
    assert store.rejection_counts(run) == {"row_not_in_slice": 2, "label_not_in_set": 1}

    store.record_call(run, api="openai", model="sim", request_hash="h1",
                      slice_id="region=uk#1", agent="agent-0", input_tokens=100,
                      output_tokens=20, latency_ms=12.5)
    store.record_call(run, api="openai", model="sim", request_hash="h2",
                      input_tokens=50, output_tokens=0, status="error", error="HTTP 529")
    store.record_call(run, api="anthropic", model="judge", request_hash="h3", role="judge",
                      input_tokens=10, output_tokens=5, cost_usd=0.25)
    store.record_call(run, api="anthropic", model="judge", request_hash="h3", role="judge",
                      cached=True)  # a cache hit: no tokens, no cost, not a provider call
    totals = store.call_totals(run)
    assert {k: totals[k] for k in ("calls", "errors", "cache_hits", "input_tokens",
                                   "output_tokens")} == {"calls": 3, "errors": 1,
                                                         "cache_hits": 1, "input_tokens": 160,
                                                         "output_tokens": 25}
    assert totals["cost_usd"] == 0.25
    assert totals["by_role"]["judge"] == {"calls": 1, "errors": 0, "cache_hits": 1,
                                          "input_tokens": 10, "output_tokens": 5,
                                          "cost_usd": 0.25}
    assert store.call_totals(other)["calls"] == 0 and store.call_totals(other)["by_role"] == {}

    # the call cache is keyed by content and keeps the first reply
    assert store.cache_get("k1") is None
    store.cache_put("k1", api="openai", model="sim", response={"text": "a"})
    store.cache_put("k1", api="openai", model="sim", response={"text": "b"})
    assert store.call_cache().get("k1") == {"text": "a"}

    slices = {s["slice_id"]: s for s in store.list_slices(run)}
    assert len(store.list_slices(run)) == 2
    assert slices["region=uk#1"]["status"] == "done" and slices["region=uk#1"]["accepted"] == 2
    assert slices["region=asia"]["status"] == "pending" and slices["region=asia"]["row_count"] == 7
    assert SliceDescriptor.model_validate_json(slices["region=asia"]["descriptor_json"]) == \
        descriptor("region=asia", 7)

    store.set_mlflow_run(run, "mlflow-run-1")
    store.finish_run(run, "completed", {"accepted": 2, "accuracy": 0.9})
    runs = {r["id"]: r for r in store.list_runs()}
    assert set(runs) == {run, other}
    assert runs[run]["status"] == "completed" and runs[run]["mlflow_run_id"] == "mlflow-run-1"
    assert runs[run]["summary"] == {"accepted": 2, "accuracy": 0.9}
    assert runs[run]["finished_at"] is not None and runs[other]["status"] == "running"
    assert store.get_run(run)["spec_hash"] == "abc123"
    store.finish_run(other, "failed")
    assert store.get_run(other)["status"] == "failed" and store.get_run(other)["summary"] is None


def test_misuse_is_refused(store):
    run = store.start_run("news", "abc", "{}")
    store.add_slices(run, [descriptor("s")])
    with pytest.raises(ValueError, match="unknown field"):
        store.update_slice(run, "s", colour="red")
    with pytest.raises(ValueError, match="slice status"):
        store.update_slice(run, "s", status="exploded")
    with pytest.raises(LookupError):
        store.update_slice(run, "no-such-slice", status="done")
    with pytest.raises(ValueError, match="reason"):
        store.add_example(run, slice_id="s", row_id=1, prompt="p", completion="c", label="x",
                          status="accepted", reason="why")
    with pytest.raises(ValueError, match="reason"):
        store.add_example(run, slice_id="s", row_id=1, prompt="p", completion="c", label="x",
                          status="rejected")
    with pytest.raises(ValueError, match="run status"):
        store.finish_run(run, "done")
    with pytest.raises(LookupError):
        store.finish_run("no-such-run", "failed")


def test_four_threads_write_at_once(store):
    run = store.start_run("news", "abc", "{}")
    store.add_slices(run, [descriptor(f"s{t}") for t in range(4)])
    per_thread = 25
    barrier = threading.Barrier(4)

    def agent(t: int) -> None:
        barrier.wait()  # all four start writing together
        for i in range(per_thread):
            store.add_example(run, slice_id=f"s{t}", row_id=i, prompt=f"p{t}-{i}",
                              completion=" tech", label="tech", agent=f"a{t}")
            store.record_call(run, api="openai", model="sim",
                              request_hash=f"{t}-{i}", input_tokens=3, output_tokens=1)
            store.update_slice(run, f"s{t}", status="running", accepted=i + 1)
            if i % 10 == 0:
                store.accepted_examples(run)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(agent, t) for t in range(4)]:
            future.result()  # re-raises any writer's error
    assert len(store.accepted_examples(run)) == 4 * per_thread
    totals = store.call_totals(run)
    assert (totals["calls"], totals["errors"], totals["input_tokens"],
            totals["output_tokens"]) == (100, 0, 300, 100)
    assert {s["accepted"] for s in store.list_slices(run)} == {per_thread}


def test_a_slice_is_read_and_cleared_by_index_in_older_stores_too(store):
    """Per-slice work (an agent's start, a revocation) reads its slice's examples by index,
    not the whole run's; a store created before that index gets it when opened."""
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_examples_run_slice_row"))
    reopened = Store(store.url)
    names = {i["name"] for i in sa.inspect(reopened.engine).get_indexes("examples")}
    assert "ix_examples_run_slice_row" in names
    run = reopened.start_run("n", "h", "{}")
    reopened.add_slices(run, [descriptor("g=a", 3)])
    assert reopened.get_slice(run, "g=a")["row_count"] == 3
    assert reopened.get_slice(run, "g=b") is None
    ids = reopened.add_examples(run, [
        {"slice_id": "g=a", "row_id": i, "prompt": f"p{i}", "completion": "c", "label": "x"}
        for i in range(3)])
    assert len(ids) == 3 and reopened.clear_slice_examples(run, "g=a") == 3
    reopened.close()


def test_a_call_record_and_its_cached_reply_are_one_write(store):
    """The runtime's cache holds a reply until its call is recorded, then both go in one
    transaction; a reply never recorded is not cached, and a plain cache writes at once."""
    run = store.start_run("n", "h", "{}")
    cache = store.call_cache(with_records=True)
    cache.put("k1", api="openai", model="m", response={"text": "a"})
    assert store.cache_get("k1") is None  # held, not yet written
    store.record_call(run, api="openai", model="m", request_hash="k1", input_tokens=3,
                      reply=cache.take("k1"))
    assert cache.get("k1") == {"text": "a"} and cache.take("k1") is None
    assert store.call_totals(run)["calls"] == 1
    store.record_call(run, api="openai", model="m", request_hash="k1", reply={
        "api": "openai", "model": "m", "response": {"text": "b"}})  # the first reply stays
    assert store.cache_get("k1") == {"text": "a"}
    store.call_cache().put("k2", api="openai", model="m", response={"text": "c"})
    assert store.cache_get("k2") == {"text": "c"}
