"""Generation: free text written from the row (a headline, a summary, a reply).

The answer is text within `task.rules` (agents.answers.TextAnswer: length in words and
characters, forbidden and required patterns, no copy of the prompt) and not a near-duplicate
of an answer accepted for another row (agents.text_diversity, MinHash over word trigrams).
With a gold column, models are also scored by ROUGE-L and chrF against it; the judge's
pairwise win-rate decides promotion (flows/kinds/text.py).
"""

from __future__ import annotations

from agents.answers import TextAnswer
from agents.text_diversity import NearDuplicates, drop_near_duplicates, length_report
from flows.kinds.text import TextKind
from training.text_eval import reference_scores


class Generation(TextKind):
    name = "generation"
    references = ("rouge_l", "chrf")

    def answer_rule(self) -> TextAnswer:
        r = self.task.rules
        return TextAnswer(min_words=r.min_words, max_words=r.max_words, min_chars=r.min_chars,
                          max_chars=r.max_chars, forbidden=tuple(r.forbidden),
                          required=tuple(r.required), max_prompt_overlap=r.max_prompt_overlap)

    def near_duplicates(self) -> NearDuplicates:
        rules = self.task.rules
        return NearDuplicates(threshold=rules.max_similarity, ngram=rules.similarity_ngram)

    def reference(self, outputs: list, gold: list) -> dict:
        scores = reference_scores([str(o) for o in outputs], [str(g) for g in gold])
        return {"rouge_l": scores["rouge_l"], "chrf": scores["chrf"]}

    def curate(self, kept: list[dict]) -> tuple[list[dict], dict]:
        """Near-duplicate answers across slices go (the first of each group stays); the
        answers' length distribution is measured against `rules.target_words`."""
        rules = self.task.rules
        # the same answer for the same prompt went with the exact duplicates before this
        keep, dropped = drop_near_duplicates([(f"{e['slice_id']}/{e['row_id']}", e["label"])
                                              for e in kept], rules.max_similarity,
                                             ngram=rules.similarity_ngram)
        keep = set(keep)
        kept = [e for e in kept if f"{e['slice_id']}/{e['row_id']}" in keep]
        target = self.task.rules.target_words
        lengths = length_report([e["label"] for e in kept],
                                tuple(target) if target else None)
        return kept, {"near_duplicates": len(dropped), "answer_lengths": lengths}
