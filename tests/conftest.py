"""Shared fixtures. Everything here is real: real SQLite files, a real PostgreSQL server
when one is reachable, the real BBC articles."""

from __future__ import annotations

import os
import tempfile
import uuid

import pytest
import sqlalchemy as sa

# Offline, quiet, and never touching the user's own Prefect/MLflow homes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A loaded 2-core CI machine can take more than Prefect's default 20 s to start an ephemeral
# API server (the bench --quick subprocesses start their own): a slow start is not a failure.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect's ephemeral API keeps its database under PREFECT_HOME: one throwaway home per session.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="posttrain-test-prefect-")

PG_ENV = "POSTTRAIN_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def small_warehouse_url(tmp_path_factory) -> str:
    """A SQLite warehouse of 40 real articles per topic (200 rows)."""
    from examples.news_topics.build_warehouse import build

    return build(tmp_path_factory.mktemp("wh") / "warehouse.db", per_label=40)


@pytest.fixture(scope="session")
def engine(small_warehouse_url):
    """A SQLAlchemy engine on the small warehouse."""
    engine = sa.create_engine(small_warehouse_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of a PostgreSQL server for tests that need one, from $POSTTRAIN_TEST_POSTGRES_URL."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"PostgreSQL tests need ${PG_ENV} (e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/test); .ci/run sets it")
    try:
        with sa.create_engine(url).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as e:  # a stated reason, not a silent pass
        pytest.skip(f"PostgreSQL at ${PG_ENV} is not reachable: {e.__class__.__name__}: {e}")
    return url


@pytest.fixture
def pg_schema_url(pg_server_url):
    """A fresh schema on the PostgreSQL server, dropped afterwards; URL sets search_path."""
    schema = f"pt_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(pg_server_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_server_url else "?"
    yield f"{pg_server_url}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(scope="session")
def prefect_api():
    """A real, temporary Prefect API server for the session (stopped before pytest exits)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` subprocess (SQLite, its own PREFECT_HOME) with the
    scheduler service on a 2 s loop, as a user runs it; yields its base URL (no /api)."""
    from tests.servers import start_prefect_server, stop_process

    proc, url = start_prefect_server(tmp_path_factory.mktemp("prefect_home"),
                                     PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    yield url
    stop_process(proc)


@pytest.fixture(autouse=True, scope="module")
def _fresh_prefect_senders():
    """Prefect's event and log senders keep the API URL they started with, and a later flow in
    this process reuses them: task-run states (sent as events) of one module would reach the
    Prefect server another module pointed at. Each module starts and ends with them flushed
    and stopped, so the next sender reads the API URL of its own time."""
    from tests.servers import drain_prefect_senders

    drain_prefect_senders()
    yield
    drain_prefect_senders()


# ── the simulated teacher, shared by tests/test_teacher_*.py (helpers: tests/teacher_helpers.py)
@pytest.fixture(scope="module")
def gold(engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, topic FROM articles ORDER BY id")).all())


@pytest.fixture
def teacher(small_warehouse_url, tmp_path):
    """teacher(**knobs) -> a started TeacherServer (stopped after the test); log at .log."""
    from agents.teacher import TeacherConfig, TeacherKnobs, TeacherServer
    from tests.teacher_helpers import LABELS

    started = []

    def start(api_key=None, **knobs) -> TeacherServer:
        knobs.setdefault("read_chars", None)  # exact paging queries in the tests read whole columns
        log = tmp_path / f"requests-{len(started)}.jsonl"
        server = TeacherServer(TeacherConfig(
            small_warehouse_url, "articles", "id", "topic", LABELS, knobs=TeacherKnobs(**knobs),
            api_key=api_key, request_log=str(log)))
        server.start()
        server.log = log
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
