"""Slice planning against real SQLite warehouses of real BBC articles: the slices partition
the non-held-out rows, and their ids go to a member store (flows/slicing.py). The trusted
row lookups by id are in tests/test_slice_lookups.py."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from flows.slicing import SliceDescriptor, fetch_slice_rows, plan_slices, slice_source
from flows.warehouse import WarehouseError, make_engine, stable_hash
from tests.test_warehouse import COLUMNS, check_partition, holdout_ids, make_spec, slice_ids


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


def test_planning_streams_in_batches_into_a_store(small_warehouse_url, tmp_path, monkeypatch):
    """Planning writes each group's ids in chunks as it reads (memory: one batch), into the
    example store when given one; the slices read back exactly as a one-batch plan's."""
    import flows.slicing as sl
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
        monkeypatch.setattr(sl, "PLAN_BATCH", 7)
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
    from flows.slicing import MembersRef

    d = plan_slices(make_spec(small_warehouse_url), make_engine(small_warehouse_url))[0]
    elsewhere = d.model_copy(update={"members": MembersRef(
        url="memory:0123", plan_id="p", part="x", lo=0, hi=3)})
    with pytest.raises(WarehouseError, match="another process's memory"):
        fetch_slice_rows(make_engine(small_warehouse_url), elsewhere, [1])
