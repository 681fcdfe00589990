"""Sub-agents on a Dask cluster: the real pipeline twice on the small warehouse, once with
threads in the flow's process and once on a local Dask cluster of 2 worker processes, each run
with its own out folder, example store and MLflow store. The data the agents write must not
depend on where they ran, and the Dask run's agents must really have run elsewhere."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.test_pipeline import tiny_spec

pytest.importorskip("prefect_dask")

PROCESS = re.compile(r"ran in process (\S+)$")


def _spec(warehouse_url: str, tmp, task_runner: str):
    path = tiny_spec(warehouse_url, tmp, max_steps=20)
    data = yaml.safe_load(path.read_text())
    data["generation"].update(task_runner=task_runner, dask_workers=2)
    data["tuning"] = {"enabled": False}
    data["dpo"] = {"enabled": False}
    path.write_text(yaml.safe_dump(data))
    return path


def _agent_processes(flow_run_id) -> tuple[list[str], int]:
    """Where each agent task ran, as its own log line (sent to the API by that process), and
    how many completed agent task runs Prefect recorded for the flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    agents = sum(t.name.startswith("agent ") and t.state.is_completed() for t in tasks)
    return [m.group(1) for log in logs if (m := PROCESS.search(log.message))], agents


@pytest.fixture(scope="module")
def both_runs(small_warehouse_url, tmp_path_factory, prefect_api):
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import post_training

    runs = {}
    for runner in ("thread", "dask"):
        tmp = tmp_path_factory.mktemp(f"runner-{runner}")
        state = post_training(spec_path=str(_spec(small_warehouse_url, tmp, runner)),
                              out_dir=str(tmp / "run"), return_state=True)
        runs[runner] = (tmp, state.result(), state.state_details.flow_run_id)
    APILogHandler().flush()
    return runs


def test_dask_run_writes_the_same_data_as_the_thread_run(both_runs):
    (t_tmp, thread, _), (d_tmp, dask, _) = both_runs["thread"], both_runs["dask"]
    # Each run has its own store, so no cross-run cache; the simulated teacher seeds every
    # choice by row and conversation, and judge sampling is a hash of the row id: nothing the
    # agents produce depends on timing or on which process ran them.
    keys = ("slices", "topup_slices", "examples_accepted", "examples_rejected", "tool_misuse",
            "reanchors", "llm_calls", "llm_errors", "cache_hits", "input_tokens",
            "output_tokens", "cost_usd", "label_counts", "train_examples",
            "duplicates_dropped", "eval_copies_dropped", "quota_trimmed", "eval_examples")
    assert {k: dask[k] for k in keys} == {k: thread[k] for k in keys}
    assert dask["slices"] >= 5 and dask["examples_accepted"] > 0
    assert dask["mlflow_tracking_uri"] != thread["mlflow_tracking_uri"]
    # curate orders by (slice, row): the very same training file, byte for byte
    assert ((d_tmp / "run" / "data" / "train.jsonl").read_bytes()
            == (t_tmp / "run" / "data" / "train.jsonl").read_bytes())
    assert len(list((d_tmp / "run" / "transcripts").glob("*.jsonl"))) == dask["slices"]


def test_dask_agents_ran_in_worker_processes(both_runs):
    from flows.generation import this_process

    here = this_process()  # the flow ran in this test's process
    _, thread, thread_run = both_runs["thread"]
    _, dask, dask_run = both_runs["dask"]
    threads, thread_tasks = _agent_processes(thread_run)
    assert len(threads) == thread_tasks == thread["slices"] + thread["topup_slices"]
    assert set(threads) == {here}
    # the worker processes reported their task runs and logs to the flow's Prefect API
    workers, dask_tasks = _agent_processes(dask_run)
    assert len(workers) == dask_tasks == dask["slices"] + dask["topup_slices"]
    assert here not in workers
    assert len(set(workers)) == 2  # both worker processes of the local cluster took agents
