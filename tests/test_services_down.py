"""Services down or wrong (issue 14, item 5): the warehouse, the example store, MLflow or the
Prefect API unreachable gives one clear error naming the setting to fix, before any work:
no store row, no MLflow run, no registered model. Real SQLite files, a real PostgreSQL server
when $POSTTRAIN_TEST_POSTGRES_URL is set, real closed ports, the real `posttrain run`."""

from __future__ import annotations

import copy
import http.server
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

# Prefect, imported now (through flows.runtime), binds its log handlers to this stderr, not to
# the stream of a test that captures it (test_mlflow_server_unreachable_through_the_cli)
import flows.runtime  # noqa: F401
from flows.preflight import ServiceUnavailable, check_services
from flows.spec import load_spec
from tests.servers import free_port

DEMO = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"
EXE = shutil.which("posttrain") or str(Path(sys.executable).parent / "posttrain")
SECRET = "pw-not-for-logs-42"


def write_spec(tmp: Path, warehouse_url: str, **sections: dict) -> Path:
    """The demo spec on `warehouse_url`, MLflow in tmp/mlflow.db, `sections` merged in."""
    data = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    data["warehouse"]["url"] = warehouse_url
    data["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    for key, values in sections.items():
        data.setdefault(key, {}).update(values)
    path = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def closed_port_url(scheme: str = "postgresql+psycopg2", db: str = "test") -> str:
    return f"{scheme}://postgres:{SECRET}@127.0.0.1:{free_port()}/{db}"


def preflight_error(spec_path: Path, out: Path, **kwargs) -> ServiceUnavailable:
    started = time.perf_counter()
    with pytest.raises(ServiceUnavailable) as err:
        check_services(load_spec(str(spec_path)), out, **kwargs)
    assert time.perf_counter() - started < 15  # short timeouts, not a hang
    message = str(err.value)
    assert "\n" not in message and SECRET not in message
    return err.value


def run_cli(spec: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environ.update(env)
    return subprocess.run([EXE, "run", str(spec), "--out", str(out)], capture_output=True,
                          text=True, check=False, env=environ, timeout=300)


def assert_nothing_started(tmp: Path, out: Path, store_url: str | None = None) -> None:
    """No run folder, no MLflow database (so no run, no registered model), no store row."""
    assert not out.exists() or not (out / "store.db").exists()
    assert not (tmp / "mlflow.db").exists()
    if store_url:
        engine = sa.create_engine(store_url)
        try:
            with engine.connect() as conn:
                assert not sa.inspect(conn).has_table("runs")
        finally:
            engine.dispose()


# ── the warehouse ────────────────────────────────────────────────────────────────────────────
def test_warehouse_file_missing(tmp_path):
    missing = tmp_path / "no-such-warehouse.db"
    err = preflight_error(write_spec(tmp_path, f"sqlite:///{missing}"), tmp_path / "out")
    assert str(err) == (f"warehouse.url: the warehouse at sqlite:///{missing}: "
                        f"no such file {missing}")
    assert not missing.exists()  # the check did not create an empty database


def test_warehouse_postgres_host_wrong(tmp_path):
    url = closed_port_url()
    err = preflight_error(write_spec(tmp_path, url), tmp_path / "out")
    assert err.setting == "warehouse.url" and f"{SECRET}" not in err.url
    assert str(err).startswith(f"warehouse.url: the warehouse at "
                               f"{url.replace(SECRET, '***')}: cannot connect or read: "
                               f"OperationalError: ")
    assert "Connection refused" in str(err)


def test_warehouse_table_or_column_missing(tmp_path, small_warehouse_url):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE tickets (id INTEGER PRIMARY KEY, title TEXT)")
    err = preflight_error(write_spec(tmp_path, f"sqlite:///{other}"), tmp_path / "out")
    assert str(err) == (f"slicing.table: the warehouse at sqlite:///{other}: no table "
                        f"'articles' (tables there: tickets)")
    spec = write_spec(tmp_path, small_warehouse_url,
                      warehouse={"tables": {"articles": ["id", "title", "body", "region",
                                                         "headline"]}})
    err = preflight_error(spec, tmp_path / "out")
    assert err.setting == "warehouse.tables.articles"
    assert "table 'articles' has no column 'headline' (its columns: body, id, " in str(err)
    spec = write_spec(tmp_path, small_warehouse_url, task={"gold_column": "label"})
    assert preflight_error(spec, tmp_path / "out").setting == "task.gold_column"


# ── the example store ────────────────────────────────────────────────────────────────────────
def test_store_postgres_port_closed_through_the_cli(tmp_path, small_warehouse_url):
    """The real `posttrain run`: exit 2, one line on stderr naming store.url, the password
    hidden, nothing started (no run folder, no MLflow database, no Prefect server)."""
    url = closed_port_url()
    spec = write_spec(tmp_path, small_warehouse_url, store={"url": url})
    started = time.perf_counter()
    proc = run_cli(spec, tmp_path / "out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in proc.stderr and SECRET not in proc.stderr
    assert line.startswith(f"store.url: the example store at {url.replace(SECRET, '***')}: "
                           "OperationalError: connection to server at \"127.0.0.1\"")
    assert "Connection refused" in line
    assert "Starting temporary server" not in proc.stdout + proc.stderr
    assert_nothing_started(tmp_path, tmp_path / "out")
    assert time.perf_counter() - started < 120


def test_store_postgres_wrong_database_or_user(tmp_path, small_warehouse_url, pg_server_url):
    good = sa.make_url(pg_server_url)
    for bad, says in ((good.set(database="posttrain_no_such_db"),
                       'database "posttrain_no_such_db" does not exist'),
                      (good.set(username="posttrain_no_such_user"),
                       'role "posttrain_no_such_user" does not exist')):
        url = bad.render_as_string(hide_password=False)
        err = preflight_error(write_spec(tmp_path, small_warehouse_url, store={"url": url}),
                              tmp_path / "out")
        assert err.setting == "store.url" and says in str(err), str(err)


def test_store_postgres_good_leaves_nothing_behind(tmp_path, small_warehouse_url,
                                                   pg_schema_url):
    """The write test on a reachable PostgreSQL store creates a table and a row in a
    transaction it rolls back: the schema is as empty afterwards."""
    spec = write_spec(tmp_path, small_warehouse_url, store={"url": pg_schema_url})
    report = check_services(load_spec(str(spec)), tmp_path / "out", prefect_api=False)
    assert set(report.ms) == {"warehouse", "store", "mlflow"}
    engine = sa.create_engine(pg_schema_url)
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == []
    engine.dispose()


# ── MLflow ───────────────────────────────────────────────────────────────────────────────────
def test_mlflow_server_unreachable_through_the_cli(tmp_path, small_warehouse_url, capsys):
    """`posttrain run` (its `main`, in this process: the subprocess path is covered above)."""
    from flows.cli import main

    uri = f"http://127.0.0.1:{free_port()}"
    spec = write_spec(tmp_path, small_warehouse_url, tracking={"uri": uri})
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tracking.uri: the MLflow tracking store at {uri}: unreachable: ConnectError: "
        "[Errno 111] Connection refused")
    assert_nothing_started(tmp_path, tmp_path / "out")


def test_mlflow_env_uri_and_registry_are_named(tmp_path, small_warehouse_url, monkeypatch):
    data = yaml.safe_load(write_spec(tmp_path, small_warehouse_url).read_text())
    data["tracking"].pop("uri")
    spec = tmp_path / "spec-env.yaml"
    spec.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://u:{SECRET}@127.0.0.1:{free_port()}")
    err = preflight_error(spec, tmp_path / "out")
    assert err.setting == "$MLFLOW_TRACKING_URI" and "http://u:***@127.0.0.1:" in str(err)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"http://127.0.0.1:{free_port()}")
    err = preflight_error(spec, tmp_path / "out")
    assert err.setting == "$MLFLOW_REGISTRY_URI" and err.service == "the MLflow model registry"


class _FakeMlflow(http.server.BaseHTTPRequestHandler):
    registry_status = 200

    def do_GET(self):
        status = 200 if self.path == "/health" else type(self).registry_status
        body = b"OK" if self.path == "/health" else b'{"error_code": "ENDPOINT_NOT_FOUND"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_mlflow_server_health_and_registry(tmp_path, small_warehouse_url):
    """An answering server passes; one whose registry API fails is named as such."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        spec = write_spec(tmp_path, small_warehouse_url, tracking={"uri": uri})
        report = check_services(load_spec(str(spec)), tmp_path / "out", prefect_api=False)
        assert report.ms["mlflow"] < 5000
        _FakeMlflow.registry_status = 404
        err = preflight_error(spec, tmp_path / "out", prefect_api=False)
        assert str(err).startswith(f"tracking.uri: the MLflow tracking store at {uri}: the "
                                   "model registry API answered HTTP 404")
    finally:
        _FakeMlflow.registry_status = 200
        server.shutdown()
        server.server_close()


def test_prepare_run_checks_before_it_opens_anything(tmp_path, small_warehouse_url):
    """The flow's own first step (`prepare_run`) runs the same checks before the store or MLflow
    is opened: with MLflow down, no store database and no MLflow database exist afterwards."""
    from flows.run_lifecycle import prepare_run

    uri = f"http://127.0.0.1:{free_port()}"
    spec = write_spec(tmp_path, small_warehouse_url, tracking={"uri": uri})
    with pytest.raises(ServiceUnavailable, match=r"^tracking\.uri: the MLflow tracking store"):
        prepare_run(str(spec), str(tmp_path / "out"), overrides={})
    assert_nothing_started(tmp_path, tmp_path / "out")


def test_prepare_run_with_mlflow_down_writes_no_store_row(tmp_path, small_warehouse_url,
                                                         pg_schema_url):
    """MLflow down, the PostgreSQL store fine: the store's schema stays empty (no runs table,
    so no run row), and MLflow holds nothing."""
    from flows.run_lifecycle import prepare_run

    spec = write_spec(tmp_path, small_warehouse_url, store={"url": pg_schema_url},
                      tracking={"uri": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(ServiceUnavailable):
        prepare_run(str(spec), str(tmp_path / "out"), overrides={})
    assert_nothing_started(tmp_path, tmp_path / "out", store_url=pg_schema_url)


# ── Prefect ──────────────────────────────────────────────────────────────────────────────────
def test_prefect_api_unreachable_through_the_cli(tmp_path, small_warehouse_url):
    api = f"http://127.0.0.1:{free_port()}/api"
    spec = write_spec(tmp_path, small_warehouse_url)
    proc = run_cli(spec, tmp_path / "out", PREFECT_API_URL=api)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"$PREFECT_API_URL: the Prefect API at {api}: unreachable: ConnectError: [Errno 111] "
        "Connection refused; start it (prefect server start) or unset PREFECT_API_URL for a "
        "temporary server")
    assert_nothing_started(tmp_path, tmp_path / "out")


def test_no_prefect_api_url_says_a_temporary_server_will_run(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.preflight import check_prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings({PREFECT_API_URL: None}):
        notes = check_prefect_api()
    assert notes == [("Prefect: PREFECT_API_URL is not set; a temporary local Prefect server "
                      "will run the flow (set PREFECT_API_URL to use a running one).")]


# ── what it costs when everything is up ──────────────────────────────────────────────────────
def test_preflight_is_cheap_when_everything_is_up(tmp_path, small_warehouse_url, prefect_api,
                                                  capsys):
    spec = load_spec(str(write_spec(tmp_path, small_warehouse_url)))
    check_services(spec, tmp_path / "out")  # imports and first connections
    best = min((check_services(spec, tmp_path / "out") for _ in range(5)),
               key=lambda r: r.total_ms)
    with capsys.disabled():
        print(f"\npreflight (SQLite warehouse and store, SQLite MLflow, Prefect API): "
              f"{best.ms} = {best.total_ms} ms")
    assert set(best.ms) == {"warehouse", "store", "mlflow", "prefect"}
    assert best.total_ms < 500
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
