"""A read-only SQL tool that shows an agent its own slice and nothing else.

The agent writes SQL against one table name (say `articles`). That name is a view of
exactly its slice's rows and of the allow-listed columns only: the tool runs

    WITH _pt_slice AS (SELECT <allowed columns> FROM (<trusted slice SQL>) AS _pt_src)
         [, the agent's own CTEs]
    <the agent's query, its table references pointed at _pt_slice>
    LIMIT <row limit>

Before that, sqlglot checks the agent's query (`check`): one statement, a SELECT or a
set operation (UNION ...) at the root, no DML/DDL/commands anywhere, no tables other
than the scoped one and the query's own CTEs, no schema-qualified names, no
table-valued or denied functions, no bind parameters, and only allow-listed columns
(or aliases the query itself defines). A rejection raises `SQLRejected` whose message
says what to change. The guard is basic; the view is what keeps other rows and the gold
column out of reach, and the read runs in a transaction that is rolled back.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import re
from dataclasses import dataclass, field

import sqlalchemy as sa
import sqlglot
from sqlglot import exp

SLICE_CTE = "_pt_slice"
_INTERNAL = re.compile(r"^_pt_", re.IGNORECASE)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Functions that read or write files, load code, or stall the database.
DENIED_FUNCTIONS = {
    "load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "zipfile",
    "randomblob", "zeroblob", "sleep", "pg_sleep", "pg_read_file", "pg_read_binary_file",
    "pg_ls_dir", "lo_import", "lo_export", "dblink", "current_setting", "set_config",
}
_FORBIDDEN_NODES = (
    exp.DML, exp.DDL, exp.Command, exp.Into, exp.Lock, exp.Set, exp.Pragma, exp.Attach,
    exp.Detach, exp.Drop, exp.Alter, exp.TruncateTable, exp.Transaction, exp.Commit,
    exp.Rollback, exp.Use, exp.Grant, exp.Analyze, exp.Describe,
)
# SQLAlchemy dialect name -> sqlglot dialect name, where they differ.
_DIALECTS = {"postgresql": "postgres", "mssql": "tsql"}


class SQLRejected(Exception):
    """The agent's SQL was refused; `reason` is a message the agent can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ScopedTable:
    """The one table an agent sees: `name` over the rows `source_sql` yields.

    `source_sql` is trusted (written by posttrain, not the agent): a SELECT with
    :named `params` that yields exactly the slice's rows. Only `columns` are exposed."""

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
    """`run(sql)` executes an agent's query over its slice; `lookup_row(id)` fetches a row."""

    def __init__(self, engine: sa.Engine, scoped: ScopedTable, row_limit: int = 200):
        if row_limit < 1:
            raise ValueError("row_limit must be at least 1")
        self.engine = engine
        self.scoped = scoped
        self.row_limit = row_limit
        self.dialect = _DIALECTS.get(engine.dialect.name, engine.dialect.name)
        if self.dialect not in sqlglot.Dialect.classes:
            self.dialect = None  # sqlglot's generic dialect
        cols = ", ".join(scoped.columns)
        self._slice_cte = (
            f"{SLICE_CTE} AS (SELECT {cols} FROM ({scoped.source_sql}) AS _pt_src)"
        )

    # ── the guard ───────────────────────────────────────────────────────────────────────────
    def check(self, sql: str) -> exp.Query:
        """Parse and check the agent's query; return its tree or raise SQLRejected."""
        if not isinstance(sql, str) or not sql.strip():
            raise SQLRejected("the query is empty; send one SELECT statement")
        try:
            statements = [s for s in sqlglot.parse(sql, read=self.dialect) if s is not None]
        except sqlglot.errors.ParseError as e:
            first = str(e).splitlines()[0]
            raise SQLRejected(f"the query does not parse: {first}") from None
        if len(statements) != 1:
            raise SQLRejected(
                f"send exactly one SQL statement, got {len(statements)}; drop extra ';' parts"
            )
        tree = statements[0]
        if not isinstance(tree, (exp.Select, exp.SetOperation)):
            kind = tree.name if isinstance(tree, exp.Command) else tree.key
            raise SQLRejected(
                f"only SELECT queries are allowed (got {kind.upper()}); the tool is read-only"
            )
        for node in tree.walk():
            if isinstance(node, _FORBIDDEN_NODES):
                raise SQLRejected(
                    f"{node.key.upper()} is not allowed anywhere in the query; "
                    "only read with SELECT"
                )
            if isinstance(node, (exp.Placeholder, exp.Parameter)):
                raise SQLRejected("bind parameters are not supported; write literal values")
            if isinstance(node, exp.Func):
                fname = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
                if fname in DENIED_FUNCTIONS:
                    raise SQLRejected(f"function {fname}() is not allowed")

        with_ = tree.args.get("with_")
        if with_ is not None and with_.args.get("recursive"):
            raise SQLRejected("recursive CTEs are not allowed; use a plain WITH")
        ctes = {c.alias_or_name.casefold() for c in tree.find_all(exp.CTE)}
        table = self.scoped.name.casefold()
        if table in ctes or any(_INTERNAL.match(c) for c in ctes):
            raise SQLRejected(f"a CTE may not be named {self.scoped.name!r} or start with _pt_")

        for t in tree.find_all(exp.Table):
            if not isinstance(t.this, exp.Identifier):
                raise SQLRejected(
                    f"table functions are not allowed; read from {self.scoped.name!r}"
                )
            if t.args.get("db") or t.args.get("catalog"):
                raise SQLRejected(
                    f"qualified table names ({t.sql(self.dialect)}) are not allowed; "
                    f"write just {self.scoped.name}"
                )
            if t.name.casefold() not in ctes | {table}:
                raise SQLRejected(
                    f"table {t.name!r} is not available; the only table is {self.scoped.name!r}"
                )

        allowed = {c.casefold() for c in self.scoped.columns} | _aliases(tree)
        for col in tree.find_all(exp.Column):
            if col.args.get("db") or col.args.get("catalog"):
                raise SQLRejected(f"qualified names ({col.sql(self.dialect)}) are not allowed")
            if isinstance(col.this, exp.Star):
                continue
            if col.name.casefold() not in allowed:
                raise SQLRejected(
                    f"column {col.name!r} is not available; the columns of "
                    f"{self.scoped.name} are: {', '.join(self.scoped.columns)}"
                )
        return tree

    # ── execution ───────────────────────────────────────────────────────────────────────────
    def build(self, sql: str, escape_colons: bool = False) -> str:
        """The SQL executed for an agent query (checked, scoped, limited).

        With escape_colons the agent's part has its colons escaped for `sa.text()`, so
        only the trusted slice SQL binds :named parameters."""
        tree = self.check(sql)
        # point the agent's table references at the slice CTE, keeping the name as alias
        for t in list(tree.find_all(exp.Table)):
            if t.name.casefold() == self.scoped.name.casefold():
                alias = t.alias or t.name
                t.set("this", exp.to_identifier(SLICE_CTE))
                t.set("alias", exp.TableAlias(this=exp.to_identifier(alias)))
        # lift the agent's CTEs so ours comes first
        with_ = tree.args.get("with_")
        ctes = [c.sql(self.dialect) for c in with_.expressions] if with_ else []
        tree.set("with_", None)
        tree = self._limit(tree)
        agent_part = "".join(f", {c}" for c in ctes) + " " + tree.sql(self.dialect)
        if escape_colons:
            agent_part = agent_part.replace(":", "\\:")
        return "WITH " + self._slice_cte + agent_part

    def _limit(self, tree: exp.Query) -> exp.Query:
        """Cap the rows at row_limit + 1 (the extra row tells us the result was truncated)."""
        cap = self.row_limit + 1
        limit = tree.args.get("limit")
        if limit is None:
            tree.set("limit", exp.Limit(expression=exp.Literal.number(cap)))
            return tree
        value = limit.expression
        if isinstance(value, exp.Literal) and not value.is_string and value.this.isdigit():
            limit.set("expression", exp.Literal.number(min(int(value.this), cap)))
            return tree
        return exp.select("*").from_(tree.subquery("_pt_q")).limit(cap)

    def run(self, sql: str) -> dict:
        """Run the agent's query; return {"rows", "row_count", "truncated"} (JSON-safe)."""
        stmt = sa.text(self.build(sql, escape_colons=True))
        with self.engine.connect() as conn:
            try:
                result = conn.execute(stmt, self.scoped.params)
                rows = [_json_row(r) for r in result.mappings().fetchmany(self.row_limit + 1)]
            finally:
                conn.rollback()
        truncated = len(rows) > self.row_limit
        rows = rows[: self.row_limit]
        return {"rows": rows, "row_count": len(rows), "truncated": truncated}

    def lookup_row(self, row_id: str | int) -> dict | None:
        """The slice's row with this id (allowed columns only), or None if not in the slice."""
        sql = (
            f"WITH {self._slice_cte} SELECT * FROM {SLICE_CTE} "
            f"WHERE {self.scoped.id_column} = :_pt_row_id"
        )
        params = {**self.scoped.params, "_pt_row_id": row_id}
        with self.engine.connect() as conn:
            try:
                row = conn.execute(sa.text(sql), params).mappings().first()
            finally:
                conn.rollback()
        return _json_row(row) if row is not None else None


def _aliases(tree: exp.Expression) -> set[str]:
    """Names the query defines itself: column aliases and CTE/derived-table column lists."""
    names = {a.alias.casefold() for a in tree.find_all(exp.Alias) if a.alias}
    for ta in tree.find_all(exp.TableAlias):
        names |= {c.name.casefold() for c in ta.columns}
    return names


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
