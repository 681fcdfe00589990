"""The flow parameters people change from the Prefect UI form, applied to a spec file.

The spec file stays the source of truth; a run with overrides pins the exact spec it ran
(`<out>/spec.pinned.yaml`, relative paths resolved) and every stage reads that copy, so what
ran is on disk and its hash is on the MLflow run.

    path = pin_overrides("examples/news_topics/spec.yaml", out,
                         {"llm.generator.model": "MiniMax-M2.5", "training.max_steps": 100})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flows.spec import load_spec, parse_spec

PINNED_NAME = "spec.pinned.yaml"


def pin_overrides(spec_path: str | Path, out: Path, overrides: dict[str, Any]) -> Path:
    """Apply dotted-key `overrides` (None values ignored) to the spec, validate, write the
    pinned copy and return its path; the spec's own path when there is nothing to change."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    if not changes:
        return Path(spec_path)
    data = load_spec(spec_path).model_dump(mode="json")  # relative URLs already resolved
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value
    parse_spec(data)  # a bad override is a SpecError naming the field, before anything runs
    out.mkdir(parents=True, exist_ok=True)
    pinned = out / PINNED_NAME
    pinned.write_text(yaml.safe_dump(data, sort_keys=False))
    return pinned
