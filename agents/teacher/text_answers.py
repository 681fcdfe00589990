"""The sub-agent's answers for the text kinds: generation (free text) and extraction (a JSON
object valid against the task's schema). labeller.py pages through the slice exactly as for
labels and asks `TextAnswers.examples` what to submit for a page (or for a fix round).

The honest answer of a row is its gold value: generation, the gold text (stripped);
extraction, the gold column parsed as a JSON object. A row whose gold is NULL, empty or not
a JSON object (extraction) cannot be answered and is skipped. Seeded per row
(`random.Random(f"{seed}:text-answer:{row_id}")`), one draw `u` decides at most one of:

    [0, error_rate)                 a wrong but well-formed answer: generation, the gold of
                                    another row of the page (one row: the gold's words
                                    shuffled); extraction, the gold with one field's value
                                    replaced (another row's value, else a plausible one)
    then too_long_rate              generation: padded beyond the rules' max_words/max_chars
    then copy_prompt_rate           generation: the first ~12 words of the row's longest column
    then empty_answer_rate          ""
    then off_format_rate            generation: `Headline: "..."`; extraction: an object that
                                    breaks the schema (a required field dropped, a value of
                                    the wrong type)
    then broken_json_rate           extraction: the object as JSON text cut short

A fault that does not fit the kind (too_long, copy_prompt for extraction; broken_json for
generation) leaves the row honest. Drifted: a wrong answer for drift_error_rate of rows.
The faults hit only the first submission: the fix round answers every row rejected for a
reason in TEXT_FIXABLE with its gold answer, as after a careful re-read.
"""

from __future__ import annotations

import json
import random

import jsonschema

from agents.teacher.config import TEXT_FAULTS, TeacherConfig

TEXT_KINDS = ("generation", "extraction")
TEXT_FIXABLE = frozenset({
    "invalid_schema", "empty_answer", "too_short", "too_long", "forbidden_pattern",
    "missing_pattern", "copies_prompt", "invalid_json", "schema_violation", "near_duplicate",
    "judge_disagreed"})
COPY_WORDS = 12
_FITS = {"generation": {"too_long", "copy_prompt", "empty_answer", "off_format"},
         "extraction": {"empty_answer", "off_format", "broken_json"}}
_PADDING = ("as the full report explains in more detail below",
            "with the background, the reactions and what is expected to happen next",
            "according to everyone involved in the story so far",
            "which many readers will want to follow closely in the coming weeks")
_WRONG_TYPE = {"string": 0, "integer": "n/a", "number": "n/a", "boolean": "yes",
               "array": "n/a", "object": "n/a", "null": "n/a"}


def text_kind(block: dict, config: TeacherConfig) -> str | None:
    """"generation" or "extraction" when the slice asks for text answers, else None."""
    kind = block.get("kind") or config.kind
    return kind if kind in TEXT_KINDS else None


def gold_answer(kind: str, raw):
    """The honest answer from a gold value, or None when it cannot be answered."""
    if raw is None:
        return None
    if kind == "extraction":
        value = parse_object(raw)
        return value or None
    text = raw.strip() if isinstance(raw, str) else str(raw).strip()
    return text or None


def parse_object(value) -> dict | None:
    """A JSON object given as an object or as JSON text; None when it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def as_text(answer) -> str:
    """An answer as text (an object as its JSON)."""
    if answer is None:
        return ""
    return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


class TextAnswers:
    def __init__(self, config: TeacherConfig, gold):
        self.config, self.knobs, self.gold = config, config.knobs, gold

    def _rng(self, purpose: str, key) -> random.Random:
        return random.Random(f"{self.knobs.seed}:{purpose}:{key}")

    def examples(self, step, block: dict, drifted: bool) -> tuple[list[dict], list[str]]:
        """(the items to submit for a submit or fix step, the faults they show); the
        caller caps them at MAX_SUBMIT."""
        kind = text_kind(block, self.config)
        id_col = block.get("id_column", self.config.id_column)
        field = block.get("answer_field") or "response"
        if step.kind == "fix":
            ids, rows = [r.get("row_id") for r in step.rows], {}
        else:
            ids = [r.get(id_col) for r in step.rows]
            rows = {str(r.get(id_col)): r for r in step.rows}
        found = self.gold.rows(ids)
        golds = {k: gold_answer(kind, g) for k, (_, g) in found.items()}
        out, faults, seen = [], [], set()
        for i in ids:
            gold = golds.get(str(i))
            if gold is None or str(i) in seen:
                continue
            seen.add(str(i))
            i = found[str(i)][0]  # the stored id: a fix never echoes an id sent as "42"
            if step.kind == "fix":
                out.append({"row_id": i, field: gold})
                continue
            others = [golds[str(j)] for j in ids  # the page's other answers, in page order
                      if str(j) != str(i) and golds.get(str(j)) not in (None, gold)]
            answer = self.believed(kind, i, gold, others, block, drifted)
            answer, fault = self.first(kind, i, answer, rows.get(str(i)) or {}, id_col, block)
            faults += [fault] if fault else []
            out.append({"row_id": i, field: answer})
        return out, faults

    # ── what it believes, and what it sends first ──────────────────────────────────────────
    def believed(self, kind: str, row_id, gold, others: list, block: dict, drifted: bool):
        """The well-formed answer it believes right: gold, or a seeded mistake."""
        k = self.knobs
        answer = gold
        if self._rng("text-answer", row_id).random() < k.error_rate:
            answer = self.wrong(kind, row_id, gold, others, block, "text-wrong")
        if drifted and self._rng("text-drift", row_id).random() < k.drift_error_rate:
            answer = self.wrong(kind, row_id, gold, others, block, "text-drift-wrong")
        return answer

    def first(self, kind: str, row_id, answer, row: dict, id_col: str,
              block: dict) -> tuple[object, str | None]:
        """(the answer of the first submission, the fault it shows or None)."""
        k = self.knobs
        u = self._rng("text-answer", row_id).random() - k.error_rate
        if u < 0:
            return answer, None
        fault = None
        for name in TEXT_FAULTS:
            rate = getattr(k, f"{name}_rate")
            if u < rate:
                fault = name
                break
            u -= rate
        if fault not in _FITS[kind]:
            return answer, None
        rng = self._rng(f"text-{fault}", row_id)
        rules = block.get("rules") if isinstance(block.get("rules"), dict) else {}
        schema = block.get("answer_schema") if isinstance(block.get("answer_schema"), dict) \
            else None
        if fault == "empty_answer":
            return "", fault
        if fault == "too_long":
            return pad(answer, rules, rng), fault
        if fault == "copy_prompt":
            copied = copy_of(row, id_col, rules)
            return (copied, fault) if copied else (answer, None)
        if fault == "broken_json":
            return cut_json(answer), fault
        if kind == "generation":  # off_format
            return f'Headline: "{answer}"', fault
        return break_schema(answer, schema, rng), fault

    def wrong(self, kind: str, row_id, gold, others: list, block: dict, purpose: str):
        rng = self._rng(purpose, row_id)
        if kind == "generation":
            if others:
                return rng.choice(others)
            words = gold.split()
            shuffled = words[:]
            rng.shuffle(shuffled)
            if shuffled == words:
                shuffled = words[::-1]
            return " ".join(shuffled)
        schema = block.get("answer_schema") if isinstance(block.get("answer_schema"), dict) \
            else None
        return wrong_record(gold, others, schema, rng)


# ── the shapes of a wrong or faulty answer ─────────────────────────────────────────────────
def pad(text: str, rules: dict, rng: random.Random) -> str:
    """`text` padded with filler beyond every max bound the rules give (else to ~3x)."""
    max_words, max_chars = rules.get("max_words"), rules.get("max_chars")
    n_words = len(text.split())
    want_words = max_words if isinstance(max_words, int) else max(40, 3 * n_words)
    want_chars = max_chars if isinstance(max_chars, int) else 0
    out, n = text.rstrip(". "), rng.randrange(len(_PADDING))
    while len(out.split()) <= want_words or len(out) <= want_chars:
        out += ", " + _PADDING[n % len(_PADDING)]
        n += 1
    return out + "."


def copy_of(row: dict, id_col: str, rules: dict) -> str:
    """The first ~12 words of the row's longest column (fewer when the rules' max_words or
    max_chars allow fewer, never under 5 words or min_words: a copy, not a length slip)."""
    values = [str(v) for c, v in row.items() if c != id_col and v is not None]
    if not values:
        return ""
    words = max(values, key=len).split()
    n = COPY_WORDS
    if isinstance(rules.get("max_words"), int):
        n = min(n, rules["max_words"])
    if isinstance(rules.get("min_words"), int):
        n = max(n, rules["min_words"])
    floor = max(5, rules.get("min_words") or 0)  # 5-word runs: what a copy check compares
    while isinstance(rules.get("max_chars"), int) and n > floor \
            and len(" ".join(words[:n])) > rules["max_chars"]:
        n -= 1
    return " ".join(words[:n])


def cut_json(answer) -> str:
    """The answer as JSON text cut short: a syntax error json.loads rejects."""
    text = json.dumps(answer, ensure_ascii=False)
    cut = text[: max(1, len(text) // 2)]
    try:
        json.loads(cut)
    except json.JSONDecodeError:
        return cut
    return cut + ","  # never valid: a dangling comma


def _valid(schema: dict | None):
    if schema is None:
        return lambda value: True
    try:
        return jsonschema.Draft202012Validator(schema).is_valid
    except jsonschema.SchemaError:
        return lambda value: True


def break_schema(obj, schema: dict | None, rng: random.Random):
    """`obj` made invalid against `schema`: a required field dropped or a value of the wrong
    type (seeded choice among those that really break it); else the object in a list."""
    valid = _valid(schema)
    if not isinstance(obj, dict):
        return [obj]
    props = schema.get("properties") if isinstance(schema, dict) else None
    candidates = [{k: v for k, v in obj.items() if k != f}
                  for f in (schema or {}).get("required") or [] if f in obj]
    for name, sub in (props or {}).items():
        types = sub.get("type") if isinstance(sub, dict) else None
        types = [types] if isinstance(types, str) else types or []
        for t in types:
            if t in _WRONG_TYPE:
                candidates.append({**obj, name: _WRONG_TYPE[t]})
    rng.shuffle(candidates)
    return next((c for c in candidates if not valid(c)), [obj])


def wrong_record(gold: dict, others: list[dict], schema: dict | None,
                 rng: random.Random) -> dict:
    """The gold object with one field's value replaced: another row's value for that field,
    else a plausible different one; still valid against the schema when the gold is."""
    valid = _valid(schema)
    keep_valid = valid(gold)
    props = (schema or {}).get("properties") or {}
    fields = sorted(gold)
    rng.shuffle(fields)
    for f in fields:
        theirs = []
        for other in others:
            v = other.get(f) if isinstance(other, dict) else None
            if f in other and v != gold[f] and v not in theirs:
                theirs.append(v)
        rng.shuffle(theirs)
        sub = props.get(f) if isinstance(props.get(f), dict) else {}
        for value in theirs + _plausible(gold[f], sub):
            candidate = {**gold, f: value}
            if value != gold[f] and (not keep_valid or valid(candidate)):
                return candidate
    return gold


def _plausible(value, sub: dict) -> list:
    """Other values a careless reader might have given for a field."""
    out = [v for v in sub.get("enum") or [] if v != value]
    if isinstance(value, bool):
        return out + [not value]
    if isinstance(value, int):
        return out + [value + 1, value - 1]
    if isinstance(value, float):
        return out + [round(value * 1.1 + 1, 2), round(value * 0.9 - 1, 2)]
    if isinstance(value, str):
        words = value.split()
        return out + ([" ".join(words[::-1])] if len(words) > 1 else []) + ["other", "unknown"]
    if isinstance(value, list):
        return out + ([value[:-1]] if value else [["other"]])
    if value is None:
        return out + ["unknown", 0]
    return out
