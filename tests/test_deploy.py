"""Deployments and the command line around them, against a real Prefect API: prefect.yaml's
nightly deployment served (schedule, typed parameter form) and deployed on a process pool;
`posttrain ui` starting both servers; `posttrain runs` listing past runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.deploy import REPO_ROOT, deployment_settings
from tests.servers import free_port

DEPLOYMENT = "post-training/nightly"


def api_env(api_url: str | None = None) -> dict[str, str]:
    """A subprocess environment pointing at `api_url` (default: this process's Prefect API,
    the test harness's temporary server)."""
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PREFECT_API_URL=api_url or PREFECT_API_URL.value(),
                PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")


def read_deployment(deadline_s: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    end = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < end:
            try:
                return client.read_deployment_by_name(DEPLOYMENT)
            except ObjectNotFound:
                time.sleep(0.5)
    raise AssertionError(f"{DEPLOYMENT} never appeared")


def test_prefect_yaml_defines_the_nightly_deployment():
    nightly = deployment_settings("nightly")
    assert nightly["entrypoint"] == "flows/pipeline.py:post_training"
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["parameters"]["only_if_new_data"] is True
    with pytest.raises(SystemExit, match="no deployment named 'weekly'"):
        deployment_settings("weekly")


def test_served_deployment_has_the_0200_schedule_and_a_typed_form(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = prefect_server + "/api"
    with temporary_settings({PREFECT_API_URL: api}):
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--timezone", "Europe/Paris"],
            cwd=REPO_ROOT, env=api_env(api), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deployment = read_deployment()
            schedule = deployment.schedules[0].schedule
            assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "Europe/Paris")
            assert deployment.parameters["out_dir"] == "runs/nightly"
            # the UI builds its run form from this schema: typed fields, not one free-text blob
            props = deployment.parameter_openapi_schema["properties"]
            assert props["only_if_new_data"]["type"] == "boolean"
            assert props["max_steps"]["anyOf"][0]["type"] == "integer"
            assert props["budget_usd"]["anyOf"][0]["type"] == "number"
            assert "max_steps" in props and "Override training.max_steps" in (
                props["max_steps"]["description"])
            api = next(x for x in props["generator_api"]["anyOf"] if "enum" in x)
            assert api["enum"] == ["openai", "anthropic"]
            # the server's scheduler creates the upcoming runs: each at 02:00 Paris time
            deadline = time.monotonic() + 30
            runs = []
            with get_client(sync_client=True) as client:
                while not runs and time.monotonic() < deadline:
                    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                        id=DeploymentFilterId(any_=[deployment.id])))
                    time.sleep(1)
            from zoneinfo import ZoneInfo

            assert runs, "the scheduler created no runs for the served deployment"
            starts = {r.expected_start_time.astimezone(ZoneInfo("Europe/Paris")).strftime("%H:%M")
                      for r in runs}
            assert starts == {"02:00"}
        finally:
            serve.terminate()
            serve.wait(timeout=30)


def test_deploy_registers_it_on_a_process_pool(prefect_api):
    from prefect.client.orchestration import get_client

    done = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--pool",
                           "posttrain-test"], check=False, cwd=REPO_ROOT, env=api_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    deployment = read_deployment(10)
    assert deployment.work_pool_name == "posttrain-test"
    assert deployment.entrypoint == "flows/pipeline.py:post_training"
    step = deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == str(REPO_ROOT)
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("posttrain-test").type == "process"



def test_ui_starts_prefect_and_mlflow_on_localhost(tmp_path):
    from flows.ui import start_uis, stop

    procs, urls = start_uis(f"sqlite:///{tmp_path / 'mlflow.db'}", free_port(), free_port())
    try:
        assert urls["prefect"].startswith("http://127.0.0.1:")
        for url in (urls["prefect"] + "/api/health", urls["mlflow"] + "/health"):
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.status == 200
    finally:
        stop(procs)
    assert all(p.poll() is not None for p in procs)


def test_runs_lists_past_runs_with_their_outcome(tmp_path, capsys, monkeypatch):
    from flows.cli import main
    from flows.store import Store

    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    store = Store(f"sqlite:///{folder / 'store.db'}")
    done = store.start_run("news", "h1", {})
    store.finish_run(done, "completed", {"accuracy": 0.9012, "promoted": True,
                                         "model_version": "3", "cost_usd": 1.25})
    skipped = store.start_run("news", "h1", {})
    store.finish_run(skipped, "skipped", {"reason": "No new data since champion v3"})
    store.close()
    monkeypatch.setenv("COLUMNS", "220")  # rich squeezes the table to 80 columns without a TTY
    assert main(["runs", "--root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert done[:8] in out and "0.901" in out and "yes" in out and "1.250" in out
    assert skipped[:8] in out and "skipped (No new data" in out
    assert main(["runs", "--root", str(tmp_path / "empty")]) == 0
    assert "no runs under" in capsys.readouterr().out


def test_bad_override_names_the_field(tmp_path):
    from flows.overrides import pin_overrides
    from flows.spec import SpecError

    spec = Path(REPO_ROOT / "examples" / "news_topics" / "spec.yaml")
    assert pin_overrides(spec, tmp_path, {"training.max_steps": None}) == spec
    pinned = pin_overrides(spec, tmp_path, {"training.max_steps": 7,
                                            "llm.generator.model": "MiniMax-M2.5"})
    import yaml

    data = yaml.safe_load(pinned.read_text())
    assert data["training"]["max_steps"] == 7
    assert data["llm"]["generator"]["model"] == "MiniMax-M2.5"
    assert data["warehouse"]["url"].startswith("sqlite:////")  # resolved, not relative
    with pytest.raises(SpecError) as err:
        pin_overrides(spec, tmp_path, {"training.max_steps": 0})
    assert err.value.problems == ["training.max_steps: must be at least 1, got 0"]


def test_a_served_flow_validates_its_typed_parameters_in_another_process():
    """`flow.serve` ships the flow to a spawned process by cloudpickle; the parameter model
    (the UI form's types, Literal included) must still resolve there."""
    import cloudpickle

    from flows.pipeline import post_training

    code = ("import sys, cloudpickle; flow = cloudpickle.loads(sys.stdin.buffer.read()); "
            "print(flow.validate_parameters({'generator_api': 'anthropic', 'max_steps': '3'}))")
    done = subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps(post_training),
                          capture_output=True, cwd=REPO_ROOT, check=False, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    out = done.stdout.decode()
    assert "'generator_api': 'anthropic'" in out and "'max_steps': 3" in out


def test_nightly_deployment_runs_one_flow_run_at_a_time(prefect_api):
    """prefect.yaml's `concurrency_limit: 1`, as `posttrain deploy` registers it, is enforced by
    the Prefect server: while one run of post-training/nightly holds the slot (Pending, then
    Running), a second one a worker tries to start is sent back to wait
    (Scheduled/AwaitingConcurrencySlot); once the first finishes, the second gets the slot.
    The states are proposed as a worker proposes them, so no flow actually runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled, Completed, Pending, Running

    assert deployment_settings("nightly")["concurrency_limit"] == 1
    try:  # registered by test_deploy_registers_it_on_a_process_pool when it ran first
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        done = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--pool",
                               "posttrain-test"], check=False, cwd=REPO_ROOT, env=api_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    deployment = read_deployment(10)
    assert deployment.global_concurrency_limit is not None
    assert deployment.global_concurrency_limit.limit == 1
    with get_client(sync_client=True) as client:
        first = client.create_flow_run_from_deployment(deployment.id)
        second = client.create_flow_run_from_deployment(deployment.id)
        try:
            assert client.set_flow_run_state(first.id, Pending()).status.value == "ACCEPT"
            assert client.set_flow_run_state(first.id, Running()).status.value == "ACCEPT"
            refused = client.set_flow_run_state(second.id, Pending())
            assert refused.status.value == "REJECT"
            waiting = client.read_flow_run(second.id).state
            assert (waiting.type, waiting.name) == (StateType.SCHEDULED,
                                                     "AwaitingConcurrencySlot")
            assert client.set_flow_run_state(first.id, Completed()).status.value == "ACCEPT"
            assert client.set_flow_run_state(second.id, Pending()).status.value == "ACCEPT"
        finally:
            for run in (first, second):
                client.set_flow_run_state(run.id, Cancelled(), force=True)


def test_served_deployment_gets_the_same_concurrency_limit(monkeypatch):
    """`posttrain serve` passes prefect.yaml's concurrency_limit on as the served deployment's
    limit (the served path registers through `flow.serve`, not `prefect deploy`)."""
    from flows import deploy
    from flows.pipeline import post_training

    seen = {}
    monkeypatch.chdir(REPO_ROOT)  # serve() changes directory; put it back afterwards
    monkeypatch.setattr(post_training, "serve", lambda **kwargs: seen.update(kwargs))
    deploy.serve()
    assert seen["global_limit"] == deployment_settings("nightly")["concurrency_limit"] == 1
