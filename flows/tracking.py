"""MLflow for the pipeline: where runs are tracked, the parent run, the dataset input.

The pipeline talks to MLflow through an explicit `MlflowClient` (tasks run in threads;
the fluent API's active-run stack is per thread). One parent run per pipeline run; the
training job logs into a child run of it.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


def tracking_uri(spec_uri: str | None, out_dir: Path) -> str:
    """The spec's URI, else $MLFLOW_TRACKING_URI, else a SQLite store beside the run folder,
    shared by every run under the same parent folder (so the registry sees them all)."""
    if spec_uri:
        return spec_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{out_dir.resolve().parent / 'mlflow.db'}"


def ensure_experiment(client: MlflowClient, name: str, out_dir: Path) -> str:
    """Experiment id; a new experiment stores artifacts beside a local tracking database, or
    where a tracking server puts them (its artifact store: never this machine's disk)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    remote = client.tracking_uri.startswith(("http://", "https://", "databricks"))
    artifacts = None if remote else (out_dir.resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(name)  # another run created it a moment ago
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: a spec as MLflow params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


def start_parent_run(client: MlflowClient, experiment_id: str, run_name: str, params: dict,
                     tags: dict) -> str:
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """Log figures at step 0, stamped now: a resumed run logging a figure again (coverage
    before and after the resume) adds a point to its history, never a duplicate key."""
    now = int(time.time() * 1000)
    items = [mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=items)


def log_dataset(run_id: str, path: Path, digest: str, name: str,
                context: str = "training") -> None:
    """Log a JSONL file as an MLflow dataset input (`context`: training, evaluation) whose
    digest hashes the whole file, with the file itself as an artifact under dataset/."""
    import pandas as pd

    df = pd.read_json(path, lines=True)
    with warnings.catch_warnings():  # a local path matches two equivalent source types
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = mlflow.data.from_pandas(df, source=str(path.resolve()), name=name,
                                          digest=digest)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(dataset, context=context)
        mlflow.log_artifact(str(path), artifact_path="dataset")
