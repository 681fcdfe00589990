"""The warehouse and slicing layer: which rows are held out, and which rows each agent gets.

Everything here is trusted pipeline code running SQL it wrote itself (SQLAlchemy Core and
text with bound parameters); agents never call it directly.

* **Hash.** `stable_hash(v)` = the first 32 bits of md5(str(v)), unsigned. The same number
  comes from SQL: SQLite gets a registered function `posttrain_hash(x)` (see `make_engine`),
  PostgreSQL an md5 expression (`hash_sql`).
* **Holdout.** A row is held out for evaluation iff `stable_hash(id) % 10000 <
  round(holdout_fraction * 10000)`. It is decided first, by id alone, so it is the same on
  every backend holding the same ids, and held-out rows are in no slice.
* **Slices.** `plan_slices` cuts the remaining rows by a column's values (`group_by`) or by
  hash buckets (`hash`). A part over `max_rows_per_slice` rows is split into
  ceil(n / cap) near-equal id ranges, found in one window query. A slice is a small
  `SliceDescriptor`: a SELECT of exactly its rows with bound params and a row count, never
  the rows themselves.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import hashlib
import math
import re
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.engine import Connection, Dialect, Engine

from agents.gates import row_key
from flows.render import render_completion, render_prompt
from flows.spec import Spec

__all__ = [
    "HASH_MODULUS",
    "SliceDescriptor",
    "WarehouseError",
    "fetch_eval_rows",
    "fetch_slice_row",
    "fetch_slice_rows",
    "hash_sql",
    "holdout_predicate",
    "make_engine",
    "plan_slices",
    "render_completion",
    "render_prompt",
    "stable_hash",
    "without_rows",
]

HASH_MODULUS = 10000  # holdout resolution: fractions are rounded to 1/10000
NULL_TEXT = "<null>"  # how a NULL group value is written in a slice id


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


def _not_holdout(spec: Spec, engine: Engine | Connection) -> tuple[str, dict]:
    return f"{_holdout_expr(spec, engine)} >= :pt_holdout_cut", {"pt_holdout_cut": _holdout_cut(spec)}


def fetch_eval_rows(spec: Spec, engine: Engine) -> list[dict]:
    """The held-out rows (trusted read): id, the template columns and the gold column, by id."""
    id_col = spec.slicing.id_column
    cols = list(dict.fromkeys([id_col, *spec.task.template_columns(), spec.task.gold_column]))
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
        return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]


# ── slices ───────────────────────────────────────────────────────────────────────────────────
class SliceDescriptor(BaseModel):
    """One agent's share of the table: a query for its rows, never the rows themselves."""

    slice_id: str = Field(description="Human-readable, stable id, e.g. 'region=uk#2'.")
    key: dict = Field(description="What the slice is: the group value or bucket, and its part.")
    table: str = Field(description="The sliced table.")
    id_column: str = Field(description="The table's id column.")
    columns: list[str] = Field(description="The allow-listed columns the SQL selects.")
    sql: str = Field(
        description="A trusted SELECT of exactly the slice's rows (all allow-listed columns, "
        "no ORDER BY), with :named params; usable as a CTE body."
    )
    params: dict = Field(description="Bound parameters of `sql` (JSON values).")
    row_count: int = Field(description="Rows in the slice when it was planned.")


def _json_value(v: Any) -> Any:
    """Group values become JSON primitives, so descriptors serialise and re-bind the same."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (dt.date, dt.datetime, dt.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        raise WarehouseError("slicing.column: binary columns cannot be grouped by")
    return str(v)


def _split_sizes(n: int, cap: int) -> list[int]:
    """n rows in ceil(n/cap) parts whose sizes differ by at most one."""
    k = max(1, math.ceil(n / cap))
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _part_bounds(
    conn: Connection, table: str, id_col: str, cond: str, params: dict, offsets: list[int]
) -> list[Any]:
    """The ids at the given 0-based positions (in id order) among rows matching cond."""
    sql = sa.text(
        f"SELECT pt_id FROM (SELECT {id_col} AS pt_id, ROW_NUMBER() OVER (ORDER BY {id_col}) - 1"
        f" AS pt_pos FROM {table} WHERE {cond}) pt_ranked WHERE pt_pos IN :pt_offsets"
        " ORDER BY pt_pos"
    ).bindparams(sa.bindparam("pt_offsets", expanding=True))
    ids = conn.execute(sql, {**params, "pt_offsets": offsets}).scalars().all()
    if len(ids) != len(offsets):
        raise WarehouseError("the warehouse changed while slices were being planned; plan again")
    return list(ids)


def _descriptors_for_part(
    spec: Spec,
    conn: Connection,
    base_id: str,
    key: dict,
    cond: str,
    params: dict,
    n: int,
) -> list[SliceDescriptor]:
    """One descriptor, or several disjoint id ranges when n is over the row cap."""
    table, id_col = _q(conn, spec.slicing.table), _q(conn, spec.slicing.id_column)
    select = f"SELECT {', '.join(_q(conn, c) for c in spec.allowed_columns)} FROM {table}"
    sizes = _split_sizes(n, spec.slicing.max_rows_per_slice)
    common = {"table": spec.slicing.table, "id_column": spec.slicing.id_column,
              "columns": list(spec.allowed_columns)}
    if len(sizes) == 1:
        return [SliceDescriptor(slice_id=base_id, key={**key, "part": 1, "parts": 1},
                                sql=f"{select} WHERE {cond}", params=params, row_count=n, **common)]
    offsets = [sum(sizes[:i]) for i in range(1, len(sizes))]
    bounds = _part_bounds(conn, table, id_col, cond, params, offsets)
    out = []
    for i, size in enumerate(sizes):
        part_cond, part_params = cond, dict(params)
        if i > 0:
            part_cond += f" AND {id_col} >= :pt_id_lo"
            part_params["pt_id_lo"] = bounds[i - 1]
        if i < len(sizes) - 1:
            part_cond += f" AND {id_col} < :pt_id_hi"
            part_params["pt_id_hi"] = bounds[i]
        out.append(SliceDescriptor(
            slice_id=f"{base_id}#{i + 1}", key={**key, "part": i + 1, "parts": len(sizes)},
            sql=f"{select} WHERE {part_cond}", params=part_params, row_count=size, **common,
        ))
    return out


def _sort_key(value: Any) -> tuple:
    # NULL group first, then by value (by type name first, should a column mix types)
    return (value is not None, type(value).__name__, value)


def plan_slices(spec: Spec, engine: Engine) -> list[SliceDescriptor]:
    """Cut the non-held-out rows into slices, in a deterministic order (first N if max_slices)."""
    s = spec.slicing
    with engine.connect() as conn:
        table, id_col = _q(conn, s.table), _q(conn, s.id_column)
        keep, keep_params = _not_holdout(spec, conn)
        plan: list[tuple[str, dict, str, dict, int]] = []  # (slice id, key, cond, params, n)
        if s.method == "group_by":
            col = _q(conn, s.column)
            rows = conn.execute(
                sa.text(f"SELECT {col}, count(*) FROM {table} WHERE {keep} GROUP BY {col}"),
                keep_params,
            ).all()
            for value, n in sorted(rows, key=lambda r: _sort_key(r[0])):
                value = _json_value(value)
                text = NULL_TEXT if value is None else str(value)
                if value is None:
                    cond, params = f"{col} IS NULL AND {keep}", dict(keep_params)
                else:
                    cond, params = f"{col} = :pt_value AND {keep}", {**keep_params, "pt_value": value}
                plan.append((f"{s.column}={text}", {s.column: value}, cond, params, n))
        else:
            bucket = f"{hash_sql(conn, id_col)} % :pt_buckets"
            rows = conn.execute(
                sa.text(f"SELECT {bucket}, count(*) FROM {table} WHERE {keep} GROUP BY 1"),
                {**keep_params, "pt_buckets": s.buckets},
            ).all()
            for b, n in sorted(rows, key=lambda r: int(r[0])):
                params = {**keep_params, "pt_buckets": s.buckets, "pt_bucket": int(b)}
                plan.append((f"bucket={int(b)}", {"bucket": int(b)},
                             f"{bucket} = :pt_bucket AND {keep}", params, n))
        out: list[SliceDescriptor] = []
        for slice_id, key, cond, params, n in plan:
            out.extend(_descriptors_for_part(spec, conn, slice_id, key, cond, params, n))
            if spec.generation.max_slices and len(out) >= spec.generation.max_slices:
                return out[: spec.generation.max_slices]
        return out


# how a row id is compared, the gate's rule: 42, 42.0, "42" and " 42 " are the same row
_normalise_row_id = row_key


# ── trusted row lookups, by the id column's own type ─────────────────────────────────────────
LOOKUP_CHUNK = 500  # ids per lookup query
_INT64 = (-(2**63), 2**63 - 1)
_INT_TEXT = re.compile(r"-?[0-9]+")
_ID_KINDS: dict[tuple[str, str, str], str] = {}  # (engine url, table, id column) -> kind


def _id_kind(engine: Engine | Connection, table: str, id_column: str) -> str:
    """How ids compare with the id column uncast: "int", "str", or "cast" (the column's type is
    unknown or neither, so ids are compared as text, `CAST(id AS TEXT)`: correct, but no index).

    Found once per (engine url, table, id column) by reflection and cached; an in-memory
    SQLite database is reflected each time (two engines may share its URL, not its tables)."""
    url = engine.engine.url
    key = (url.render_as_string(hide_password=True), table, id_column)
    kind = _ID_KINDS.get(key)
    if kind is not None:
        return kind
    try:
        columns = sa.inspect(engine).get_columns(table)
    except sa.exc.NoSuchTableError:
        return "cast"  # not cached: the table may appear later; the query will say what is wrong
    match = [c for c in columns if c["name"] == id_column] or \
            [c for c in columns if c["name"].lower() == id_column.lower()]
    kind = "cast"
    if match:
        try:
            python_type = match[0]["type"].python_type
        except NotImplementedError:  # NullType: an untyped SQLite column, an unknown type
            python_type = None
        if python_type is int:
            kind = "int"
        elif python_type is str:
            kind = "str"
    memory = url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory")
    if not memory:
        _ID_KINDS[key] = kind
    return kind


def _typed_id(kind: str, row_id: Any) -> int | str | None:
    """The id as the id column's type, or None where no row can have it (never raises).

    An id matches exactly when its text (`_normalise_row_id`) equals the stored id's text, as
    the old text comparison had it: for an integer column 42, "42", " 42 " and 42.0 are 42;
    "042", "4.5", "abc", True and ids beyond 64 bits are nothing."""
    if isinstance(row_id, bool):
        return None
    text = _normalise_row_id(row_id)
    if kind != "int":
        return text
    if not _INT_TEXT.fullmatch(text):
        return None
    value = int(text)
    return value if str(value) == text and _INT64[0] <= value <= _INT64[1] else None


def _id_condition(engine: Engine | Connection, alias: str, slice: SliceDescriptor,
                  negate: bool = False) -> tuple[str, str]:
    """(SQL `alias.id [NOT] IN :pt_row_ids`, id kind): uncast for an int or text column, so
    the primary key index serves it; CAST to text where the column's type is unknown."""
    kind = _id_kind(engine, slice.table, slice.id_column)
    col = f"{alias}.{_q(engine, slice.id_column)}"
    if kind == "cast":
        col = f"CAST({col} AS TEXT)"
    return f"{col} {'NOT IN' if negate else 'IN'}", kind


def _lookup_query(engine: Engine | Connection, slice: SliceDescriptor) -> tuple[sa.TextClause, str]:
    """The lookup query (expanding param `pt_row_ids`, the slice's own params) and id kind.

    The id condition sits outside the slice's subquery; both SQLite and PostgreSQL pull the
    subquery up, so the planner finds the rows by primary key first and evaluates the slice's
    predicate (the holdout hash, the group, the id range) on those rows only."""
    cond, kind = _id_condition(engine, "pt_slice", slice)
    sql = sa.text(f"SELECT * FROM ({slice.sql}) pt_slice WHERE {cond} :pt_row_ids")
    return sql.bindparams(sa.bindparam("pt_row_ids", expanding=True)), kind


def fetch_slice_rows(engine: Engine, slice: SliceDescriptor, row_ids: Iterable[Any]
                     ) -> dict[str, dict]:
    """The slice's rows among these ids (allow-listed columns), keyed by
    `_normalise_row_id(row's id)`; ids that are not in the slice (held out, another slice's,
    absent, junk) are simply missing. An id matches when its text matches the row id's text,
    so 42, "42", " 42 " and 42.0 find row 42 (as an LLM may write it), but the comparison is
    on the id column's own type: one primary-key lookup per id, in one query per
    `LOOKUP_CHUNK` ids, and the slice's predicate runs on the rows found only."""
    sql, kind = _lookup_query(engine, slice)
    ids = list(dict.fromkeys(t for t in (_typed_id(kind, r) for r in row_ids) if t is not None))
    out: dict[str, dict] = {}
    if not ids:
        return out
    with engine.connect() as conn:
        for i in range(0, len(ids), LOOKUP_CHUNK):
            params = {**slice.params, "pt_row_ids": ids[i:i + LOOKUP_CHUNK]}
            for row in conn.execute(sql, params).mappings():
                out[_normalise_row_id(row[slice.id_column])] = dict(row)
    return out


def fetch_slice_row(engine: Engine, slice: SliceDescriptor, row_id: Any) -> dict | None:
    """The row with this id if it belongs to the slice (allow-listed columns), else None.

    42 and "42" (as an LLM may write it) find the same row: see `fetch_slice_rows`."""
    return next(iter(fetch_slice_rows(engine, slice, [row_id]).values()), None)


def without_rows(slice: SliceDescriptor, row_ids: list[str], slice_id: str,
                 engine: Engine) -> SliceDescriptor:
    """The same slice minus rows already labelled: the share a top-up agent works on.

    The ids are bound as named params of the id column's type (a descriptor's params are
    JSON), compared with the column uncast; `row_count` drops by the rows of the slice among
    them (found by `fetch_slice_rows`), so ids given twice or not in the slice count nothing."""
    cond, kind = _id_condition(engine, "pt_base", slice, negate=True)
    typed = {t for t in (_typed_id(kind, r) for r in row_ids) if t is not None}
    params = dict(slice.params)
    first = sum(k.startswith("pt_done_") for k in params)  # a top-up of a top-up: new names
    names = []
    for i, rid in enumerate(sorted(typed), start=first):
        params[f"pt_done_{i}"] = rid
        names.append(f":pt_done_{i}")
    where = f" WHERE {cond} ({', '.join(names)})" if names else ""
    removed = len(fetch_slice_rows(engine, slice, sorted(typed))) if typed else 0
    return slice.model_copy(update={
        "slice_id": slice_id,
        "key": {**slice.key, "topup": slice_id},
        "sql": f"SELECT * FROM ({slice.sql}) pt_base{where}",
        "params": params,
        "row_count": slice.row_count - removed,
    })


@functools.cache
def shared_engine(url: str) -> Engine:
    """One engine (one connection pool) per warehouse URL per process, for the flow's tasks."""
    return make_engine(url)
