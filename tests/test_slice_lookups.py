"""The trusted row lookups of a slice by id (flows/slicing.py: `fetch_slice_rows`,
`slice_source`, `without_rows`) against real SQLite and (when configured) PostgreSQL
warehouses of real BBC articles: exactly the slice's rows, by the id column's own type,
through the primary key index."""

from __future__ import annotations

import json
import shutil

import pytest
import sqlalchemy as sa

from flows.slicing import (
    SliceDescriptor,
    fetch_slice_row,
    fetch_slice_rows,
    plan_slices,
    slice_source,
    without_rows,
)
from flows.warehouse import make_engine
from tests.test_warehouse import COLUMNS, all_ids, holdout_ids, make_spec, slice_ids


# ── trusted row lookups ─────────────────────────────────────────────────────────────────────
def test_fetch_slice_row_checks_membership(small_warehouse_url):
    spec = make_spec(small_warehouse_url)
    engine = make_engine(small_warehouse_url)
    a, b = plan_slices(spec, engine)[:2]
    in_a, in_b = slice_ids(engine, a)[0], slice_ids(engine, b)[0]
    for rid in (in_a, str(in_a), f" {in_a} ", float(in_a)):
        row = fetch_slice_row(engine, a, rid)
        assert row is not None and row["id"] == in_a
    assert set(row) == set(COLUMNS)  # allow-listed columns only: no gold label
    assert fetch_slice_row(engine, a, in_b) is None  # another agent's row
    held = min(holdout_ids(all_ids(engine)))
    assert fetch_slice_row(engine, a, held) is None
    assert fetch_slice_row(engine, a, "999999") is None
    assert fetch_slice_row(engine, a, "1 OR 1=1") is None


# ── batch lookups by the id column's own type, on both backends ─────────────────────────────
ITEM_COLUMNS = ["id", "region", "txt"]
JUNK = ["abc", "4.5", True, False, None, "1 OR 1=1", "", " ", "--1", "1e3", 10**30, "٤٢",
        float("nan"), -1, 999999, "999999"]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request, small_warehouse_url, tmp_path) -> str:
    """A private copy of the 200-article warehouse: a SQLite file, or a fresh PostgreSQL schema
    (skipped without $POSTTRAIN_TEST_POSTGRES_URL)."""
    if request.param == "sqlite":
        path = tmp_path / "warehouse.db"
        shutil.copy(sa.engine.make_url(small_warehouse_url).database, path)
        return f"sqlite:///{path}"
    from examples.news_topics.build_warehouse import build

    url = request.getfixturevalue("pg_schema_url")
    build(url, per_label=40)
    return url


def text_lookup(engine, d: SliceDescriptor, row_id) -> dict | None:
    """The old lookup, as reference: the id's text against CAST(id AS TEXT), scanning."""
    from flows.slicing import _normalise_row_id

    source, params = slice_source(engine, d)
    sql = f"SELECT * FROM ({source}) s WHERE CAST(s.{d.id_column} AS TEXT) = :rid"
    with engine.connect() as conn:
        row = conn.execute(sa.text(sql), {**params, "rid": _normalise_row_id(row_id)})
        row = row.mappings().first()
    return None if row is None else dict(row)


def slice_rows_by_id(engine, d: SliceDescriptor) -> dict:
    source, params = slice_source(engine, d)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT * FROM ({source}) s"), params).mappings()
        return {str(r[d.id_column]).strip(): dict(r) for r in rows}


def mixed_ids(members: list, others: list, held: list) -> tuple[list, set]:
    """Ids as an agent may submit them, and the keys of those that are the slice's rows."""
    m = [members[i % len(members)] for i in range(8)]
    others = [others[i % len(others)] for i in range(3)]
    ids = [m[0], str(m[1]), f" {m[2]} ", float(m[3]), f"\t{m[4]}\n", m[0], str(m[0]),
           f"0{m[5]}", f"{m[6]}.0", f"+{m[7]}", others[0], str(others[1]), float(others[2]),
           held[0], str(held[1]), *JUNK]
    return ids, {str(i) for i in m[:5]}


def check_lookups(engine, d: SliceDescriptor, others: list, held: list) -> None:
    everything = slice_rows_by_id(engine, d)
    members = sorted(int(k) for k in everything)
    ids, want = mixed_ids(members, others, held)
    got = fetch_slice_rows(engine, d, ids)
    assert set(got) == want
    assert all(got[k] == everything[k] and set(got[k]) == set(d.columns) for k in want)
    # exactly what the old text comparison found, id by id
    old = {str(r[d.id_column]): r for r in (text_lookup(engine, d, i) for i in ids) if r}
    assert got == old
    for rid in ids:
        assert fetch_slice_row(engine, d, rid) == text_lookup(engine, d, rid), repr(rid)
    assert fetch_slice_rows(engine, d, []) == {}
    assert fetch_slice_rows(engine, d, [*members, *others, *held]) == everything


def test_fetch_slice_rows_returns_exactly_the_slice_rows(backend_url):
    engine = make_engine(backend_url)
    try:
        ids = all_ids(engine)
        held = sorted(holdout_ids(ids))
        for spec in (make_spec(backend_url),
                     make_spec(backend_url, method="hash", buckets=3, max_rows_per_slice=25)):
            slices = plan_slices(spec, engine)
            assert any(d.key["parts"] > 1 for d in slices)  # id-range parts are covered
            for i, d in enumerate(slices):
                others = slice_ids(engine, slices[i - 1])[:3]
                check_lookups(engine, d, others, held)
            # a top-up slice: the slice minus rows already labelled
            d = max(slices, key=lambda d: d.row_count)
            done = slice_ids(engine, d)[:10]
            topup = without_rows(d, [str(i) for i in done], f"{d.slice_id}+topup1")
            other = slice_ids(engine, next(o for o in slices if o is not d))[0]
            check_lookups(engine, topup, [*done, other], held)
            assert not fetch_slice_rows(engine, topup, done)
    finally:
        engine.dispose()


def make_items(url: str, n: int, make_id=lambda i: f"item-{i:05d}"):
    """Table `items` (id text primary key, region, txt) of n rows."""
    engine = make_engine(url)
    meta = sa.MetaData()
    items = sa.Table("items", meta, sa.Column("id", sa.String(20), primary_key=True),
                     sa.Column("region", sa.String(8)), sa.Column("txt", sa.Text))
    with engine.begin() as conn:
        meta.drop_all(conn)
        meta.create_all(conn)
        conn.execute(items.insert(), [{"id": make_id(i), "region": "ab"[i % 2], "txt": f"t{i}"}
                                      for i in range(1, n + 1)])
    return engine


def test_text_ids(backend_url):
    special = {1: "42", 2: "007", 3: "a-1", 4: "x y", 5: "4.5", 6: "-3"}
    engine = make_items(backend_url, 120, make_id=lambda i: special.get(i, f"r{i}"))
    try:
        spec = make_spec(backend_url, table="items", columns=ITEM_COLUMNS, max_rows_per_slice=20)
        slices = plan_slices(spec, engine)
        with engine.connect() as conn:
            ids = conn.execute(sa.text("SELECT id FROM items")).scalars().all()
        held = sorted(holdout_ids(ids))
        owner = {i: d for d in slices for i in slice_ids(engine, d)}
        assert set(owner) == set(ids) - set(held)
        for value, stored in [(42, "42"), (42.0, "42"), (" 42 ", "42"), ("007", "007"),
                              ("a-1", "a-1"), ("x y", "x y"), (4.5, "4.5"), ("4.5", "4.5"),
                              (-3, "-3"), ("-3", "-3")]:
            if stored in held:
                assert all(fetch_slice_row(engine, d, value) is None for d in slices)
                continue
            d = owner[stored]
            assert fetch_slice_row(engine, d, value)["id"] == stored, value
            assert fetch_slice_rows(engine, d, [value]) == {stored: fetch_slice_row(engine, d, value)}
            assert all(fetch_slice_row(engine, o, value) is None for o in slices if o is not d)
        d = owner[next(i for i in ids if i not in held and i.startswith("r"))]
        assert fetch_slice_rows(engine, d, [7, "7", "X Y", "A-1", 10**30, True, None]) == {}
        for i, d in enumerate(slices):
            members = slice_ids(engine, d)
            others = slice_ids(engine, slices[i - 1])
            got = fetch_slice_rows(engine, d, [*members, *others, *held, *JUNK])
            assert sorted(got) == sorted(members)
            assert all(got[k]["id"] == k for k in got)
        # top-up: the same rows minus the done ones
        d = slices[0]
        members = slice_ids(engine, d)
        topup = without_rows(d, members[:3] + [7, "nope"], "t+topup1")
        assert sorted(slice_ids(engine, topup)) == sorted(members[3:])
        assert topup.row_count == d.row_count - 3
    finally:
        engine.dispose()


def test_untyped_sqlite_id_column_falls_back_to_text(tmp_path):
    url = f"sqlite:///{tmp_path / 'loose.db'}"
    engine = make_engine(url)
    with engine.begin() as conn:  # no declared types: reflection cannot tell, text comparison
        conn.execute(sa.text("CREATE TABLE items (id, region, txt)"))
        conn.execute(sa.text("INSERT INTO items VALUES (:id, :region, :txt)"),
                     [{"id": i, "region": "ab"[i % 2], "txt": f"t{i}"} for i in range(1, 61)])
    from flows.slicing import _id_kind

    assert _id_kind(engine, "items", "id") == "cast"
    spec = make_spec(url, table="items", columns=ITEM_COLUMNS, max_rows_per_slice=100)
    d = plan_slices(spec, engine)[0]
    members = slice_ids(engine, d)
    for rid in (members[0], str(members[0]), float(members[0]), f" {members[0]}"):
        assert fetch_slice_row(engine, d, rid)["id"] == members[0]
    assert sorted(fetch_slice_rows(engine, d, [*range(1, 61), "abc"])) == sorted(map(str, members))
    topup = without_rows(d, [str(m) for m in members[:2]], "t+topup1")
    assert sorted(slice_ids(engine, topup)) == sorted(members[2:])


def test_id_type_is_reflected_once_and_lookups_are_chunked(small_warehouse_url, monkeypatch):
    import flows.slicing as sl

    engine = make_engine(small_warehouse_url)
    d = max(plan_slices(make_spec(small_warehouse_url), engine), key=lambda d: d.row_count)
    members = slice_ids(engine, d)
    assert len(members) > 14
    sl._ID_KINDS.clear()
    inspected = []
    real_inspect = sa.inspect
    monkeypatch.setattr(sl.sa, "inspect", lambda x: inspected.append(x) or real_inspect(x))
    statements = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda *a: statements.append(a[2]) if "FROM articles WHERE" in a[2] else None)
    everything = fetch_slice_rows(engine, d, all_ids(engine))
    assert sorted(everything) == sorted(map(str, members))
    fetch_slice_row(engine, d, members[0])
    without_rows(d, members[:2], "t+topup1")  # reads the plan's ids, not the warehouse
    fetch_slice_rows(engine, d, ["abc", 10**30, -5])  # nobody's rows: no query at all
    assert len(inspected) == 1  # one reflection for (url, table, id column)
    assert len(statements) == 2  # one query per batch of up to LOOKUP_CHUNK slice ids
    statements.clear()
    monkeypatch.setattr(sl, "LOOKUP_CHUNK", 7)
    assert fetch_slice_rows(engine, d, all_ids(engine)) == everything
    assert len(statements) == -(-len(members) // 7)  # only the slice's ids are looked up
    engine.dispose()


def grow_articles(engine, copies: int) -> None:
    """The 200 articles copied `copies` times more under new ids (201.., 401.., ...)."""
    cols = "title, body, published_at, region, word_count, topic"
    with engine.begin() as conn:
        for k in range(1, copies + 1):
            conn.execute(sa.text(f"INSERT INTO articles (id, {cols}) SELECT id + :off, {cols} "
                                 "FROM articles WHERE id <= 200"), {"off": k * 200})


def explain(engine, sql: sa.TextClause, params: dict) -> str:
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    stmt = sa.text(prefix + sql.text).bindparams(*sql._bindparams.values())
    with engine.connect() as conn:
        rows = conn.execute(stmt, params).all()
    return "\n".join(str(r[-1]) for r in rows)


def explain_lookup(engine, d: SliceDescriptor, ids: list) -> str:
    """The database's plan for fetch_slice_rows' query (the same SQL, the same params)."""
    from flows.slicing import _lookup_sql

    return explain(engine, _lookup_sql(engine, d), {"pt_row_ids": ids})


def explain_source(engine, d: SliceDescriptor) -> str:
    """The database's plan for reading the slice as its agent's SQL tool does."""
    sql, params = slice_source(engine, d)
    return explain(engine, sa.text(sql), params)


def assert_index_lookup(engine, plan: str, index: str) -> None:
    print(plan)
    if engine.dialect.name == "sqlite":
        lines = plan.splitlines()
        assert lines and all(line.startswith("SEARCH ") for line in lines), plan
        assert f"USING {index}" in plan, plan
    else:
        assert "Seq Scan" not in plan, plan
        assert any(f"{kind} {index}" in plan for kind in
                   ("Index Scan using", "Index Only Scan using", "Bitmap Index Scan on")), plan
        assert any("Index Cond:" in line and "= ANY" in line for line in plan.splitlines()), plan


def assert_index_read(engine, plan: str, table: str, index: str) -> None:
    """The slice's whole view (its ids bound as a JSON array) is read through the primary key:
    no line of the plan scans the table."""
    print(plan)
    if engine.dialect.name == "sqlite":
        assert f"SEARCH {table} USING {index}" in plan, plan
        assert f"SCAN {table}" not in plan, plan
    else:
        assert f"Seq Scan on {table}" not in plan, plan
        assert any(f"{kind} {index}" in plan for kind in
                   ("Index Scan using", "Index Only Scan using", "Bitmap Index Scan on")), plan


def test_lookups_use_the_primary_key_index(backend_url):
    engine = make_engine(backend_url)
    try:
        grow_articles(engine, 99)  # 20,000 rows
        make_items(backend_url, 20000).dispose()
        with engine.begin() as conn:
            conn.execute(sa.text("ANALYZE"))
        lite = engine.dialect.name == "sqlite"
        pk = "INTEGER PRIMARY KEY (rowid=?)" if lite else "articles_pkey"
        spec = make_spec(backend_url, max_rows_per_slice=3000)
        hashed = make_spec(backend_url, method="hash", buckets=4, max_rows_per_slice=3000)
        slices = plan_slices(spec, engine)
        hslices = plan_slices(hashed, engine)
        assert len(all_ids(engine)) == 20000 and any(d.key["parts"] > 1 for d in slices)
        uk = next(d for d in slices if d.key["region"] == "uk" and d.key["part"] == 2)
        members = slice_ids(engine, uk)
        topup = without_rows(uk, [str(i) for i in members[:300]], "uk#2+topup1")
        assert topup.row_count == uk.row_count - 300
        ids = [*members[295:310], *range(1, 11)]  # 25: done, members, other slices, held out
        for d in (slices[0], uk, hslices[0], topup):
            assert_index_lookup(engine, explain_lookup(engine, d, ids), pk)
            assert_index_read(engine, explain_source(engine, d), "articles", pk)
            got = fetch_slice_rows(engine, d, ids)
            assert got == {str(r["id"]): r for r in (text_lookup(engine, d, i) for i in ids) if r}
        assert sorted(fetch_slice_rows(engine, topup, ids)) == sorted(map(str, members[300:310]))
        # the text-id table: its primary key index too
        items = plan_slices(make_spec(backend_url, table="items", columns=ITEM_COLUMNS,
                                      max_rows_per_slice=5000), engine)
        names = [f"item-{i:05d}" for i in range(100, 125)]
        text_pk = "INDEX sqlite_autoindex_items_1 (id=?)" if lite else "items_pkey"
        for d in items[:2]:
            assert_index_lookup(engine, explain_lookup(engine, d, names), text_pk)
            assert_index_read(engine, explain_source(engine, d), "items", text_pk)
    finally:
        engine.dispose()


def test_without_rows_removes_exactly_the_slice_rows_given(backend_url):
    engine = make_engine(backend_url)
    try:
        slices = plan_slices(make_spec(backend_url), engine)
        d = max(slices, key=lambda d: d.row_count)
        other = next(o for o in slices if o is not d)
        members = slice_ids(engine, d)
        held = min(holdout_ids(all_ids(engine)))
        done = [str(members[0]), f" {members[1]} ", float(members[2]), members[3], members[0],
                str(held), slice_ids(engine, other)[0], "abc", "4.5", True, 10**30]
        topup = without_rows(d, done, f"{d.slice_id}+topup1")
        assert topup.row_count == d.row_count - 4  # the slice's rows among them, once each
        assert topup.slice_id == f"{d.slice_id}+topup1" and topup.key["topup"] == topup.slice_id
        assert slice_ids(engine, topup) == members[4:]
        again = SliceDescriptor.model_validate(json.loads(topup.model_dump_json()))
        assert again == topup and slice_ids(engine, again) == members[4:]  # JSON round trip
        assert fetch_slice_rows(engine, topup, members[:4]) == {}
        assert without_rows(d, [], "t").row_count == d.row_count
        assert slice_ids(engine, without_rows(d, [], "t")) == members
        # a top-up of a top-up
        second = without_rows(topup, [members[4]], f"{d.slice_id}+topup2")
        assert slice_ids(engine, second) == members[5:]
        assert second.row_count == d.row_count - 5
    finally:
        engine.dispose()
