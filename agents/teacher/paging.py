"""Reading the teacher's place in its slice back out of a conversation (labeller.py pages by
key and decides from the last turn): its `<progress>` note (`progress_note`), the page a
call it did not write was on (`guess_progress`), the largest `"resume_after_id"` of a
re-anchor (`resume_after`), the later of two row ids (`later_id`), the rows still whole in
an sql result cut short (`whole_rows`), row ids as SQL literals (`sql_literal`,
`sql_unliteral`), and JSON that may not parse (`json_or_none`)."""

from __future__ import annotations

import json
import re

from agents.teacher.slips import unfence
from agents.teacher.wire import text_of

__all__ = ["guess_progress", "json_or_none", "later_id", "progress_note", "resume_after",
           "sql_literal", "sql_unliteral", "whole_rows"]

_PROGRESS = re.compile(r"<progress>(\{.*?\})</progress>", re.DOTALL)
_RESUME = re.compile(r'"resume_after_id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")')
_AFTER = re.compile(r"\bWHERE\s+\w+\s*>\s*(-?\d+|'(?:[^']|'')*')", re.IGNORECASE)


def whole_rows(text: str | None) -> list[dict]:
    """The rows of an sql result that survive whole in a text cut short."""
    start = text.find('"rows"') if text else -1
    i = text.find("[", start) + 1 if start >= 0 else 0
    rows, decoder = [], json.JSONDecoder()
    while 0 < i < len(text):
        while i < len(text) and text[i] in " ,\n\r\t":
            i += 1
        try:
            row, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def json_or_none(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def progress_note(content) -> dict | None:
    found = _PROGRESS.findall(text_of(content))
    note = json_or_none(found[-1]) if found else None
    return note if isinstance(note, dict) else None


def guess_progress(calls: list[dict]) -> dict:
    """For assistant messages the teacher did not write: the page from the calls."""
    for c in calls:
        fn = c.get("function") or {}
        args = json_or_none(unfence(fn.get("arguments") or ""))
        if fn.get("name") == "sql" and isinstance(args, dict):
            found = _AFTER.search(str(args.get("query", "")))
            if found:
                return {"after_id": sql_unliteral(found.group(1))}
        if fn.get("name") == "submit_examples" and isinstance(args, dict):
            ids = [e.get("row_id") for e in args.get("examples") or [] if isinstance(e, dict)]
            ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
            if ids:
                return {"last_id": max(ids), "short": False}
    return {}


def resume_after(messages: list[dict]):
    """The largest `"resume_after_id": N` in any user or system note (None if none)."""
    found = None
    for m in messages:
        if m.get("role") in ("user", "system"):
            for raw in _RESUME.findall(text_of(m.get("content"))):
                found = later_id(found, json.loads(raw))
    return found


def later_id(a, b):
    """The later of two row ids (keys only grow); None stands for 'before the first row'."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, bool) or isinstance(b, bool) or type(a) is not type(b):
        return a
    return max(a, b)


def sql_literal(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def sql_unliteral(text: str):
    return int(text) if text.lstrip("-").isdigit() else text[1:-1].replace("''", "'")
