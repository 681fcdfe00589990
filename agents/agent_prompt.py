"""What an agent's conversation opens with, and what identifies a request.

`build_messages` gives the pinned opening: the system prompt (the skill and the task) and the
first user message with the <slice> block. `request_hash` is the sha256 of everything that
determines a reply (agents/teacher/wire.py hashes a decoded request the same way).
"""

from __future__ import annotations

import hashlib
import json

from agents.skills import Skill
from agents.sql_tool import SQLTool

__all__ = ["build_messages", "request_hash"]


def build_messages(skill: Skill, task: dict, sql_tool: SQLTool) -> list[dict]:
    """System prompt (skill + pinned task) and the first user message with the <slice>.

    `task["kind"]` (default classification) decides what the agent is asked for: a label of
    `task["labels"]`, or (generation, extraction) a `response` written by the task's
    `instructions` within its `rules` or valid against its `answer_schema`."""
    kind = task.get("kind", "classification")
    required = ("description", "labels", "slice_id", "rows", "page_size") \
        if kind == "classification" else ("description", "slice_id", "rows", "page_size")
    missing = [k for k in required if k not in task]
    if missing:
        raise ValueError(f"task is missing {', '.join(missing)}")
    scoped = sql_tool.scoped
    block = {
        "slice_id": task["slice_id"],
        "table": scoped.name,
        "columns": list(scoped.columns),
        "id_column": scoped.id_column,
        "rows": task["rows"],
    }
    if kind == "classification":
        system = (
            f"{skill.instructions}\n\n## Your task (pinned)\n{task['description']}\n"
            f"Labels (use exactly one of these per row): {', '.join(task['labels'])}"
        )
        block |= {"labels": list(task["labels"]), "page_size": task["page_size"]}
        ask = "Label every row of your slice, following the skill."
    else:
        system = f"{skill.instructions}\n\n## Your task (pinned)\n{task['description']}\n"
        if task.get("instructions"):
            system += f"Instructions: {task['instructions']}\n"
        if kind == "extraction":
            system += ("Answer with one JSON object per row, valid against this JSON Schema: "
                       f"{json.dumps(task.get('answer_schema'), sort_keys=True)}")
            block |= {"answer_schema": task.get("answer_schema")}
        else:
            system += f"Rules every answer must keep: {describe_rules(task.get('rules'))}"
            block |= {"rules": task.get("rules")}
        block = {**block, "page_size": task["page_size"], "kind": kind,
                 "answer_field": "response"}
        ask = "Write the answer for every row of your slice, following the skill."
    if task.get("want_labels"):  # a targeted top-up: only rows of these labels are wanted
        block["want_labels"] = list(task["want_labels"])
    user = f"{ask}\n<slice>\n{json.dumps(block)}\n</slice>"
    if task.get("want_labels"):
        user = (f"Top-up: submit only rows whose label is one of "
                f"{', '.join(task['want_labels'])}; skip the others.\n<slice>\n"
                f"{json.dumps(block)}\n</slice>")
    if task.get("previous"):  # a fresh agent over the rows a stopped or failed one left
        user = (f"An earlier agent on this slice did not finish ({task['previous']}). "
                f"Your slice holds only the rows it left unlabelled.\n{user}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def describe_rules(rules: dict | None) -> str:
    """A generation task's answer rules in one line, as the agent reads them."""
    rules = rules or {}
    parts = []
    for unit in ("words", "chars"):
        low, high = rules.get(f"min_{unit}"), rules.get(f"max_{unit}")
        name = "characters" if unit == "chars" else unit
        if low is not None and high is not None:
            parts.append(f"{low} to {high} {name}")
        elif low is not None:
            parts.append(f"at least {low} {name}")
        elif high is not None:
            parts.append(f"at most {high} {name}")
    parts += [f"never matching /{p}/" for p in rules.get("forbidden") or []]
    parts += [f"always matching /{p}/" for p in rules.get("required") or []]
    parts.append("in your own words (not copied from the row)")
    parts.append("specific to its row (no answer reused for another row)")
    return "; ".join(parts) + "."


def request_hash(model: str, messages: list[dict], tools: list[dict], params: dict) -> str:
    """sha256 of the canonical JSON of everything that determines a reply."""
    blob = json.dumps(
        {"model": model, "messages": messages, "tools": tools, "params": params},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
