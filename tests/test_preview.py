"""`posttrain preview` (flows/preview.py): a few slices' agents, capped, their examples on
screen; nothing trained or registered; the following full run in the same folder gets the
previewed calls from its call cache, is a run of its own, and trains on its own examples.

One end-to-end pair on the tiny spec: the CLI (which goes through the post-training flow with
preview=True), then `post_training` in the same folder."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from flows.preview import pick_slices
from flows.run_lifecycle import RUN_MARKER, prepare_run
from flows.slicing import MembersRef, SliceDescriptor
from flows.store import Store
from flows.store_tables import Example, LLMCall
from tests.test_pipeline import tiny_spec

NAME = "preview-test"
SLICES, ROWS = 2, 10


def _spec(small_warehouse_url, tmp, **training) -> str:
    path = tiny_spec(small_warehouse_url, tmp, **training)
    data = yaml.safe_load(path.read_text())
    data["name"] = NAME
    data["tracking"]["registered_model"] = f"{NAME}-model"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def previewed(small_warehouse_url, tmp_path_factory, prefect_api):
    """`posttrain preview` in a fresh folder, what it left, then the full run there."""
    from mlflow.tracking import MlflowClient

    from flows.cli import main
    from flows.pipeline import post_training

    tmp = tmp_path_factory.mktemp("preview")
    spec, out = _spec(small_warehouse_url, tmp, max_steps=5), tmp / "run"
    screen = io.StringIO()
    wide = pytest.MonkeyPatch()
    wide.setenv("COLUMNS", "200")  # rich sizes its table to the terminal: a wide one
    try:
        with contextlib.redirect_stdout(screen):
            code = main(["preview", spec, "--out", str(out), "--slices", str(SLICES),
                         "--rows", str(ROWS)])
    finally:
        wide.undo()
    store = Store(f"sqlite:///{out / 'store.db'}")
    (preview,) = store.list_runs()
    mlflow_uri = yaml.safe_load(Path(spec).read_text())["tracking"]["uri"]
    after_preview = {
        "registered": MlflowClient(mlflow_uri).search_registered_models(),
        "model_dir": (out / "model").exists(), "marker": (out / RUN_MARKER).exists(),
        "preview_examples": _examples(store, preview["id"])}
    full = post_training(spec_path=spec, out_dir=str(out))
    yield {"code": code, "screen": screen.getvalue(), "store": store, "preview": preview,
           "full": full, "out": out, **after_preview}
    store.close()


def _examples(store: Store, run_id: str) -> list[tuple]:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(Example.id, Example.slice_id, Example.row_id,
                                      Example.status).where(Example.run_id == run_id)).all()


def _calls(store: Store, run_id: str) -> list[tuple]:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(LLMCall.slice_id, LLMCall.request_hash, LLMCall.cached)
                            .where(LLMCall.run_id == run_id)).all()


def test_preview_prints_the_examples_and_trains_nothing(previewed):
    p, screen = previewed["preview"], previewed["screen"]
    assert previewed["code"] == 0
    assert p["status"] == "preview" and p["name"] == NAME
    summary = p["summary"]
    assert len(summary["slices"]) == SLICES
    for s in summary["slices"]:  # every agent stopped on the cap, not at the end of its slice
        assert s["stopped_reason"] == f"preview: {ROWS} rows", s
        assert ROWS <= s["accepted"] + s["rejected"] < s["rows"]
    assert summary["llm_calls"] > 0 and summary["cost_usd"] > 0
    # the table: a line per example, with its slice, row, prompt excerpt, label and status
    examples = previewed["preview_examples"]
    assert len(examples) >= SLICES * ROWS
    for _, slice_id, row_id, status in examples[:3]:
        line = next(ln for ln in screen.splitlines() if f" {row_id} " in ln
                    and f" {slice_id} " in ln)
        assert status in line and "Title:" in line
    assert "LLM calls" in screen and "cache hits" in screen
    # nothing trained, registered, nor named as the folder's run
    assert previewed["registered"] == [] and not previewed["model_dir"]
    assert not previewed["marker"]


def test_the_full_run_gets_the_previewed_calls_from_the_cache(previewed):
    store, p, full = previewed["store"], previewed["preview"], previewed["full"]
    previewed_slices = {s["slice_id"] for s in p["summary"]["slices"]}
    paid = {h for s, h, cached in _calls(store, p["id"]) if s in previewed_slices and not cached}
    hits = {h for s, h, cached in _calls(store, full["run_id"]) if cached}
    assert paid and paid <= hits  # every call the preview paid for came back free
    assert full["cache_hits"] >= len(paid)


def test_the_full_run_is_its_own_run_with_its_own_examples(previewed):
    store, p, full, out = (previewed["store"], previewed["preview"], previewed["full"],
                           previewed["out"])
    assert full["run_id"] != p["id"] and not full["resumed"]
    assert (out / RUN_MARKER).read_text().strip() == full["run_id"]
    assert store.get_run(p["id"])["status"] == "preview"  # left as it was
    assert _examples(store, p["id"]) == previewed["preview_examples"]
    mine = _examples(store, full["run_id"])
    assert not {e[0] for e in mine} & {e[0] for e in previewed["preview_examples"]}
    # the previewed slices were labelled whole by the full run, not stopped at the cap
    for s in p["summary"]["slices"]:
        done = {row for _, sl, row, st in mine if sl == s["slice_id"] and st == "accepted"}
        assert len(done) > s["accepted"]
    assert full["examples_accepted"] == sum(st == "accepted" for *_, st in mine)


def test_the_preview_publishes_its_table_artifact(previewed):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = {key: client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]))) for key in (f"{NAME}-preview",
                                                           f"{NAME}-preview-summary")}
    (table,) = found[f"{NAME}-preview"]
    assert table.type == "table"
    rows = table.data if isinstance(table.data, list) else json.loads(table.data)
    assert len(rows) == len(previewed["preview_examples"])
    assert {"slice", "row", "prompt", "label", "status", "reason"} <= set(rows[0])
    (summary,) = found[f"{NAME}-preview-summary"]
    assert "Nothing was trained" in summary.data


def test_a_preview_never_resumes_nor_hijacks_a_folders_unfinished_run(small_warehouse_url,
                                                                      tmp_path):
    spec, out = _spec(small_warehouse_url, tmp_path), str(tmp_path / "out")
    failed = prepare_run(spec, out, {})
    with pytest.raises(RuntimeError, match="killed"), failed.recorded():
        raise RuntimeError("killed")
    preview = prepare_run(spec, out, {}, preview=True)
    with preview.recorded():
        assert not preview.resumed and preview.id != failed.id
        preview.store.finish_run(preview.id, "preview")
    assert (tmp_path / "out" / RUN_MARKER).read_text().strip() == failed.id
    again = prepare_run(spec, out, {})
    with again.recorded():
        assert again.resumed and again.id == failed.id  # the killed run, not the preview


def _slice(slice_id: str, rows: int) -> SliceDescriptor:
    return SliceDescriptor(
        slice_id=slice_id, table="t", id_column="id", columns=["id"], key={}, row_count=rows,
        members=MembersRef(url="memory:x", plan_id="p", part=slice_id, lo=0, hi=rows))


def test_pick_slices_takes_the_largest_distinct_groups_first():
    plan = [_slice("r=a", 50), _slice("r=uk#1", 100), _slice("r=uk#2", 100),
            _slice("r=b", 80), _slice("r=c", 80)]
    assert [s.slice_id for s in pick_slices(plan, 2)] == ["r=uk#1", "r=b"]
    assert [s.slice_id for s in pick_slices(plan, 3)] == ["r=uk#1", "r=b", "r=c"]
    # more slices than groups: further parts of the largest groups
    assert [s.slice_id for s in pick_slices(plan, 5)][-1] == "r=uk#2"
    assert len(pick_slices(plan, 9)) == 5
