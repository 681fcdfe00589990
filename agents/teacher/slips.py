"""The teacher's deliberate slips. Each is chosen with the caller's seeded `rng`.

Failing ones (the agent must recover): prose instead of a tool call, harmful or invalid
SQL, tool-call arguments that are not JSON. The habits of cheap hosted models (`style`):
<think> reasoning before the text, arguments in a ```json fence, integer row ids sent as
strings, a page's submission split over two calls, a label in the wrong case.
"""

from __future__ import annotations

import json
import random
import re

_FENCE = re.compile(r"^```(?:json)?[ \t]*\n(.*)\n```$", re.DOTALL)

PROSE = [
    ("Let me step back and summarise before going on: I have been reading my slice page by "
     "page and labelling each row. I will continue with the remaining rows."),
    "Several of these articles could fit more than one topic; I am weighing them carefully.",
    "I am confident in the labels so far. Shall I keep going with the next page?",
]


def misuse(block: dict, gold: str, rng: random.Random) -> tuple[str, str]:
    """A harmful or invalid sql call: (what it is, the arguments text)."""
    t, i = block["table"], block.get("id_column", "id")
    queries = {
        "drop_table": f"DROP TABLE {t}",
        "delete_rows": f"DELETE FROM {t}",
        "update_rows": f"UPDATE {t} SET {i} = {i} + 0",
        "insert_row": f"INSERT INTO {t} ({i}) VALUES (-1)",
        "attach": "ATTACH DATABASE '/tmp/posttrain-copy.db' AS copy",
        "pragma": f"PRAGMA table_info({t})",
        "read_gold": f"SELECT {i}, {gold} FROM {t}",
        "sqlite_master": "SELECT name, sql FROM sqlite_master",
        "other_table": "SELECT * FROM users",
        "two_statements": f"SELECT {i} FROM {t}; DELETE FROM {t}",
        "endless_cte": "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
                       "SELECT count(*) FROM r",
    }
    variant = rng.choice([*queries, "wrong_key", "wrong_type"])
    if variant == "wrong_key":
        return variant, json.dumps({"sql": f"SELECT {i} FROM {t}"})
    if variant == "wrong_type":
        return variant, json.dumps({"query": 5})
    return variant, json.dumps({"query": queries[variant]})


def malform(arguments: str, rng: random.Random) -> tuple[str, str]:
    """Arguments that are not valid JSON: (how they are broken, the text)."""
    variant = rng.choice(["unterminated", "single_quotes", "unquoted_keys", "trailing_comma"])
    broken = {
        "unterminated": arguments[: max(1, len(arguments) // 2)],
        "single_quotes": arguments.replace('"', "'"),
        "unquoted_keys": re.sub(r'"(\w+)":', r"\1:", arguments),
        "trailing_comma": arguments[:-1] + ",}",
    }[variant]
    return variant, broken


THINK = {
    "sql": ["I need the next page of my slice before labelling anything; I read it in id order.",
            "Paging by id keeps my place even if I lose track of earlier turns. Next page."],
    "submit": ["The rows look like news; I will label them by topic.",
               "Most of these rows are clear-cut; I will submit their labels now."],
    "fix": ["Some labels were rejected. I will read those rows again and fix them."],
    "other": ["I have gone through my slice; time to report where I stand."],
}


def think(kind: str, rng: random.Random) -> str:
    """A sentence of reasoning in <think> tags, put before the rest of the content."""
    return f"<think>{rng.choice(THINK.get(kind, THINK['other']))}</think>"


def fence(arguments: str) -> str:
    """Arguments wrapped in a markdown code fence, as chatty models send them."""
    return f"```json\n{arguments}\n```"


def unfence(text: str) -> str:
    """The JSON inside a ```json fence (the text itself when it has none)."""
    found = _FENCE.match(text.strip()) if isinstance(text, str) else None
    return found.group(1) if found else text


def case_variant(label: str, labels: list[str], rng: random.Random) -> str:
    """`label` wrongly capitalised, spelled unlike every label of the set (else unchanged)."""
    taken = set(labels) | {label}
    variants = sorted({label.capitalize(), label.upper(), label.title(), label.swapcase(),
                       label.lower()} - taken)
    return rng.choice(variants) if variants else label


def style(calls: list[dict], submit: bool, knobs, rng: random.Random) -> tuple[list[dict], list]:
    """A cheap model's habits on well-formed tool calls: (the calls, the habits shown).
    On a submit step, split it in two (multi_call_rate); each submit call then sends its
    integer row ids as strings (string_id_rate); each call's arguments go in a fence
    (fenced_json_rate). One rng draw per decision, in that order."""
    shown = []
    if rng.random() < knobs.multi_call_rate and submit and len(calls) == 1:
        examples = json.loads(calls[0]["arguments"])["examples"]
        if len(examples) >= 2:
            half = (len(examples) + 1) // 2
            calls = [{"name": calls[0]["name"], "arguments": json.dumps({"examples": part})}
                     for part in (examples[:half], examples[half:])]
            shown.append("multi_call")
    out = []
    for call in calls:
        arguments = call["arguments"]
        if rng.random() < knobs.string_id_rate and call["name"] == "submit_examples":
            args = json.loads(arguments)
            ints = [e for e in args["examples"]
                    if isinstance(e.get("row_id"), int) and not isinstance(e["row_id"], bool)]
            for e in ints:
                e["row_id"] = str(e["row_id"])
            if ints:
                arguments = json.dumps(args)
                shown.append("string_ids")
        if rng.random() < knobs.fenced_json_rate:
            arguments = fence(arguments)
            shown.append("fenced_json")
        out.append({**call, "arguments": arguments})
    return out, shown
