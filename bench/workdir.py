"""What every bench does first: run offline and quiet, in a folder of its own."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def offline() -> None:
    """No model hub, no telemetry (a variable already set is kept)."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def workdir(keep: str | None, prefix: str) -> Path:
    """`offline()`, then the folder runs go in: `keep` (kept), or a new temporary one."""
    offline()
    folder = Path(keep or tempfile.mkdtemp(prefix=prefix)).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
