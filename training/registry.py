"""Register trained models in the MLflow Model Registry and move the `champion` alias.

    version = register_model("runs/x/final", run_id, "news-topics-classifier",
                             metrics={"accuracy": 0.91}, tags={"spec_hash": "..."})
    decision = promote_if_better("news-topics-classifier", version, "accuracy", 0.91, 0.0)

The model is logged with `mlflow.transformers.log_model` (model + tokenizer, task
text-generation) into the given run and registered in one step; its metrics and tags become
model-version tags, so the champion's figure is read back from its own version. The
tracking URI is the caller's (`mlflow.set_tracking_uri`).
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHAMPION = "champion"


def _requirements() -> list[str]:
    """Pinned runtime requirements (skips MLflow's slow requirement inference)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "tokenizers")]


def register_model(
    model_dir: str | Path,
    run_id: str,
    registered_name: str,
    metrics: dict | None = None,
    tags: dict | None = None,
) -> str:
    """Log the model in `model_dir` to run `run_id`, register it, and return the version.

    `metrics` (numbers) and `tags` are stored as tags of the new model version."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    version_tags = {k: str(v) for k, v in (tags or {}).items()}
    version_tags |= {k: repr(float(v)) for k, v in (metrics or {}).items()}

    # The logged model belongs to the run's experiment, whatever experiment is active here.
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    logged = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, experiment_id=experiment_id
    )
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        registered_model_name=registered_name,
        pip_requirements=_requirements(),
        tags=version_tags,
        run_id=run_id,
        model_id=logged.model_id,
    )
    return str(info.registered_model_version)


def champion(registered_name: str, metric: str) -> tuple[str | None, float | None]:
    """(version, value of `metric` from its tag) of the current champion, or (None, None)."""
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(registered_name, CHAMPION)
    except MlflowException:
        return None, None
    raw = mv.tags.get(metric)
    return str(mv.version), (float(raw) if raw is not None else None)


def promote_if_better(
    registered_name: str, version: str | int, metric: str, value: float, min_improvement: float
) -> dict:
    """Move `champion` to `version` if there is none or `value` beats it by > min_improvement.

    Returns {promoted, previous_champion_version, previous_champion_value, reason}."""
    client = MlflowClient()
    prev_version, prev_value = champion(registered_name, metric)
    if prev_version is None:
        promoted, reason = True, "no champion yet"
    elif prev_value is None or math.isnan(prev_value):
        promoted, reason = True, f"champion v{prev_version} has no {metric} tag"
    elif value > prev_value + min_improvement:
        promoted = True
        reason = (
            f"{metric} {value:.4f} > champion v{prev_version} {prev_value:.4f} + {min_improvement}"
        )
    else:
        promoted = False
        reason = (
            f"{metric} {value:.4f} does not beat champion v{prev_version} "
            f"{prev_value:.4f} + {min_improvement}"
        )
    if promoted:
        client.set_registered_model_alias(registered_name, CHAMPION, str(version))
    client.set_model_version_tag(registered_name, str(version), "promotion", reason)
    return {
        "promoted": promoted,
        "previous_champion_version": prev_version,
        "previous_champion_value": prev_value,
        "reason": reason,
    }
