"""Diversity controls for text answers (agents/text_diversity.py): the near-duplicate index
(MinHash + LSH candidates, verified by exact Jaccard), curation's drop_near_duplicates, and the
length report's figures on known inputs."""

from __future__ import annotations

import random

import pytest

from agents.text_diversity import NearDuplicates, drop_near_duplicates, length_report, shingles

HEADLINE = "Carmaker shares jump after record quarterly profits beat forecasts"  # 9 words
LAST_WORD_CHANGED = "Carmaker shares jump after record quarterly profits beat expectations"
MIDDLE_WORD_CHANGED = "Carmaker shares jump after strong quarterly profits beat forecasts"
UNRELATED = "Heavy rain expected across the north of the country this weekend"


def jaccard(a: str, b: str, n: int = 3) -> float:
    x, y = shingles(a, n), shingles(b, n)
    return len(x & y) / len(x | y)


# ── the index ───────────────────────────────────────────────────────────────────────────────
def test_a_changed_word_is_found_above_the_threshold_and_not_below_it():
    assert jaccard(HEADLINE, LAST_WORD_CHANGED) == pytest.approx(6 / 8)
    index = NearDuplicates(threshold=0.7)
    index.add("7", HEADLINE)
    assert index.find(LAST_WORD_CHANGED) == ("7", pytest.approx(0.75))
    assert index.find(UNRELATED) is None
    strict = NearDuplicates(threshold=0.8)
    strict.add("7", HEADLINE)
    assert strict.find(LAST_WORD_CHANGED) is None  # 0.75 < 0.8
    # a word changed mid-headline breaks three 3-grams (4/10 shared); single words see it
    assert strict.find(MIDDLE_WORD_CHANGED) is None
    words = NearDuplicates(threshold=0.8, ngram=1)
    words.add("7", HEADLINE)
    assert words.find(MIDDLE_WORD_CHANGED) == ("7", pytest.approx(8 / 10))


def test_case_punctuation_and_spacing_do_not_count_and_short_texts_are_one_shingle():
    index = NearDuplicates(threshold=1.0)
    index.add("1", HEADLINE)
    assert index.find("  CARMAKER shares jump, after record quarterly profits -- beat "
                      "forecasts!") == ("1", 1.0)
    assert shingles("Profits soar") == {"profits soar"}
    index.add("2", "Profits soar")
    assert index.find("profits SOAR.") == ("2", 1.0)
    assert index.find("Profits fall") is None
    assert index.find(HEADLINE + " again") is None  # threshold 1.0: identical sets only


def test_json_objects_are_compared_over_their_canonical_text():
    index = NearDuplicates(threshold=1.0)
    index.add("1", {"company": "Acme Motors", "change": "up", "percent": 12})
    assert index.find('{"percent": 12, "change": "up", "company": "Acme Motors"}') == ("1", 1.0)
    assert index.find({"company": "Zenith Foods", "change": "down", "percent": 3}) is None


def test_an_answer_never_matches_its_own_row_and_adding_again_replaces_it():
    index = NearDuplicates()
    index.add("1", HEADLINE)
    assert index.find(HEADLINE, key="1") is None
    assert index.find(HEADLINE, key="2") == ("1", 1.0)
    index.add("1", UNRELATED)
    assert len(index) == 1 and index.text_of("1") == UNRELATED
    assert index.find(HEADLINE) is None and index.find(UNRELATED) == ("1", 1.0)


def test_remove_forgets_a_revoked_answer():
    index = NearDuplicates()
    index.add("1", HEADLINE)
    index.add("2", UNRELATED)
    index.remove("1")
    index.remove("no such row")  # ignored
    assert len(index) == 1 and "1" not in index and index.text_of("1") is None
    assert index.find(HEADLINE) is None and index.find(UNRELATED) == ("2", 1.0)
    index.add("1", HEADLINE)  # can come back
    assert index.find(HEADLINE) == ("1", 1.0)


def test_the_most_similar_answer_wins_and_ties_go_to_the_earliest():
    index = NearDuplicates(threshold=0.5)
    index.add("b", LAST_WORD_CHANGED)
    index.add("a", HEADLINE)
    index.add("c", HEADLINE)
    assert index.find(HEADLINE) == ("a", 1.0)
    assert index.find(LAST_WORD_CHANGED) == ("b", 1.0)


def test_similarities_are_exact_and_match_all_pairs_at_a_high_threshold():
    """Variants of one sentence spread around the threshold: every answer the index gives is
    the all-pairs best by exact Jaccard (no LSH false positive, no miss)."""
    rng = random.Random(3)
    sentence = ("the central bank held interest rates steady on thursday while warning that "
                "inflation could stay above its target for longer than markets expect")
    base = sentence.split()
    texts = []
    for _ in range(300):
        words = base[rng.randint(0, 2):len(base) - rng.randint(0, 2)]
        for _ in range(rng.choice([0, 0, 1, 2])):
            words[rng.randrange(len(words))] = f"w{rng.randrange(40)}"
        texts.append(" ".join(words))
    sets = [shingles(t) for t in texts]
    index = NearDuplicates(threshold=0.85)
    hits = set()
    for i, text in enumerate(texts):
        best = None
        for j in range(i):
            sim = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            if sim >= 0.85 and (best is None or sim > best):
                best = sim
        got = index.find(text)
        if best is None:
            assert got is None, i
        else:
            assert got is not None and got[1] == pytest.approx(best), i
            assert got[1] == pytest.approx(jaccard(text, texts[int(got[0])]))
            hits.add(round(got[1], 3))
        index.add(str(i), text)
    assert len(hits) >= 3 and min(hits) < 1.0  # near-duplicates, not only copies


def test_bad_parameters_are_refused():
    for kwargs in ({"threshold": 0.0}, {"threshold": 1.5}, {"ngram": 0}):
        with pytest.raises(ValueError):
            NearDuplicates(**kwargs)


# ── curation ────────────────────────────────────────────────────────────────────────────────
def test_drop_near_duplicates_keeps_the_first_of_each_group_in_order():
    items = [("a", HEADLINE), ("b", UNRELATED), ("a2", HEADLINE.upper()),
             ("b2", UNRELATED + "!"), ("a3", LAST_WORD_CHANGED), ("c", "Something else entirely")]
    kept, dropped = drop_near_duplicates(items, threshold=0.7)
    assert kept == ["a", "b", "c"]
    assert dropped == [("a2", "a", 1.0), ("b2", "b", 1.0), ("a3", "a", pytest.approx(0.75))]
    kept, dropped = drop_near_duplicates(items, threshold=1.0)
    assert kept == ["a", "b", "a3", "c"]
    with pytest.raises(ValueError, match="twice"):
        drop_near_duplicates([("a", "x"), ("a", "y")], threshold=0.8)


def test_drop_near_duplicates_agrees_with_all_pairs_on_a_thousand_texts():
    rng = random.Random(7)
    vocab = [f"v{i}" for i in range(400)]
    items = []
    for i in range(1000):
        if i % 5 == 4:
            words = items[rng.randrange(i)][1].split() + [rng.choice(vocab)]
        else:
            words = rng.choices(vocab, k=rng.randint(4, 12))
        items.append((str(i), " ".join(words)))
    kept, dropped = drop_near_duplicates(items, threshold=0.6)
    sets = {key: shingles(text) for key, text in items}
    brute_kept, brute_dropped = [], []
    for key, _ in items:
        best = (0.0, None)
        for k in brute_kept:  # in kept order, so a tie keeps the earliest
            sim = len(sets[key] & sets[k]) / len(sets[key] | sets[k])
            if sim > best[0]:
                best = (sim, k)
        if best[0] >= 0.6:
            brute_dropped.append((key, best[1], best[0]))
        else:
            brute_kept.append(key)
    assert kept == brute_kept
    assert [d[:2] for d in dropped] == [d[:2] for d in brute_dropped]
    assert [d[2] for d in dropped] == pytest.approx([d[2] for d in brute_dropped])
    assert len(dropped) > 100


# ── lengths ─────────────────────────────────────────────────────────────────────────────────
def test_length_report_on_known_counts():
    texts = [" ".join(["w"] * n) for n in (3, 1, 2, 10, 4, 5, 6, 7, 8, 9)]
    report = length_report(texts, target_words=(3, 8), bins=4)
    assert report == {
        "n": 10, "mean_words": 5.5, "median_words": 5.5, "p10": pytest.approx(1.9),
        "p90": pytest.approx(9.1), "min": 1, "max": 10,
        "histogram": [{"low": 1, "high": 3, "count": 3}, {"low": 4, "high": 6, "count": 3},
                      {"low": 7, "high": 9, "count": 3}, {"low": 10, "high": 10, "count": 1}],
        "share_in_target": 0.6, "share_below": 0.2, "share_above": 0.2,
    }


def test_length_report_counts_words_as_the_text_rule_does_and_handles_edges():
    report = length_report(["Profits soar -- again!", "One"])  # "--" is a word, as TextAnswer
    assert (report["min"], report["max"], report["mean_words"]) == (1, 4, 2.5)
    assert report["share_in_target"] is None and report["share_below"] is None
    assert sum(b["count"] for b in report["histogram"]) == 2
    assert report["histogram"][0]["low"] == 1 and report["histogram"][-1]["high"] == 4
    single = length_report(["a b c"], target_words=(4, 6))
    assert single["p10"] == single["p90"] == single["median_words"] == 3
    assert single["histogram"] == [{"low": 3, "high": 3, "count": 1}]
    assert (single["share_in_target"], single["share_below"], single["share_above"]) == (0, 1, 0)
    empty = length_report([], target_words=(1, 2))
    assert empty["n"] == 0 and empty["histogram"] == [] and empty["mean_words"] is None
    with pytest.raises(ValueError):
        length_report(["a"], target_words=(5, 2))
