"""The tuner: an LLM proposes training configs for the tune stage, and a gate checks each.

    proposals = propose(gateway, model, skill, k=3, bounds={"learning_rate": (2e-4, 3e-3)},
                        stats={"n": 800, ...}, past_trials=[{"config": {...},
                        "eval_loss": 1.9}], seen=[default_config])

One `gateway.complete_json` call (so it is cached, budgeted, rate limited and retried like
every other call): the skill's instructions (skills/propose-training-config) as the system
message and one user message, exactly

    <tune>{"k": 3, "bounds": {"name": [low, high]}, "stats": {...},
           "past_trials": [{"config": {...}, "eval_loss": 1.9, "score": -1.9}]}</tune>

answered by `{"configs": [{...}, ...]}`. Past trials carry `score = -eval_loss` because the
skill's contract is "higher is better". Integer settings (`batch_size`, `lora_r`) are sent
with integer bounds. Every proposal passes `clamp_config`, the gate: unknown or missing
settings and non-numbers (strings, booleans, NaN, infinities) reject it; values outside the
bounds are clamped and integers rounded, each with a note; a proposal equal to a past trial,
to a `seen` config or to an earlier proposal is dropped. `propose` returns one entry per
proposal, kept or not, so nothing is dropped silently. Gateway errors (budget, a provider
failure after the gateway's retries) propagate: the caller fills the trials another way and
records why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

TUNABLE = ("learning_rate", "batch_size", "warmup_ratio", "lora_r")
INTEGER = frozenset({"batch_size", "lora_r"})


def config_key(config: Mapping[str, float]) -> tuple:
    """What makes two configs the same trial: each value to 6 significant digits."""
    return tuple(sorted((k, float(f"{float(v):.6g}")) for k, v in config.items()))


def wire_bounds(bounds: Mapping[str, tuple[float, float]]) -> dict[str, list]:
    """Bounds as sent to the model: integer settings get integer [low, high]."""
    out: dict[str, list] = {}
    for name, (low, high) in sorted(bounds.items()):
        out[name] = ([math.ceil(low), math.floor(high)] if name in INTEGER
                     else [float(low), float(high)])
    return out


def configs_schema(bounds: Mapping[str, tuple[float, float]]) -> dict:
    """Structured output: `{"configs": [{name: number, ...}]}`, every bounded name required."""
    names = sorted(bounds)
    item = {"type": "object",
            "properties": {n: {"type": "integer" if n in INTEGER else "number"} for n in names},
            "required": names, "additionalProperties": False}
    return {"type": "object", "properties": {"configs": {"type": "array", "items": item}},
            "required": ["configs"], "additionalProperties": False}


def tune_block(k: int, bounds: Mapping[str, tuple[float, float]], stats: dict,
               past_trials: Iterable[Mapping]) -> str:
    """The user message: `<tune>{json}</tune>` ("</" escaped so no string can close it)."""
    past = []
    for t in past_trials:
        loss = t.get("eval_loss")
        entry: dict[str, Any] = {"config": {n: t["config"][n] for n in sorted(bounds)
                                            if n in (t.get("config") or {})}}
        if isinstance(loss, int | float) and math.isfinite(loss):
            entry.update(eval_loss=round(float(loss), 6), score=-round(float(loss), 6))
        past.append(entry)
    body = {"k": int(k), "bounds": wire_bounds(bounds), "stats": stats, "past_trials": past}
    return "<tune>" + json.dumps(body, ensure_ascii=False).replace("</", "<\\/") + "</tune>"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def clamp_config(proposal: Any, bounds: Mapping[str, tuple[float, float]],
                 seen: Iterable[Mapping[str, float]] = ()) -> tuple[dict | None, list[str]]:
    """The gate for one proposal: `(config, notes)`, or `(None, notes)` when it is rejected.

    Rejected: not an object; a setting not in `bounds` (or not tunable); a bounded setting
    missing; a value that is not a finite number (strings, booleans, null, NaN, inf count as
    not numbers); equal (to 6 significant digits) to a config in `seen`. Kept with a note:
    a value outside [low, high] (clamped), a non-integer batch_size / lora_r (rounded)."""
    if not isinstance(proposal, Mapping):
        return None, [f"rejected: a proposal must be an object, got {type(proposal).__name__}"]
    unknown = sorted(str(k) for k in proposal if k not in bounds or k not in TUNABLE)
    if unknown:
        return None, [(f"rejected: unknown setting(s) {', '.join(unknown)}; allowed: "
                       f"{', '.join(sorted(bounds))}")]
    missing = sorted(n for n in bounds if n not in proposal)
    if missing:
        return None, [f"rejected: missing setting(s) {', '.join(missing)}"]
    bad = sorted(n for n in bounds if not _number(proposal[n]))
    if bad:
        return None, [f"rejected: {n}={proposal[n]!r} is not a finite number" for n in bad]
    config: dict[str, float | int] = {}
    notes: list[str] = []
    for name in sorted(bounds):
        low, high = bounds[name]
        value = proposal[name]
        if name in INTEGER:
            low, high = math.ceil(low), math.floor(high)
            if value != round(value):
                notes.append(f"{name} {value:g} rounded to {round(value)}")
            value = round(value)
        if value < low or value > high:
            clamped = min(max(value, low), high)
            notes.append(f"{name} {value:g} outside [{low:g}, {high:g}], clamped to {clamped:g}")
            value = clamped
        config[name] = int(value) if name in INTEGER else float(f"{float(value):.6g}")
    if config_key(config) in {config_key(s) for s in seen}:
        return None, notes + ["rejected: duplicate of a past trial or another proposal"]
    return config, notes


def propose(gateway, model: str, skill, k: int, bounds: Mapping[str, tuple[float, float]],
            stats: dict, past_trials: Iterable[Mapping], *,
            seen: Iterable[Mapping[str, float]] = (), temperature: float | None = 0.2,
            max_tokens: int | None = 2000, agent: str = "tuner") -> list[dict]:
    """Ask for `k` configs; gate each. One entry per proposal in the reply's order:
    `{"config": dict | None, "notes": [...], "proposal": <as sent>}`, `config` None when the
    gate rejected it; at most `k` entries keep a config (extra ones are marked as beyond k).
    A reply without a `configs` list gives one rejected entry saying so."""
    past_trials = list(past_trials)
    if k <= 0:
        return []
    reply = gateway.complete_json(
        model=model,
        messages=[{"role": "system", "content": skill.instructions},
                  {"role": "user", "content": tune_block(k, bounds, stats, past_trials)}],
        schema=configs_schema(bounds), schema_name="configs",
        temperature=temperature, max_tokens=max_tokens, agent=agent, slice_id=None,
    )
    configs = reply.get("configs") if isinstance(reply, dict) else None
    if not isinstance(configs, list):
        return [{"config": None, "proposal": reply,
                 "notes": ["rejected: the reply holds no `configs` list"]}]
    taken = [dict(s) for s in seen] + [dict(t["config"]) for t in past_trials
                                       if isinstance(t.get("config"), Mapping)
                                       and all(n in t["config"] for n in bounds)]
    taken = [{n: c[n] for n in bounds} for c in taken if all(n in c for n in bounds)]
    out, kept = [], 0
    for proposal in configs:
        if kept == k:
            out.append({"config": None, "proposal": proposal,
                        "notes": [f"rejected: beyond the {k} configs asked for"]})
            continue
        config, notes = clamp_config(proposal, bounds, seen=taken)
        if config is not None:
            kept += 1
            taken.append(config)
        out.append({"config": config, "notes": notes, "proposal": proposal})
    return out
