"""The pipeline with every optional stage on, as one real Prefect flow run: tuning trials
(mapped tasks, MLflow child runs), SFT with the chosen config, agent-written preference pairs
and DPO, evaluation of both models on the same held-out rows, and a person approving the
promotion through the paused run's form."""

from __future__ import annotations

import threading

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.test_approval import answer_when_paused
from tests.test_pipeline import LEARNS, tiny_spec


@pytest.fixture(scope="module")
def staged_run(small_warehouse_url, tmp_path_factory, prefect_api):
    from flows.pipeline import post_training

    tmp = tmp_path_factory.mktemp("stages")
    path = tiny_spec(small_warehouse_url, tmp, LEARNS["student"], **LEARNS["training"])
    data = yaml.safe_load(path.read_text())
    # lr bounds where this student learns the task: the promotion needs a model that beats
    # the majority baseline (tuning by 40-step eval loss alone picked lr 5e-3, accuracy 0.17)
    data["tuning"] = {"enabled": True, "trials": 2, "max_steps": 40, "concurrency": 2,
                      "bounds": {"learning_rate": [0.0008, 0.0015], "batch_size": [8, 16]}}
    data["dpo"] = {"enabled": True, "max_steps": 30, "learning_rate": 0.001, "beta": 0.1,
                   "loss_type": ["sigmoid"], "batch_size": 8, "holdout_fraction": 0.15}
    data["evaluation"]["promotion"]["require_approval"] = True
    path.write_text(yaml.safe_dump(data))
    found: dict = {}
    approver = threading.Thread(target=answer_when_paused, args=(
        {"approve": True, "reviewer": "alice", "comment": "looks right"}, found, 600))
    approver.start()
    summary = post_training(spec_path=str(path), out_dir=str(tmp / "run"))
    approver.join()
    return tmp, summary, found


def test_summary_reports_every_stage(staged_run):
    _, s, _ = staged_run
    assert [t["trial"] for t in s["tuning_trials"]] == [0, 1]
    assert s["tuning_trials"][0]["source"] == "default"
    losses = {t["trial"]: t["eval_loss"] for t in s["tuning_trials"]}
    best = min(losses, key=losses.get)
    assert s["chosen_config"] == s["tuning_trials"][best]["config"]
    assert s["tuning_beats_default"] == (best != 0)
    assert s["dpo_pairs"]["train"] > 0 and s["dpo_pairs"]["held_out"] > 0
    assert 0.0 <= s["dpo_reward_accuracy"] <= 1.0
    assert 0.0 <= s["sft_accuracy"] <= 1.0
    # `accuracy` is the final (DPO) model's, measured on the same rows as the SFT model's
    assert s["accuracy"] != s["base_accuracy"]
    assert {"tune", "train", "pairs", "dpo", "evaluate", "promote"} <= set(s["stage_seconds"])


def test_each_training_job_is_one_child_run(staged_run):
    tmp, s, _ = staged_run
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    parent = client.get_run(s["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{s['mlflow_run_id']}'")
    stages = sorted(c.data.tags["posttrain.stage"] for c in children)
    assert stages == ["dpo", "sft", "trial", "trial"]
    dpo = next(c for c in children if c.data.tags["posttrain.stage"] == "dpo")
    assert any(k.startswith("rewards/accuracies") or k == "eval_rewards/accuracies"
               for k in dpo.data.metrics)
    assert parent.data.metrics["sft_accuracy"] == pytest.approx(s["sft_accuracy"])
    assert parent.data.metrics["dpo_reward_accuracy"] == pytest.approx(s["dpo_reward_accuracy"])
    version = client.get_model_version(s["model_name"], s["model_version"])
    assert version.tags["posttrain.stages"] == "sft+dpo"
    assert version.tags["posttrain.pairs_sha256"]


def test_promotion_waited_for_a_person(staged_run):
    _, s, found = staged_run
    assert found["state"] == "Paused"
    assert s["approval"] == {"approved": True, "reviewer": "alice", "comment": "looks right",
                             "timed_out": False}
    assert s["promoted"] is True and s["promotion_reason"].endswith("(approved by alice)")
