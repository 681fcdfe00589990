"""The contamination guard: no training example or DPO pair may be a near-copy of a held-out row.

Curation already drops EXACT copies of held-out prompts. A paraphrase or a lightly edited copy
(a synonym here, a typo there, a new first sentence, the title reworded) passes that check and
still teaches the model the answer to an evaluation row. So every training text is compared
with the rendered prompts of the held-out rows, and one too similar to any of them goes:

    index = held_out_index(spec_path, threshold, ngram, num_perm)  # once per process
    kept, figures = guard(index, examples, texts=lambda ex: [ex["prompt"]])
    kept, figures = guard_examples(spec, spec_path, examples)       # the spec's settings

The held-out rows are streamed from the warehouse (`iter_eval_rows`, in batches) and rendered
with the spec's prompt template (`render_prompt`), exactly as evaluation sees them. The index
(`HeldOutIndex`) is a MinHash LSH, as `agents.text_diversity.NearDuplicates` is, in numpy arrays:
the LSH proposes candidates, each is verified by its EXACT Jaccard similarity, so the LSH
decides speed, never a verdict.

Shingling, measured (a scratch run of bench/contamination.py's edits on the demo: 400 edited
copies of held-out rows, and the 1,806 clean rows that are not genuine corpus copies of a
held-out article; each row's best exact Jaccard similarity to any held-out prompt):

    shingles           lowest copy  highest clean  threshold: copies caught, clean removed
    word 1-grams       0.333        0.508          0.30: 100%, 34    0.40: 99.5%, 3
    word 2-grams       0.255        0.256          0.25: 100%, 1     0.30: 97.8%, 0
    word 3-grams       0.193        0.170          0.15: 100%, 1     0.20: 99.8%, 0
    character 5-grams  0.292        0.353          0.30: 99.8%, 2    0.40: 96.8%, 0

Chosen: word 2-grams after casefolding and dropping punctuation (`text_diversity.shingles`,
n=2), threshold 0.3. Single words are shared by unrelated news stories (the clean tail reaches
0.5); character 5-grams overlap more (the highest clean row above the lowest copy) and took
five times as long. Word 3-grams separate this corpus slightly better, but lose three shingles
per edited word, so an edited copy falls to ~0.2, where the LSH (recall 0.999 at the
threshold) needs one-row bands: every held-out row becomes a candidate and the index doubles.
Between 0.25 and 0.3 word 2-grams meet follow-up articles on the same story as a held-out one
(the lead repeats its names and facts: 0.253 and 0.259 in the 200-row test warehouse, 2 of 156
training rows; 0.256 on the demo), which are not copies; at 0.3 none was removed, and the copies
missed (2-3%) are those with the most edits stacked (a dropped first sentence plus word drops
or a reworded title). bench/RESULTS.md has the bench's threshold sweep.

A missed copy inflates the evaluation; a false alarm costs one training example.

Memory: a warehouse of 100k-1M rows holds out 18k-180k rows (18%), every one indexed unless
`evaluation.max_rows` bounds them. The index was `NearDuplicates` (datasketch's MinHashLSH),
built for a few thousand answers: ~46 KB a held-out row (tracemalloc, on the demo's 2,225
prompts: ~34 KB the 128 band tables, a dict per band with a bytes key and a Python set per
bucket; ~6 KB datasketch's key -> band keys lists; ~6 KB the frozenset of shingle strings;
0.4 KB the prompt text), so 180k rows would take ~8.6 GB. `HeldOutIndex` holds, per row, one
uint64 per band (1 KB: a 64-bit bucket tag whose low bits are replaced by the row number, all
rows' entries in one sorted array), the shingles as sorted 64-bit hashes (~0.5 KB) and the
160-character excerpt the report's sample shows (UTF-8); no MinHash, no prompt text, no
Python object per row: ~1.7 KB a row (`nbytes`), ~0.3 GB for 180k rows. Building peaks at
about twice the band entries (each chunk's tags, then all of them concatenated and sorted):
~3.6 KB a row of peak RSS at 100k rows. Building takes ~0.1-0.15 ms a row (was ~0.6-0.7 ms),
the rendering of the prompts apart. bench/RESULTS.md ("Contamination guard") has the figures,
`bench/contamination.py --scale N --compare` measures both.

The verdicts are NearDuplicates': the MinHash is datasketch's (the same permutations, seed 1,
and the same 32-bit input hash: the low half of each shingle's SHA-1 hash, datasketch's
`sha1_hash32`) and the bands are `_bands`' (128 bands of 2 rows at 0.3, recall 0.999 at the
threshold kept), so every candidate the datasketch LSH proposed is proposed here too; another
bucket shares a tag only by a ~2^-44 coincidence (2^-(64 - log2 rows)), a false candidate that
the exact check discards. The exact check counts equal 64-bit shingle hashes (the first 8
bytes of the SHA-1, stable across processes, unlike Python's `hash`): two different shingles of
a pair collide with probability ~58^2 / 2^64, negligible. Measured: the same verdicts (prompt
matched and similarity) as NearDuplicates on every check of the bench, at every threshold of
its sweep, and on 5,000 checks against 20k and 100k made-up held-out rows.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np

from agents.text_diversity import _bands, shingles
from flows.spec import Spec, load_spec
from flows.warehouse import iter_eval_rows, render_prompt, shared_engine

T = TypeVar("T")
SAMPLE = 5  # matches shown in the figures
EXCERPT = 160  # characters of each text shown in a sample
CHUNK = 4096  # rows whose band tags are computed at once while building
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LOW32 = np.uint64(0xFFFFFFFF)


def shingling(ngram: int) -> str:
    """The shingling in words, for the figures and the reports."""
    return f"word {ngram}-grams, casefolded, punctuation dropped"


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT else flat[:EXCERPT - 1] + "…"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that spreads every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _offsets(lengths: Iterable[np.ndarray]) -> np.ndarray:
    """Where each item starts in the items concatenated, and (last) where they end."""
    return np.concatenate([[0], np.cumsum(np.concatenate(list(lengths)))]).astype(np.int64)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """The text's word n-gram shingles as sorted, unique 64-bit hashes: the first 8 bytes of each
    shingle's SHA-1 (little-endian), whose low 32 bits are datasketch's `sha1_hash32`."""
    digests = b"".join(hashlib.sha1(s.encode("utf-8")).digest()[:8]
                       for s in shingles(text, ngram))
    return np.unique(np.frombuffer(digests, dtype="<u8").astype(np.uint64))


class HeldOutIndex:
    """The rendered prompts of the held-out rows, indexed for near-duplicate look-ups.

    `HeldOutIndex(prompts, threshold, ngram, num_perm)` indexes the prompts (any iterable,
    consumed once); `match(text)` -> (excerpt of the held-out prompt, similarity) of the most
    similar held-out prompt whose exact word n-gram Jaccard similarity reaches the threshold
    (ties: the earliest indexed), or None. Built once, then read-only.

    The LSH: each prompt's MinHash signature (datasketch's, `num_perm` values) is cut into the
    bands of `text_diversity._bands`; a band's values and its number are mixed into a 64-bit
    tag, and two prompts are candidates when one band's tags agree. Each (prompt, band) is one
    uint64 entry, the tag's high bits and the row number in the low bits, in one sorted array:
    a query's band tags are looked up with one `searchsorted` (and a second for the few that
    hit). Each candidate is then verified by the exact Jaccard similarity of the shingle hash
    sets (all rows' sorted hashes concatenated, with offsets)."""

    def __init__(self, prompts: Iterable[str], threshold: float, ngram: int = 2,
                 num_perm: int = 256):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        from datasketch import MinHash  # ~0.6 s to import: only when indexing

        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        self._b, self._r = _bands(threshold, num_perm)
        # the shingles come hashed: the MinHash hashes them no further (`int`)
        self._minhash = MinHash(num_perm=num_perm, seed=1, hashfunc=int)
        chunks, batch = [], []
        for prompt in prompts:
            batch.append(prompt)
            if len(batch) == CHUNK:
                chunks.append(self._chunk(batch))
                batch = []
        if batch or not chunks:
            chunks.append(self._chunk(batch))
        tags, hashes, counts, excerpts, lengths = zip(*chunks)
        del chunks, batch
        self._hashes, self._starts = np.concatenate(hashes), _offsets(counts)
        self._excerpts, self._excerpt_starts = b"".join(excerpts), _offsets(lengths)
        del hashes, excerpts
        # one entry per (row, band): the tag's high bits, the row number in the low `bits`
        n = len(self._starts) - 1
        bits = max(1, (n - 1).bit_length())
        self._row_mask = np.uint64((1 << bits) - 1)
        entries = np.concatenate(tags)
        del tags
        entries &= ~self._row_mask
        entries |= np.arange(n, dtype=np.uint64)[:, None]
        self._entries = entries.ravel()
        self._entries.sort()

    def _chunk(self, prompts: list[str]) -> tuple:
        """A chunk of rows, as arrays: (band tags, shingle hashes, shingles per row, excerpts
        (UTF-8, joined), excerpt lengths)."""
        hashes = [shingle_hashes(p, self.ngram) for p in prompts]
        sigs = [self._signature(h) for h in hashes]
        excerpts = [_excerpt(p).encode("utf-8") for p in prompts]
        return (self._tags(np.array(sigs, np.uint32).reshape(len(sigs), self.num_perm)),
                np.concatenate([np.zeros(0, np.uint64), *hashes]),
                np.array([len(h) for h in hashes], np.int64), b"".join(excerpts),
                np.array([len(e) for e in excerpts], np.int64))

    def __len__(self) -> int:
        return len(self._starts) - 1

    @property
    def nbytes(self) -> int:
        """The bytes the index holds: its arrays and the excerpts."""
        return (self._entries.nbytes + self._hashes.nbytes + self._starts.nbytes
                + self._excerpt_starts.nbytes + len(self._excerpts))

    def _signature(self, hashes: np.ndarray) -> np.ndarray:
        """datasketch's MinHash signature of the shingles (uint32[num_perm])."""
        m = self._minhash.copy()
        m.update_batch((hashes & _LOW32).tolist())
        return m.hashvalues

    def _tags(self, sigs: np.ndarray) -> np.ndarray:
        """(rows, bands) uint64: band i's r values mixed with i into one tag; equal values in
        the same band give equal tags (so no candidate is lost)."""
        b, r = self._b, self._r
        values = sigs[:, :b * r].reshape(len(sigs), b, r).astype(np.uint64)
        tag = np.broadcast_to(np.arange(1, b + 1, dtype=np.uint64) * _GOLDEN, values.shape[:2])
        for j in range(r):
            tag = _mix(tag ^ values[:, :, j])
        return tag

    def _candidates(self, hashes: np.ndarray) -> np.ndarray:
        """The rows sharing a band's tag with these shingles' signature, sorted."""
        tags = np.sort(self._tags(self._signature(hashes)[None, :])[0] & ~self._row_mask)
        entries, mask = self._entries, self._row_mask
        if not len(entries):
            return np.zeros(0, np.int64)
        lo = np.searchsorted(entries, tags)  # sorted tags: each search starts at the last
        hit = (entries[np.minimum(lo, len(entries) - 1)] & ~mask) == tags  # most bands miss
        if not hit.any():
            return np.zeros(0, np.int64)
        hi = np.searchsorted(entries, tags[hit] | mask, side="right")
        rows = np.concatenate([entries[a:z] for a, z in zip(lo[hit], hi)])
        return np.unique(rows & mask).astype(np.int64)

    def match(self, text: str) -> tuple[str, float] | None:
        q = shingle_hashes(text, self.ngram)
        rows = self._candidates(q)
        if not len(rows):
            return None
        starts, sizes = self._starts[rows], self._starts[rows + 1] - self._starts[rows]
        first = np.cumsum(sizes) - sizes  # each candidate's first shingle among `gathered`
        gathered = self._hashes[np.repeat(starts - first, sizes) + np.arange(sizes.sum())]
        found = q[np.minimum(np.searchsorted(q, gathered), len(q) - 1)] == gathered  # q sorted
        inter = np.add.reduceat(found.astype(np.int64), first)
        sims = inter / (len(q) + sizes - inter)
        ok = sims >= self.threshold - 1e-12
        if not ok.any():
            return None
        best = sims[ok].max()
        row = rows[ok][sims[ok] == best][0]  # rows are sorted: the earliest indexed
        excerpt = self._excerpts[self._excerpt_starts[row]:self._excerpt_starts[row + 1]]
        return excerpt.decode("utf-8"), float(best)

    @classmethod
    def from_warehouse(cls, spec: Spec, engine, threshold: float, ngram: int, num_perm: int
                       ) -> HeldOutIndex:
        """Every held-out row of the warehouse (streamed), rendered with the spec's template."""
        return cls((render_prompt(spec, row) for row in iter_eval_rows(spec, engine)),
                   threshold, ngram, num_perm)


@functools.cache
def held_out_index(spec_path: str, threshold: float, ngram: int, num_perm: int) -> HeldOutIndex:
    """The held-out index of a spec's warehouse, built once per process (per settings)."""
    spec = load_spec(spec_path)
    return HeldOutIndex.from_warehouse(spec, shared_engine(spec.warehouse.url), threshold,
                                       ngram, num_perm)


def guard(index: HeldOutIndex, items: Iterable[T], texts: Callable[[T], list[str]]
          ) -> tuple[list[T], dict]:
    """(items kept, figures): an item goes when any of its texts matches a held-out prompt.

    Figures: checked, removed, threshold, ngram, num_perm, shingles, held_out_rows, and sample
    (the first few removed: {train_prompt, held_out, similarity}, excerpts)."""
    kept: list[T] = []
    removed, checked, sample = 0, 0, []
    for item in items:
        checked += 1
        hit = None
        for text in texts(item):
            hit = index.match(text)
            if hit is not None:
                break
        if hit is None:
            kept.append(item)
            continue
        removed += 1
        if len(sample) < SAMPLE:
            sample.append({"train_prompt": _excerpt(text), "held_out": hit[0],
                           "similarity": round(hit[1], 4)})
    return kept, {"enabled": True, "checked": checked, "removed": removed,
                  "threshold": index.threshold, "ngram": index.ngram,
                  "num_perm": index.num_perm, "shingles": shingling(index.ngram),
                  "held_out_rows": len(index), "sample": sample}


def guard_examples(spec: Spec, spec_path: str, items: list[T],
                   texts: Callable[[T], list[str]] = lambda ex: [ex["prompt"]]
                   ) -> tuple[list[T], dict]:
    """`guard` with the spec's `contamination` settings and the spec's held-out index; with the
    guard disabled, every item is kept and the figures say so."""
    c = spec.contamination
    if not c.enabled:
        return list(items), {"enabled": False, "checked": 0, "removed": 0,
                             "threshold": c.threshold, "ngram": c.ngram,
                             "num_perm": c.num_perm, "shingles": shingling(c.ngram),
                             "held_out_rows": None, "sample": []}
    return guard(held_out_index(spec_path, c.threshold, c.ngram, c.num_perm), items, texts)


def contamination_summary(dataset: dict, pairs: dict | None) -> dict:
    """The run summary's block: what the guard removed from the SFT set and the DPO pairs."""
    sft = dataset.get("contamination") or {}
    dpo = (pairs or {}).get("contamination") or {}
    return {"enabled": sft.get("enabled", False), "threshold": sft.get("threshold"),
            "shingles": sft.get("shingles"), "held_out_rows": sft.get("held_out_rows"),
            "sft_checked": sft.get("checked", 0), "sft_removed": sft.get("removed", 0),
            "dpo_checked": dpo.get("checked", 0), "dpo_removed": dpo.get("removed", 0),
            "sample": [*sft.get("sample", []), *dpo.get("sample", [])][:SAMPLE]}


def report_lines(block: dict | None) -> list[str]:
    """The "Contamination guard" section of the summary page and the model card."""
    from flows.reports.markdown import table  # the reports' helpers, only when reporting

    if not block:
        return []
    lines = ["", "## Contamination guard", ""]
    if not block.get("enabled"):
        off = "Off (`contamination.enabled: false`): only exact copies of held-out prompts went."
        return [*lines, off]
    lines.append(
        f"Near-copies of held-out rows removed: **{block.get('sft_removed', 0)}** of "
        f"{block.get('sft_checked', 0)} SFT examples, **{block.get('dpo_removed', 0)}** of "
        f"{block.get('dpo_checked', 0)} DPO pairs (Jaccard similarity of "
        f"{block.get('shingles')} >= {block.get('threshold')} to any of "
        f"{block.get('held_out_rows')} held-out prompts).")
    sample = block.get("sample") or []
    if sample:
        lines += ["", "Removed, for example:", ""]
        lines += table(["similarity", "training text", "held-out prompt"],
                       [[f"{m['similarity']:.3f}", m["train_prompt"], m["held_out"]]
                        for m in sample], align="rll")
    return lines
