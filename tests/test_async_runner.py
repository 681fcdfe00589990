"""Sub-agents as coroutines (`generation.task_runner: async`): the generate stage inside a real
Prefect flow, the simulated teacher over HTTP through both official SDKs on their aiohttp
transport, the real warehouse and store. Each slice must still be one Prefect task run, in
the flow run; results come back in slice order and a failing slice is recorded, never lost,
exactly as on the thread runner."""

from __future__ import annotations

import pytest
import yaml

from tests.test_pipeline import tiny_spec

LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def _spec(warehouse_url: str, tmp):
    path = tiny_spec(warehouse_url, tmp)
    data = yaml.safe_load(path.read_text())
    data["generation"].update(task_runner="async", concurrency=3, max_slices=5)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def async_run(small_warehouse_url, tmp_path_factory, prefect_api):
    """One flow run of the generate stage on the async runner, with one slice whose
    descriptor names a column the table lacks (its task fails)."""
    from prefect import flow
    from prefect.logging.handlers import APILogHandler

    from agents.teacher import TeacherConfig, TeacherServer
    from flows.agent_runners import EventLoopRunner, sub_agent_runner
    from flows.generation import generate
    from flows.planning import plan
    from flows.progress import Progress
    from flows.runtime import RuntimeSettings
    from flows.spec import load_spec
    from flows.store import shared_store
    from tests.servers import drain_prefect_senders

    tmp = tmp_path_factory.mktemp("async-runner")
    spec_path = _spec(small_warehouse_url, tmp)
    spec = load_spec(spec_path)
    store_url = f"sqlite:///{tmp / 'store.db'}"
    seen: dict = {}

    @flow(name="async-agents")
    def agents(url: str) -> list[dict]:
        store = shared_store(store_url)
        run_id = store.start_run(spec.name, spec.content_hash(), spec.model_dump_json())
        slices = plan(spec, store_url, run_id)
        broken = slices[0].model_copy(update={"slice_id": "broken", "id_column": "missing"})
        store.add_slices(run_id, [broken])
        slices.insert(2, broken)
        settings = RuntimeSettings(str(spec_path), run_id, store_url, str(tmp / "out"),
                                   (("generator", f"{url}/v1"), ("judge", url)))
        progress = Progress.create()
        progress.start("generate", "agents", sum(s.row_count for s in slices))
        with sub_agent_runner(spec) as runner:
            assert isinstance(runner, EventLoopRunner) and runner.concurrency == 3
            results = generate(slices, settings, progress.id, 3, runner=runner)
        seen.update(slices=slices, run_id=run_id, store=store,
                    progress=progress._rich.tasks[0].completed)
        progress.stop("generate")
        return results

    with TeacherServer(TeacherConfig(small_warehouse_url, "articles", "id", "topic", LABELS,
                                     knobs={"latency_ms": 20})) as teacher:
        state = agents(teacher.url, return_state=True)
    APILogHandler().flush()
    drain_prefect_senders()  # the task runs' states are events: sent before they are read
    return state.result(), state.state_details.flow_run_id, seen


def test_results_in_slice_order_and_the_failure_recorded(async_run):
    from flows.generation import this_process

    results, _, seen = async_run
    assert [r["slice_id"] for r in results] == [s.slice_id for s in seen["slices"]]
    broken = results[2]
    assert broken["stopped_reason"].startswith("failed: ") and broken["accepted"] == 0
    others = results[:2] + results[3:]
    assert all(r["stopped_reason"] == "completed" and r["accepted"] > 0 for r in others)
    assert {r["process"] for r in others} == {this_process()}  # the flow's own process
    status = {s["slice_id"]: s["status"] for s in seen["store"].list_slices(seen["run_id"])}
    assert status.pop("broken") == "failed" and set(status.values()) == {"done"}
    # the bars moved as the agents accepted rows (in this process, so once each)
    assert seen["progress"] == sum(r["accepted"] for r in results)


def test_one_task_run_per_slice_in_the_flow_run(async_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    _, flow_run_id, seen = async_run
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    agents = {t.name: t.state for t in runs if t.name.startswith("agent ")}
    assert sorted(agents) == sorted(f"agent {s.slice_id}" for s in seen["slices"])
    assert agents.pop("agent broken").is_failed()
    assert all(state.is_completed() for state in agents.values())
