"""The warehouse layer against real SQLite and (when configured) PostgreSQL warehouses of
real BBC articles: the hash and the holdout. Slice planning and the trusted row lookups are in
tests/test_slicing.py, which shares the helpers here."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from flows.render import RenderError
from flows.slicing import SliceDescriptor, fetch_slice_row, plan_slices, slice_source
from flows.spec import parse_spec
from flows.warehouse import (
    WarehouseError,
    fetch_eval_rows,
    hash_sql,
    holdout_predicate,
    make_engine,
    render_completion,
    render_prompt,
    stable_hash,
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
    # template columns + gold (trusted) + the slicing column (the row's slice group, for
    # promotion's per-slice limit): nothing else leaves the warehouse
    assert set(rows[0]) == {"id", "title", "body", "topic", spec.slicing.column}
    cond, params = holdout_predicate(spec, engine)
    with engine.connect() as conn:
        n = conn.execute(sa.text(f"SELECT count(*) FROM articles WHERE {cond}"), params).scalar()
    assert n == len(got)
    spec.evaluation.max_rows = 5
    assert [r["id"] for r in fetch_eval_rows(spec, engine)] == got[:5]


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
