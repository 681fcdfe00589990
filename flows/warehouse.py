"""The warehouse layer: the hash and which rows are held out for evaluation.

Everything here is trusted pipeline code running SQL it wrote itself (SQLAlchemy Core and
text with bound parameters); agents never call it directly. Which rows each agent gets, and
the reads of a slice's rows by primary key, are in flows/slicing.py.

* **Hash.** `stable_hash(v)` = the first 32 bits of md5(str(v)), unsigned. The same number
  comes from SQL: SQLite gets a registered function `posttrain_hash(x)` (see `make_engine`),
  PostgreSQL an md5 expression (`hash_sql`).
* **Holdout.** A row is held out for evaluation iff `stable_hash(id) % 10000 <
  round(holdout_fraction * 10000)`. It is decided first, by id alone, so it is the same on
  every backend holding the same ids, and held-out rows are in no slice.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine

from flows.render import render_completion, render_prompt
from flows.spec import Spec

__all__ = [
    "HASH_MODULUS",
    "WarehouseError",
    "fetch_eval_rows",
    "hash_sql",
    "holdout_predicate",
    "iter_eval_rows",
    "make_engine",
    "render_completion",
    "render_prompt",
    "stable_hash",
]

HASH_MODULUS = 10000  # holdout resolution: fractions are rounded to 1/10000
NULL_TEXT = "<null>"  # how a NULL group value is written in a slice id
# rows read per round trip when streaming the table (the eval rows; planning, which also
# writes its member rows in batches of this size: flows/slicing.py)
PLAN_BATCH = 20_000


class WarehouseError(ValueError):
    """A warehouse the pipeline cannot use (unsupported dialect, bad column...)."""


# ── the hash, in Python and in SQL ───────────────────────────────────────────────────────────
def stable_hash(value: Any) -> int:
    """First 32 bits of md5(str(value)) as an unsigned int: equal to `hash_sql` in SQL."""
    return int(hashlib.md5(str(value).encode()).hexdigest()[:8], 16)


def _sqlite_hash(value: Any) -> int | None:
    return None if value is None else stable_hash(value)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A SQLAlchemy engine for the warehouse; SQLite connections get `posttrain_hash(x)`."""
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _register_hash(dbapi_conn, _record):
            dbapi_conn.create_function("posttrain_hash", 1, _sqlite_hash, deterministic=True)

    return engine


def _dialect(engine_or_dialect: Engine | Connection | Dialect | str) -> str:
    if isinstance(engine_or_dialect, str):
        return engine_or_dialect
    if isinstance(engine_or_dialect, Dialect):
        return engine_or_dialect.name
    return engine_or_dialect.dialect.name


def hash_sql(engine_or_dialect: Engine | Connection | Dialect | str, column_sql: str) -> str:
    """SQL for stable_hash(column) in this dialect (an unsigned 32-bit integer)."""
    name = _dialect(engine_or_dialect)
    if name == "sqlite":
        return f"posttrain_hash({column_sql})"
    if name == "postgresql":
        # bit(32) -> bigint keeps the bits right-aligned in 64, so the result is unsigned.
        return f"(('x' || substr(md5(CAST({column_sql} AS TEXT)), 1, 8))::bit(32)::bigint)"
    raise WarehouseError(
        f"warehouse dialect {name!r} is not supported for hashing/slicing "
        "(supported: sqlite, postgresql)"
    )


def _q(engine: Engine | Connection, name: str) -> str:
    return engine.dialect.identifier_preparer.quote(name)


# ── has the data changed? ────────────────────────────────────────────────────────────────────
def data_fingerprint(spec: Spec, engine: Engine) -> str:
    """`rows:hexsum`: the row count and the sum of a hash of every row's allow-listed and gold
    columns. Rows added, removed or edited change it (barring a 32-bit hash collision that
    also balances the sum); the order rows are stored in does not. One full scan."""
    columns = [*spec.allowed_columns, spec.task.gold_column]
    row = " || '|' || ".join(f"COALESCE(CAST({_q(engine, c)} AS TEXT), '')" for c in columns)
    sql = (f"SELECT count(*), COALESCE(sum({hash_sql(engine, row)}), 0) "
           f"FROM {_q(engine, spec.slicing.table)}")
    with engine.connect() as conn:
        n, total = conn.execute(sa.text(sql)).one()
    return f"{int(n)}:{int(total):x}"


# ── the evaluation holdout ───────────────────────────────────────────────────────────────────
def _holdout_cut(spec: Spec) -> int:
    return round(spec.evaluation.holdout_fraction * HASH_MODULUS)


def _holdout_expr(spec: Spec, engine: Engine | Connection) -> str:
    return f"{hash_sql(engine, _q(engine, spec.slicing.id_column))} % {HASH_MODULUS}"


def holdout_predicate(spec: Spec, engine: Engine | Connection) -> tuple[str, dict]:
    """(SQL condition true exactly for held-out rows, its params) over the slicing table."""
    return f"{_holdout_expr(spec, engine)} < :pt_holdout_cut", {"pt_holdout_cut": _holdout_cut(spec)}


def iter_eval_rows(spec: Spec, engine: Engine) -> Iterator[dict]:
    """The held-out rows (trusted read), streamed in batches, by id: id, the template columns,
    the gold column and the group_by column (figures by slice); at most
    `evaluation.max_rows`."""
    id_col = spec.slicing.id_column
    group = [spec.slicing.column] if spec.slicing.method == "group_by" else []  # by_slice
    cols = list(dict.fromkeys([id_col, *spec.task.template_columns(), spec.task.gold_column,
                               *group]))
    cols = [c for c in cols if c]
    cond, params = holdout_predicate(spec, engine)
    sql = (
        f"SELECT {', '.join(_q(engine, c) for c in cols)} FROM {_q(engine, spec.slicing.table)}"
        f" WHERE {cond} ORDER BY {_q(engine, id_col)}"
    )
    if spec.evaluation.max_rows:
        sql += " LIMIT :pt_max_rows"
        params["pt_max_rows"] = spec.evaluation.max_rows
    with engine.connect() as conn:
        for row in conn.execution_options(yield_per=PLAN_BATCH).execute(sa.text(sql), params):
            yield dict(row._mapping)


def fetch_eval_rows(spec: Spec, engine: Engine) -> list[dict]:
    """The held-out rows (trusted read), as a list: see `iter_eval_rows`."""
    return list(iter_eval_rows(spec, engine))


@functools.cache
def shared_engine(url: str) -> Engine:
    """One engine (one connection pool) per warehouse URL per process, for the flow's tasks."""
    return make_engine(url)

