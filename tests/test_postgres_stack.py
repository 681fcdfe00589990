"""The flow with PostgreSQL behind everything, as docker/compose.yml runs it.

Fresh databases on the server at $POSTTRAIN_TEST_POSTGRES_URL, dropped afterwards:
`pt_prefect_<tag>` behind a real `prefect server start` subprocess, `pt_mlflow_<tag>` as the
MLflow tracking store and registry (artifacts on local disk), and `pt_wh_<tag>` holding the
warehouse (200 real BBC articles, schema public) and the example store (schema
posttrain_store). `post_training` runs in-process against that Prefect server; every
record is then read back through its own client and once with plain SQL on its database.
Skips with a stated reason when the server is not configured or not reachable.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
import yaml

from tests.servers import drain_prefect_senders, start_prefect_server, stop_process
from tests.test_pipeline import LEARNS, tiny_spec

READER_ROLE = "posttrain_reader"  # what flows/planning.py's plan-slices ensures
STORE_SCHEMA = "posttrain_store"
# the flow's tasks that must each have at least one COMPLETED run (names get a suffix)
STAGE_TASKS = ("plan-slices", "curate", "train-sft", "evaluate", "register-model", "promote")


def _db_url(server: sa.URL, database: str, driver: str | None = None) -> str:
    url = server.set(database=database)
    if driver:
        url = url.set(drivername=driver)
    return url.render_as_string(hide_password=False)


def _drop_databases(admin: sa.Engine, names: list[str]) -> None:
    with admin.connect() as conn:
        for name in names:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": name})
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg_databases(pg_server_url):
    """Three fresh databases for this module (prefect, mlflow, wh), dropped afterwards,
    connections terminated first; the reader role is dropped too when this module made it."""
    server = sa.make_url(pg_server_url)
    tag = uuid.uuid4().hex[:10]
    names = {kind: f"pt_{kind}_{tag}" for kind in ("prefect", "mlflow", "wh")}
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE
    with admin.connect() as conn:
        role_existed = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                    {"r": READER_ROLE}).first() is not None
        for name in names.values():
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server, names
    finally:
        _drop_databases(admin, list(names.values()))
        if not role_existed:  # fails harmlessly while another database still grants it
            try:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{READER_ROLE}"')
            except sa.exc.DBAPIError:
                pass
        admin.dispose()


@pytest.fixture(scope="module")
def pg_prefect_server(pg_databases, tmp_path_factory):
    """A real Prefect server whose database is pt_prefect_<tag> (PostgreSQL, asyncpg)."""
    server, names = pg_databases
    home = tmp_path_factory.mktemp("prefect_pg_home")
    started = time.perf_counter()
    proc, url = start_prefect_server(
        home, PREFECT_API_DATABASE_CONNECTION_URL=_db_url(server, names["prefect"],
                                                          "postgresql+asyncpg"),
        PREFECT_UI_ENABLED="false")
    seconds = time.perf_counter() - started
    try:
        yield url, seconds
    finally:
        stop_process(proc)


class _StatementLog:
    """Every statement a SQLAlchemy engine of this process sends to one database."""

    def __init__(self, database: str):
        self.database, self.statements, self._lock = database, [], threading.Lock()

    def __call__(self, conn, _cursor, statement, *_args):
        if conn.engine.url.database == self.database:
            with self._lock:
                self.statements.append(statement)


@pytest.fixture(scope="module")
def stack_run(pg_databases, pg_prefect_server, tmp_path_factory):
    """Build the PostgreSQL warehouse, then run `post_training` once against everything."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as mlflow_uri_state
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from examples.news_topics.build_warehouse import build
    from flows.pipeline import post_training
    from flows.store import shared_store
    from flows.warehouse import shared_engine

    server, names = pg_databases
    prefect_url, prefect_start_s = pg_prefect_server
    tmp = tmp_path_factory.mktemp("pg_stack")
    timings = {"prefect_server_start": round(prefect_start_s, 2)}

    t = time.perf_counter()
    wh_url = build(_db_url(server, names["wh"]), per_label=40)  # 200 real articles
    timings["warehouse_build"] = round(time.perf_counter() - t, 2)
    with sa.create_engine(wh_url).begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{STORE_SCHEMA}"')
    sep = "&" if "?" in wh_url else "?"
    store_url = f"{wh_url}{sep}options=-csearch_path%3D{STORE_SCHEMA}"
    mlflow_uri = _db_url(server, names["mlflow"], "postgresql")

    spec_path = tiny_spec(wh_url, tmp, LEARNS["student"], **LEARNS["training"])  # promotable
    data = yaml.safe_load(spec_path.read_text())
    data["llm"].pop("tuner", None)  # tuning and DPO stay off: this test is about the stores
    data["tuning"]["enabled"] = data["dpo"]["enabled"] = False
    data["slicing"]["max_rows_per_slice"] = 25
    data["store"] = {"url": store_url}
    data["tracking"]["uri"] = mlflow_uri
    spec_path.write_text(yaml.safe_dump(data))

    saved_uri, saved_env = mlflow_uri_state._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    statements = _StatementLog(names["wh"])
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", statements)
    t = time.perf_counter()
    try:
        with temporary_settings({PREFECT_API_URL: prefect_url + "/api"}):
            drain_prefect_senders()  # a worker made under another API URL would be reused
            state = post_training(spec_path=str(spec_path), out_dir=str(tmp / "run"),
                                  return_state=True)
            drain_prefect_senders()  # this run's task-run events and logs reach the server
    finally:
        timings["flow"] = round(time.perf_counter() - t, 2)
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", statements)
        mlflow.set_tracking_uri(saved_uri)  # the flow set it (and $MLFLOW_TRACKING_URI)
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
        for url in (store_url,):  # give the pooled connections back before the DROP
            shared_store(url).close()
        shared_engine(wh_url).dispose()
    assert state.is_completed(), state
    try:
        yield {"summary": state.result(), "flow_run_id": state.state_details.flow_run_id,
               "prefect_url": prefect_url, "mlflow_uri": mlflow_uri, "wh_url": wh_url,
               "store_url": store_url, "names": names, "server": server, "tmp": tmp,
               "timings": timings, "statements": statements.statements}
    finally:  # flush while the server still runs (else the client retries it at exit)
        with temporary_settings({PREFECT_API_URL: prefect_url + "/api"}):
            drain_prefect_senders()


def _scalar(url: str, sql: str, **params):
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()
    finally:
        engine.dispose()


def test_the_run_completed_with_accuracy(stack_run):
    s = stack_run["summary"]
    print("figures:", {k: s[k] for k in ("slices", "examples_accepted", "llm_calls",
                                         "train_examples", "eval_examples", "base_accuracy",
                                         "accuracy", "macro_f1", "model_version", "promoted",
                                         "wall_seconds")}, "timings:", stack_run["timings"])
    assert s["skipped"] is False and s["teacher"] == "simulated"
    assert s["mlflow_tracking_uri"] == stack_run["mlflow_uri"]
    assert s["slices"] >= 4 and s["examples_accepted"] > 0 and s["llm_calls"] > s["slices"]
    assert s["eval_examples"] > 0 and s["train_examples"] > 0
    assert 0.0 <= s["accuracy"] <= 1.0 and 0.0 <= s["macro_f1"] <= 1.0
    assert s["accuracy"] > s["base_accuracy"]  # the SFT did learn something
    assert s["model_version"] == "1" and s["promoted"] is True  # a fresh registry: v1 champion


def test_prefect_recorded_the_flow_and_its_tasks_in_postgres(stack_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run_id, s = stack_run["flow_run_id"], stack_run["summary"]
    with (temporary_settings({PREFECT_API_URL: stack_run["prefect_url"] + "/api"}),
          get_client(sync_client=True) as client):
        flow_run = client.read_flow_run(run_id)
        # task-run states arrive as events the server records a moment later: wait for them
        deadline = time.monotonic() + 60
        while True:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run_id]}))
            done = [t for t in tasks if t.state and t.state.is_completed()]
            names = [t.name for t in done]
            if (all(any(n.startswith(f"{stage}-") for n in names) for stage in STAGE_TASKS)
                    and sum(n.startswith("agent ") for n in names) >= s["slices"]
                    and len(done) == len(tasks)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert flow_run.name and flow_run.state.is_completed()
    assert [t.name for t in tasks if not (t.state and t.state.is_completed())] == []
    for stage in STAGE_TASKS:
        assert any(n.startswith(f"{stage}-") for n in names), (stage, names)
    assert sum(n.startswith("agent ") for n in names) == s["slices"] + s["topup_slices"]

    # the same rows, read with plain SQL from the PostgreSQL database behind the server
    prefect_db = _db_url(stack_run["server"], stack_run["names"]["prefect"], "postgresql")
    assert _scalar(prefect_db, "SELECT count(*) FROM flow_run WHERE id = CAST(:id AS uuid) "
                   "AND state_type = 'COMPLETED'", id=str(run_id)) == 1
    assert _scalar(prefect_db, "SELECT count(*) FROM task_run WHERE flow_run_id = "
                   "CAST(:id AS uuid) AND state_type = 'COMPLETED'", id=str(run_id)) == len(tasks)


def test_mlflow_runs_and_registry_live_in_postgres(stack_run):
    from mlflow.tracking import MlflowClient

    s, uri = stack_run["summary"], stack_run["mlflow_uri"]
    assert uri.startswith("postgresql://")
    client = MlflowClient(uri)
    parent = client.get_run(s["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["accuracy"] == pytest.approx(s["accuracy"])
    assert parent.data.tags["posttrain.run_id"] == s["run_id"]
    # artifacts on local disk beside the run folder (flows/tracking.py ensure_experiment)
    assert parent.info.artifact_uri.startswith((stack_run["tmp"] / "mlartifacts").as_uri())
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{s['mlflow_run_id']}'")
    assert len(children) >= 1 and all(c.info.status == "FINISHED" for c in children)
    assert any("train_loss" in c.data.metrics for c in children)
    champion = client.get_model_version_by_alias(s["model_name"], "champion")
    assert str(champion.version) == s["model_version"]
    assert champion.run_id == s["mlflow_run_id"]
    assert champion.tags["posttrain.run_id"] == s["run_id"]

    db = stack_run["mlflow_uri"]
    assert _scalar(db, "SELECT count(*) FROM runs WHERE run_uuid = :r", r=s["mlflow_run_id"]) == 1
    assert _scalar(db, "SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' "
                   "AND value = :r", r=s["mlflow_run_id"]) == len(children)
    assert _scalar(db, "SELECT count(*) FROM model_versions WHERE name = :n",
                   n=s["model_name"]) == 1


def test_the_example_store_is_in_postgres(stack_run):
    s, url = stack_run["summary"], stack_run["store_url"]
    q = f'"{STORE_SCHEMA}"'
    assert _scalar(url, f"SELECT count(*) FROM {q}.runs WHERE id = :r AND status = 'completed'",
                   r=s["run_id"]) == 1
    assert _scalar(url, f"SELECT mlflow_run_id FROM {q}.runs WHERE id = :r",
                   r=s["run_id"]) == s["mlflow_run_id"]
    assert _scalar(url, f"SELECT count(*) FROM {q}.slices WHERE run_id = :r AND status = 'done'",
                   r=s["run_id"]) == s["slices"] + s["topup_slices"]
    accepted = _scalar(url, f"SELECT count(*) FROM {q}.examples WHERE run_id = :r "
                       "AND status = 'accepted'", r=s["run_id"])
    assert accepted == s["examples_accepted"]
    rejected = _scalar(url, f"SELECT count(*) FROM {q}.examples WHERE run_id = :r "
                       "AND status = 'rejected'", r=s["run_id"])
    assert rejected == sum(s["examples_rejected"].values())
    assert _scalar(url, f"SELECT count(*) FROM {q}.llm_calls WHERE run_id = :r AND NOT cached",
                   r=s["run_id"]) == s["llm_calls"]
    # nothing of the store leaked into the warehouse's own schema
    assert _scalar(stack_run["wh_url"], "SELECT count(*) FROM pg_tables WHERE schemaname = "
                   "'public' AND tablename IN ('runs', 'examples')") == 0


def test_agents_read_the_warehouse_as_the_select_only_role(stack_run):
    wh = stack_run["wh_url"]
    assert _scalar(wh, "SELECT count(*) FROM pg_roles WHERE rolname = :r AND NOT rolcanlogin "
                   "AND NOT rolsuper", r=READER_ROLE) == 1
    # a fresh database: these grants were made by this run's plan-slices
    assert _scalar(wh, "SELECT has_column_privilege(:r, 'public.articles', 'title', 'SELECT')",
                   r=READER_ROLE) is True
    assert _scalar(wh, "SELECT has_column_privilege(:r, 'public.articles', 'topic', 'SELECT')",
                   r=READER_ROLE) is False
    assert _scalar(wh, "SELECT has_table_privilege(:r, 'public.articles', 'INSERT')",
                   r=READER_ROLE) is False
    # and the agents' SQL tool switched to it inside read-only transactions
    sent = stack_run["statements"]
    switches = [st for st in sent if st.startswith("SET LOCAL ROLE")]
    assert switches and set(switches) == {f"SET LOCAL ROLE {READER_ROLE}"}
    assert len(switches) >= stack_run["summary"]["slices"]
    assert sent.count("SET TRANSACTION READ ONLY") >= len(switches)
