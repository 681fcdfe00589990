"""Slices: which rows each agent gets, where their ids are kept, and the trusted reads of a
slice's rows. Trusted pipeline code, like flows/warehouse.py (SQL it wrote itself, with bound
parameters); agents never call it directly.

* **Plans.** `plan_slices` cuts the rows that are not held out (flows/warehouse.py) by a
  column's values (`group_by`) or by hash buckets (`hash`), in one pass over (id, group) in id
  order: the holdout and bucket are computed there, once, and every slice's row ids are
  written to a member store (the example store in a run). A part over `max_rows_per_slice`
  rows is split into ceil(n / cap) near-equal id ranges. A slice is a small
  `SliceDescriptor`: where its ids are and how many, never the rows themselves.
* **Reads.** Every later read is by primary key: an agent's view of its slice
  (`slice_source`: its ids bound as one JSON array), the gate's row lookups
  (`fetch_slice_rows`), retries (`without_rows`). No request evaluates the hash, or any
  other predicate, over the table, so a request costs the same at 10 thousand rows or a
  million.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import json
import math
import re
import threading
import uuid
from collections.abc import Iterable
from typing import Any, Protocol

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.engine import Connection, Engine

from agents.gates import row_key
from flows.spec import Spec
from flows.store import shared_store
from flows.warehouse import (
    HASH_MODULUS,
    NULL_TEXT,
    PLAN_BATCH,
    WarehouseError,
    _dialect,
    _holdout_cut,
    _q,
    stable_hash,
)

__all__ = [
    "MemberStore",
    "MembersRef",
    "MemoryMembers",
    "SliceDescriptor",
    "fetch_slice_row",
    "fetch_slice_rows",
    "member_store",
    "only_rows",
    "plan_slices",
    "slice_members",
    "slice_source",
    "without_rows",
]


# ── slices ───────────────────────────────────────────────────────────────────────────────────
class MembersRef(BaseModel):
    """Where a slice's row ids are: positions lo..hi-1 (in id order) of part `part` of plan
    `plan_id`, in the member store at `url` (the example store's URL, or `memory:<id>` for a
    plan kept in one process's memory)."""

    url: str
    plan_id: str
    part: str
    lo: int
    hi: int


class SliceDescriptor(BaseModel):
    """One agent's share of the table: where its row ids are, never the rows themselves."""

    slice_id: str = Field(description="Human-readable, stable id, e.g. 'region=uk#2'.")
    key: dict = Field(description="What the slice is: the group value or bucket, and its part.")
    table: str = Field(description="The sliced table.")
    id_column: str = Field(description="The table's id column.")
    columns: list[str] = Field(description="The allow-listed columns the slice exposes.")
    members: MembersRef = Field(description="The slice's row ids, decided at planning.")
    row_count: int = Field(description="Rows in the slice.")


class MemberStore(Protocol):
    """Where plans keep their slices' row ids (`flows.store.Store` is one)."""

    url: str

    def add_members(self, plan_id: str, chunks: list[tuple[str, int, list[str]]]) -> None:
        """Record chunks (part, position of the first id, ids), in position order per part."""

    def members(self, plan_id: str, part: str, lo: int, hi: int) -> list[str]:
        """The ids at positions lo..hi-1 of the part."""


_MEMORY: dict[str, MemoryMembers] = {}


class MemoryMembers:
    """A member store in this process's memory, for plans made without an example store
    (tests, notebooks); agents in other processes cannot read it."""

    def __init__(self) -> None:
        self.url = f"memory:{uuid.uuid4().hex}"
        self._parts: dict[tuple[str, str], list[str]] = {}
        self._lock = threading.Lock()
        _MEMORY[self.url] = self

    def add_members(self, plan_id: str, chunks: list[tuple[str, int, list[str]]]) -> None:
        with self._lock:
            for part, _first, ids in chunks:  # chunks come in position order
                self._parts.setdefault((plan_id, part), []).extend(ids)

    def members(self, plan_id: str, part: str, lo: int, hi: int) -> list[str]:
        return self._parts.get((plan_id, part), [])[lo:hi]


def member_store(url: str) -> MemberStore:
    """The member store at `url`: this process's memory store, or the example store."""
    if url.startswith("memory:"):
        try:
            return _MEMORY[url]
        except KeyError:
            raise WarehouseError(
                f"slice members at {url} were planned in another process's memory; plan with "
                "the example store (plan_slices(..., members=store)) for agents that run in "
                "other processes") from None
    return shared_store(url)


@functools.lru_cache(maxsize=1024)
def _member_ids(url: str, plan_id: str, part: str, lo: int, hi: int) -> tuple[str, ...]:
    # a plan's parts are written once, under a plan id no other planning reuses: safe to cache
    return tuple(member_store(url).members(plan_id, part, lo, hi))


def slice_members(slice: SliceDescriptor) -> tuple[str, ...]:
    """The slice's row ids (as `row_key` text), in id order: one indexed read, cached."""
    r = slice.members
    return _member_ids(r.url, r.plan_id, r.part, r.lo, r.hi)


@functools.lru_cache(maxsize=1024)
def _member_set(url: str, plan_id: str, part: str, lo: int, hi: int) -> frozenset[str]:
    return frozenset(_member_ids(url, plan_id, part, lo, hi))


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


def _sort_key(value: Any) -> tuple:
    # NULL group first, then by value (by type name first, should a column mix types)
    return (value is not None, type(value).__name__, value)


def plan_slices(spec: Spec, engine: Engine, members: MemberStore | None = None,
                plan_id: str = "plan") -> list[SliceDescriptor]:
    """Cut the non-held-out rows into slices, in a deterministic order (first N if max_slices).

    One pass over (id, group value) in id order, in batches: each row's holdout and hash
    bucket are computed here, in Python, once, and its id is written to `members` (default:
    this process's memory) as the next position of its group or bucket. Memory holds a
    counter per group and one batch, whatever the table's size. A part over
    `max_rows_per_slice` rows becomes ceil(n / cap) slices of consecutive positions, i.e.
    near-equal id ranges. The member ids are stored in chunks (one per group per batch) under `<plan_id>/<random>`, so a second
    planning never overwrites a plan that agents may be reading."""
    s = spec.slicing
    members = members if members is not None else MemoryMembers()
    plan_id = f"{plan_id}/{uuid.uuid4().hex[:12]}"
    cut, by_group = _holdout_cut(spec), s.method == "group_by"
    counts: dict[Any, int] = {}
    pending: dict[Any, list[str]] = {}  # ids read but not yet written, per group or bucket
    buffered = 0
    with engine.connect() as conn:
        table, id_col = _q(conn, s.table), _q(conn, s.id_column)
        group = f", {_q(conn, s.column)}" if by_group else ""
        rows = conn.execution_options(yield_per=PLAN_BATCH).execute(
            sa.text(f"SELECT {id_col}{group} FROM {table} ORDER BY {id_col}"))
        for row in rows:
            h = stable_hash(row[0])
            if h % HASH_MODULUS < cut:
                continue  # held out for evaluation: in no slice
            key = _json_value(row[1]) if by_group else h % s.buckets
            counts[key] = counts.get(key, 0) + 1
            pending.setdefault(key, []).append(row_key(row[0]))
            buffered += 1
            if buffered >= PLAN_BATCH:
                _write_members(spec, members, plan_id, counts, pending)
                buffered = 0
    _write_members(spec, members, plan_id, counts, pending)
    common = {"table": s.table, "id_column": s.id_column, "columns": list(spec.allowed_columns)}
    out: list[SliceDescriptor] = []
    for key in sorted(counts, key=_sort_key):
        base, sizes, lo = _base_id(spec, key), _split_sizes(counts[key], s.max_rows_per_slice), 0
        what = {s.column: key} if by_group else {"bucket": key}
        for i, size in enumerate(sizes):
            out.append(SliceDescriptor(
                slice_id=base if len(sizes) == 1 else f"{base}#{i + 1}",
                key={**what, "part": i + 1, "parts": len(sizes)},
                members=MembersRef(url=members.url, plan_id=plan_id, part=base, lo=lo,
                                   hi=lo + size),
                row_count=size, **common))
            lo += size
            if spec.generation.max_slices and len(out) >= spec.generation.max_slices:
                return out
    return out


def _write_members(spec: Spec, members: MemberStore, plan_id: str, counts: dict[Any, int],
                   pending: dict[Any, list[str]]) -> None:
    """Write each group's pending ids as one chunk, at the positions that follow its last."""
    members.add_members(plan_id, [(_base_id(spec, key), counts[key] - len(ids), ids)
                                  for key, ids in pending.items()])
    pending.clear()


def slice_group(spec: Spec, row: dict) -> str:
    """The slice group a row belongs to (`region=europe`, `bucket=3`): the slice id before a
    big group is split by the row cap. Held-out rows are in no slice, but they have a group,
    so every model's figures can be read by slice (`evaluation.promotion.max_slice_drop`)."""
    s = spec.slicing
    if s.method == "group_by":
        return _base_id(spec, _json_value(row.get(s.column)))
    return _base_id(spec, stable_hash(row[s.id_column]) % s.buckets)


def _base_id(spec: Spec, key: Any) -> str:
    """A group's or bucket's slice id before splitting: 'region=europe', 'bucket=3'."""
    if spec.slicing.method != "group_by":
        return f"bucket={key}"
    return f"{spec.slicing.column}={NULL_TEXT if key is None else key}"


# how a row id is compared, the gate's rule: 42, 42.0, "42" and " 42 " are the same row
_normalise_row_id = row_key


# ── trusted row reads, by the id column's own type ───────────────────────────────────────────
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

    An id matches exactly when its text (`_normalise_row_id`) equals the stored id's text:
    for an integer column 42, "42", " 42 " and 42.0 are 42; "042", "4.5", "abc", True and
    ids beyond 64 bits are nothing."""
    if isinstance(row_id, bool):
        return None
    text = _normalise_row_id(row_id)
    if kind != "int":
        return text
    if not _INT_TEXT.fullmatch(text):
        return None
    value = int(text)
    return value if str(value) == text and _INT64[0] <= value <= _INT64[1] else None


def _id_column_sql(engine: Engine | Connection, slice: SliceDescriptor) -> tuple[str, str]:
    """(the id column as compared: uncast for an int or text column, so the primary key index
    serves it; CAST to text where the column's type is unknown, kind)."""
    kind = _id_kind(engine, slice.table, slice.id_column)
    col = _q(engine, slice.id_column)
    return (f"CAST({col} AS TEXT)" if kind == "cast" else col), kind


def slice_source(engine: Engine, slice: SliceDescriptor) -> tuple[str, dict]:
    """(a trusted SELECT of exactly the slice's rows and allow-listed columns, its params):
    the ids are bound as one JSON array, `:pt_members`, and found by primary key, so reading a
    slice costs its own rows, not the table's. What an agent's SQL tool scopes to."""
    col, kind = _id_column_sql(engine, slice)
    name = _dialect(engine)
    if name == "sqlite":
        where = f"{col} IN (SELECT value FROM json_each(:pt_members))"
    elif name == "postgresql":  # an array, computed once, so the planner always takes the index
        cast = "bigint" if kind == "int" else "text"
        where = (f"{col} = ANY(ARRAY(SELECT CAST(value AS {cast}) FROM "
                 "json_array_elements_text(CAST(:pt_members AS json))))")
    else:
        raise WarehouseError(f"warehouse dialect {name!r} is not supported for slicing "
                             "(supported: sqlite, postgresql)")
    columns = ", ".join(_q(engine, c) for c in slice.columns)
    typed = [t for t in (_typed_id(kind, r) for r in slice_members(slice)) if t is not None]
    return (f"SELECT {columns} FROM {_q(engine, slice.table)} WHERE {where}",
            {"pt_members": json.dumps(typed)})


def _lookup_sql(engine: Engine, slice: SliceDescriptor) -> sa.TextClause:
    """Rows by primary key: the allow-listed columns of the rows whose ids are `:pt_row_ids`."""
    col, _ = _id_column_sql(engine, slice)
    columns = ", ".join(_q(engine, c) for c in slice.columns)
    return sa.text(f"SELECT {columns} FROM {_q(engine, slice.table)} WHERE {col} IN :pt_row_ids"
                   ).bindparams(sa.bindparam("pt_row_ids", expanding=True))


def fetch_slice_rows(engine: Engine, slice: SliceDescriptor, row_ids: Iterable[Any]
                     ) -> dict[str, dict]:
    """The slice's rows among these ids (allow-listed columns), keyed by
    `_normalise_row_id(row's id)`; ids that are not in the slice (held out, another slice's,
    absent, junk) are simply missing. An id matches when its text matches the row id's text,
    so 42, "42", " 42 " and 42.0 find row 42 (as an LLM may write it). Membership is checked
    against the slice's planned ids in memory; the rows are read by primary key, on the id
    column's own type, in one query per `LOOKUP_CHUNK` ids."""
    kind = _id_kind(engine, slice.table, slice.id_column)
    r = slice.members
    mine = _member_set(r.url, r.plan_id, r.part, r.lo, r.hi)
    ids = list(dict.fromkeys(
        t for t in (_typed_id(kind, x) for x in row_ids)
        if t is not None and _normalise_row_id(t) in mine))
    out: dict[str, dict] = {}
    if not ids:
        return out
    sql = _lookup_sql(engine, slice)
    with engine.connect() as conn:
        for i in range(0, len(ids), LOOKUP_CHUNK):
            for row in conn.execute(sql, {"pt_row_ids": ids[i:i + LOOKUP_CHUNK]}).mappings():
                out[_normalise_row_id(row[slice.id_column])] = dict(row)
    return out


def fetch_slice_row(engine: Engine, slice: SliceDescriptor, row_id: Any) -> dict | None:
    """The row with this id if it belongs to the slice (allow-listed columns), else None.

    42 and "42" (as an LLM may write it) find the same row: see `fetch_slice_rows`."""
    return next(iter(fetch_slice_rows(engine, slice, [row_id]).values()), None)


def without_rows(slice: SliceDescriptor, row_ids: Iterable[Any], slice_id: str) -> SliceDescriptor:
    """The same slice minus rows already labelled: the share a retry or top-up agent works on.

    Its ids (the slice's, less these, compared by `_normalise_row_id`) are written as a new
    part of the same plan; ids given twice or not in the slice change nothing."""
    done = {_normalise_row_id(r) for r in row_ids}
    return _with_members(slice, [m for m in slice_members(slice) if m not in done], slice_id,
                         "topup")


def _with_members(slice: SliceDescriptor, keep: list, slice_id: str, why: str
                  ) -> SliceDescriptor:
    """`slice` as `slice_id` over the ids `keep`, written as a new part of the same plan
    (`why`: the key naming what the part is for)."""
    r = slice.members
    part = f"{slice_id}@{uuid.uuid4().hex[:8]}"  # never an existing part: cached reads stay true
    member_store(r.url).add_members(r.plan_id, [(part, 0, keep)])
    return slice.model_copy(update={
        "slice_id": slice_id,
        "key": {**slice.key, why: slice_id},
        "members": MembersRef(url=r.url, plan_id=r.plan_id, part=part, lo=0, hi=len(keep)),
        "row_count": len(keep),
    })


def only_rows(slice: SliceDescriptor, row_ids: Iterable[Any], slice_id: str) -> SliceDescriptor:
    """The same slice restricted TO these rows: the share a probe agent labels
    (flows/error_driven.py). The twin of `without_rows`: its ids (the slice's that are among
    these, compared by `_normalise_row_id`, in the slice's order) are written as a new part
    of the same plan; ids given twice or not in the slice change nothing."""
    wanted = {_normalise_row_id(r) for r in row_ids}
    return _with_members(slice, [m for m in slice_members(slice) if m in wanted], slice_id,
                         "probe")
