"""The Prefect and MLflow UIs in a real browser: Playwright for Python driving Debian's
chromium (/usr/bin/chromium, installed by .ci/run; never a browser Playwright downloads).

A real `prefect server start`, a real `mlflow server` on a SQLite store, and a deployment of
`post_training` served from a subprocess (as `posttrain serve` does) with the nightly cron and
a tiny spec. In the browser: the deployment page shows the 02:00 schedule and the next run at
02:00; Run -> Quick run starts a flow run that completes; its Artifacts tab lists the run's
reports, whose summary links to the MLflow run; the MLflow UI shows that run with the
accuracy summary.json holds. Screenshots land in a temporary folder, or in
$POSTTRAIN_SCREENSHOTS (see docs/ui.md).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import free_port
from tests.test_pipeline import tiny_spec

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # a stated skip below, never a silent pass
    sync_playwright = expect = None

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# The Prefect pictures in docs/screenshots come from this test with
# POSTTRAIN_SCREENSHOTS=docs/screenshots; the MLflow one from the demo's real run
# (`make screenshot`), so a test run never puts its tiny model in the README.
SHOTS_ENV = "POSTTRAIN_SCREENSHOTS"
DEPLOYMENT = "browser-test"
CRON = "0 2 * * *"
VIEWPORT = {"width": 1280, "height": 800}
RUN_DEADLINE_S = 300  # the tiny flow takes ~45 s alone, ~1-2 min on 2 busy cores

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=(
        f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install -y chromium; "
        ".ci/run installs it)")),
    pytest.mark.skipif(sync_playwright is None, reason=(
        "browser tests need Playwright for Python (pip install -e '.[dev]'); no `playwright "
        "install`: it drives the system chromium")),
]

# `flow.serve` as `posttrain serve` calls it (flows/deploy.py), with test parameters.
SERVE = """
import json, sys
from prefect.schedules import Cron
from flows.pipeline import post_training
post_training.serve(name=sys.argv[1], schedules=[Cron(sys.argv[2], timezone="UTC")],
                    parameters=json.loads(sys.argv[3]))
"""



def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} unreadable)"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory):
    """A real MLflow UI server (one worker, job execution off) on a fresh SQLite store;
    yields (UI base URL, the folder holding mlflow.db)."""
    from flows.ui import _wait_for

    folder = tmp_path_factory.mktemp("browser")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    log = folder / "mlflow-server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{folder / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not _wait_for(url + "/health", 120):
            raise RuntimeError(f"mlflow server did not answer {url}/health in 120 s:\n"
                               f"{tail(log)}")
        yield url, folder
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def served(prefect_server, mlflow_ui, small_warehouse_url):
    """post_training served as `browser-test` (cron 0 2 * * *, UTC) from a subprocess against
    the fixture's Prefect server, its reports linking to the MLflow UI; yields a dict with the
    deployment, its out_dir, the serve log and the MLflow tracking URI."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ui, folder = mlflow_ui
    spec = tiny_spec(small_warehouse_url, folder)  # tracking.uri: folder/mlflow.db, the UI's
    out_dir = folder / "out"
    api = prefect_server + "/api"
    env = dict(os.environ, PREFECT_API_URL=api, POSTTRAIN_MLFLOW_UI_URL=ui,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    log = folder / "serve.log"
    params = json.dumps({"spec_path": str(spec), "out_dir": str(out_dir)})
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, DEPLOYMENT, CRON, params],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    deployment = client.read_deployment_by_name(f"post-training/{DEPLOYMENT}")
                    break
                except ObjectNotFound:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"post-training/{DEPLOYMENT} was never served:\n"
                                           f"{tail(log)}") from None
                    time.sleep(0.5)
        yield {"deployment": deployment, "out_dir": out_dir, "log": log, "api": api,
               "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "spec": spec}
    finally:
        stop(proc)


@pytest.fixture
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


@contextmanager
def step(page, what: str, shots: Path):
    """Run one step; on failure, name it and the screenshot of the page at that moment."""
    try:
        yield
    except Exception as e:
        shot = shots / f"failed-{re.sub(r'[^a-z0-9]+', '-', what.lower()).strip('-')}.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
        except Exception as shot_error:  # noqa: BLE001 - the step's error matters more
            shot = f"(no screenshot: {shot_error})"
        raise AssertionError(f"{what} failed at {page.url}: {e}\nscreenshot: {shot}") from e


def next_0200_utc(now: dt.datetime) -> dt.datetime:
    at = now.replace(hour=2, minute=0, second=0, microsecond=0)
    return at if at > now else at + dt.timedelta(days=1)


def wait_for_scheduled_runs(api: str, deployment_id, deadline_s: float = 60) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    end = time.monotonic() + deadline_s
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        while time.monotonic() < end:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[deployment_id])))
            if runs:
                return runs
            time.sleep(1)
    raise AssertionError("the Prefect scheduler created no runs for the served deployment")


def wait_for_flow_run(api: str, flow_run_id: str, log: Path, deadline_s: float):
    """The flow run once it reaches a final state; fails with its state message and the
    serve log's tail when it does not complete in time or ends other than Completed."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    end = time.monotonic() + deadline_s
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                break
            if time.monotonic() > end:
                raise AssertionError(f"flow run {flow_run_id} still {run.state_name} after "
                                     f"{deadline_s:.0f} s; serve log:\n{tail(log)}")
            time.sleep(2)
    assert run.state.is_completed(), (
        f"flow run {flow_run_id} ended {run.state_name}: {run.state.message}\n"
        f"serve log:\n{tail(log)}")
    return run


def test_prefect_and_mlflow_uis_show_the_served_deployment_and_its_run(
        prefect_server, mlflow_ui, served, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    ui, _ = mlflow_ui
    deployment = served["deployment"]
    shots = Path(os.environ.get(SHOTS_ENV) or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # the scheduler's runs exist before the page is opened (it does not poll for them)
    scheduled = wait_for_scheduled_runs(served["api"], deployment.id)
    nightly = next_0200_utc(dt.datetime.now(dt.UTC))
    starts = sorted(f"{r.expected_start_time.astimezone(dt.UTC):%Y-%m-%d %H:%M}"
                    for r in scheduled)
    assert starts[0] == f"{nightly:%Y-%m-%d %H:%M}", starts
    assert all(s.endswith(" 02:00") for s in starts), starts

    context = browser.new_context(viewport=VIEWPORT, timezone_id="UTC")
    context.set_default_timeout(60_000)
    expect.set_options(timeout=60_000)
    page = context.new_page()

    with step(page, "Prefect deployment page", tmp_path):
        page.goto(prefect_server + "/deployments")
        page.get_by_role("link", name=DEPLOYMENT, exact=True).click()
        page.wait_for_url(f"**/deployments/deployment/{deployment.id}**")
        # visible ones only: with other 02:00 deployments on the server, the list page's hidden
        # schedule tags are still in the DOM and would make the locator ambiguous
        expect(page.get_by_text("At 02:00 AM every day", exact=True).filter(visible=True)
               ).to_be_visible()
        expect(page.get_by_text("Next Run", exact=True)).to_be_visible()
        expect(page.get_by_text(f"Scheduled for {nightly:%Y/%m/%d} 02:00:00 AM")
               ).to_be_visible()
        page.screenshot(path=str(shots / "prefect-deployment.png"))

    with step(page, "Prefect quick run", tmp_path):
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Quick run", exact=True).click()
        # a toast says "<run name> scheduled to start now"; the deployment's Next Run card
        # now shows that run (due now, before 02:00) and links to it
        toast = page.get_by_text("scheduled to start now").first  # (whitespace-normalised)
        expect(toast).to_be_visible()
        run_name = re.search(r"(\S+)\s+scheduled\s+to\s+start", toast.inner_text()).group(1)
        page.get_by_role("link", name=run_name, exact=True).first.click()
        page.wait_for_url("**/runs/flow-run/**")
        flow_run_id = page.url.split("/runs/flow-run/")[1].split("?")[0].strip("/")
        expect(page.get_by_text(run_name, exact=True).first).to_be_visible()

    run = wait_for_flow_run(served["api"], flow_run_id, served["log"], RUN_DEADLINE_S)
    assert run.deployment_id == deployment.id

    summary = json.loads((served["out_dir"] / "summary.json").read_text())
    client = MlflowClient(served["tracking_uri"])
    experiment_id = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    run_url = f"{ui}/#/experiments/{experiment_id}/runs/{summary['mlflow_run_id']}"
    name = "news-topics"  # the demo spec's name: artifact keys start with it

    with step(page, "Prefect flow run artifacts", tmp_path):
        page.goto(f"{prefect_server}/runs/flow-run/{flow_run_id}")
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
        page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
        for key in ("summary", "slices", "label-distribution", "training-loss"):
            expect(page.get_by_text(f"{name}-{key}", exact=True)).to_be_visible()
        # the page scrolls inside its own pane: a taller viewport shows the run's state, its
        # task graph and the artifact cards in one picture
        page.set_viewport_size({"width": VIEWPORT["width"], "height": 1300})
        page.screenshot(path=str(shots / "prefect-flow-run.png"))
        page.set_viewport_size(VIEWPORT)
        # the markdown summary links to the parent run in the MLflow UI
        page.get_by_text(f"{name}-summary", exact=True).click()
        expect(page.locator(f'a[href="{run_url}"]').first).to_be_attached()

    with step(page, "MLflow run page", tmp_path):
        page.goto(run_url)
        expect(page.get_by_text(f"{name}-{summary['run_id'][:8]}").first).to_be_visible()
        # the Overview's metrics table: the row whose first cell is the metric "accuracy"
        # (a parameter's value is "accuracy" too: evaluation.promotion.metric)
        rows = page.get_by_role("row").filter(
            has=page.get_by_role("cell", name="accuracy", exact=True))
        expect(rows.first).to_be_visible()
        metric_rows = [r for r in rows.all()
                       if r.get_by_role("cell").first.inner_text().strip() == "accuracy"]
        assert len(metric_rows) == 1, [r.inner_text() for r in rows.all()]
        cells = metric_rows[0].get_by_role("cell").all_inner_texts()
        shown = float(cells[1])
        assert shown == pytest.approx(summary["accuracy"], abs=1e-9), (cells, summary)
        metric_rows[0].scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "mlflow-run-tiny.png"))
        # the Model metrics tab charts it too, rounded to 2 decimals
        page.get_by_role("tab", name="Model metrics").click()
        chart = page.locator("div").filter(
            has=page.get_by_text("accuracy", exact=True)).filter(
            has_not=page.get_by_text("base_accuracy", exact=True)).first
        expect(chart).to_contain_text(f"{summary['accuracy']:.2f}")
    # `make screenshot` (the README's MLflow picture) on this run: the same page, the
    # Assistant panel closed, the accuracy checked against summary.json
    script = REPO_ROOT / "docs" / "screenshots" / "mlflow_run.py"
    made = subprocess.run([sys.executable, str(script), "--out", str(served["out_dir"]),
                           "--png", str(shots / "readme.png")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    assert (shots / "readme.png").stat().st_size > 10_000
    print(f"browser test: flow run {flow_run_id} completed, accuracy in MLflow {shown} "
          f"= summary.json {summary['accuracy']}; {time.monotonic() - started:.0f} s")


# MLflow's Assistant panel opens on a browser's first visit: kept shut, as
# docs/screenshots/mlflow_run.py does, so the picture shows the trace
ASSISTANT_CLOSED = """
window.localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
window.localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
"""


def test_mlflow_traces_tab_shows_each_agents_trace(mlflow_ui, served, browser, tmp_path):
    """The parent run's Traces tab lists one trace per agent (flows/agent_traces.py); one
    opened shows its span tree: the agent, its LLM calls, its sql and submit_examples tools.
    Reuses the served deployment's run when the test above made one, else starts one."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ui, _ = mlflow_ui
    shots = Path(os.environ.get(SHOTS_ENV) or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    summary_path = served["out_dir"] / "summary.json"
    if not summary_path.exists():  # run on its own: one run of the deployment
        with temporary_settings({PREFECT_API_URL: served["api"]}), \
                get_client(sync_client=True) as client:
            flow_run = client.create_flow_run_from_deployment(served["deployment"].id)
        wait_for_flow_run(served["api"], str(flow_run.id), served["log"], RUN_DEADLINE_S)
    summary = json.loads(summary_path.read_text())
    client = MlflowClient(served["tracking_uri"])
    experiment_id = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    # the served process writes its traces in the background: wait for one per agent
    agents = summary["slices"] + summary["agent_retries"] + summary["topup_slices"]
    deadline = time.monotonic() + 60
    while len(traces := client.search_traces(
            locations=[experiment_id], run_id=summary["mlflow_run_id"],
            include_spans=False)) < agents and time.monotonic() < deadline:
        time.sleep(1)
    assert len(traces) == agents, (len(traces), agents)
    slice_id = min(t.info.tags["slice_id"] for t in traces)

    context = browser.new_context(viewport=VIEWPORT, timezone_id="UTC")
    context.set_default_timeout(60_000)
    expect.set_options(timeout=60_000)
    page = context.new_page()
    page.add_init_script(ASSISTANT_CLOSED)
    with step(page, "MLflow run's Traces tab", tmp_path):
        page.goto(f"{ui}/#/experiments/{experiment_id}/runs/{summary['mlflow_run_id']}")
        page.get_by_role("tab", name="Traces").click()
        expect(page.get_by_text(f"{len(traces)} of {len(traces)}", exact=True)).to_be_visible()
        # the Request column shows each agent's task: one row per slice
        request = page.get_by_text(f'"slice_id": "{slice_id}"')
        expect(request).to_have_count(1)
        request.click()
    with step(page, "an agent's trace", tmp_path):
        spans = page.get_by_text(re.compile(r"^(agent |generator |sql$|submit_examples$)"))
        expect(page.get_by_text(f"agent {slice_id}", exact=True).first).to_be_visible()
        expect(page.get_by_text("sql", exact=True).first).to_be_visible()
        expect(page.get_by_text("submit_examples", exact=True).first).to_be_visible()
        expect(page.get_by_text(re.compile(r"^generator ")).first).to_be_visible()
        assert spans.count() >= 4
        # the root span's outputs: the agent's accepted count and why it stopped
        expect(page.get_by_text("stopped_reason", exact=True).first).to_be_visible()
        page.screenshot(path=str(shots / "mlflow_traces.png"))
