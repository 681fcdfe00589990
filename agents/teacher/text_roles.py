"""The teacher's judge roles for the text kinds (generation, extraction), each one JSON object
in, one out (structured output, as roles.py):

    <review>{"kind", "instructions", "rules", "rubric": {"criteria": [{"name", "description"}],
             "threshold"}, "items": [{"row_id", "answer", "text"}]}</review>
        -> {"verdicts": [{"row_id", "scores": {criterion: 1..5}, "reason"}]}   rubric judge
    <compare>{"instructions", "rules", "rubric", "items": [{"id", "row_id", "prompt", "a",
              "b"}]}</compare>
        -> {"preferences": [{"id", "winner": "a" | "b" | "tie", "reason"}]}   pairwise

Both follow the gold answer (text_answers.gold_answer). Quality q in [0, 1]: generation, the
ROUGE-L F1 of the answer against the gold text; extraction, the share of the gold object's
fields the answer holds equal (an answer in JSON text is parsed; unparsable: 0).

Rubric: the first criterion scores q (>= 0.6: 5, >= 0.4: 4, >= 0.25: 3, >= 0.1: 2, else 1),
every other one 4 when q >= 0.25, else 2; an answer that breaks the rules (empty, over
max_words / max_chars) scores 1 on every criterion; a row not in the warehouse scores 3 with
the reason "row not found". judge_error_rate (seeded per row id) moves every score by 2 the
wrong way: down for an answer whose mean reaches the threshold, up for one under it.

Compare: each answer is worth q plus 0.25 when it keeps the rules (non-empty, within the word
and character bounds given; extraction: a JSON object); the higher wins by >= 0.02, else a
tie (a row not found: the rules bonus alone). Seeded per item id: judge_position_bias of the
items answer "a" whatever the answers; judge_error_rate of the others flip a decided winner.
"""

from __future__ import annotations

import random
import re

from agents.teacher.config import TeacherConfig
from agents.teacher.text_answers import TEXT_KINDS, as_text, gold_answer, parse_object

DEFAULT_CRITERIA = {"generation": ["faithful", "follows_instructions", "clear"],
                    "extraction": ["correct", "complete"]}
RULES_BONUS = 0.25
MIN_MARGIN = 0.02
_WORD = re.compile(r"\S+")
_scorer = None


def rouge_l(answer: str, gold: str) -> float:
    """ROUGE-L F1 (stemmed) of an answer against the gold text."""
    global _scorer
    if not answer.strip() or not gold.strip():
        return 0.0
    if _scorer is None:  # rouge_score pulls nltk: import it only when a text judge runs
        from rouge_score.rouge_scorer import RougeScorer

        _scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return _scorer.score(gold, answer)["rougeL"].fmeasure


def quality(kind: str, answer, gold) -> float:
    """q in [0, 1] of an answer against the gold answer (see the module's docstring)."""
    if gold is None:
        return 0.0
    if kind == "extraction":
        got = parse_object(answer)
        if got is None or not gold:
            return 0.0
        return sum(k in got and got[k] == v for k, v in gold.items()) / len(gold)
    return rouge_l(as_text(answer), gold)


def broken_rule(kind: str, answer, rules: dict | None, minimums: bool = False) -> str | None:
    """What rule the answer breaks, said to its writer (None: it keeps them). Always: empty;
    extraction: not a JSON object; generation: over max_words / max_chars (and, with
    `minimums`, under min_words / min_chars)."""
    text = as_text(answer).strip()
    if kind == "extraction" and text:
        parsed = parse_object(answer)
        if parsed is None:
            return "the answer is not a JSON object: send one object with the row's fields"
        return None if parsed else "the answer is empty: write one for this row"
    if not text:
        return "the answer is empty: write one for this row"
    rules = rules if isinstance(rules, dict) else {}
    words, chars = len(_WORD.findall(text)), len(text)
    for n, unit, key in ((words, "words", "words"), (chars, "characters", "chars")):
        high, low = rules.get(f"max_{key}"), rules.get(f"min_{key}")
        if isinstance(high, int) and n > high:
            return f"the answer has {n} {unit}, over the limit of {high}: shorten it"
        if minimums and isinstance(low, int) and n < low:
            return f"the answer has {n} {unit}, under the minimum of {low}: write more"
    return None


def _kind(block: dict, config: TeacherConfig) -> str:
    kind = block.get("kind") or config.kind
    if kind in TEXT_KINDS:
        return kind
    answers = [i.get(k) for i in _items(block) for k in ("answer", "a", "b")]
    return "extraction" if any(isinstance(a, dict) for a in answers) else "generation"


def _items(block: dict) -> list[dict]:
    items = block.get("items")
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _golds(block: dict, gold_of, kind: str, key: str = "row_id") -> dict:
    """str(row id) -> the gold answer (None: empty gold); rows not found are absent."""
    found = gold_of([i.get(key) for i in _items(block)])
    return {k: gold_answer(kind, g) for k, g in found.items()}


# ── rubric judge ───────────────────────────────────────────────────────────────────────────
def _first_score(q: float) -> int:
    return 5 if q >= 0.6 else 4 if q >= 0.4 else 3 if q >= 0.25 else 2 if q >= 0.1 else 1


def _criteria(block: dict, kind: str) -> tuple[list[str], float]:
    rubric = block.get("rubric") if isinstance(block.get("rubric"), dict) else {}
    names = [c.get("name") for c in rubric.get("criteria") or []
             if isinstance(c, dict) and isinstance(c.get("name"), str)]
    threshold = rubric.get("threshold")
    return (names or DEFAULT_CRITERIA[kind],
            float(threshold) if isinstance(threshold, int | float) else 3.0)


def _reason(kind: str, answer, gold, q: float) -> str:
    """One short sentence the writer can act on, about what the judge believes."""
    if kind == "extraction":
        got = parse_object(answer) or {}
        missing = sorted(k for k in gold if k not in got)
        wrong = sorted(k for k in gold if k in got and got[k] != gold[k])
        if not missing and not wrong:
            return "every field holds what the row says"
        parts = ([f"{', '.join(wrong[:4])} do not hold what the row says"] if wrong else []) + \
                ([f"{', '.join(missing[:4])} are missing"] if missing else [])
        return f"the fields {' and '.join(parts)}: read the row again and fix them"
    if q >= 0.6:
        return "the answer says what this row is about, in the form asked"
    if q >= 0.25:
        return ("the answer is on this row's subject but misses or changes its key points: "
                "rewrite it from the row's text")
    return ("the answer does not say what this row is about: it reads like the answer for "
            "another row")


def rubric_judge(block: dict, gold_of, config: TeacherConfig) -> dict:
    kind = _kind(block, config)
    names, threshold = _criteria(block, kind)
    rules = block.get("rules")
    golds = _golds(block, gold_of, kind)
    verdicts = []
    for item in _items(block):
        row_id, answer = item.get("row_id"), item.get("answer")
        if str(row_id) not in golds:
            verdicts.append({"row_id": row_id, "scores": dict.fromkeys(names, 3),
                             "reason": "row not found"})
            continue
        gold = golds[str(row_id)]
        broken = broken_rule(kind, answer, rules)
        q = quality(kind, answer, gold)
        if broken:
            scores, reason = dict.fromkeys(names, 1), broken
        elif gold is None:  # a row with no reference: the judge cannot tell; middling
            scores, reason = dict.fromkeys(names, 3), "this row has no reference to judge by"
        else:
            scores = {n: _first_score(q) if n == names[0] else 4 if q >= 0.25 else 2
                      for n in names}
            reason = _reason(kind, answer, gold, q)
        if random.Random(f"{config.knobs.seed}:rubric:{row_id}").random() \
                < config.knobs.judge_error_rate:
            good = sum(scores.values()) / len(scores) >= threshold
            scores = {n: min(5, max(1, s - 2 if good else s + 2)) for n, s in scores.items()}
            reason = ("the answer misses key points of this row: rewrite it from the row's "
                      "text") if good else "the answer says what this row is about"
        verdicts.append({"row_id": row_id, "scores": scores, "reason": reason})
    return {"verdicts": verdicts}


# ── pairwise comparison ────────────────────────────────────────────────────────────────────
def compare(block: dict, gold_of, config: TeacherConfig) -> dict:
    kind, k = _kind(block, config), config.knobs
    rules = block.get("rules")
    golds = _golds(block, gold_of, kind)
    out = []
    for item in _items(block):
        key, gold = item.get("id"), golds.get(str(item.get("row_id")))
        worth, broken = {}, {}
        for side in ("a", "b"):
            broken[side] = broken_rule(kind, item.get(side), rules, minimums=True)
            worth[side] = quality(kind, item.get(side), gold) + \
                (0.0 if broken[side] else RULES_BONUS)
        diff = worth["a"] - worth["b"]
        winner = "a" if diff >= MIN_MARGIN else "b" if diff <= -MIN_MARGIN else "tie"
        if winner == "tie":
            reason = "both answers are about as good for this row"
        else:
            loser = "b" if winner == "a" else "a"
            reason = f"{loser}: {broken[loser]}" if broken[loser] and not broken[winner] \
                else f"{winner} keeps closer to what the row says"
        if random.Random(f"{k.seed}:position:{key}").random() < k.judge_position_bias:
            winner, reason = "a", "a reads a little better"
        elif winner != "tie" and random.Random(f"{k.seed}:compare:{key}").random() \
                < k.judge_error_rate:
            winner = "b" if winner == "a" else "a"
            reason = f"{winner} reads better"
        out.append({"id": key, "winner": winner, "reason": reason})
    return {"preferences": out}
