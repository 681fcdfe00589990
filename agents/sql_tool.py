"""A read-only SQL tool that shows an agent its own slice and nothing else.

The agent writes SQL against one table name (say `articles`). That name is a view of
exactly its slice's rows and of the allow-listed columns only: the tool runs

    WITH _pt_slice_<nonce> AS (SELECT <allowed columns> FROM (<trusted slice SQL>) AS _pt_src)
         [, the agent's own CTEs]
    <the agent's query, its table references pointed at _pt_slice_<nonce>>
    LIMIT <row limit + 1>

Two independent layers keep the agent's SQL read-only and inside its slice:

1. **The guard** (`agents.sql_guard`): sqlglot checks the query against an allow-list
   of read-only constructs, tables, columns and functions; the SQL that runs is generated
   from the checked tree. A refusal raises `SQLRejected` with a `code` and a `reason`
   the agent can act on.
2. **The connection** (here), which holds even for SQL the guard never saw
   (`SQLTool._execute` runs raw text under this layer alone; the tests do exactly that):
   * SQLite: an authorizer allows only SELECT, column reads made inside the trusted slice
     CTE (whose name carries a fresh random nonce per query, so an agent cannot name it),
     and allow-listed functions; everything else (reading the real table directly, the
     gold column, other tables, PRAGMA, ATTACH, VACUUM INTO, writes, recursive CTEs,
     transactions) is denied by SQLite itself. No database may be attached
     (`SQLITE_LIMIT_ATTACHED` 0), values are capped at 16 MiB, and a progress handler
     aborts the query at its deadline. All of it is removed before the connection goes
     back to the pool.
   * PostgreSQL: a READ ONLY transaction, `SET LOCAL ROLE` to a role that may SELECT only
     the allowed columns (`ensure_reader_role`; PostgreSQL itself refuses the gold column
     and other tables), `SET LOCAL statement_timeout` plus a client-side cancel at the
     deadline (which no SQL can lift), no ';' in the text (psycopg2 sends text over the
     simple protocol, which runs every statement in it), and a rollback.

     Limit of this layer: PostgreSQL checks `SET ROLE` / `set_config('role', ...)`
     against the *login*, not the current role. With a superuser login, a statement
     that got past the guard could switch back (e.g. `SELECT set_config('role',
     'postgres', true), query_to_xml('SELECT topic ...', ...)`). The guard refuses all of
     these; for a boundary that holds on its own, point the agents' engine at a login
     that can only become the reader role (or is it: `CREATE ROLE posttrain_reader LOGIN
     ...`), and the READ ONLY transaction still stops writes either way. The role also
     does not scope rows: the slice CTE does, behind the guard.

The guard and the connection together are counted in `SQLTool.stats`.

What comes back is bounded too, whatever the warehouse holds (a 200 KB article, a row
pasted full of junk): each value longer than `max_cell_chars` (32,000 characters: every BBC
article fits) is cut with a marker that says how much and how to read the rest,

    …[sql tool: cut 168000 of 200000 characters; read the rest with substr(body, 32001, n)]

and rows after the result's first reach `max_result_chars` (1,000,000 characters of JSON)
are left out, the result marked `truncated` with a `cut` note: page on after the last id.
Rows the pipeline reads itself (`lookup_row`, the gate's) are never cut.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlglot import exp

from agents.pg_reader_role import (
    DEFAULT_READER_ROLE,
    ReaderRoleError,
    ensure_reader_role,
    reader_role_sql,
)
from agents.sql_guard import (
    SQLRejected,
    check_tree,
    enforce_limit,
    generate,
    normalized_name,
    sqlglot_dialect,
)

__all__ = [
    "SLICE_CTE",
    "ReaderRoleError",
    "SQLRejected",
    "SQLTool",
    "ScopedTable",
    "ensure_reader_role",
    "reader_role_sql",
]

log = logging.getLogger(__name__)

SLICE_CTE = "_pt_slice"  # prefix of the trusted CTE's name; a random nonce follows
_INTERNAL = re.compile(r"^_pt_", re.IGNORECASE)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_VALUE_BYTES = 16 * 1024 * 1024
MAX_CELL_CHARS = 32_000  # per value an agent sees (the longest BBC article: 25,396)
MAX_RESULT_CHARS = 1_000_000  # per result, as JSON
CUT_MARK = "…[sql tool: cut {cut} of {total} characters; read the rest with substr({column}, {start}, n)]"
_CANCEL_GRACE_S = 1.0

# SQLite functions the authorizer lets agent SQL call (outside the trusted CTE, which may
# call anything it likes, e.g. posttrain_hash). The names the guard's allow-list compiles to.
SQLITE_FUNCTIONS = frozenset({
    "count", "sum", "total", "avg", "min", "max", "group_concat", "string_agg",
    "lower", "upper", "length", "octet_length", "substr", "substring", "trim", "ltrim",
    "rtrim", "replace", "instr", "concat", "concat_ws", "unicode", "char", "hex",
    "coalesce", "ifnull", "nullif", "iif", "typeof", "round", "abs", "sign", "ceil",
    "ceiling", "floor", "sqrt", "pow", "power", "ln", "log", "log10", "exp", "date", "time",
    "datetime", "julianday", "strftime", "unixepoch", "like", "glob", "row_number", "rank",
    "dense_rank", "ntile", "lag", "lead", "first_value", "last_value", "nth_value",
    "percent_rank", "cume_dist",
})
_SQLITE_CATALOG = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master",
                             "sqlite_temp_schema", "sqlite_sequence"})


@dataclass(frozen=True)
class ScopedTable:
    """The one table an agent sees: `name` over the rows `source_sql` yields.

    `source_sql` is trusted (written by posttrain, not the agent): a SELECT with
    :named `params` that yields exactly the slice's rows. Only `columns` are exposed.
    On PostgreSQL it runs as the reader role, so it may read only `columns` of `name`."""

    name: str
    columns: tuple[str, ...] | list[str]
    source_sql: str
    params: dict = field(default_factory=dict)
    id_column: str = "id"

    def __post_init__(self):
        for ident in (self.name, *self.columns):
            if not _IDENT.match(ident) or _INTERNAL.match(ident):
                raise ValueError(f"{ident!r} is not a plain SQL identifier")
        if self.id_column not in self.columns:
            raise ValueError(f"id_column {self.id_column!r} must be one of the columns")
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "params", dict(self.params))


class SQLTool:
    """`run(sql)` executes an agent's query over its slice; `lookup_row(id)` fetches a row.

    `timeout_s` bounds each query; `pg_role` is the SELECT-only role PostgreSQL queries
    run as (created on first use when this login may, see `ensure_reader_role`; None
    when the login itself is already that restricted). `max_cell_chars` and
    `max_result_chars` bound what a result shows (module doc)."""

    def __init__(
        self,
        engine: sa.Engine,
        scoped: ScopedTable,
        row_limit: int = 200,
        *,
        timeout_s: float = 2.0,
        pg_role: str | None = DEFAULT_READER_ROLE,
        max_cell_chars: int = MAX_CELL_CHARS,
        max_result_chars: int = MAX_RESULT_CHARS,
    ):
        if row_limit < 1:
            raise ValueError("row_limit must be at least 1")
        if max_cell_chars < 1 or max_result_chars < 1:
            raise ValueError("max_cell_chars and max_result_chars must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.kind = engine.dialect.name
        if self.kind not in ("sqlite", "postgresql"):
            raise ValueError(
                f"the SQL tool has no hardened connection for {self.kind!r}; "
                "use SQLite or PostgreSQL"
            )
        if self.kind == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
            raise ValueError(f"the SQL tool needs SQLite 3.35+ (have {sqlite3.sqlite_version})")
        self.engine = engine
        self.scoped = scoped
        self.row_limit = row_limit
        self.timeout_s = timeout_s
        self.pg_role = pg_role
        self.max_cell_chars, self.max_result_chars = max_cell_chars, max_result_chars
        self.dialect = sqlglot_dialect(self.kind)
        self.stats: dict = {"executed": 0, "rejected": 0, "failed": 0, "by_code": {}}
        quote = engine.dialect.identifier_preparer.quote
        self._columns_sql = ", ".join(quote(c) for c in scoped.columns)

    # ── the guard ─────────────────────────────────────────────────────────────────────
    def check(self, sql: str) -> exp.Query:
        """Parse and check the agent's query; return its tree or raise SQLRejected."""
        return check_tree(sql, {self.scoped.name: list(self.scoped.columns)}, self.dialect)

    def _slice_cte(self, name: str) -> str:
        # SQLite: MATERIALIZED keeps the slice from being flattened into the agent's query,
        # so every read of the real table happens inside this CTE (where the authorizer
        # trusts it) and `count(*)` never turns into an untagged read of the whole table
        how = "MATERIALIZED " if self.kind == "sqlite" else ""
        body = f"SELECT {self._columns_sql} FROM ({self.scoped.source_sql}) AS _pt_src"
        return f"{name} AS {how}({body})"

    def build(self, sql: str, escape_colons: bool = False, cte: str | None = None) -> str:
        """The SQL executed for an agent query (checked, scoped, limited).

        With escape_colons the agent's part has its colons escaped for `sa.text()`, so
        only the trusted slice SQL binds :named parameters."""
        cte = cte or _nonce_name()
        tree = self.check(sql)
        table = normalized_name(self.scoped.name, self.dialect)
        # point the agent's table references at the slice CTE, keeping its name as alias
        for t in list(tree.find_all(exp.Table)):
            if t.name == table:
                alias = t.args["alias"].this if t.args.get("alias") else t.this.copy()
                t.set("this", exp.to_identifier(cte))
                t.set("alias", exp.TableAlias(this=alias))
        # lift the agent's CTEs so ours comes first
        with_ = tree.args.get("with_")
        ctes = [generate(c, self.dialect) for c in with_.expressions] if with_ else []
        tree.set("with_", None)
        tree = enforce_limit(tree, self.row_limit + 1)
        agent_part = "".join(f", {c}" for c in ctes) + " " + generate(tree, self.dialect)
        if escape_colons:
            agent_part = agent_part.replace(":", "\\:")
        return "WITH " + self._slice_cte(cte) + agent_part

    # ── execution ─────────────────────────────────────────────────────────────────────
    def run(self, sql: str) -> dict:
        """Run the agent's query; return {"rows", "row_count", "truncated"} (JSON-safe)."""
        cte = _nonce_name()
        try:
            built = self.build(sql, escape_colons=True, cte=cte)
            rows = self._execute(built, self.scoped.params, cte, self.row_limit + 1)
        except SQLRejected as e:
            self.stats["rejected"] += 1
            self.stats["by_code"][e.code] = self.stats["by_code"].get(e.code, 0) + 1
            raise
        except sa.exc.SQLAlchemyError:
            self.stats["failed"] += 1
            raise
        self.stats["executed"] += 1
        truncated = len(rows) > self.row_limit
        rows, cut = self._bounded(rows[: self.row_limit])
        out = {"rows": rows, "row_count": len(rows), "truncated": truncated or bool(cut.get("rows"))}
        if cut:
            out["cut"] = self._cut_note(cut)
        return out

    # ── what a result may show ─────────────────────────────────────────────────────────
    def _bounded(self, rows: list[dict]) -> tuple[list[dict], dict]:
        """The rows with long values cut, and as many as fit `max_result_chars` (at least
        one); and what was cut: {"values": n, "rows": n} (empty when nothing was)."""
        out, size, cut = [], 0, {}
        for i, row in enumerate(rows):
            fitted, long_values = {}, 0
            for column, value in row.items():
                if isinstance(value, str) and len(value) > self.max_cell_chars:
                    keep = self.max_cell_chars
                    value = value[:keep] + CUT_MARK.format(
                        cut=len(value) - keep, total=len(value), column=column, start=keep + 1)
                    long_values += 1
                fitted[column] = value
            n = len(json.dumps(fitted, ensure_ascii=False, default=str)) + 2
            if out and size + n > self.max_result_chars:
                cut["rows"] = len(rows) - i
                break
            out.append(fitted)
            size += n
            if long_values:
                cut["values"] = cut.get("values", 0) + long_values
        for key, n in cut.items():
            self.stats[f"cut_{key}"] = self.stats.get(f"cut_{key}", 0) + n
        return out, cut

    def _cut_note(self, cut: dict) -> str:
        parts = []
        if cut.get("values"):
            parts.append(f"{cut['values']} values longer than {self.max_cell_chars} characters "
                         "were cut (each ends with a '…[sql tool: cut ...]' marker)")
        if cut.get("rows"):
            parts.append(f"{cut['rows']} more rows were left out to keep the result under "
                         f"{self.max_result_chars} characters: read on after the last row "
                         "shown, or select fewer or shorter columns")
        return "; ".join(parts)

    def lookup_row(self, row_id: str | int) -> dict | None:
        """The slice's row with this id (allowed columns only), or None if not in the slice."""
        cte = _nonce_name()
        id_col = self.engine.dialect.identifier_preparer.quote(self.scoped.id_column)
        sql = f"WITH {self._slice_cte(cte)} SELECT * FROM {cte} WHERE {id_col} = :_pt_row_id"
        rows = self._execute(sql, {**self.scoped.params, "_pt_row_id": row_id}, cte, 1)
        return rows[0] if rows else None

    def _execute(
        self, sql: str, params: dict | None = None, trusted_cte: str | None = None,
        max_rows: int | None = None,
    ) -> list[dict]:
        """Run `sql` under the connection layer only (no guard): rows as JSON-safe dicts.

        With params, `sql` goes through `sa.text` (":name" binds); without, it is sent as
        is. `trusted_cte` names the CTE whose reads SQLite's authorizer trusts."""
        if self.kind == "postgresql" and ";" in sql:
            raise SQLRejected(
                "';' is not allowed in queries on this warehouse, not even inside a string "
                "(write chr(59) for one)", "multiple_statements",
            )
        if self.kind == "postgresql":
            self._ensure_role()
        deadline = time.monotonic() + self.timeout_s
        with self.engine.connect() as conn:
            hardened = _sqlite_hardened if self.kind == "sqlite" else _pg_hardened
            with hardened(self, conn, trusted_cte, deadline):
                try:
                    if params is None:  # the text exactly as given
                        raw_sql = sql
                        if conn.dialect.paramstyle in ("pyformat", "format"):
                            raw_sql = sql.replace("%", "%%")
                        result = conn.exec_driver_sql(raw_sql)
                    else:
                        result = conn.execute(sa.text(sql), params)
                    mappings = result.mappings()
                    rows = mappings.fetchmany(max_rows) if max_rows else mappings.all()
                except sa.exc.OperationalError as e:
                    if _timed_out(e, deadline):
                        raise SQLRejected(
                            f"the query ran past {self.timeout_s:g} s and was stopped; "
                            "narrow it (WHERE, LIMIT) and avoid joins that multiply rows",
                            "timeout",
                        ) from None
                    raise
        return [_json_row(r) for r in rows]

    def _ensure_role(self) -> None:
        if self.pg_role:
            ensure_reader_role(
                self.engine, self.pg_role, {self.scoped.name: list(self.scoped.columns)}
            )


def _nonce_name() -> str:
    return f"{SLICE_CTE}_{secrets.token_hex(8)}"


def _timed_out(e: sa.exc.OperationalError, deadline: float) -> bool:
    if getattr(e.orig, "pgcode", None) == "57014":  # query_canceled
        return True
    return "interrupted" in str(e.orig) and time.monotonic() >= deadline


# ── SQLite: authorizer, limits, deadline ─────────────────────────────────────────────────
def _sqlite_authorizer(trusted_cte: str | None, real_tables: set[str]):
    ok, deny = sqlite3.SQLITE_OK, sqlite3.SQLITE_DENY

    def authorize(action, arg1, arg2, _db, inner):
        if action == sqlite3.SQLITE_SELECT:
            return ok
        if action in (sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION) and (
            trusted_cte is not None and inner == trusted_cte
        ):
            return ok  # the trusted slice SQL, inside the nonce-named CTE
        if action == sqlite3.SQLITE_READ and arg2 == "":
            # a read of rows but no column (count(*), EXISTS): fine for CTEs and subqueries
            return ok if (arg1 or "").casefold() not in real_tables else deny
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").casefold() in SQLITE_FUNCTIONS:
            return ok
        return deny

    return authorize


@contextmanager
def _sqlite_hardened(_tool: SQLTool, conn: sa.Connection, trusted_cte, deadline: float):
    raw = conn.connection.driver_connection
    if not isinstance(raw, sqlite3.Connection):
        raise TypeError("the SQL tool needs the standard sqlite3 driver to harden SQLite")
    real = {
        r[0].casefold()
        for r in raw.execute(
            "SELECT name FROM sqlite_master UNION SELECT name FROM sqlite_temp_master"
        )
    } | _SQLITE_CATALOG
    old_attached = raw.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    old_length = raw.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_VALUE_BYTES)
    raw.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    # The trusted slice SQL reads its ids with json_each. SQLite connects that virtual table
    # on its first use in a connection by declaring its schema, which the authorizer below
    # would refuse ("vtable constructor failed"): connect it first, outside the authorizer.
    raw.execute("SELECT 1 FROM json_each('[]')").fetchall()
    # setting an authorizer also expires every cached prepared statement, so a statement
    # prepared earlier without it cannot run under this one
    raw.set_authorizer(_sqlite_authorizer(trusted_cte, real))
    try:
        yield
    finally:
        raw.set_authorizer(None)
        raw.set_progress_handler(None, 0)
        raw.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, old_length)
        raw.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, old_attached)


# ── PostgreSQL: read-only transaction as the reader role, timeout, cancel ───────────────
class _Canceller:
    """Cancels the running query at a deadline from another thread, unless stopped first."""

    def __init__(self, delay_s: float, cancel):
        self._lock = threading.Lock()
        self._stopped = False
        self._cancel = cancel
        self._timer = threading.Timer(max(delay_s, 0.0), self._fire)
        self._timer.daemon = True

    def _fire(self):
        with self._lock:
            if not self._stopped:
                self._cancel()

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._stopped = True
        self._timer.cancel()


@contextmanager
def _pg_hardened(tool: SQLTool, conn: sa.Connection, _trusted_cte, deadline: float):
    ms = max(1, int(tool.timeout_s * 1000))
    try:
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")  # first statement of the transaction
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
        if tool.pg_role:
            role = conn.dialect.identifier_preparer.quote(tool.pg_role)
            conn.exec_driver_sql(f"SET LOCAL ROLE {role}")
        # the server-side timeout is the first line; this client-side cancel is the second
        raw = conn.connection.driver_connection
        delay = deadline - time.monotonic() + _CANCEL_GRACE_S
        with _Canceller(delay, raw.cancel):
            yield
    finally:
        conn.rollback()


# ── JSON-safe rows ───────────────────────────────────────────────────────────────────────
def _json_value(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (dt.date, dt.datetime, dt.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    return str(v)


def _json_row(row) -> dict:
    return {str(k): _json_value(v) for k, v in dict(row).items()}
