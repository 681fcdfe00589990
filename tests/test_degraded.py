"""A failed optional stage degrades the run, it does not end it (flows/optional_stages.py):
a real run whose DPO stage the sanity check stops as degenerate goes on with the SFT model,
registers and can promote it, and says so in summary.json, the model card and the flow run's
state; `required: true` keeps the old behaviour."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect import flow, task

from flows.optional_stages import OptionalStages
from tests.test_pipeline import LEARNS, tiny_spec

DEGENERATE_DPO = {"enabled": True, "max_steps": 40, "learning_rate": 1e-12, "beta": 0.1,
                  "loss_type": ["sigmoid"], "batch_size": 8, "holdout_fraction": 0.15}


def test_a_degenerate_dpo_stage_degrades_the_run_to_the_sft_model(small_warehouse_url, tmp_path,
                                                                   prefect_api):
    from flows.pipeline import post_training

    spec = tiny_spec(small_warehouse_url, tmp_path, LEARNS["student"], **LEARNS["training"])
    data = yaml.safe_load(spec.read_text())
    data["dpo"] = DEGENERATE_DPO  # learning rate 1e-12: the loss stays at ln 2
    spec.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    state = post_training(spec_path=str(spec), out_dir=str(out), return_state=True)

    assert state.is_completed() and state.name == "Degraded"
    assert "dpo failed (TrainingFailed: DPO degenerate: sigmoid loss stuck at ln 2" in state.message
    s = state.result()
    assert s == json.loads((out / "summary.json").read_text())
    assert s["outcome"] == "degraded"
    [d] = s["degraded"]
    assert d["stage"] == "dpo" and d["reason"].startswith("TrainingFailed: DPO degenerate")
    assert "SFT model" in d["fallback"]
    assert s["dpo_pairs"]["train"] > 0 and s["dpo_reward_accuracy"] is None
    assert any(w.startswith("dpo failed") for w in s["warnings"])
    # the SFT model was evaluated and registered, as for a run without DPO
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version(s["model_name"], s["model_version"])
    assert version.tags["posttrain.stages"] == "sft"
    assert s["promoted"] is True, s["promotion_reason"]  # it beats the majority baseline
    card = (out / "model_card.md").read_text()
    assert "**Degraded: dpo failed**" in card and "the SFT model was evaluated" in card


@task
def broken_stage() -> dict:
    raise RuntimeError("the stage broke\nsecond line")


@flow
def two_stages(required: bool) -> dict:
    optional, result = OptionalStages(), {"model": "sft"}
    with optional.attempt("dpo", required, "the SFT model goes on"):
        broken_stage()
        result["model"] = "dpo"  # skipped: the stage failed
    return {**result, "degraded": optional.degraded}


def test_an_optional_stage_failing_inside_a_flow_is_recorded_and_skipped(prefect_api):
    state = two_stages(False, return_state=True)
    assert state.is_completed()
    assert state.result() == {"model": "sft", "degraded": [
        {"stage": "dpo", "reason": "RuntimeError: the stage broke",
         "fallback": "the SFT model goes on"}]}


def test_a_required_stage_failing_fails_the_flow(prefect_api):
    state = two_stages(True, return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="the stage broke"):
        state.result()
