"""The SFT stage: TRL's SFTTrainer on the curated set, launched through Accelerate.

The config is built from the spec (flows/train_configs.py) with the tune stage's chosen
settings when it ran; the job runs in its own process under the spec's accelerate profile and
logs a child MLflow run under the parent; its `[progress]` lines move the flow's bar.

A resumed run (flows/run_lifecycle.py) does not train twice: when out/model already holds the
finished model of this very job (done.json of the same fingerprint: config, data, parent run)
its result is reused; when only checkpoints are there, training resumes from the newest
(`training.launch`, `training.sft`). The result says which: `reused`, `resumed_from_step`.
"""

from pathlib import Path

from prefect import get_run_logger, task
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
    result = launch_sft(config, out_dir / "model", profile=spec.training.accelerate_profile,
                        on_line=Progress.get(progress_id).training_line)
    if result.get("reused"):
        get_run_logger().info("SFT: the model in %s had finished for this config and data "
                              "before the run was resumed: reused, not retrained",
                              result["final_dir"])
    elif result.get("resumed_from_step"):
        get_run_logger().info("SFT resumed from step %d of %d (its last checkpoint)",
                              result["resumed_from_step"], result["steps"])
    return result
