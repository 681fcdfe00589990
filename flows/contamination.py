"""The contamination guard: no training example or DPO pair may be a near-copy of a held-out row.

Curation already drops EXACT copies of held-out prompts. A paraphrase or a lightly edited copy
(a synonym here, a typo there, a new first sentence, the title reworded) passes that check and
still teaches the model the answer to an evaluation row. So every training text is compared
with the rendered prompts of the held-out rows, and one too similar to any of them goes:

    index = held_out_index(spec_path, threshold, ngram, num_perm)  # once per process
    kept, figures = guard(index, examples, texts=lambda ex: [ex["prompt"]])
    kept, figures = guard_examples(spec, spec_path, examples)       # the spec's settings

The held-out rows are streamed from the warehouse (`iter_eval_rows`, in batches) and rendered
with the spec's prompt template (`render_prompt`), exactly as evaluation sees them. The index is
`agents.text_diversity.NearDuplicates`: MinHash + MinHashLSH (datasketch) proposes candidates,
each is verified by its EXACT Jaccard similarity, so the LSH decides speed, never a verdict.

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

A missed copy inflates the evaluation; a false alarm costs one training example. Memory: the
index holds each held-out prompt's text, shingle set and its key in each of the LSH's 128 bands
(datasketch keeps a Python set per bucket): ~46 KB per held-out row measured, so 10,000
held-out rows take ~0.5 GB; `evaluation.max_rows` bounds the rows evaluated, and so indexed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TypeVar

from agents.text_diversity import NearDuplicates
from flows.spec import Spec, load_spec
from flows.warehouse import iter_eval_rows, render_prompt, shared_engine

T = TypeVar("T")
SAMPLE = 5  # matches shown in the figures
EXCERPT = 160  # characters of each text shown in a sample


def shingling(ngram: int) -> str:
    """The shingling in words, for the figures and the reports."""
    return f"word {ngram}-grams, casefolded, punctuation dropped"


class HeldOutIndex:
    """The rendered prompts of the held-out rows, indexed for near-duplicate look-ups.

    `match(text)` -> (held-out prompt, similarity) of the most similar held-out prompt whose
    exact word n-gram Jaccard similarity reaches the threshold, or None."""

    def __init__(self, threshold: float, ngram: int = 2, num_perm: int = 256):
        self._near = NearDuplicates(threshold=threshold, num_perm=num_perm, ngram=ngram)
        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm

    def __len__(self) -> int:
        return len(self._near)

    def add(self, key: str, prompt: str) -> None:
        self._near.add(key, prompt)

    def match(self, text: str) -> tuple[str, float] | None:
        hit = self._near.find(text)
        return None if hit is None else (self._near.text_of(hit[0]), hit[1])

    @classmethod
    def from_warehouse(cls, spec: Spec, engine, threshold: float, ngram: int, num_perm: int
                       ) -> HeldOutIndex:
        """Every held-out row of the warehouse (streamed), rendered with the spec's template."""
        index = cls(threshold, ngram, num_perm)
        id_col = spec.slicing.id_column
        for row in iter_eval_rows(spec, engine):
            index.add(str(row[id_col]), render_prompt(spec, row))
        return index


@functools.cache
def held_out_index(spec_path: str, threshold: float, ngram: int, num_perm: int) -> HeldOutIndex:
    """The held-out index of a spec's warehouse, built once per process (per settings)."""
    spec = load_spec(spec_path)
    return HeldOutIndex.from_warehouse(spec, shared_engine(spec.warehouse.url), threshold,
                                       ngram, num_perm)


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT else flat[:EXCERPT - 1] + "…"


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
            sample.append({"train_prompt": _excerpt(text), "held_out": _excerpt(hit[0]),
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
