"""The champion's error map and the focus plan it sets: pure computations, no I/O.

An error-driven run (flows/error_driven.py) has the champion predict a deterministic sample
of each slice's rows (the probes) and the run's own sub-agents label the same rows. Compared,
they give where the champion is wrong:

    error_map(pairs, labels, k)   accuracy/error by slice group, per-label precision/recall/F1
                                  against the agents' labels, the top confusion pairs
                                  (gold -> predicted) and the k weak labels (worst F1)
    focus_plan(slices, emap, ...) the slices ordered worst-first, the per-slice max_turns
                                  (focus_turns x on the weakest), the top-up's want_labels
    probe_ids(ids, n, salt)       which n ids of a slice are probed: the n smallest hashes
    error_map_summary(emap, ev)   the summary's block: the map before, both models after

Everything here takes and returns plain data, so tests/test_error_driven.py checks it on
hand-made pairs.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from training.evaluate import classification_metrics

TOP_CONFUSIONS = 10


def group_of(slice_id: str) -> str:
    """The group a slice id belongs to: 'region=uk#2+probe' -> 'region=uk'."""
    return slice_id.split("+", 1)[0].split("#", 1)[0]


def probe_ids(ids: Iterable[str], n: int, salt: str = "") -> list[str]:
    """The `n` ids with the smallest blake2b(salt + id): the same sample on every run of the
    same plan, spread over the slice (not its first rows), returned in id order."""
    ids = list(ids)
    if n >= len(ids):
        return ids
    key = {i: hashlib.blake2b(f"{salt}{i}".encode(), digest_size=8).digest() for i in ids}
    chosen = set(sorted(ids, key=key.__getitem__)[:n])
    return [i for i in ids if i in chosen]


def probe_quota(row_counts: list[int], per_slice: int, total: int) -> list[int]:
    """Probe rows per slice: `per_slice` each (at most the slice's rows), lowered evenly so the
    sum stays within `total`; with more slices than `total`, one row each for the first ones."""
    if not row_counts:
        return []
    each = max(1, min(per_slice, total // len(row_counts)))
    out, left = [], total
    for n in row_counts:
        take = min(each, n, left)
        out.append(take)
        left -= take
    return out


def error_map(pairs: Iterable[tuple[str, str, str]], labels: list[str], weak_k: int = 2,
              top: int = TOP_CONFUSIONS) -> dict:
    """The champion's errors from (slice id, agents' label, champion's prediction) triples.

    Returns {n, accuracy, by_slice: {group: {n, errors, accuracy, error}}, per_label:
    {label: {precision, recall, f1, support}}, macro_f1, invalid, confusions: [{gold,
    predicted, count}] (off-diagonal, commonest first, `top` at most), weak_labels}. Weak
    labels are the `weak_k` labels with the lowest F1 among those the probes hold (support >
    0: a label never seen says nothing), ties broken by more support first, then by name."""
    pairs = list(pairs)
    gold = [g for _, g, _ in pairs]
    pred = [p for _, _, p in pairs]
    metrics = classification_metrics(pred, gold, labels)
    by_slice: dict[str, dict] = {}
    for slice_id, g, p in pairs:
        s = by_slice.setdefault(group_of(slice_id), {"n": 0, "errors": 0})
        s["n"] += 1
        s["errors"] += g != p
    for s in by_slice.values():
        s["accuracy"] = round(1 - s["errors"] / s["n"], 4)
        s["error"] = round(s["errors"] / s["n"], 4)
    confusions = Counter((g, p) for g, p in zip(gold, pred, strict=True) if g != p)
    seen = [label for label in labels if metrics["per_label"][label]["support"] > 0]
    weak = sorted(seen, key=lambda lb: (metrics["per_label"][lb]["f1"],
                                        -metrics["per_label"][lb]["support"], lb))[:weak_k]
    return {
        "n": metrics["n"], "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4), "invalid": metrics["invalid"],
        "by_slice": dict(sorted(by_slice.items())),
        "per_label": {lb: {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
                      for lb, m in metrics["per_label"].items()},
        "confusions": [{"gold": g, "predicted": p, "count": c}
                       for (g, p), c in sorted(confusions.items(),
                                               key=lambda x: (-x[1], x[0]))[:top]],
        "weak_labels": weak,
    }


@dataclass
class FocusPlan:
    """Where the agents work first: `order` (slice ids, worst group first), `max_turns` per
    slice id (focus_turns x the spec's on the weakest groups), the weak labels the targeted
    top-up wants, and the groups that got the extra turns."""

    order: list[str]
    max_turns: dict[str, int]
    want_labels: list[str]
    focus_groups: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"order": self.order, "max_turns": self.max_turns,
                "want_labels": self.want_labels, "focus_groups": self.focus_groups}


def focus_plan(slice_ids: list[str], emap: dict, max_turns: int, focus_turns: float
               ) -> FocusPlan:
    """Slices ordered by their group's champion error, worst first (groups the probes did not
    reach count as error 0, the planned order kept among equals). The weakest groups, those
    whose error is above zero and at least the probes' overall error, get
    round(focus_turns x max_turns) turns; the others keep `max_turns`."""
    by_group = emap.get("by_slice") or {}
    overall = 1 - emap.get("accuracy", 1.0) if emap.get("n") else 0.0

    def error(sid: str) -> float:
        return by_group.get(group_of(sid), {}).get("error", 0.0)

    order = sorted(slice_ids, key=lambda sid: -error(sid))  # stable: planned order among equals
    focus = sorted({group_of(s) for s in slice_ids if error(s) > 0 and error(s) >= overall})
    boosted = max(1, round(focus_turns * max_turns))
    return FocusPlan(order=order,
                     max_turns={s: boosted if group_of(s) in focus else max_turns
                                for s in order},
                     want_labels=list(emap.get("weak_labels") or []), focus_groups=focus)


# ── after: the summary's block ──────────────────────────────────────────────────────────────
def error_map_summary(emap: dict | None, ev: dict) -> dict | None:
    """The summary's `error_map`: `before`, the champion's map on the probes; `after`, the
    new model's (`final`) and the champion's per-label F1 and, where evaluation gives them,
    per-slice-group figures on the same held-out rows."""
    if not emap:
        return None
    final, champion = ev.get("final") or {}, ev.get("champion") or {}
    per_label: dict[str, dict] = defaultdict(dict)
    for who, res in (("final", final), ("champion", champion)):
        for label, m in (res.get("per_label") or {}).items():
            per_label[label][who] = round(m["f1"], 4)
    by_slice: dict[str, dict] = defaultdict(dict)
    for who, res in (("final", final), ("champion", champion)):
        for group, m in (res.get("by_slice") or {}).items():
            by_slice[group][who] = {k: m.get(k) for k in ("n", "accuracy", "macro_f1")}
    return {
        "champion_version": emap.get("champion_version"),
        "start_from_champion": bool(emap.get("start_from_champion")),
        "before": {k: emap.get(k) for k in ("n", "accuracy", "macro_f1", "weak_labels",
                                             "by_slice", "confusions")}
        | {"f1": {k: v["f1"] for k, v in (emap.get("per_label") or {}).items()},
           "focus_groups": (emap.get("focus") or {}).get("focus_groups", [])},
        "after": {"n": ev.get("n"), "f1": dict(per_label), "by_slice": dict(by_slice) or None,
                  "weak_labels_f1": {k: per_label.get(k, {}) for k in emap.get("weak_labels")
                                     or []}},
    }
