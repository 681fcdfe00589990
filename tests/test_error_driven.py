"""Error-driven retraining (flows/error_map.py, flows/error_driven.py): the champion's error
map on hand-made pairs, the focus plan it sets, the probe rows (`only_rows`, the hash sample,
the caps) on a real SQLite warehouse, and the spec's section. The probe stage end to end, on a
real registry with a champion, is in tests/test_pipeline.py (`test_error_driven_run_...`)."""

from __future__ import annotations

import pytest

from flows.error_map import (
    error_map,
    error_map_summary,
    focus_plan,
    group_of,
    probe_ids,
    probe_quota,
)
from flows.slicing import fetch_slice_rows, only_rows, plan_slices, slice_members, without_rows
from flows.warehouse import make_engine
from tests.test_warehouse import make_spec, slice_ids

LABELS = ["business", "politics", "sports", "tech"]

# (slice id, agents' label, champion's prediction): the champion never says sports, and
# errs mostly in region=uk
PAIRS = [
    ("region=uk#1+probe", "politics", "politics"),
    ("region=uk#1+probe", "sports", "politics"),
    ("region=uk#2+probe", "sports", "politics"),
    ("region=uk#2+probe", "sports", "business"),
    ("region=uk#2+probe", "tech", "tech"),
    ("region=europe+probe", "sports", "<invalid>"),
    ("region=europe+probe", "business", "business"),
    ("region=europe+probe", "business", "business"),
    ("region=asia+probe", "tech", "tech"),
    ("region=asia+probe", "business", "tech"),
]


def test_error_map_by_slice_group_label_and_confusion():
    m = error_map(PAIRS, LABELS, weak_k=2)
    assert m["n"] == 10 and m["accuracy"] == pytest.approx(0.5)
    # split slices (#1, #2) are one group; the probe suffix is dropped
    assert m["by_slice"] == {
        "region=asia": {"n": 2, "errors": 1, "accuracy": 0.5, "error": 0.5},
        "region=europe": {"n": 3, "errors": 1, "accuracy": 0.6667, "error": 0.3333},
        "region=uk": {"n": 5, "errors": 3, "accuracy": 0.4, "error": 0.6}}
    sports, politics = m["per_label"]["sports"], m["per_label"]["politics"]
    assert (sports["support"], sports["recall"], sports["f1"]) == (4, 0.0, 0.0)
    assert politics["precision"] == 0.3333 and politics["recall"] == 1.0
    assert m["invalid"] == 1
    # off-diagonal only, commonest first, then by (gold, predicted)
    assert m["confusions"][0] == {"gold": "sports", "predicted": "politics", "count": 2}
    assert {(c["gold"], c["predicted"]) for c in m["confusions"]} == {
        ("sports", "politics"), ("sports", "business"), ("sports", "<invalid>"),
        ("business", "tech")}
    # sports F1 0; then politics 0.5 vs tech 0.667 vs business 0.667
    assert m["weak_labels"] == ["sports", "politics"]


def test_weak_labels_skip_labels_the_probes_never_hold():
    m = error_map([("a+probe", "tech", "business"), ("a+probe", "business", "business")],
                  LABELS, weak_k=3)
    assert m["weak_labels"] == ["tech", "business"]  # politics, sports: no support, no verdict
    assert error_map([], LABELS)["weak_labels"] == [] and error_map([], LABELS)["n"] == 0


def test_focus_plan_orders_weak_first_with_more_turns():
    m = error_map(PAIRS, LABELS, weak_k=2)
    ids = ["region=africa", "region=asia", "region=europe", "region=uk#1", "region=uk#2"]
    plan = focus_plan(ids, m, max_turns=40, focus_turns=2.5)
    # uk (0.6) first, its parts in planned order; asia (0.5), europe (0.33); africa unprobed
    assert plan.order == ["region=uk#1", "region=uk#2", "region=asia", "region=europe",
                          "region=africa"]
    # groups at or above the overall error (0.5) get 2.5 x 40 turns
    assert plan.focus_groups == ["region=asia", "region=uk"]
    assert plan.max_turns == {"region=uk#1": 100, "region=uk#2": 100, "region=asia": 100,
                              "region=europe": 40, "region=africa": 40}
    assert plan.want_labels == ["sports", "politics"]
    # a champion right everywhere changes no order and no turns
    right = error_map([(s, "tech", "tech") for s, _, _ in PAIRS], LABELS)
    calm = focus_plan(ids, right, max_turns=40, focus_turns=2.0)
    assert calm.order == ids and set(calm.max_turns.values()) == {40}
    assert group_of("region=uk#2+weak") == "region=uk"


def test_probe_sample_is_deterministic_spread_and_capped():
    ids = [str(i) for i in range(1, 201)]
    a = probe_ids(ids, 20, "s:")
    assert sorted(probe_ids(list(reversed(ids)), 20, "s:")) == sorted(a)  # order-free
    assert probe_ids(ids, 20, "other:") != a  # the salt picks the sample
    assert len(a) == 20 and a == [i for i in ids if i in set(a)]  # id order
    assert a != ids[:20] and max(map(int, a)) > 100  # a hash sample, not the first rows
    assert probe_ids(ids[:5], 20) == ids[:5]
    assert probe_quota([50, 50, 10], 20, 2000) == [20, 20, 10]
    assert probe_quota([50, 50, 50, 50], 20, 40) == [10, 10, 10, 10]
    assert probe_quota([50] * 5, 20, 3) == [1, 1, 1, 0, 0]


def test_only_rows_restricts_a_slice_to_its_probes(small_warehouse_url):
    spec = make_spec(small_warehouse_url)
    engine = make_engine(small_warehouse_url)
    d, other = sorted(plan_slices(spec, engine), key=lambda s: -s.row_count)[:2]
    members = slice_ids(engine, d)
    probe = only_rows(d, [members[4], str(members[1]), members[1], slice_ids(engine, other)[0],
                          "nope"], f"{d.slice_id}+probe")
    assert probe.slice_id == f"{d.slice_id}+probe" and probe.row_count == 2
    assert slice_ids(engine, probe) == [members[1], members[4]]  # the slice's order
    assert sorted(fetch_slice_rows(engine, probe, members)) == sorted(
        str(m) for m in (members[1], members[4]))
    rest = without_rows(d, slice_members(probe), d.slice_id)  # the first agent's share
    assert sorted(slice_ids(engine, rest) + slice_ids(engine, probe)) == sorted(members)


def test_spec_section_validates_and_names_fields():
    import copy

    from flows.spec import SpecError, parse_spec
    from tests.test_spec import GOOD

    assert parse_spec(copy.deepcopy(GOOD)).error_driven.enabled is False
    on = parse_spec({**copy.deepcopy(GOOD), "error_driven": {"enabled": True, "focus_turns": 3}})
    assert on.error_driven.focus_turns == 3.0 and on.error_driven.probe_rows == 20
    for bad, field in (({"probe_rows": 0}, "error_driven.probe_rows"),
                       ({"focus_turns": 0.5}, "error_driven.focus_turns"),
                       ({"probe_rows": 50, "max_probe_rows": 10},
                        "error_driven.max_probe_rows"),
                       ({"typo": 1}, "error_driven.typo")):
        with pytest.raises(SpecError) as e:
            parse_spec({**copy.deepcopy(GOOD), "error_driven": bad})
        assert e.value.problems[0].startswith(field), e.value.problems


def test_summary_block_puts_before_beside_after():
    m = error_map(PAIRS, LABELS, weak_k=1) | {"champion_version": "3"}
    ev = {"n": 80, "final": {"per_label": {k: {"f1": 0.9} for k in LABELS},
                             "by_slice": {"region=uk": {"n": 40, "accuracy": 0.8,
                                                        "macro_f1": 0.7}}},
          "champion": {"per_label": {k: {"f1": 0.5} for k in LABELS}}}
    s = error_map_summary(m, ev)
    assert s["before"]["weak_labels"] == ["sports"] and s["before"]["f1"]["sports"] == 0.0
    assert s["after"]["weak_labels_f1"] == {"sports": {"final": 0.9, "champion": 0.5}}
    assert s["after"]["by_slice"] == {"region=uk": {"final": {"n": 40, "accuracy": 0.8,
                                                              "macro_f1": 0.7}}}
    assert error_map_summary(None, ev) is None
    from flows.reports.summary_page import error_map_lines

    text = "\n".join(error_map_lines(s))
    assert "## Error map" in text and "| **sports** | 0.000 | 0.900 | 0.500 |" in text
    assert "sports -> politics (2)" in text and error_map_lines(None) == []
