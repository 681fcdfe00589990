"""Links into the MLflow UI, for the reports' pages and the Prefect artifacts.

The UI is at $POSTTRAIN_MLFLOW_UI_URL (default http://127.0.0.1:5000): runs at
`{ui}/#/experiments/{experiment_id}/runs/{run_id}`, model versions at
`{ui}/#/models/{name}/versions/{version}`, a run's files at the server's
`{ui}/get-artifact?path=...&run_uuid=...` route (the one its UI uses for previews).
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote

UI_ENV = "POSTTRAIN_MLFLOW_UI_URL"
DEFAULT_UI = "http://127.0.0.1:5000"


def mlflow_ui_url() -> str:
    return (os.environ.get(UI_ENV) or DEFAULT_UI).rstrip("/")


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(ui: str, name: str, version: str) -> str:
    return f"{ui}/#/models/{quote(name, safe='')}/versions/{version}"


def artifact_url(ui: str, run_id: str, path: str) -> str:
    """A run's file as the MLflow server serves it (the route its UI uses for previews)."""
    return f"{ui}/get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"


def slug(name: str) -> str:
    """A Prefect artifact key part: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "posttrain"
