"""The teacher's other roles, each asked for by a block in the last user message and answered
with one JSON object (structured output in either wire format):

    <review>{"labels", "items": [{"row_id", "label", "text"}]}</review>
        -> {"verdicts": [{"row_id", "agree", "label"}]}      judge: the label it believes
    <pairs>{"labels", "items": [{"row_id", "prompt"}], "completion_template": " {label}"}</pairs>
        -> {"pairs": [{"row_id", "chosen", "rejected"}]}     gold vs a seeded wrong label
    <tune>{"k", "bounds": {"name": [lo, hi]}, "stats", "past_trials"}</tune>
        -> {"configs": [{...}] * k}                          inside the bounds, seeded

The judge believes the gold label except for `judge_error_rate` of rows (seeded per row).
"""

from __future__ import annotations

import json
import math
import random
import re

from agents.teacher.config import TeacherKnobs
from agents.teacher.wire import canonical, text_of

ROLE_TAGS = {"review": "judge", "pairs": "pairs", "tune": "tune", "compare": "compare"}


def role_block(messages: list[dict]) -> tuple[str, dict] | None:
    """(kind, block) when the last user message holds a <review>, <pairs>, <tune> or
    <compare> block (a <review> with a `rubric` key is the text kinds' judge:
    text_roles.py, as is <compare>)."""
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if last is None:
        return None
    text = text_of(last.get("content"))
    for tag, kind in ROLE_TAGS.items():
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
        if found:  # the last block that is a JSON object (a mention in prose is not one)
            blocks = [b for b in map(_json_object, found) if b is not None]
            return kind, blocks[-1] if blocks else {}
    return None


def _json_object(text: str) -> dict | None:
    try:
        block = json.loads(text)
    except json.JSONDecodeError:
        return None
    return block if isinstance(block, dict) else None


def _items(block: dict) -> list[dict]:
    items = block.get("items")
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _other(labels: list[str], gold: str, rng: random.Random) -> str | None:
    wrong = [x for x in labels if x != gold]
    return rng.choice(wrong) if wrong else None


def judge(block: dict, gold_of, labels: list[str], knobs: TeacherKnobs) -> dict:
    labels = block.get("labels") or labels
    items = _items(block)
    gold = gold_of([i.get("row_id") for i in items])
    verdicts = []
    for item in items:
        row_id, given = item.get("row_id"), item.get("label")
        believed = gold.get(str(row_id), given)  # a row it cannot find: it takes the label given
        rng = random.Random(f"{knobs.seed}:judge:{row_id}")
        if rng.random() < knobs.judge_error_rate:
            believed = _other(labels, believed, rng) or believed
        verdicts.append({"row_id": row_id, "agree": given == believed, "label": believed})
    return {"verdicts": verdicts}


def pairs(block: dict, gold_of, labels: list[str], knobs: TeacherKnobs) -> dict:
    labels = block.get("labels") or labels
    template = block.get("completion_template") or " {label}"
    items = _items(block)
    gold = gold_of([i.get("row_id") for i in items])
    out = []
    for item in items:
        row_id = item.get("row_id")
        g = gold.get(str(row_id))
        wrong = _other(labels, g, random.Random(f"{knobs.seed}:pair:{row_id}")) if g else None
        if g is not None and wrong is not None:
            out.append({"row_id": row_id, "chosen": template.replace("{label}", g),
                        "rejected": template.replace("{label}", wrong)})
    return {"pairs": out}


def tune(block: dict, knobs: TeacherKnobs) -> dict:
    """k configs inside the bounds, seeded: with no scored past trial, the middle of the box
    and then random draws; with one, alternately a draw near the best trial and a free one.
    Bounds [lo, hi] of ints give ints; a ratio hi/lo >= 100 is drawn on a log scale; any
    other list is a list of choices."""
    bounds = block.get("bounds") if isinstance(block.get("bounds"), dict) else {}
    k = max(1, min(int(block.get("k") or 1), 64))
    rng = random.Random(f"{knobs.seed}:tune:{canonical(block)}")
    best = _best_trial(block.get("past_trials"), bounds)
    configs = [] if best else [{name: _middle(b) for name, b in bounds.items()}]
    while len(configs) < k:
        near = best is not None and len(configs) % 2 == 0
        configs.append({name: _draw(b, rng, best.get(name) if near else None)
                        for name, b in bounds.items()})
    return {"configs": configs[:k]}


def _numeric(b) -> bool:
    return isinstance(b, list | tuple) and len(b) == 2 and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in b) and b[0] <= b[1]


def _log_scale(b) -> bool:
    return b[0] > 0 and b[1] / b[0] >= 100


def _cast(b, value: float):
    if all(isinstance(x, int) for x in b):
        return int(min(max(round(value), b[0]), b[1]))
    return float(min(max(value, b[0]), b[1]))


def _middle(b):
    if not _numeric(b):
        return b[0] if isinstance(b, list) and b else b
    return _cast(b, math.sqrt(b[0] * b[1]) if _log_scale(b) else (b[0] + b[1]) / 2)


def _draw(b, rng: random.Random, near=None):
    if not _numeric(b):  # a list of choices
        return rng.choice(b) if isinstance(b, list) and b else b
    if near is not None and _log_scale(b):
        return _cast(b, near * math.exp(rng.uniform(-0.7, 0.7)))
    if near is not None:
        return _cast(b, near + rng.uniform(-0.2, 0.2) * (b[1] - b[0]))
    if _log_scale(b):
        return _cast(b, math.exp(rng.uniform(math.log(b[0]), math.log(b[1]))))
    return _cast(b, rng.uniform(b[0], b[1]))


def _best_trial(trials, bounds: dict) -> dict | None:
    """The config of the highest-scoring past trial, clipped to the bounds."""
    scored = [t for t in trials or [] if isinstance(t, dict) and isinstance(t.get("config"), dict)
              and isinstance(t.get("score"), int | float)]
    if not scored:
        return None
    config = max(scored, key=lambda t: t["score"])["config"]
    return {name: _cast(b, config[name]) if _numeric(b) and isinstance(config.get(name), int | float)
            else _middle(b) for name, b in bounds.items()}
