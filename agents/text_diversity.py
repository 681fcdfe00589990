"""Diversity controls for free-text answers: near-duplicate answers across rows, and lengths.

    index = NearDuplicates(threshold=0.8)      # MinHash + LSH over word 3-gram shingles
    index.find("Carmaker shares jump after record profits")  # ("7", 0.83) or None
    index.add("7", "Carmaker shares soar after record profits")
    index.remove("7")                          # a revoked answer

    kept, dropped = drop_near_duplicates([(key, text), ...], threshold=0.8)   # curation
    length_report(texts, target_words=(4, 14))  # word counts, histogram, share in target

An answer is shingled into its word n-grams (words are runs of letters and digits, casefolded,
so punctuation and case do not count; a text of fewer than n words is one shingle, its whole
word tuple). A JSON object (or JSON object text) is shingled over its canonical JSON text
(sorted keys), so key order does not count. The similarity reported is the EXACT Jaccard
similarity of two shingle sets: datasketch's MinHashLSH only proposes candidates, tuned to
miss almost none at the threshold, and each candidate is verified against the kept sets, so
the LSH never causes a false positive. `length_report` counts words as the text answer rule
does (runs of non-space characters), so its figures match `TextAnswer(min_words, max_words)`.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from typing import Any

__all__ = ["NearDuplicates", "drop_near_duplicates", "length_report", "shingles"]

_TOKEN = re.compile(r"\w+(?:['’]\w+)*")  # a word for shingling: "Don't" -> "don't"
_WORD = re.compile(r"\S+")  # a word for counting, as TextAnswer counts them
_RECALL = 0.999  # the LSH's chance of proposing a pair exactly at the threshold, at least


def _canonical(text: Any) -> str:
    """The text an answer is shingled over: JSON objects (or their text) canonicalised."""
    if isinstance(text, str):
        stripped = text.strip()
        if not stripped.startswith("{"):
            return text
        try:
            text = json.loads(stripped)  # text starting with "{" parses to a dict or fails
        except json.JSONDecodeError:
            return text
    return json.dumps(text, ensure_ascii=False, sort_keys=True)


def shingles(text: Any, n: int = 3) -> frozenset[str]:
    """The word n-gram shingles of a text (each n-gram joined by single spaces)."""
    words = [w.casefold() for w in _TOKEN.findall(_canonical(text))]
    if len(words) < n:
        return frozenset({" ".join(words)})
    return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if a is b or a == b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """LSH (bands, rows per band): the most rows per band (fewest false candidates) for which
    a pair exactly at the threshold still becomes a candidate with probability >= _RECALL.
    Candidates are verified exactly, so a false candidate costs time, a missed one a miss."""
    for r in range(num_perm // 2, 0, -1):
        b = num_perm // r
        if 1.0 - (1.0 - threshold ** r) ** b >= _RECALL:
            return b, r
    return num_perm, 1


class NearDuplicates:
    """An index of accepted answers that finds the one most like a new answer.

    `find(text, key=None)` -> (key, similarity) of the most similar indexed answer whose exact
    Jaccard similarity reaches `threshold` (ties: the earliest added), or None; an answer never
    matches its own key. `add(key, text)` indexes (or replaces) a row's answer, `remove(key)`
    drops it (unknown keys are ignored), `text_of(key)` is the answer as added.
    Threshold 1.0 matches identical shingle sets only.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 3,
                 seed: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {ngram}")
        if num_perm < 4:
            raise ValueError(f"num_perm must be at least 4, got {num_perm}")
        from datasketch import MinHash, MinHashLSH  # ~0.6 s to import: only when indexing

        self.threshold = threshold
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed
        self._empty = MinHash(num_perm=num_perm, seed=seed)
        self._lsh = MinHashLSH(num_perm=num_perm, params=_bands(threshold, num_perm))
        self._sets: dict[str, frozenset[str]] = {}
        self._texts: dict[str, str] = {}
        self._order: dict[str, int] = {}
        self._added = 0

    def __len__(self) -> int:
        return len(self._sets)

    def __contains__(self, key: object) -> bool:
        return key in self._sets

    def text_of(self, key: str) -> str | None:
        return self._texts.get(key)

    def _minhash(self, sh: frozenset[str]):
        m = self._empty.copy()
        m.update_batch([s.encode("utf-8") for s in sh])
        return m

    def _find(self, sh: frozenset[str], mh, key: str | None) -> tuple[str, float] | None:
        best: tuple[float, int, str] | None = None
        for other in self._lsh.query(mh):
            if other == key:
                continue
            sim = _jaccard(sh, self._sets[other])
            if sim >= self.threshold - 1e-12:
                rank = (-sim, self._order[other], other)
                if best is None or rank < best:
                    best = rank
        return None if best is None else (best[2], -best[0])

    def find(self, text: Any, key: str | None = None) -> tuple[str, float] | None:
        """The most similar indexed answer at or above the threshold, other than `key`'s."""
        sh = shingles(text, self.ngram)
        return self._find(sh, self._minhash(sh), key)

    def add(self, key: str, text: Any) -> None:
        """Index `key`'s answer (replacing the one it had)."""
        if key in self._sets:
            self.remove(key)
        sh = shingles(text, self.ngram)
        self._add(key, text, sh, self._minhash(sh))

    def _add(self, key: str, text: Any, sh: frozenset[str], mh) -> None:
        self._lsh.insert(key, mh, check_duplication=False)
        self._sets[key] = sh
        self._texts[key] = text if isinstance(text, str) else _canonical(text)
        self._order[key] = self._added
        self._added += 1

    def remove(self, key: str) -> None:
        """Drop `key`'s answer (a revoked one); a key not indexed is ignored."""
        if self._sets.pop(key, None) is None:
            return
        self._lsh.remove(key)
        del self._texts[key], self._order[key]


def drop_near_duplicates(items: list[tuple[str, str]], threshold: float = 0.8, ngram: int = 3
                         ) -> tuple[list[str], list[tuple[str, str, float]]]:
    """Keep the first of each group of near-duplicate texts, in the order given.

    Returns (kept keys, dropped as (key, kept key it duplicates, similarity)). Each text is
    compared with the texts kept so far (a dropped text is never the reason to drop another).
    Keys must be unique.
    """
    index = NearDuplicates(threshold=threshold, ngram=ngram)
    kept: list[str] = []
    dropped: list[tuple[str, str, float]] = []
    seen: set[str] = set()
    for key, text in items:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen.add(key)
        sh = shingles(text, index.ngram)
        mh = index._minhash(sh)
        hit = index._find(sh, mh, key)
        if hit is None:
            kept.append(key)
            index._add(key, text, sh, mh)
        else:
            dropped.append((key, hit[0], hit[1]))
    return kept, dropped


def _quantile(xs: list[int], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default) of sorted xs."""
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def length_report(texts: list[str], target_words: tuple[int, int] | None = None,
                  bins: int = 8) -> dict:
    """Word counts of texts: n, mean_words, median_words, p10, p90, min, max, a histogram
    (at most `bins` contiguous bins {"low", "high", "count"}, inclusive integer word counts,
    equal widths but the last, covering min..max), and with a target (low, high), inclusive,
    the shares of texts inside it, below it and above it (None without a target)."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if target_words is not None and target_words[0] > target_words[1]:
        raise ValueError(f"target_words {target_words} is not (low, high)")
    counts = sorted(len(_WORD.findall(t)) for t in texts)
    n = len(counts)
    report: dict = {"n": n, "mean_words": None, "median_words": None, "p10": None,
                    "p90": None, "min": None, "max": None, "histogram": [],
                    "share_in_target": None, "share_below": None, "share_above": None}
    if not n:
        return report
    low, high = counts[0], counts[-1]
    width = math.ceil((high - low + 1) / bins)
    histogram = []
    for edge in range(low, high + 1, width):
        top = min(edge + width - 1, high)
        histogram.append({"low": edge, "high": top,
                          "count": sum(1 for c in counts if edge <= c <= top)})
    report.update(mean_words=statistics.fmean(counts), median_words=statistics.median(counts),
                  p10=_quantile(counts, 0.1), p90=_quantile(counts, 0.9), min=low, max=high,
                  histogram=histogram)
    if target_words is not None:
        lo, hi = target_words
        below = sum(1 for c in counts if c < lo)
        above = sum(1 for c in counts if c > hi)
        report.update(share_in_target=(n - below - above) / n, share_below=below / n,
                      share_above=above / n)
    return report
