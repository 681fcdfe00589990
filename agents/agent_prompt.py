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
    """System prompt (skill + pinned task) and the first user message with the <slice>."""
    required = ("description", "labels", "slice_id", "rows", "page_size")
    missing = [k for k in required if k not in task]
    if missing:
        raise ValueError(f"task is missing {', '.join(missing)}")
    scoped = sql_tool.scoped
    system = (
        f"{skill.instructions}\n\n## Your task (pinned)\n{task['description']}\n"
        f"Labels (use exactly one of these per row): {', '.join(task['labels'])}"
    )
    block = {
        "slice_id": task["slice_id"],
        "table": scoped.name,
        "columns": list(scoped.columns),
        "id_column": scoped.id_column,
        "rows": task["rows"],
        "labels": list(task["labels"]),
        "page_size": task["page_size"],
    }
    if task.get("want_labels"):  # a targeted top-up: only rows of these labels are wanted
        block["want_labels"] = list(task["want_labels"])
    user = (
        f"Label every row of your slice, following the skill.\n<slice>\n"
        f"{json.dumps(block)}\n</slice>"
    )
    if task.get("want_labels"):
        user = (f"Top-up: submit only rows whose label is one of "
                f"{', '.join(task['want_labels'])}; skip the others.\n<slice>\n"
                f"{json.dumps(block)}\n</slice>")
    if task.get("previous"):  # a fresh agent over the rows a stopped or failed one left
        user = (f"An earlier agent on this slice did not finish ({task['previous']}). "
                f"Your slice holds only the rows it left unlabelled.\n{user}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def request_hash(model: str, messages: list[dict], tools: list[dict], params: dict) -> str:
    """sha256 of the canonical JSON of everything that determines a reply."""
    blob = json.dumps(
        {"model": model, "messages": messages, "tools": tools, "params": params},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
