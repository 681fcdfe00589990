"""Crash during training (issue 14): a training job killed with SIGKILL resumes from its last
checkpoint, a finished one is not trained again, and a killed pipeline run, run again, resumes
SFT, pays no LLM call twice and registers one model version.

Real components only: `accelerate launch` of TRL in a subprocess whose process group is
killed, a real MLflow (SQLite) store, and `posttrain run` end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import sqlalchemy as sa
import yaml
from mlflow import MlflowClient

from examples.news_topics.build_warehouse import read_articles
from training.launch import CHECKPOINTS, DONE, launch_sft, launch_training, parse_progress

REPO = Path(__file__).resolve().parent.parent
EXE = shutil.which("posttrain") or str(Path(sys.executable).parent / "posttrain")
PROMPT = "Title: {title}\nLead: {body:.300}\nTopic:"
LABELS = ["business", "entertainment", "politics", "sports", "tech"]
TINY = {
    "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
    "vocab_size": 400, "max_position_embeddings": 256,
}  # fmt: skip


# ── helpers ──────────────────────────────────────────────────────────────────────────────────
def complete_checkpoints(out: Path) -> list[int]:
    """Steps of the checkpoints in out/checkpoints that the Trainer finished writing."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")
                  if (p / "trainer_state.json").is_file())


def launch_and_kill(module: str, config: dict, run_dir: Path, result_name: str,
                    wait_s: float = 180) -> int:
    """Launch a training job through training.launch in a subprocess (its own process group),
    SIGKILL the whole group as soon as a complete checkpoint is on disk; return its step."""
    code = ("import json, sys; from pathlib import Path; from training.launch import "
            "launch_training; launch_training(sys.argv[1], json.loads(sys.argv[2]), "
            "Path(sys.argv[3]), result_name=sys.argv[4])")
    proc = subprocess.Popen([sys.executable, "-c", code, module, json.dumps(config),
                             str(run_dir), result_name], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + wait_s
    try:
        while time.time() < deadline and proc.poll() is None and not complete_checkpoints(
                run_dir):
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    steps = complete_checkpoints(run_dir)
    assert steps, f"no checkpoint appeared (exit code {proc.returncode})"
    assert not (run_dir / DONE).exists(), "the job finished before it could be killed"
    return steps[-1]


def _logged(run_dir: Path) -> list[dict]:
    lines = (run_dir / "train.log").read_text().splitlines()
    return [p for p in map(parse_progress, lines) if p and "loss" in p]


def progress_steps(run_dir: Path) -> list[int]:
    return [p["step"] for p in _logged(run_dir)]


def losses(run_dir: Path) -> list[float]:
    return [p["loss"] for p in _logged(run_dir)]


def children_of(client: MlflowClient, experiment_id: str, parent: str) -> list:
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


# ── fixtures ─────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.create_experiment("resume-tests", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    yield {"uri": uri, "experiment_id": exp, "parent_run_id": parent, "client": client}
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def articles(tmp_path_factory) -> Path:
    rows = read_articles(per_label=12)  # 60 real articles
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": PROMPT.format(**r), "completion": " " + r["topic"]}) + "\n"
        for r in rows))
    return path


def sft_config(train_file: Path, tracking: dict, **extra) -> dict:
    return {
        "train_file": str(train_file), "tiny": TINY, "seed": 0, "max_steps": 60,
        "learning_rate": 1e-2, "batch_size": 8, "lr_scheduler": "cosine", "warmup_ratio": 0.0,
        "max_length": 256, "threads": 1, "logging_steps": 2, "save_steps": 4,
        "mlflow": {"tracking_uri": tracking["uri"], "parent_run_id": tracking["parent_run_id"],
                   "run_name": "sft-resume"},
        **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
def sft(tmp_path_factory, articles, tracking):
    """One SFT job killed after its first checkpoint, a copy of its folder (stale checkpoints
    for another config), then the same job launched again."""
    tmp = tmp_path_factory.mktemp("sft")
    run_dir = tmp / "run"
    config = sft_config(articles, tracking)
    killed_at = launch_and_kill("training.sft", config, run_dir, "train_result.json")
    job = json.loads((run_dir / CHECKPOINTS / "job.json").read_text())
    shutil.copytree(run_dir, tmp / "copy")
    # another config on the copy first: it must not resume the stale checkpoints
    other = launch_sft({**config, "learning_rate": 5e-3}, tmp / "copy")
    lines: list[str] = []
    started = time.perf_counter()
    result = launch_sft(config, run_dir, on_line=lines.append)
    return {"config": config, "run_dir": run_dir, "killed_at": killed_at, "job": job,
            "other": other, "copy": tmp / "copy", "result": result, "lines": lines,
            "seconds": time.perf_counter() - started}


# ── (a) SFT ──────────────────────────────────────────────────────────────────────────────────
def test_killed_sft_resumes_from_its_last_checkpoint(sft):
    result, run_dir = sft["result"], sft["run_dir"]
    step = result["resumed_from_step"]
    assert step >= sft["killed_at"] > 0 and step % 4 == 0
    assert result["steps"] == 60 and "reused" not in result
    assert f"[resume] SFT resumes from checkpoint-{step} (step {step} of 60)" in sft["lines"]
    # training went on from the checkpoint: no step at or before it was trained again
    steps = progress_steps(run_dir)
    assert steps[0] > step and steps[-1] == 60
    # final/ is whole, done.json written last, the checkpoints gone once the job finished
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert not (run_dir / "final.partial").exists() and not (run_dir / CHECKPOINTS).exists()
    done = json.loads((run_dir / DONE).read_text())
    assert done["result"] == "train_result.json" and done["fingerprint"]
    assert json.loads((run_dir / "train_result.json").read_text())["resumed_from_step"] == step
    # a whole-run mean loss, not the mean of the steps after the resume alone
    assert result["final_loss"] < result["train_loss"] < 10


def test_the_resumed_job_keeps_its_one_mlflow_child_run(sft, tracking):
    client, result = tracking["client"], sft["result"]
    assert result["mlflow_run_id"] == sft["job"]["mlflow_run_id"]  # reopened, not a new one
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "sft-resume"
    assert run.data.metrics["result/resumed_from_step"] == result["resumed_from_step"]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert max(m.step for m in losses) == 60
    # the parent has two children: this job's (once) and the other config's
    children = children_of(client, tracking["experiment_id"], tracking["parent_run_id"])
    ids = [r.info.run_id for r in children]
    assert sorted(ids) == sorted([result["mlflow_run_id"], sft["other"]["mlflow_run_id"]])
    assert all(r.info.status == "FINISHED" for r in children)


def test_a_different_config_ignores_stale_checkpoints(sft):
    other, copy = sft["other"], sft["copy"]
    assert other["resumed_from_step"] == 0 and other["steps"] == 60
    log = (copy / "train.log").read_text()
    assert "were made by a different config or data: cleared, training from step 0" in log
    assert progress_steps(copy)[0] == 2  # from the start
    assert other["mlflow_run_id"] != sft["job"]["mlflow_run_id"]


def test_a_finished_job_is_not_trained_again(sft):
    lines: list[str] = []
    started = time.perf_counter()
    again = launch_sft(sft["config"], sft["run_dir"], on_line=lines.append)
    assert time.perf_counter() - started < 5  # no accelerate launch at all
    assert again["reused"] is True
    assert {k: v for k, v in again.items() if k != "reused"} == sft["result"]
    assert len(lines) == 1 and lines[0].startswith("[resume] SFT already finished")


def test_a_kill_during_the_final_save_leaves_no_finished_model(sft, tmp_path, articles,
                                                                tracking):
    """The same job uninterrupted (and no MLflow), killed after the last checkpoint but before
    final/ and done.json were whole: the next launch resumes at the last step, trains nothing
    more and writes final/ again. The uninterrupted losses match the resumed job's."""
    config = sft_config(articles, tracking, keep_checkpoints=True, mlflow=None)
    first = launch_sft(config, tmp_path)
    assert first["resumed_from_step"] == 0 and complete_checkpoints(tmp_path)[-2:] == [56, 60]
    # a resume continues the same run: the same data order, optimizer and schedule
    step = sft["result"]["resumed_from_step"]
    resumed = dict(zip(progress_steps(sft["run_dir"]), losses(sft["run_dir"]), strict=True))
    straight = dict(zip(progress_steps(tmp_path), losses(tmp_path), strict=True))
    assert [k for k in straight if k > step] == list(resumed)
    for k, loss in resumed.items():
        assert loss == pytest.approx(straight[k], rel=1e-4, abs=1e-5), k
    # what a kill in the middle of the final save leaves: a partial final, no done.json
    (tmp_path / DONE).unlink()
    shutil.rmtree(tmp_path / "final")
    (tmp_path / "final.partial").mkdir()
    (tmp_path / "final.partial" / "config.json").write_text("{")
    lines: list[str] = []
    again = launch_sft(config, tmp_path, on_line=lines.append)
    assert "reused" not in again and again["resumed_from_step"] == 60 and again["steps"] == 60
    assert "[resume] SFT resumes from checkpoint-60 (step 60 of 60)" in lines
    assert not [p for p in map(parse_progress, lines) if p and "loss" in p]  # no step trained
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert not (tmp_path / "final.partial").exists()
    assert again["final_loss"] == pytest.approx(first["final_loss"])


# ── (b) DPO ──────────────────────────────────────────────────────────────────────────────────
def test_killed_dpo_resumes_from_its_last_checkpoint(sft, articles, tracking, tmp_path):
    rows = [json.loads(x) for x in articles.read_text().splitlines()]
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"],
              "rejected": " " + LABELS[(LABELS.index(r["completion"].strip()) + 1) % 5]}
             for r in rows]
    train, held = tmp_path / "pairs_train.jsonl", tmp_path / "pairs_eval.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in pairs[:50]))
    held.write_text("".join(json.dumps(p) + "\n" for p in pairs[50:]))
    config = {
        "train_file": str(train), "eval_file": str(held), "model_dir": sft["result"]["final_dir"],
        "beta": 0.1, "loss_type": ["sigmoid"], "max_steps": 40, "learning_rate": 1e-3,
        "batch_size": 8, "max_length": 256, "threads": 1, "logging_steps": 2, "save_steps": 4,
        "sanity": False,
        "mlflow": {"tracking_uri": tracking["uri"], "parent_run_id": tracking["parent_run_id"],
                   "run_name": "dpo-resume", "tags": {"posttrain.stage": "dpo"}},
    }  # fmt: skip
    run_dir = tmp_path / "dpo"
    killed_at = launch_and_kill("training.dpo", config, run_dir, "dpo_result.json")
    job = json.loads((run_dir / CHECKPOINTS / "job.json").read_text())
    lines: list[str] = []
    result = launch_training("training.dpo", config, run_dir, on_line=lines.append,
                             result_name="dpo_result.json")
    step = result["resumed_from_step"]
    assert step >= killed_at > 0 and result["steps"] == 40
    assert f"[resume] DPO resumes from checkpoint-{step} (step {step} of 40)" in lines
    assert progress_steps(run_dir)[0] > step
    assert result["reward_accuracy"] is not None
    assert result["mlflow_run_id"] == job["mlflow_run_id"]
    runs = tracking["client"].search_runs([tracking["experiment_id"]],
                                          "attributes.run_name = 'dpo-resume'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    # launched once more, the finished DPO job is reused, not trained again
    again = launch_training("training.dpo", config, run_dir, result_name="dpo_result.json")
    assert again["reused"] is True


# ── tuning: a resumed run finds its finished trials ──────────────────────────────────────────
def test_a_resumed_tune_reuses_its_finished_trials(small_warehouse_url, engine, tmp_path,
                                                  prefect_api):
    """tune() twice under one parent run and out folder, as a resumed pipeline run calls it:
    the second proposes the same trials (its own finished trials are not "past" ones), and
    trains none of them again: one child run per trial, no new ones."""
    from prefect import flow

    from flows import tracking as flow_tracking
    from flows.spec import load_spec
    from flows.tuning import tune
    from tests.test_tuning import curated, tune_spec

    spec_path = tune_spec(small_warehouse_url, tmp_path, tuner=False)
    data = yaml.safe_load(spec_path.read_text())
    data["tuning"].update(trials=2, max_steps=8)
    data["llm"].pop("tuner", None)  # the seeded search proposes: no LLM in this test
    spec_path.write_text(yaml.safe_dump(data))
    spec = load_spec(spec_path)
    dataset = curated(engine, tmp_path / "curated.jsonl", n=40)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = flow_tracking.ensure_experiment(client, spec.tracking.experiment, tmp_path)
    parent = flow_tracking.start_parent_run(client, exp, run_name="tune", params={}, tags={})

    @flow(name="tune-resume")
    def run() -> dict:
        return tune(spec, dataset, None, tmp_path, uri, parent, "")

    first = run()
    second = run()
    assert [t["config"] for t in second["trials"]] == [t["config"] for t in first["trials"]]
    assert first["past_trials"] == second["past_trials"] == 0
    assert not any(t["reused"] for t in first["trials"])
    assert all(t["reused"] for t in second["trials"])
    assert [t["eval_loss"] for t in second["trials"]] == [t["eval_loss"] for t in first["trials"]]
    assert second["chosen_config"] == first["chosen_config"]
    children = children_of(client, exp, parent)
    assert sorted(r.info.run_id for r in children) == sorted(
        t["mlflow_run_id"] for t in first["trials"])
    assert all(r.info.status == "FINISHED" for r in children)


# ── registration once per posttrain run ──────────────────────────────────────────────────────
def test_a_run_registers_its_model_once(sft, tracking):
    from training.registry import register_model, version_of_run

    name = "resume-tests-classifier"
    assert version_of_run(name, "run-a") is None  # no such model yet
    version = register_model(sft["result"]["final_dir"], sft["result"]["mlflow_run_id"], name,
                             tags={"posttrain.run_id": "run-a"})
    assert version_of_run(name, "run-a") == version == "1"
    assert version_of_run(name, "run-b") is None
    # the pipeline's registration step, in a resumed run: the version comes back, none is added
    from types import SimpleNamespace

    from flows.promotion import register_once

    spec = SimpleNamespace(tracking=SimpleNamespace(registered_model=name))
    assert register_once(spec, Path(sft["result"]["final_dir"]), sft["result"]["mlflow_run_id"],
                         {}, tags={"posttrain.run_id": "run-a"}) == "1"
    assert [str(v.version) for v in tracking["client"].search_model_versions(
        f"name = '{name}'")] == ["1"]


# ── (c) the pipeline, killed during SFT ──────────────────────────────────────────────────────
def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_a_pipeline_killed_during_sft_resumes_it(small_warehouse_url, tmp_path):
    from tests.test_pipeline import tiny_spec

    spec = tiny_spec(small_warehouse_url, tmp_path, max_steps=60, save_steps=5)
    out = tmp_path / "run"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    log, store_db, model = out / "teacher_requests.jsonl", out / "store.db", out / "model"

    # 1. start, and kill the whole process group once SFT has written a checkpoint
    proc = subprocess.Popen([EXE, "run", str(spec), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    started = time.time()
    deadline = started + 300
    try:
        while time.time() < deadline and proc.poll() is None and not complete_checkpoints(
                model):
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = complete_checkpoints(model)
    assert killed_at, f"no SFT checkpoint appeared (exit code {proc.returncode})"
    assert not (model / DONE).exists(), "SFT finished before it could be killed"
    store = sa.create_engine(f"sqlite:///{store_db}")
    with store.connect() as c:
        run_id, status = c.execute(sa.text("SELECT id, status FROM runs")).one()
        last_call = c.execute(sa.text("SELECT max(id) FROM llm_calls")).scalar_one()
    assert status == "running"
    teacher_before = _lines(log)
    assert teacher_before
    # The kill can land mid-write to a SQLite file (the training job logs to MLflow while it
    # trains), leaving a hot journal that the next read-write open rolls back; flows/preflight.py
    # probes with a read-only open, which fails on it ("attempt to write a readonly database").
    # Reported to the lead; until preflight opens read-write, roll the journals back here.
    for db in (tmp_path / "mlflow.db", store_db):
        with sqlite3.connect(db) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()

    killed = time.time()

    # 2. run again: the same run resumes, SFT from its checkpoint
    proc = subprocess.run([EXE, "run", str(spec), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = time.time() - killed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] is True and summary["run_id"] == run_id
    result = json.loads((model / "train_result.json").read_text())
    step = result["resumed_from_step"]
    assert step >= killed_at[-1] and result["steps"] == 60
    assert f"[resume] SFT resumes from checkpoint-{step} (step {step} of 60)" in (
        model / "train.log").read_text()

    # no LLM request that had completed was sent again (the kill came after generation)
    before = {x["request_hash"] for x in teacher_before}
    after = [x["request_hash"] for x in _lines(log)[len(teacher_before):]]
    assert not [h for h in after if h in before]
    with store.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM runs")).scalar_one() == 1
        repeated = c.execute(sa.text(
            "SELECT count(*) FROM llm_calls WHERE cached = 0 AND id > :last AND request_hash IN "
            "(SELECT request_hash FROM llm_calls WHERE id <= :last AND status = 'ok')"),
            {"last": last_call}).scalar_one()
    assert repeated == 0

    # MLflow: one SFT child run under the parent (reopened, finished), one model version
    client = MlflowClient(yaml.safe_load(spec.read_text())["tracking"]["uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    children = children_of(client, parent.info.experiment_id, summary["mlflow_run_id"])
    assert [r.info.status for r in children] == ["FINISHED"]
    assert children[0].info.run_id == result["mlflow_run_id"]
    versions = client.search_model_versions(f"name = '{summary['model_name']}'")
    assert [str(v.version) for v in versions] == ["1"] and summary["model_version"] == "1"
    assert versions[0].tags["posttrain.run_id"] == run_id
    print(f"pipeline resume: killed after {killed - started:.0f} s with checkpoint(s) "
          f"{killed_at}, SFT resumed from step {step} of 60, the second run took {again:.0f} "
          f"s ({summary.get('stage_seconds')}), {len(after)} teacher requests after the restart")
