"""The reports of a run, made by real components: a real example store, a real MLflow SQLite
store with a parent run, child runs with metric histories and a registered model version, a
real Prefect flow run on the session's temporary Prefect API, and, for the image links, a
real `mlflow server` on that store."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from flows.approval import Approval
from flows.reports import NOTE_TAG, UI_ENV, publish_reports
from flows.slicing import MembersRef, SliceDescriptor
from flows.spec import Spec
from flows.store import Store
from tests.servers import free_port
from training.evaluate import classification_metrics
from training.registry import decide_promotion

DEMO = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"
PNG = b"\x89PNG\r\n\x1a\n"
UI = "http://mlflow.example.test:5999"
LABELS = ["business", "entertainment", "politics", "sports", "tech"]
PLOTS = {"plots/label_distribution.png", "plots/sft_loss.png", "plots/dpo.png",
         "plots/tuning_trials.png"}


def _spec() -> Spec:
    data = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    data["name"] = "reporting-test"
    data["warehouse"]["url"] = "sqlite:///unused.db"
    data["distribution"]["target"] = "uniform"
    data["tracking"] = {"experiment": "reporting", "registered_model": "reporting-test-model"}
    data["evaluation"]["promotion"]["require_approval"] = True
    return Spec.model_validate(data)


def _descriptor(slice_id: str, rows: int) -> SliceDescriptor:
    return SliceDescriptor(slice_id=slice_id, key={"region": slice_id}, table="articles",
                           id_column="id", columns=["id", "title"],
                           members=MembersRef(url="memory:none", plan_id="p", part=slice_id,
                                              lo=0, hi=rows), row_count=rows)


def _log_history(client: MlflowClient, run_id: str, key: str, values: list[float]) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, v, now, 10 * (i + 1))
                                      for i, v in enumerate(values)])


def _store(out: Path, slices: list[SliceDescriptor]) -> str:
    """A run in the example store: 3 planned slices, 1 top-up slice, examples of each."""
    store = Store(f"sqlite:///{out / 'store.db'}")
    run_id = store.start_run("reporting-test", "abc", "{}")
    topup = _descriptor("region=uk+topup1", 6)
    store.add_slices(run_id, [*slices, topup])
    planned = {"region=uk": ["business"] * 6 + ["politics"] * 5,
               "region=us": ["tech"] * 3 + ["sports"] * 4,
               "region=eu": ["entertainment"] * 2 + ["business"] * 2}
    for slice_id, labels in planned.items():
        for i, label in enumerate(labels):
            store.add_example(run_id, slice_id=slice_id, row_id=f"{slice_id}-{i}",
                              prompt=f"p {slice_id} {i}", completion=f" {label}", label=label)
    for i, label in enumerate(["tech", "tech", "entertainment", "entertainment"]):
        store.add_example(run_id, slice_id=topup.slice_id, row_id=f"t{i}", prompt=f"t {i}",
                          completion=f" {label}", label=label)
    for i, reason in enumerate(["label_not_in_set", "label_not_in_set", "copy_of_eval_row"]):
        store.add_example(run_id, slice_id="region=uk", row_id=f"r{i}", prompt="x",
                          completion=" weather", label="weather", status="rejected",
                          reason=reason)
    figures = {"region=uk": (11, 3, "completed"), "region=us": (7, 0, "completed"),
               "region=eu": (4, 0, "max_turns"), topup.slice_id: (4, 0, "completed")}
    for slice_id, (accepted, rejected, stopped) in figures.items():
        store.update_slice(run_id, slice_id, status="done", accepted=accepted,
                           rejected=rejected, stopped_reason=stopped)
    store.close()
    return run_id


def _mlflow(tmp: Path, spec: Spec) -> tuple[MlflowClient, str, dict, dict, dict, str]:
    """Parent run, SFT/DPO/trial child runs with metric histories, a registered version."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment_id = client.create_experiment(
        "reporting", artifact_location=(tmp / "mlartifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="reporting-test",
                               tags={NOTE_TAG: "Roles played by the SIMULATED teacher."})
    parent_id = parent.info.run_id

    def child(name: str) -> str:
        return client.create_run(experiment_id, run_name=name,
                                 tags={"mlflow.parentRunId": parent_id}).info.run_id

    sft = child("sft")
    _log_history(client, sft, "loss", [5.1, 3.0, 1.4, 0.8, 0.5, 0.4, 0.35, 0.3])
    dpo = child("dpo")
    _log_history(client, dpo, "loss", [0.69, 0.6, 0.52, 0.45])
    _log_history(client, dpo, "rewards/accuracies", [0.5, 0.7, 0.85, 0.9])
    _log_history(client, dpo, "rewards/margins", [0.0, 0.05, 0.1, 0.2])
    trials = []
    for trial, scale in ((0, 1.0), (1, 0.8)):
        run = child(f"trial-{trial}")
        _log_history(client, run, "loss", [scale * v for v in (4.0, 2.0, 1.0, 0.6)])
        trials.append({"trial": trial, "source": "default" if trial == 0 else "tuner",
                       "config": {"learning_rate": 0.001 * (trial + 1), "batch_size": 16},
                       "eval_loss": 0.5 - 0.1 * trial, "status": "ok", "mlflow_run_id": run})
    tuned = {"trials": trials, "chosen_trial": 1, "chosen_config": trials[1]["config"],
             "default_eval_loss": 0.5, "best_eval_loss": 0.4, "beats_default": True}
    # a registered version (any logged file as its source: the card is what is tested)
    weights = tmp / "weights.txt"
    weights.write_text("not a real model")
    client.log_artifact(parent_id, str(weights), "model")
    client.create_registered_model(spec.tracking.registered_model)
    version = client.create_model_version(
        spec.tracking.registered_model, f"{parent.info.artifact_uri}/model", run_id=parent_id,
        tags={"posttrain.dataset_sha256": "d" * 64, "posttrain.spec_hash": "5a5a5a5a",
              "posttrain.stages": "sft+dpo", "posttrain.git_commit": "c0ffee"}).version
    train_result = {"mlflow_run_id": sft, "steps": 80, "train_loss": 1.48,
                    "num_parameters": 66752, "final_dir": str(tmp / "model" / "final")}
    dpo_result = {"mlflow_run_id": dpo, "steps": 40, "n_train": 30, "beta": 0.1,
                  "loss_type": ["sigmoid", "sft"], "reward_accuracy": 0.875,
                  "reward_margin": 0.2, "final_dir": str(tmp / "dpo" / "final")}
    return client, parent_id, train_result, dpo_result, tuned, str(version)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reporting")
    out = tmp / "run"
    out.mkdir()
    spec = _spec()
    slices = [_descriptor("region=uk", 14), _descriptor("region=us", 7),
              _descriptor("region=eu", 9)]
    run_id = _store(out, slices)
    client, parent_id, train_result, dpo_result, tuned, version = _mlflow(tmp, spec)
    gold = ["business", "tech", "sports", "politics", "entertainment"] * 4
    final = classification_metrics(gold[:16] + ["tech", "business", "<invalid>", "tech"],
                                   gold, LABELS)
    champion = classification_metrics(gold[:12] + ["tech"] * 8, gold, LABELS)
    sft = classification_metrics(gold[:14] + ["tech"] * 6, gold, LABELS)
    base = classification_metrics(["<invalid>"] * 20, gold, LABELS)
    (out / "eval.json").write_text(json.dumps({
        "base": base, "sft": sft, "final": final, "champion": champion,
        "champion_version": "1", "majority_baseline": 0.2}))
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text('{"prompt": "p", "completion": " tech"}\n')
    rule = decide_promotion(final, champion, metric="accuracy", min_improvement=0.0,
                            max_label_drop=0.5)
    approval = Approval(approved=True, reviewer="ana", comment="checked the F1s",
                        timed_out=False)
    decision = approval.applied_to(rule)
    summary = {  # the shape flows/summary.py writes to summary.json
        "run_id": run_id, "mlflow_run_id": parent_id,
        "mlflow_tracking_uri": "sqlite:///x", "teacher": "simulated",
        "llm": "generator=simulated,judge=simulated,tuner=simulated", "resumed": False,
        "slices": 3, "topup_slices": 1, "agents_stopped": {"region=eu": "max_turns"},
        "examples_accepted": 26,
        "examples_rejected": {"label_not_in_set": 2, "copy_of_eval_row": 1},
        "tool_misuse": {"sql_not_allowed": 2},
        "reanchors": 1,
        "drift_alarms": [{"slice_id": "region=uk", "at_call": 7, "time": 3.5}],
        "max_context_tokens": 7846, "llm_calls": 63, "llm_errors": 1, "cache_hits": 4,
        "input_tokens": 213150, "output_tokens": 6612, "cost_usd": 0.110798,
        "cost_by_role": {"generator": 0.067388, "judge": 0.04341, "tuner": 0.0},
        "label_tv_before": 0.2, "label_tv_after_topup": 0.12, "label_tv_after": 0.0,
        "label_counts": {"business": 4, "entertainment": 4, "politics": 4, "sports": 4,
                         "tech": 4},
        "train_examples": 20, "duplicates_dropped": 1, "eval_copies_dropped": 0,
        "quota_trimmed": 5, "train_loss": 1.48,
        "tuning_trials": [{k: t[k] for k in ("trial", "source", "config", "eval_loss",
                                             "status")} for t in tuned["trials"]],
        "chosen_config": tuned["chosen_config"], "tuning_beats_default": True,
        "dpo_pairs": {"train": 30, "held_out": 8, "rejected": {}},
        "dpo_reward_accuracy": 0.875, "dpo_reward_margin": 0.2,
        "sft_accuracy": sft["accuracy"], "eval_examples": 20, "base_accuracy": 0.0,
        "majority_baseline": 0.2, "accuracy": final["accuracy"],
        "macro_f1": final["macro_f1"], "model_name": spec.tracking.registered_model,
        "model_version": version, "promoted": decision["promote"],
        "previous_champion_version": "1", "champion_accuracy": champion["accuracy"],
        "promotion_reason": decision["reason"], "approval": approval.as_dict(),
        "stage_seconds": {"plan": 0.04, "generate": 1.1, "train": 46.3},
        "wall_seconds": 60.5,
    }
    balance = {"tv_before": 0.2, "tv_after": 0.12, "topup_slices": 1}
    args = (spec, summary, out, client, parent_id, slices, balance, train_result, dpo_result,
            tuned)
    return {"args": args, "client": client, "summary": summary, "out": out, "tmp": tmp,
            "final": final}


@pytest.fixture(scope="module")
def reported(inputs, prefect_api):
    """publish_reports called from the body of a real Prefect flow run."""
    from prefect import flow
    from prefect.context import FlowRunContext

    @flow(name="reporting-test")
    def report() -> tuple[str, dict]:
        return str(FlowRunContext.get().flow_run.id), publish_reports(*inputs["args"])

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(UI_ENV, UI + "/")
        started = time.perf_counter()
        flow_run_id, result = report()
        seconds = time.perf_counter() - started
    return {**inputs, "flow_run_id": flow_run_id, "result": result, "seconds": seconds}


def _artifacts(flow_run_id: str, key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_reports_without_failures(reported):
    result = reported["result"]
    assert result["errors"] == []
    assert set(result["plots"]) == PLOTS
    assert set(result["prefect_artifacts"]) == {
        "reporting-test-summary", "reporting-test-slices", "reporting-test-label-distribution",
        "reporting-test-training-loss"}
    assert reported["seconds"] < 30


def test_markdown_artifact_reads_as_the_run_summary(reported):
    [artifact] = _artifacts(reported["flow_run_id"], "reporting-test-summary")
    assert artifact.type == "markdown"
    md, s = artifact.data, reported["summary"]
    experiment_id = reported["client"].get_run(s["mlflow_run_id"]).info.experiment_id
    assert f"{UI}/#/experiments/{experiment_id}/runs/{s['mlflow_run_id']}" in md
    assert f"**{s['accuracy']:.3f}**" in md  # final accuracy, bold in the metrics table
    assert f"{s['sft_accuracy']:.3f}" in md and "0.875" in md  # SFT, DPO reward accuracy
    assert "**0.1108**" in md and "| generator | 0.0674 |" in md  # total and per-role cost
    assert s["promotion_reason"] in md and "approved by ana" in md
    assert "**promoted to champion**" in md
    assert "| `label_not_in_set` | 2 |" in md and "| `sql_not_allowed` | 2 |" in md
    assert "| region=uk | 7 | 3.5 |" in md  # the drift alarm
    assert "| 1 **chosen** | tuner |" in md  # tuning trials
    # label counts before top-up / after top-up / curated, readable without the image
    assert "| label | before top-up | after top-up | curated (after quota) |" in md
    assert "| `tech` | 3 | 5 | 4 |" in md and "| **total** | **22** | **26** | **20** |" in md
    assert "before top-up 0.200, after top-up 0.120, curated 0.000" in md


def test_slices_table_has_one_row_per_agent_slice(reported):
    [artifact] = _artifacts(reported["flow_run_id"], "reporting-test-slices")
    assert artifact.type == "table"
    rows = json.loads(artifact.data)
    assert [r["slice"] for r in rows] == ["region=uk", "region=us", "region=eu",
                                          "region=uk+topup1"]
    by_id = {r["slice"]: r for r in rows}
    assert by_id["region=uk"] == {"slice": "region=uk", "kind": "planned", "rows": 14,
                                  "accepted": 11, "rejected": 3, "status": "done",
                                  "stopped": "completed"}
    assert by_id["region=eu"]["stopped"] == "max_turns"
    assert by_id["region=uk+topup1"]["kind"] == "top-up"


def test_image_artifacts_point_at_the_plots_in_mlflow(reported):
    run_id = reported["summary"]["mlflow_run_id"]
    [image] = _artifacts(reported["flow_run_id"], "reporting-test-label-distribution")
    assert image.type == "image"
    assert image.data == (f"{UI}/get-artifact?path=plots%2Flabel_distribution.png"
                          f"&run_uuid={run_id}")
    [loss] = _artifacts(reported["flow_run_id"], "reporting-test-training-loss")
    assert "path=plots%2Fsft_loss.png" in loss.data


def test_plots_are_pngs_on_the_parent_run(reported, tmp_path):
    client, run_id = reported["client"], reported["summary"]["mlflow_run_id"]
    logged = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert logged == PLOTS
    for path in sorted(logged):
        local = Path(client.download_artifacts(run_id, path, str(tmp_path)))
        data = local.read_bytes()
        assert data[:8] == PNG and len(data) > 5000, path


def test_run_description_and_summary_md(reported, tmp_path):
    client, run_id = reported["client"], reported["summary"]["mlflow_run_id"]
    note = client.get_run(run_id).data.tags[NOTE_TAG]
    on_disk = (reported["out"] / "summary.md").read_text()
    assert note == on_disk and note.startswith("# reporting-test: post-training run")
    assert "SIMULATED" in note  # the pipeline's announcement is kept in the new note
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.md", "model_card.md"} <= names


def test_model_card_is_the_version_description(reported):
    client, s = reported["client"], reported["summary"]
    mv = client.get_model_version(s["model_name"], s["model_version"])
    card, final = mv.description, reported["final"]
    assert card == (reported["out"] / "model_card.md").read_text()
    assert card.startswith(f"# Model card: {s['model_name']} v{s['model_version']}")
    assert "Label a BBC News article with its topic." in card  # intended use
    assert f"| **this model** | {final['accuracy']:.3f} | {final['macro_f1']:.3f} |" in card
    tech = final["per_label"]["tech"]
    assert (f"| `tech` | {tech['precision']:.3f} | {tech['recall']:.3f} | {tech['f1']:.3f} "
            f"| {tech['support']} |") in card
    assert "d" * 64 in card and "| `posttrain.git_commit` | `c0ffee` |" in card  # lineage
    assert "**SIMULATED**" in card and "Stages: tune → SFT → DPO." in card
    assert s["promotion_reason"] in card


def test_outside_a_flow_run_mlflow_reports_are_made_and_prefect_is_skipped(inputs):
    spec, summary, out, client, run_id, *rest = inputs["args"]
    result = publish_reports(spec, summary, out, client, run_id, *rest)
    assert result["errors"] == [] and result["prefect_artifacts"] == {}
    assert set(result["plots"]) == PLOTS
    assert client.get_run(run_id).data.tags[NOTE_TAG].startswith("# reporting-test")



def test_the_mlflow_server_serves_the_image_url(reported, tmp_path):
    """The URL the image artifact holds, against a real `mlflow server` on the same store."""
    port = free_port()
    db = reported["tmp"] / "mlflow.db"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.3)
        [image] = _artifacts(reported["flow_run_id"], "reporting-test-label-distribution")
        with urllib.request.urlopen(image.data.replace(UI, base), timeout=10) as reply:
            assert reply.headers["Content-Type"] == "image/png"
            assert reply.read() == (reported["out"] / "plots" / "label_distribution.png"
                                    ).read_bytes()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=20)

