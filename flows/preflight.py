"""Preflight: every service a run needs, checked before any work, each failure one clear line.

    report = check_services(spec, out)       # raises ServiceUnavailable, else what it checked
    report.notes    # e.g. "Prefect: no PREFECT_API_URL; a temporary local server will run the flow"
    report.ms       # {"warehouse": 3.1, "store": 1.2, "mlflow": 0.8, "prefect": 2.0}

Checked, each with a short timeout (`TIMEOUT_S`, 5 s at most per check):

  warehouse  warehouse.url: connect; slicing.table and every allow-listed table exist with the
             columns the spec names (warehouse.tables, task.gold_column). A SQLite file that
             is not there is an error, never an empty database created by the check.
  store      store.url (default sqlite:///<out>/store.db): connect and a write test that
             leaves nothing behind (PostgreSQL: CREATE TABLE + INSERT in a transaction rolled
             back; SQLite: the file, or the folder it will go in, writable).
  MLflow     tracking.uri / $MLFLOW_TRACKING_URI / the default SQLite file beside the run
             folder, and $MLFLOW_REGISTRY_URI when it names another registry: http(s) servers
             answer /health and the registry API; SQLite files and folders are writable;
             other database URLs connect.
  Prefect    $PREFECT_API_URL (or the profile's api.url) answers {url}/health; when none is
             set, a note says a temporary local server will run the flow.

A failure raises `ServiceUnavailable` (a RuntimeError) whose message names the setting (spec
field or environment variable), the service, its URL with any password hidden, and the
underlying error in one line. Nothing is created before the checks pass: no store row, no
MLflow run, no registered model (the caller, `prepare_run`, opens them afterwards).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from agents.redact import env_secrets, redact_text
from flows import tracking
from flows.spec import Spec

TIMEOUT_S = 5  # per check: a connection or an HTTP request
_PG_DRIVERS = ("postgresql", "mysql", "mariadb")  # dialects that take connect_timeout


class ServiceUnavailable(RuntimeError):
    """A service the run needs is unreachable or unusable. `setting` is the spec field or the
    environment variable to fix; the message is one line."""

    def __init__(self, setting: str, service: str, url: str, error: str):
        self.setting, self.service, self.url, self.error = setting, service, url, error
        super().__init__(f"{setting}: {service} at {url}: {error}")


@dataclass
class Preflight:
    """What the checks saw: notes worth printing and each check's cost in milliseconds."""

    notes: list[str] = field(default_factory=list)
    ms: dict[str, float] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return round(sum(self.ms.values()), 1)


def check_services(spec: Spec, out: Path, *, prefect_api: bool = True) -> Preflight:
    """Check the warehouse, the example store, MLflow (tracking and registry) and, with
    `prefect_api`, the Prefect API, in that order; raise `ServiceUnavailable` at the first
    that fails. `out` is the run folder (the default store and MLflow locations hang off it;
    nothing is created in it). A flow already running skips the Prefect check: it got this far
    through that API."""
    out = Path(out).resolve()
    report = Preflight()
    checks = [("warehouse", lambda: check_warehouse(spec)),
              ("store", lambda: check_store(spec.store.url or f"sqlite:///{out / 'store.db'}",
                                            "store.url" if spec.store.url else
                                            "store.url (default: <out>/store.db)")),
              ("mlflow", lambda: check_mlflow(spec, out))]
    if prefect_api:
        checks.append(("prefect", lambda: report.notes.extend(check_prefect_api())))
    for name, check in checks:
        started = time.perf_counter()
        check()
        report.ms[name] = round((time.perf_counter() - started) * 1000, 1)
    return report


# ── one line of everything ───────────────────────────────────────────────────────────────────
def safe_url(url: str) -> str:
    """`url` with its password (and any secret-looking value) hidden."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port is not None:
                host += f":{parts.port}"
            netloc = f"{parts.username or ''}:***@{host}"
            url = urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # e.g. a port that is not a number: SQLAlchemy's parser hides it
        try:
            url = sa.make_url(url).render_as_string(hide_password=True)
        except (sa.exc.ArgumentError, ValueError):
            url = re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", url)
    return redact_text(url, env_secrets())


def one_line(error: BaseException, *, secrets: tuple[str, ...] = ()) -> str:
    """`Class: message` on one line, without SQLAlchemy's background links or passwords."""
    inner = getattr(error, "orig", None) or error  # a driver's own error says what happened
    text = str(inner).split("\n(Background on this error", 1)[0]
    text = re.sub(r"\s+", " ", text).strip()
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = redact_text(text, env_secrets())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{inner.__class__.__name__}: {text}" if text else inner.__class__.__name__


def _engine(url: str) -> sa.Engine:
    """A pool-less engine that gives up connecting after TIMEOUT_S."""
    parsed = sa.make_url(url)
    args = {"connect_timeout": TIMEOUT_S} if parsed.get_backend_name() in _PG_DRIVERS else {}
    return sa.create_engine(parsed, poolclass=NullPool, connect_args=args)


def _password(url: str) -> tuple[str, ...]:
    try:
        return (sa.make_url(url).password or "",)
    except sa.exc.ArgumentError:
        return ()


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for in-memory and URI-style databases."""
    database = sa.make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def _writable(path: Path) -> str | None:
    """Why a file at `path` (existing or to be created, with its journal beside it) could not
    be written, or None. Creates nothing."""
    if path.exists():
        if path.is_dir():
            return f"{path} is a folder, not a file"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return f"its folder {path.parent} is not writable (SQLite writes a journal there)"
        return None
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {path.parent} cannot be created"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable, so {path} cannot be created"
    return None


def _sqlite_readable(path: Path) -> str | None:
    """Why the existing SQLite file at `path` is not a usable database, or None."""
    try:
        # read-write (never create): a process killed mid-write leaves a hot journal that only
        # a writer may roll back, and a read-only open would then refuse a healthy database
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=TIMEOUT_S)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        return one_line(e)
    return None


# ── the warehouse ────────────────────────────────────────────────────────────────────────────
def check_warehouse(spec: Spec) -> None:
    """warehouse.url connects; the slicing table and every allow-listed table exist with the
    columns the spec names."""
    url, shown = spec.warehouse.url, safe_url(spec.warehouse.url)

    def fail(setting: str, error: str) -> ServiceUnavailable:
        return ServiceUnavailable(setting, "the warehouse", shown, error)

    if sa.make_url(url).get_backend_name() == "sqlite":
        path = _sqlite_path(url)
        if path is not None and not path.is_file():
            raise fail("warehouse.url", f"no such file {path}")
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            wanted = {table: list(columns) for table, columns in spec.warehouse.tables.items()}
            gold = spec.task.gold_column
            if gold:
                wanted.setdefault(spec.slicing.table, []).append(gold)
            for table, columns in wanted.items():
                schema, _, name = table.rpartition(".")
                try:
                    have = {c["name"] for c in inspector.get_columns(name, schema=schema or None)}
                except sa.exc.NoSuchTableError:
                    tables = sorted(inspector.get_table_names(schema=schema or None)
                                    + inspector.get_view_names(schema=schema or None))
                    setting = ("slicing.table" if table == spec.slicing.table
                               else f"warehouse.tables.{table}")
                    raise fail(setting, f"no table {table!r} (tables there: "
                               f"{', '.join(tables[:20]) or 'none'})") from None
                missing = [c for c in columns if c not in have]
                if missing:
                    setting = ("task.gold_column" if missing == [gold]
                               and table == spec.slicing.table else f"warehouse.tables.{table}")
                    raise fail(setting, f"table {table!r} has no column "
                               f"{', '.join(map(repr, missing))} (its columns: "
                               f"{', '.join(sorted(have))})")
    except sa.exc.SQLAlchemyError as e:
        raise fail("warehouse.url", "cannot connect or read: " + one_line(
            e, secrets=_password(url))) from None
    finally:
        engine.dispose()


# ── the example store ────────────────────────────────────────────────────────────────────────
def check_store(url: str, setting: str = "store.url") -> None:
    """The store connects and can be written; the test leaves nothing behind."""
    shown = safe_url(url)

    def fail(error: str) -> ServiceUnavailable:
        return ServiceUnavailable(setting, "the example store", shown, error)

    try:
        backend = sa.make_url(url).get_backend_name()
    except sa.exc.ArgumentError as e:
        raise fail(one_line(e)) from None
    if backend == "sqlite":
        path = _sqlite_path(url)
        if path is None:
            return
        why = _writable(path) or (_sqlite_readable(path) if path.exists() else None)
        if why:
            raise fail(why)
        return
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            if backend == "postgresql":  # DDL is transactional there: nothing survives
                probe = f"posttrain_preflight_{uuid.uuid4().hex[:12]}"
                with conn.begin() as txn:
                    conn.execute(sa.text(f"CREATE TABLE {probe} (x integer)"))
                    conn.execute(sa.text(f"INSERT INTO {probe} VALUES (1)"))
                    txn.rollback()
            else:
                conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as e:
        raise fail(one_line(e, secrets=_password(url))) from None
    finally:
        engine.dispose()


# ── MLflow ───────────────────────────────────────────────────────────────────────────────────
def mlflow_setting(spec: Spec) -> str:
    """Where the run's tracking URI comes from (what to fix)."""
    if spec.tracking.uri:
        return "tracking.uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "$MLFLOW_TRACKING_URI"
    return "tracking.uri (default: <out>/../mlflow.db)"


def check_mlflow(spec: Spec, out: Path) -> None:
    """The tracking store answers or can be written; so does the registry when
    $MLFLOW_REGISTRY_URI points elsewhere."""
    uri = tracking.tracking_uri(spec.tracking.uri, out)
    _check_mlflow_uri(uri, mlflow_setting(spec), "the MLflow tracking store")
    registry = os.environ.get("MLFLOW_REGISTRY_URI")
    if registry and registry != uri:
        _check_mlflow_uri(registry, "$MLFLOW_REGISTRY_URI", "the MLflow model registry")


def _check_mlflow_uri(uri: str, setting: str, service: str) -> None:
    shown = safe_url(uri)

    def fail(error: str) -> ServiceUnavailable:
        return ServiceUnavailable(setting, service, shown, error)

    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_mlflow_server(uri.rstrip("/"), fail)
    elif scheme in ("", "file"):
        folder = Path(urlsplit(uri).path if scheme == "file" else uri).expanduser().resolve()
        why = (f"{folder} is a file, not a folder" if folder.is_file()
               else _writable(folder / "meta.yaml"))
        if why:
            raise fail(why)
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is not None:
            why = _writable(path) or (_sqlite_readable(path) if path.exists() else None)
            if why:
                raise fail(why)
    elif scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        engine = _engine(uri)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError as e:
            raise fail(one_line(e, secrets=_password(uri))) from None
        finally:
            engine.dispose()
    # databricks and other plugin schemes: their own clients say what is wrong


def _check_mlflow_server(base: str, fail) -> None:
    """/health answers OK, and the registry API answers (auth included)."""
    import httpx

    headers, auth = {}, None
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"],
                os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    verify = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() not in ("true", "1")
    try:
        with httpx.Client(timeout=TIMEOUT_S, headers=headers, auth=auth, verify=verify) as http:
            health = http.get(f"{base}/health")
            if health.status_code != 200:
                raise fail(f"GET /health answered HTTP {health.status_code}: not an MLflow "
                           f"tracking server, or not a healthy one")
            registry = http.get(f"{base}/api/2.0/mlflow/registered-models/search",
                                params={"max_results": 1})
            if registry.status_code != 200:
                detail = re.sub(r"\s+", " ", registry.text)[:200]
                raise fail(f"the model registry API answered HTTP {registry.status_code}: "
                           f"{redact_text(detail, env_secrets())}")
    except httpx.HTTPError as e:
        raise fail(f"unreachable: {one_line(e)}") from None


# ── Prefect ──────────────────────────────────────────────────────────────────────────────────
def check_prefect_api() -> list[str]:
    """$PREFECT_API_URL (or the active profile's) answers /health; with none set, a note that
    a temporary local server will run the flow."""
    import httpx
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.api.url
    if not url:
        return [("Prefect: PREFECT_API_URL is not set; a temporary local Prefect server will "
                 "run the flow (set PREFECT_API_URL to use a running one).")]
    setting = "$PREFECT_API_URL" if os.environ.get("PREFECT_API_URL") else (
        "PREFECT_API_URL (in the Prefect profile)")
    shown = safe_url(url)
    headers = {}
    key = settings.api.key.get_secret_value() if settings.api.key else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    hint = "; start it (prefect server start) or unset PREFECT_API_URL for a temporary server"
    try:
        with httpx.Client(timeout=TIMEOUT_S, headers=headers) as http:
            answer = http.get(f"{url.rstrip('/')}/health")
    except httpx.HTTPError as e:
        raise ServiceUnavailable(setting, "the Prefect API", shown,
                                 f"unreachable: {one_line(e, secrets=(key or '',))}{hint}"
                                 ) from None
    if answer.status_code != 200:
        raise ServiceUnavailable(setting, "the Prefect API", shown,
                                 f"GET /health answered HTTP {answer.status_code} (is it the "
                                 f"API URL, ending in /api?)")
    return []
