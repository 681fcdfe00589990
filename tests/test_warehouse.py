"""The warehouse layer against real SQLite and (when configured) PostgreSQL warehouses of
real BBC articles: the hash, the holdout, slice planning and trusted row lookups."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from flows.render import RenderError
from flows.spec import parse_spec
from flows.warehouse import (
    SliceDescriptor,
    WarehouseError,
    fetch_eval_rows,
    fetch_slice_row,
    fetch_slice_rows,
    hash_sql,
    holdout_predicate,
    make_engine,
    plan_slices,
    render_completion,
    render_prompt,
    slice_source,
    stable_hash,
    without_rows,
)

COLUMNS = ["id", "title", "body", "published_at", "region", "word_count"]
HASH_VALUES = [0, 1, 7, 42, 199, 2225, -7, 10**12, "abc", "région", "", "id-0042"]


def make_spec(url: str, table: str = "articles", columns=None, **slicing) -> object:
    columns = columns or COLUMNS
    data = {
        "name": "t",
        "warehouse": {"url": url, "tables": {table: columns}},
        "slicing": {"table": table, "id_column": "id", "method": "group_by",
                    "column": "region", "max_rows_per_slice": 30, **slicing},
        "task": {"description": "topic", "labels": ["business", "entertainment", "politics",
                                                    "sports", "tech"],
                 "prompt_template": "Title: {title}\nLead: {body:.300}\nTopic:",
                 "gold_column": "topic"},
        "evaluation": {"holdout_fraction": 0.18},
        "tracking": {"registered_model": "m"},
    }
    if table != "articles":
        data["task"]["prompt_template"] = "{txt}"
    return parse_spec(data)


def all_ids(engine) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT id FROM articles ORDER BY id")).scalars().all()


def slice_ids(engine, d: SliceDescriptor) -> list:
    """The slice's ids as its agent's SQL tool sees them (`slice_source`), in id order."""
    sql, params = slice_source(engine, d)
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT {d.id_column} FROM ({sql}) s ORDER BY 1"),
                            params).scalars().all()


def holdout_ids(ids, fraction=0.18) -> set:
    return {i for i in ids if stable_hash(i) % 10000 < round(fraction * 10000)}


def check_partition(engine, spec, slices) -> dict[str, list]:
    """Slices are disjoint, cover every non-held-out row exactly, respect the cap and count."""
    ids = all_ids(engine)
    held = holdout_ids(ids, spec.evaluation.holdout_fraction)
    members = {d.slice_id: slice_ids(engine, d) for d in slices}
    flat = [i for got in members.values() for i in got]
    assert len(flat) == len(set(flat)), "slices overlap"
    assert set(flat) == set(ids) - held, "slices do not cover the non-holdout rows exactly"
    assert not set(flat) & held, "a held-out row is in a slice"
    for d in slices:
        assert d.row_count == len(members[d.slice_id])
        assert 0 < d.row_count <= spec.slicing.max_rows_per_slice
    return members


# ── the hash ────────────────────────────────────────────────────────────────────────────────
def test_stable_hash_is_unsigned_md5_prefix():
    assert stable_hash(1) == 3301589560  # md5("1") = c4ca4238...
    assert all(0 <= stable_hash(v) < 2**32 for v in HASH_VALUES)
    assert stable_hash(42) == stable_hash("42")


def test_sqlite_hash_equals_python(small_warehouse_url):
    engine = make_engine(small_warehouse_url)
    with engine.connect() as conn:
        for v in HASH_VALUES:
            got = conn.execute(sa.text(f"SELECT {hash_sql(engine, ':v')}"), {"v": v}).scalar_one()
            assert got == stable_hash(v), v
        rows = conn.execute(sa.text(f"SELECT id, {hash_sql(engine, 'id')} FROM articles")).all()
    assert len(rows) == 200 and all(h == stable_hash(i) for i, h in rows)


def test_unknown_dialect_is_named():
    with pytest.raises(WarehouseError, match="'mysql'"):
        hash_sql("mysql", "id")


# ── the holdout ─────────────────────────────────────────────────────────────────────────────
def test_holdout_is_chosen_by_hash_of_id(small_warehouse_url):
    spec = make_spec(small_warehouse_url)
    engine = make_engine(small_warehouse_url)
    ids = all_ids(engine)
    rows = fetch_eval_rows(spec, engine)
    got = [r["id"] for r in rows]
    assert got == sorted(holdout_ids(ids))
    assert 0.10 < len(got) / len(ids) < 0.26  # ~18% of 200
    assert set(rows[0]) == {"id", "title", "body", "topic"}  # template columns + gold, trusted
    cond, params = holdout_predicate(spec, engine)
    with engine.connect() as conn:
        n = conn.execute(sa.text(f"SELECT count(*) FROM articles WHERE {cond}"), params).scalar()
    assert n == len(got)
    spec.evaluation.max_rows = 5
    assert [r["id"] for r in fetch_eval_rows(spec, engine)] == got[:5]


# ── slice planning ──────────────────────────────────────────────────────────────────────────
def test_group_by_slices_partition_and_split_hot_group(small_warehouse_url):
    spec = make_spec(small_warehouse_url)
    engine = make_engine(small_warehouse_url)
    slices = plan_slices(spec, engine)
    members = check_partition(engine, spec, slices)
    uk = [d for d in slices if d.key["region"] == "uk"]
    assert len(uk) >= 2 and [d.slice_id for d in uk] == [f"region=uk#{i + 1}" for i in range(len(uk))]
    assert max(d.row_count for d in uk) - min(d.row_count for d in uk) <= 1  # balanced parts
    with engine.connect() as conn:
        for d in slices:
            sql, params = slice_source(engine, d)
            regions = conn.execute(
                sa.text(f"SELECT DISTINCT region FROM ({sql}) s"), params).scalars().all()
            assert regions == [d.key["region"]]
            assert members[d.slice_id]  # never empty
    again = plan_slices(spec, engine)  # deterministic: the same slices, the same rows
    assert [(d.slice_id, d.key, d.row_count) for d in again] == \
           [(d.slice_id, d.key, d.row_count) for d in slices]
    assert all(slice_ids(engine, a) == members[a.slice_id] for a in again)


def test_descriptors_are_small_json_without_rows(small_warehouse_url):
    spec = make_spec(small_warehouse_url)
    engine = make_engine(small_warehouse_url)
    slices = plan_slices(spec, engine)
    with engine.connect() as conn:
        titles = conn.execute(sa.text("SELECT title FROM articles")).scalars().all()
    for d in slices:
        blob = d.model_dump_json()
        assert len(blob) < 1000
        assert not any(t in blob for t in titles)
        assert SliceDescriptor.model_validate(json.loads(blob)) == d  # round-trips via JSON
        assert d.columns == COLUMNS and "topic" not in slice_source(engine, d)[0]


def test_hash_slices_partition(small_warehouse_url):
    spec = make_spec(small_warehouse_url, method="hash", buckets=3, max_rows_per_slice=25)
    engine = make_engine(small_warehouse_url)
    slices = plan_slices(spec, engine)
    members = check_partition(engine, spec, slices)
    for d in slices:
        assert all(stable_hash(i) % 3 == d.key["bucket"] for i in members[d.slice_id])
    assert {d.key["bucket"] for d in slices} == {0, 1, 2}
    assert len(slices) > 3  # 164 rows in 3 buckets under a cap of 25 must be split


def test_max_slices_takes_the_first(small_warehouse_url):
    spec = make_spec(small_warehouse_url)
    engine = make_engine(small_warehouse_url)
    full = plan_slices(spec, engine)
    spec.generation.max_slices = 3
    first = plan_slices(spec, engine)
    assert [d.slice_id for d in first] == [d.slice_id for d in full[:3]]
    assert [slice_ids(engine, d) for d in first] == [slice_ids(engine, d) for d in full[:3]]


def test_null_group_values_get_their_own_slice(tmp_path):
    url = f"sqlite:///{tmp_path / 'nulls.db'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE items (id INTEGER PRIMARY KEY, region TEXT, txt TEXT)"))
        conn.execute(sa.text("INSERT INTO items VALUES (:id, :region, :txt)"),
                     [{"id": i, "region": [None, "a", "b"][i % 3], "txt": f"t{i}"}
                      for i in range(1, 121)])
    spec = make_spec(url, table="items", columns=["id", "region", "txt"], max_rows_per_slice=20)
    slices = plan_slices(spec, engine)
    null = [d for d in slices if d.key["region"] is None]
    assert null and null[0].slice_id.startswith("region=<null>") and slices[0] is null[0]
    got = {i for d in null for i in slice_ids(engine, d)}
    expected = {i for i in range(3, 121, 3)} - holdout_ids(range(1, 121))
    assert got == expected
    flat = [i for d in slices for i in slice_ids(engine, d)]
    assert sorted(flat) == sorted(set(range(1, 121)) - holdout_ids(range(1, 121)))


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
    from flows.warehouse import _normalise_row_id

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
    from flows.warehouse import _id_kind

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
    import flows.warehouse as wh

    engine = make_engine(small_warehouse_url)
    d = max(plan_slices(make_spec(small_warehouse_url), engine), key=lambda d: d.row_count)
    members = slice_ids(engine, d)
    assert len(members) > 14
    wh._ID_KINDS.clear()
    inspected = []
    real_inspect = sa.inspect
    monkeypatch.setattr(wh.sa, "inspect", lambda x: inspected.append(x) or real_inspect(x))
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
    monkeypatch.setattr(wh, "LOOKUP_CHUNK", 7)
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
    from flows.warehouse import _lookup_sql

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


def _quote(engine, name: str) -> str:
    return engine.dialect.identifier_preparer.quote(name)


def test_render_prompt_and_completion(small_warehouse_url):
    spec = make_spec(small_warehouse_url)
    row = {"title": "Chips", "body": "x" * 500}
    assert render_prompt(spec, row) == f"Title: Chips\nLead: {'x' * 300}\nTopic:"
    assert render_prompt(spec, {"title": "T", "body": None}) == "Title: T\nLead: \nTopic:"
    assert render_completion(spec, "tech") == " tech"
    spec.task.completion_template = " {lable}"
    with pytest.raises(RenderError, match="completion_template"):
        render_completion(spec, "tech")


# ── PostgreSQL: the same numbers, the same holdout, the same slices ────────────────────────
def test_postgres_matches_sqlite(small_warehouse_url, pg_schema_url):
    from examples.news_topics.build_warehouse import build

    build(pg_schema_url, per_label=40)  # the same 200 articles as small_warehouse_url
    pg, lite = make_engine(pg_schema_url), make_engine(small_warehouse_url)
    try:
        with pg.connect() as conn:
            for v in HASH_VALUES:
                got = conn.execute(sa.text(f"SELECT {hash_sql(pg, ':v')}"), {"v": v}).scalar_one()
                assert got == stable_hash(v), v
            rows = conn.execute(sa.text(f"SELECT id, {hash_sql(pg, 'id')} FROM articles")).all()
        assert len(rows) == 200 and all(h == stable_hash(i) for i, h in rows)

        spec_pg, spec_lite = make_spec(pg_schema_url), make_spec(small_warehouse_url)
        assert fetch_eval_rows(spec_pg, pg) == fetch_eval_rows(spec_lite, lite)

        slices_pg = plan_slices(spec_pg, pg)
        check_partition(pg, spec_pg, slices_pg)
        slices_lite = plan_slices(spec_lite, lite)
        assert [(d.slice_id, d.row_count) for d in slices_pg] == \
               [(d.slice_id, d.row_count) for d in slices_lite]
        for a, b in zip(slices_pg, slices_lite, strict=True):
            assert sorted(slice_ids(pg, a)) == sorted(slice_ids(lite, b))

        spec_hash = make_spec(pg_schema_url, method="hash", buckets=3, max_rows_per_slice=25)
        check_partition(pg, spec_hash, plan_slices(spec_hash, pg))

        d = slices_pg[0]
        rid = slice_ids(pg, d)[0]
        assert fetch_slice_row(pg, d, str(rid))["id"] == rid
        assert fetch_slice_row(pg, d, rid)["id"] == rid
        assert fetch_slice_row(pg, d, slice_ids(pg, slices_pg[1])[0]) is None
    finally:
        pg.dispose()
        lite.dispose()


def test_data_fingerprint_changes_with_rows_added_edited_or_removed(tmp_path):
    import shutil

    from examples.news_topics.build_warehouse import build
    from flows.spec import load_spec
    from flows.warehouse import data_fingerprint, make_engine

    url = build(tmp_path / "wh.db", per_label=4)
    spec = load_spec(Path(__file__).resolve().parent.parent / "examples/news_topics/spec.yaml")
    spec.warehouse.url = url
    engine = make_engine(url)
    before = data_fingerprint(spec, engine)
    assert before.startswith("20:") and data_fingerprint(spec, engine) == before
    shutil.copy(tmp_path / "wh.db", tmp_path / "copy.db")  # same rows elsewhere: same print
    copy = make_engine(f"sqlite:///{tmp_path / 'copy.db'}")
    assert data_fingerprint(spec, copy) == before
    with engine.begin() as c:
        c.execute(sa.text("UPDATE articles SET title = title || '!' WHERE id = "
                          "(SELECT min(id) FROM articles)"))
    edited = data_fingerprint(spec, engine)
    assert edited != before and edited.startswith("20:")
    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM articles WHERE id = (SELECT max(id) FROM articles)"))
    assert data_fingerprint(spec, engine).startswith("19:")


def test_planning_streams_in_batches_into_a_store(small_warehouse_url, tmp_path, monkeypatch):
    """Planning writes each group's ids in chunks as it reads (memory: one batch), into the
    example store when given one; the slices read back exactly as a one-batch plan's."""
    import flows.warehouse as wh
    from flows.store import Store

    engine = make_engine(small_warehouse_url)
    for slicing in ({}, {"method": "hash", "buckets": 3, "max_rows_per_slice": 25}):
        spec = make_spec(small_warehouse_url, **slicing)
        whole = plan_slices(spec, engine)
        store = Store(f"sqlite:///{tmp_path / 'store.db'}")
        writes: list[int] = []

        def counted(plan, chunks, add=store.add_members, writes=writes):
            writes.append(len(chunks))
            add(plan, chunks)

        monkeypatch.setattr(store, "add_members", counted)
        monkeypatch.setattr(wh, "PLAN_BATCH", 7)
        batched = plan_slices(spec, engine, members=store, plan_id="run-1")
        monkeypatch.undo()
        assert len(writes) >= 164 // 7  # one write per batch of 7 rows read
        assert all(d.members.url == store.url and d.members.plan_id.startswith("run-1/")
                   for d in batched)
        assert [(d.slice_id, d.row_count) for d in batched] == \
               [(d.slice_id, d.row_count) for d in whole]
        assert [slice_ids(engine, d) for d in batched] == [slice_ids(engine, d) for d in whole]
        check_partition(engine, spec, batched)
        store.close()
    engine.dispose()


def test_members_planned_in_another_process_memory_are_a_clear_error(small_warehouse_url):
    from flows.warehouse import MembersRef

    d = plan_slices(make_spec(small_warehouse_url), make_engine(small_warehouse_url))[0]
    elsewhere = d.model_copy(update={"members": MembersRef(
        url="memory:0123", plan_id="p", part="x", lo=0, hi=3)})
    with pytest.raises(WarehouseError, match="another process's memory"):
        fetch_slice_rows(make_engine(small_warehouse_url), elsewhere, [1])
