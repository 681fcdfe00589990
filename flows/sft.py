"""The SFT stage: TRL's SFTTrainer on the curated set, launched through Accelerate.

The config is built from the spec (flows/train_configs.py) with the tune stage's chosen
settings when it ran; the job runs in its own process under the spec's accelerate profile and
logs a child MLflow run under the parent; its `[progress]` lines move the flow's bar.
"""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.progress import Progress
from flows.spec import Spec
from flows.train_configs import sft_config
from training.launch import launch_sft


@task(name="train-sft", cache_policy=NO_CACHE)
def train(spec: Spec, dataset: dict, out_dir: Path, mlflow_uri: str, mlflow_run_id: str,
          progress_id: str, settings: dict | None = None) -> dict:
    """TRL SFT via Accelerate on the curated data, with the tune stage's chosen settings."""
    config = sft_config(
        spec, train_file=dataset["path"], output_dir=str(out_dir / "model"),
        max_steps=spec.training.max_steps, settings=settings,
        mlflow={"tracking_uri": mlflow_uri, "parent_run_id": mlflow_run_id,
                "run_name": f"{spec.name}-sft"})
    return launch_sft(config, out_dir / "model", profile=spec.training.accelerate_profile,
                      on_line=Progress.get(progress_id).training_line)
