"""The contamination guard (flows/contamination.py) on a real SQLite warehouse of BBC articles:
edited copies of held-out rows are removed, other rows kept, and the figures and report say so.
No pipeline run: the guard is the function curation and the DPO pairs call."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from bench.contamination import EDITS
from flows.contamination import contamination_summary, guard, guard_examples, report_lines
from flows.spec import SpecError, load_spec, parse_spec
from flows.warehouse import fetch_eval_rows, make_engine, render_prompt

ROOT = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((ROOT / "examples" / "news_topics" / "spec.yaml").read_text())


def write_spec(tmp: Path, url: str, **contamination) -> str:
    data = {**DEMO, "warehouse": {**DEMO["warehouse"], "url": url}}
    if contamination:
        data["contamination"] = contamination
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def rows(small_warehouse_url, tmp_path):
    """(spec path, spec, held-out rows, the other rows) of the 200-article warehouse."""
    import sqlalchemy as sa

    spec_path = write_spec(tmp_path, small_warehouse_url)
    spec = load_spec(spec_path)
    engine = make_engine(small_warehouse_url)
    held = fetch_eval_rows(spec, engine)
    with engine.connect() as conn:
        every = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM articles"))]
    engine.dispose()
    held_ids = {r["id"] for r in held}
    return spec_path, spec, held, [r for r in every if r["id"] not in held_ids]


def test_edited_copies_of_held_out_rows_go_and_other_rows_stay(rows):
    spec_path, spec, held, others = rows
    assert len(held) >= 20
    rng = random.Random(0)
    copies = []
    for n, row in enumerate(held[:24]):  # every edit, three rows each
        name = sorted(EDITS)[n % len(EDITS)]
        title, body = EDITS[name](row["title"], row["body"], rng)
        copies.append({"id": f"copy-{n}", "edit": name,
                       "prompt": render_prompt(spec, {**row, "title": title, "body": body})})
    held_titles = {r["title"].casefold() for r in held}
    # rows of the corpus that are not themselves copies of a held-out article (same title)
    clean = [{"id": r["id"], "prompt": render_prompt(spec, r)} for r in others
             if r["title"].casefold() not in held_titles]
    kept, figures = guard_examples(spec, spec_path, clean + copies)
    kept_ids = {k["id"] for k in kept}
    missed = [c["edit"] for c in copies if c["id"] in kept_ids]
    assert missed == []
    # no clean row goes (follow-ups on a held-out article's story sit at 0.25-0.26 here)
    assert len(clean) > 100 and [c["id"] for c in clean if c["id"] not in kept_ids] == []
    assert figures["checked"] == len(clean) + len(copies)
    assert figures["removed"] == len(copies)
    assert figures["held_out_rows"] == len(held)


def test_figures_shape_and_the_sample(rows):
    spec_path, spec, held, others = rows
    items = [{"prompt": render_prompt(spec, r)} for r in held[:8]] + [
        {"prompt": render_prompt(spec, r)} for r in others[:5]]
    kept, figures = guard_examples(spec, spec_path, items)
    assert set(figures) == {"enabled", "checked", "removed", "threshold", "ngram", "num_perm",
                            "shingles", "held_out_rows", "sample"}
    assert figures["removed"] == 8 and len(kept) == 5
    assert (figures["threshold"], figures["ngram"]) == (spec.contamination.threshold,
                                                        spec.contamination.ngram)
    assert len(figures["sample"]) == 5
    for m in figures["sample"]:
        assert set(m) == {"train_prompt", "held_out", "similarity"}
        assert m["similarity"] == 1.0 and m["train_prompt"] == m["held_out"]
        assert m["train_prompt"].startswith("Title: ") and len(m["train_prompt"]) <= 160


def test_disabled_guard_keeps_everything(rows, small_warehouse_url, tmp_path):
    _, _, held, _ = rows
    spec_path = write_spec(tmp_path, small_warehouse_url, enabled=False)
    spec = load_spec(spec_path)
    items = [{"prompt": render_prompt(spec, r)} for r in held[:3]]
    kept, figures = guard_examples(spec, spec_path, items)
    assert kept == items and figures["enabled"] is False and figures["removed"] == 0
    block = contamination_summary({"contamination": figures}, None)
    assert "Off (`contamination.enabled: false`)" in "\n".join(report_lines(block))


def test_pairs_are_checked_by_their_chosen_and_rejected_texts_too(rows):
    """A DPO pair with an unrelated prompt whose chosen text copies a held-out prompt goes when
    its texts are checked (text answers), stays when only the prompt is (classification)."""
    from agents.pairs import Pair
    from flows.contamination import held_out_index

    spec_path, spec, held, others = rows
    c = spec.contamination
    index = held_out_index(spec_path, c.threshold, c.ngram, c.num_perm)
    leak = Pair(row_id=1, prompt=render_prompt(spec, others[0]),
                chosen=render_prompt(spec, held[0]).lower(), rejected="No.")
    fine = Pair(row_id=2, prompt=render_prompt(spec, others[1]), chosen="A short summary.",
                rejected="Something else.")
    kept, figures = guard(index, [leak, fine], lambda p: [p.prompt, p.chosen, p.rejected])
    assert kept == [fine] and figures["removed"] == 1
    assert figures["sample"][0]["similarity"] == 1.0  # casefolded: the same shingles
    kept, _ = guard(index, [leak, fine], lambda p: [p.prompt])
    assert kept == [leak, fine]


def test_summary_block_and_report_section():
    sft = {"enabled": True, "checked": 40, "removed": 2, "threshold": 0.25, "ngram": 2,
           "num_perm": 256, "shingles": "word 2-grams, casefolded, punctuation dropped",
           "held_out_rows": 30, "sample": [{"train_prompt": "Title: a | b", "held_out":
                                            "Title: a b", "similarity": 0.9}]}
    dpo = {**sft, "checked": 20, "removed": 1, "sample": []}
    block = contamination_summary({"contamination": sft}, {"contamination": dpo})
    assert (block["sft_removed"], block["dpo_removed"], block["dpo_checked"]) == (2, 1, 20)
    text = "\n".join(report_lines(block))
    assert "## Contamination guard" in text and "**2** of 40 SFT examples" in text
    assert "**1** of 20 DPO pairs" in text and ">= 0.25" in text
    assert "Title: a \\| b" in text  # a pipe in a text does not break the table
    assert contamination_summary({}, None)["sft_removed"] == 0  # a dataset from before the guard


def test_a_bad_threshold_names_its_field():
    data = {**DEMO, "contamination": {"threshold": 1.5}}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert any(p.startswith("contamination.threshold") for p in e.value.problems)
    assert parse_spec(DEMO).contamination.enabled is True  # the demo spec as it is


# ── the compact index gives NearDuplicates' verdicts ─────────────────────────────────────────
def test_signature_is_datasketchs_minhash_of_the_shingles():
    """The index hashes each shingle once (SHA-1); its MinHash is datasketch's default one."""
    from datasketch import MinHash

    from agents.text_diversity import shingles
    from flows.contamination import HeldOutIndex, shingle_hashes

    text = "Title: Shares jump\nLead: Carmaker shares jumped 5% after record profits, it said."
    index = HeldOutIndex([], threshold=0.3)
    reference = MinHash(num_perm=256, seed=1)
    reference.update_batch([s.encode("utf-8") for s in shingles(text, 2)])
    assert (index._signature(shingle_hashes(text, 2)) == reference.hashvalues).all()
    assert len(shingle_hashes(text, 2)) == len(shingles(text, 2))  # no 64-bit collision


@pytest.mark.parametrize("threshold", [0.3, 0.15, 0.5])  # bands of 2, 1 and 3 rows
def test_verdicts_are_those_of_near_duplicates(rows, threshold):
    """Every verdict (which held-out prompt, its exact similarity) of the compact index equals
    that of NearDuplicates, the structure it replaces, over the warehouse's rows and edited
    copies of held-out rows."""
    from agents.text_diversity import NearDuplicates
    from flows.contamination import HeldOutIndex, _excerpt

    _, spec, held, others = rows
    prompts = [render_prompt(spec, r) for r in held]
    index = HeldOutIndex(prompts, threshold)
    near = NearDuplicates(threshold=threshold, num_perm=256, ngram=2)
    for k, prompt in enumerate(prompts):
        near.add(str(k), prompt)
    rng = random.Random(1)
    texts = [render_prompt(spec, r) for r in others]
    for n, row in enumerate(held):
        title, body = EDITS[sorted(EDITS)[n % len(EDITS)]](row["title"], row["body"], rng)
        texts.append(render_prompt(spec, {**row, "title": title, "body": body}))
    found = 0
    for text in texts:
        hit = near.find(text)
        want = None if hit is None else (_excerpt(near.text_of(hit[0])), hit[1])
        assert index.match(text) == want
        found += want is not None
    assert len(index) == len(held) and found >= len(held) * 0.9


def test_an_empty_index_matches_nothing():
    from flows.contamination import HeldOutIndex

    index = HeldOutIndex(iter([]), threshold=0.3)
    assert len(index) == 0 and index.match("Title: anything\nLead: at all") is None


def test_scale_point_builds_both_structures_with_the_same_verdicts(small_warehouse_url):
    """bench/contamination.py --scale's work, small: made-up held-out prompts indexed by the
    compact index ("after") and by NearDuplicates ("before"), the same verdicts."""
    from bench.contamination import scale_point

    db = small_warehouse_url.removeprefix("sqlite:///")
    spec = parse_spec(DEMO)
    after, verdicts = scale_point("after", spec, db, 300, 60, 0)
    before, old = scale_point("before", spec, db, 300, 60, 0)
    assert verdicts == old
    assert after["copies_removed"] == before["copies_removed"] >= 10  # of 12 edited copies
    assert after["fresh_removed"] == before["fresh_removed"] <= 2  # of 48 made-up rows
