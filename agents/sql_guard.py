"""Layer 1 of the SQL tool's defence: a sqlglot check of an agent's query before it runs.

Agents read their slice through SQL they write themselves, so the SQL is untrusted. Two
layers stand between it and the warehouse; either alone should hold:

1. **This module** (`check`): parse the query with sqlglot in the warehouse's dialect and
   accept it only if every node of its tree is on an allow-list of read-only constructs:
   exactly one statement; a SELECT / UNION / INTERSECT / EXCEPT at the root (CTEs allowed,
   recursive ones not, even without the RECURSIVE keyword, which SQLite doesn't need); no
   DML, DDL, commands (sqlglot's fallback for syntax it doesn't know, e.g. `VACUUM INTO`,
   `RESET ROLE`), SELECT INTO, FOR UPDATE, SET, PRAGMA, ATTACH, transactions, anywhere in
   the tree; only allow-listed functions (`ALLOWED_FUNCTIONS`); no table-valued functions;
   only allow-listed tables (plus the query's own CTEs), never schema-qualified; only
   allow-listed columns (plus aliases the query defines), as `column` or `t.column` where
   `t` is an allowed table, a CTE or an alias of the query (never `schema.t.column`); no
   bind parameters; no cross joins (every JOIN needs ON on columns, or USING). Identifiers are normalised with sqlglot's optimizer for the dialect (PostgreSQL
   folds unquoted names to lower case and keeps quoted ones; SQLite ignores case), so
   `"TOPIC"` and `topic` resolve as the database would resolve them. The SQL that runs is
   *generated from the checked tree* (comments dropped, a LIMIT enforced), never the
   agent's text, so what was checked is what runs.
2. **The connection** (`agents.sql_tool`): SQLite runs the query under an authorizer that
   permits only SELECT, reads through the trusted slice, and allow-listed functions, with
   no attached databases and a deadline; PostgreSQL runs it in a READ ONLY transaction as
   a role that may SELECT only the allowed columns, under a statement timeout.

`SELECT *` is allowed: the tool points the agent's table name at a view of its slice that
has only the allowed columns, so `*` can never reach the gold column.

The allow- and deny-lists, the limits and the refusal codes (`CODES`) live in
`agents.sql_allowlist`, with why functions are an allow-list, not a deny-list; this module
is the parse, the walk over the tree and the LIMIT.
"""

from __future__ import annotations

import re

import sqlglot
from sqlglot import exp
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from agents.sql_allowlist import (
    ALLOWED_FUNCTIONS,
    ANONYMOUS_FUNCTIONS,
    BIND_PREFIXES,
    CONTROL_CHARS,
    FORBIDDEN,
    FUNCTION_NODES,
    INTERNAL_PREFIX,
    MAX_SQL_CHARS,
    MAX_TABLE_REFERENCES,
    QUERY_ROOTS,
    STRUCTURE,
    VAR_PARENTS,
)

__all__ = [
    "SQLRejected",
    "check",
    "check_tree",
    "enforce_limit",
    "generate",
    "normalized_name",
    "sqlglot_dialect",
]

# SQLAlchemy dialect name -> sqlglot dialect name, where they differ.
_SA_TO_SQLGLOT = {"postgresql": "postgres", "mssql": "tsql"}


class SQLRejected(Exception):
    """The agent's SQL was refused. `reason` says what to change; `code` is a key of
    `agents.sql_allowlist.CODES`."""

    def __init__(self, reason: str, code: str = "construct"):
        super().__init__(reason)
        self.reason = reason
        self.code = code


def sqlglot_dialect(name: str | None) -> str | None:
    """sqlglot's dialect for a SQLAlchemy or sqlglot dialect name (None: sqlglot's generic)."""
    if not name:
        return None
    name = _SA_TO_SQLGLOT.get(name, name)
    return name if name in sqlglot.Dialect.classes else None


def normalized_name(name: str, dialect: str | None) -> str:
    """A real (case-exact) table or column name as the dialect compares it (as if quoted)."""
    ident = normalize_identifiers(exp.to_identifier(name, quoted=True), dialect=dialect)
    return ident.name


# ── parsing ──────────────────────────────────────────────────────────────────────────────
def _parse_one(sql: str, dialect: str | None) -> exp.Expression:
    if not isinstance(sql, str) or not sql.strip():
        raise SQLRejected("the query is empty; send one SELECT statement", "empty")
    if len(sql) > MAX_SQL_CHARS:
        raise SQLRejected(
            f"the query is {len(sql)} characters; keep it under {MAX_SQL_CHARS}", "too_long"
        )
    bad = CONTROL_CHARS.search(sql)
    if bad:
        raise SQLRejected(
            f"the query contains the control character {bad.group()!r}; remove it", "parse_error"
        )
    try:
        statements = sqlglot.parse(sql, read=dialect)
    except sqlglot.errors.SqlglotError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SQLRejected(f"the query does not parse: {first}", "parse_error") from None
    # a trailing ';' or comment parses as None / Semicolon: not a statement
    statements = [s for s in statements if s is not None and not isinstance(s, exp.Semicolon)]
    if not statements:
        raise SQLRejected("the query is empty; send one SELECT statement", "empty")
    if len(statements) != 1:
        raise SQLRejected(
            f"send exactly one SQL statement, got {len(statements)}; drop extra ';' parts",
            "multiple_statements",
        )
    return statements[0]


def _root_kind(tree: exp.Expression) -> str:
    if isinstance(tree, exp.Command):
        return tree.name.upper() or "a command"
    return tree.key.upper()


def _check_forbidden(tree: exp.Expression) -> None:
    if not isinstance(tree, QUERY_ROOTS):
        raise SQLRejected(
            f"only SELECT queries are allowed; got {_root_kind(tree)}. The tool is read-only",
            "not_select",
        )
    for node in tree.walk():
        if isinstance(node, FORBIDDEN):
            raise SQLRejected(
                f"{_root_kind(node)} is not allowed anywhere in a query (here inside a "
                "CTE, subquery or clause); only read with SELECT",
                "forbidden",
            )
        if isinstance(node, (exp.Placeholder, exp.Parameter)) or (
            isinstance(node, exp.Identifier) and node.name.startswith(BIND_PREFIXES)
        ):
            raise SQLRejected(
                "bind parameters are not supported; write literal values", "bind_parameter"
            )


def _check_ctes(tree: exp.Expression, tables: set[str]) -> set[str]:
    """The query's CTE names; refuses recursive CTEs and names that shadow tables."""
    names: set[str] = set()
    for with_ in tree.find_all(exp.With):
        if with_.args.get("recursive"):
            raise SQLRejected("recursive CTEs are not allowed; use a plain WITH",
                              "recursive_cte")
        ctes = list(with_.expressions)
        for i, cte in enumerate(ctes):
            name = cte.alias_or_name
            if name in tables or name.casefold().startswith(INTERNAL_PREFIX):
                raise SQLRejected(
                    f"a CTE may not be named {name!r} (a table's name, or starting with "
                    f"{INTERNAL_PREFIX}); rename it", "cte_name",
                )
            later = {c.alias_or_name for c in ctes[i:]}
            if any(t.name in later for t in cte.this.find_all(exp.Table)):
                raise SQLRejected(
                    f"CTE {name!r} refers to itself or to a later CTE (recursion); a CTE "
                    "may only read tables and the CTEs before it", "recursive_cte",
                )
            names.add(name)
    return names


def _defined_names(tree: exp.Expression) -> tuple[set[str], set[str]]:
    """(column aliases the query defines, table aliases it defines)."""
    columns = {a.alias for a in tree.find_all(exp.Alias) if a.alias}
    tables = set()
    for ta in tree.find_all(exp.TableAlias):
        if ta.name:
            tables.add(ta.name)
        columns |= {c.name for c in ta.columns}
    return columns, tables


# ── the walk ─────────────────────────────────────────────────────────────────────────────
def _function_name(node: exp.Func) -> str:
    return node.name if isinstance(node, exp.Anonymous) else node.sql_name()


def _check_function(node: exp.Func) -> None:
    allowed = (
        node.name.casefold() in ANONYMOUS_FUNCTIONS
        if isinstance(node, exp.Anonymous)
        else type(node) in FUNCTION_NODES
    )
    if not allowed:
        raise SQLRejected(
            f"function {_function_name(node).lower()}() is not allowed; allowed functions: "
            f"{', '.join(ALLOWED_FUNCTIONS)}", "function",
        )


def _check_table(t: exp.Table, tables: dict[str, list[str]], ctes: set[str]) -> None:
    readable = ", ".join(sorted(tables))
    if not isinstance(t.this, exp.Identifier):
        raise SQLRejected(
            f"table-valued functions are not allowed in FROM; read from {readable}",
            "table_function",
        )
    if t.args.get("db") or t.args.get("catalog"):
        raise SQLRejected(
            f"qualified table names ({t.sql()}) are not allowed; write just the table "
            f"name ({readable})", "qualified_name",
        )
    if t.name not in tables and t.name not in ctes:
        raise SQLRejected(
            f"table {t.name!r} is not readable; readable tables: {readable}", "table"
        )


def _check_column(col: exp.Column, ctx: dict) -> None:
    if col.args.get("db") or col.args.get("catalog"):
        raise SQLRejected(
            f"qualified names ({col.sql()}) are not allowed; write column or table.column",
            "qualified_name",
        )
    if col.table and col.table not in ctx["qualifiers"]:
        raise SQLRejected(
            f"{col.table!r} in {col.sql()} is not a table or alias of this query",
            "qualified_name",
        )
    if isinstance(col.this, exp.Star) or col.name in ctx["columns"]:
        return
    detail = "; ".join(
        f"readable columns of {t}: {', '.join(cs)}" for t, cs in ctx["tables"].items()
    )
    hint = ""
    if isinstance(col.this, exp.Identifier) and col.this.quoted:
        hint = " (double quotes name a column; strings take single quotes: 'value')"
        if ctx["dialect"] == "postgres":
            hint = " (double-quoted names are case-sensitive; strings take single quotes)"
    raise SQLRejected(f"column {col.name!r} is not readable{hint}; {detail}", "column")


def _check_source(node: exp.Expression, ctx: dict) -> None:
    """What the query reads from: tables, table functions, joins."""
    if isinstance(node, exp.Table):
        _check_table(node, ctx["tables"], ctx["ctes"])
    elif isinstance(node, (exp.Unnest, exp.Lateral)):
        raise SQLRejected("UNNEST and LATERAL are not allowed; read from the table",
                          "table_function")
    elif isinstance(node, exp.Join) and not _joins_on_columns(node):
        raise SQLRejected(
            "every join needs ON <a condition on columns> or USING (write JOIN t ON ...; "
            "comma and cross joins multiply rows past any limit)", "cross_join",
        )


def _joins_on_columns(join: exp.Join) -> bool:
    on = join.args.get("on")
    if join.args.get("using") or join.method == "NATURAL":
        return True
    # sqlglot reads SQLite's bare `JOIN t` as `ON TRUE`; `ON 1 = 1` is a cross join too
    return on is not None and on.find(exp.Column) is not None


def _check_node(node: exp.Expression, ctx: dict) -> None:
    """Everything else: columns, functions, and that the node is on the allow-list."""
    if isinstance(node, exp.Column):
        _check_column(node, ctx)
    elif isinstance(node, exp.Star) and any(node.args.values()):
        raise SQLRejected("SELECT * with EXCEPT/REPLACE is not supported", "construct")
    elif isinstance(node, exp.Var):
        if not isinstance(node.parent, VAR_PARENTS):
            raise SQLRejected(f"{node.sql()!r} is not allowed here", "construct")
        return
    if isinstance(node, exp.Func) and not isinstance(node, STRUCTURE):
        _check_function(node)
    elif not isinstance(node, (STRUCTURE, exp.Func)):
        raise SQLRejected(
            f"{node.key.upper()} is not supported; write a plain SELECT "
            "(LIMIT rather than FETCH, no arrays, no hints)", "construct",
        )


def check_tree(
    sql: str, allowed_tables: dict[str, list[str]], dialect: str | None
) -> exp.Query:
    """Parse and check `sql`; return its normalised tree or raise SQLRejected."""
    try:
        return _check_tree(sql, allowed_tables, sqlglot_dialect(dialect))
    except RecursionError:
        raise SQLRejected("the query is nested too deeply; flatten it", "parse_error") from None


def _check_tree(
    sql: str, allowed_tables: dict[str, list[str]], dialect: str | None
) -> exp.Query:
    tree = _parse_one(sql, dialect)
    _check_forbidden(tree)
    tree = normalize_identifiers(tree, dialect=dialect)
    tables = {
        normalized_name(t, dialect): [normalized_name(c, dialect) for c in cols]
        for t, cols in allowed_tables.items()
    }
    ctes = _check_ctes(tree, set(tables))
    aliases, table_aliases = _defined_names(tree)
    n_tables = sum(1 for _ in tree.find_all(exp.Table))
    if n_tables > MAX_TABLE_REFERENCES:
        raise SQLRejected(
            f"the query reads {n_tables} tables; use at most {MAX_TABLE_REFERENCES}",
            "too_many_tables",
        )
    ctx = {
        "dialect": dialect,
        "tables": tables,
        "ctes": ctes,
        "qualifiers": set(tables) | ctes | table_aliases,
        "columns": {c for cols in tables.values() for c in cols} | aliases,
    }
    for node in tree.walk():
        _check_source(node, ctx)
    for node in tree.walk():
        _check_node(node, ctx)
    return tree


# ── the limit ────────────────────────────────────────────────────────────────────────────
_DIGITS = re.compile(r"^\d+$")


def enforce_limit(tree: exp.Query, row_limit: int) -> exp.Query:
    """The query returning at most row_limit rows: min(its own LIMIT, row_limit)."""
    limit = tree.args.get("limit")
    if limit is None:
        return tree.limit(row_limit, copy=False)
    value = limit.expression
    if isinstance(value, exp.Literal) and not value.is_string and _DIGITS.match(value.this):
        limit.set("expression", exp.Literal.number(min(int(value.this), row_limit)))
        return tree
    # a computed or negative LIMIT (SQLite reads LIMIT -1 as no limit): cap it outside
    return exp.select("*").from_(tree.subquery(f"{INTERNAL_PREFIX}q")).limit(row_limit)


def check(
    sql: str, allowed_tables: dict[str, list[str]], dialect: str | None, row_limit: int = 200
) -> str:
    """The SQL to run for `sql` (checked, comments dropped, LIMIT at most row_limit).

    Raises SQLRejected (with `.code` and an actionable `.reason`) when the query is
    refused. `allowed_tables` maps each readable table to its readable columns;
    `dialect` is a sqlglot or SQLAlchemy dialect name."""
    if row_limit < 1:
        raise ValueError("row_limit must be at least 1")
    tree = enforce_limit(check_tree(sql, allowed_tables, dialect), row_limit)
    return generate(tree, dialect)


def generate(tree: exp.Expression, dialect: str | None) -> str:
    """SQL text for a checked tree, without comments (raises SQLRejected if too deep)."""
    try:
        return tree.sql(dialect=sqlglot_dialect(dialect), comments=False)
    except RecursionError:
        raise SQLRejected("the query is nested too deeply; flatten it", "parse_error") from None
