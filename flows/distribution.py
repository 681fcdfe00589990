"""Data distribution bias: measure the labels against the spec's target, then fix it.

Generated data drifts towards easy labels. After generation the label distribution of the
accepted examples is compared with the target by total variation distance
(TV = ½ Σ |p − q|, 0 = identical, 1 = disjoint). Under-represented labels get targeted
top-up rounds (agents re-read their slice's still-unlabelled rows and submit only rows of
those labels); whatever gap is left is closed by a quota that trims over-represented labels,
deterministically, so the curated set is within the spec's tolerance.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal


def target_shares(target: Literal["none", "uniform"] | dict[str, float],
                  labels: list[str]) -> dict[str, float] | None:
    if target == "none":
        return None
    if target == "uniform":
        return {label: 1 / len(labels) for label in labels}
    return {label: float(target.get(label, 0.0)) for label in labels}


def shares(counts: dict[str, int], labels: list[str]) -> dict[str, float]:
    total = sum(counts.get(label, 0) for label in labels)
    return {label: (counts.get(label, 0) / total if total else 0.0) for label in labels}


def tv_distance(p: dict[str, float], q: dict[str, float]) -> float:
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def under_represented(counts: dict[str, int], target: dict[str, float],
                      tolerance: float) -> list[str]:
    """Labels whose share is below target by more than tolerance / number of labels."""
    have = shares(counts, list(target))
    slack = tolerance / max(1, len(target))
    return [label for label, want in target.items() if have[label] < want - slack]


def quota(examples: list[dict], target: dict[str, float], tolerance: float,
          label_key: str = "label", order_key: str = "content_hash") -> list[dict]:
    """Trim over-represented labels so the shares match the target (when TV > tolerance).

    Keeps every example of the scarcest label (relative to its target share) and trims the
    others to their target share of the implied total; which examples of a trimmed label
    are kept is decided by `order_key` (a content hash: deterministic, unbiased)."""
    counts = Counter(e[label_key] for e in examples)
    if tv_distance(shares(counts, list(target)), target) <= tolerance:
        return examples
    wanted = [label for label, t in target.items() if t > 0]
    total = min(counts.get(label, 0) / target[label] for label in wanted)
    caps = {label: math.floor(target.get(label, 0.0) * total + 1e-9) for label in counts}
    kept, taken = [], Counter()
    for ex in sorted(examples, key=lambda e: str(e.get(order_key))):
        label = ex[label_key]
        if taken[label] < caps.get(label, 0):
            taken[label] += 1
            kept.append(ex)
    return kept
