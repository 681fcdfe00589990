"""The teacher's deliberate slips: prose instead of a tool call, harmful or invalid SQL,
tool-call arguments that are not JSON. Each is chosen with the caller's seeded `rng`."""

from __future__ import annotations

import json
import random
import re

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
