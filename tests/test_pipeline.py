"""The whole pipeline as a real Prefect flow run, tiny settings: a real SQLite warehouse of
real articles, the simulated teacher over HTTP through the openai SDK, a real
`accelerate launch` of TRL, a real MLflow store and registry."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from mlflow.tracking import MlflowClient

DEMO = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"


# A student that learns the task from ~160 articles (0.71 held-out accuracy against a 0.26
# majority baseline in `bench/sft_accuracy.py --quick`): what promotion needs to see.
LEARNS = {"student": {"hidden_size": 128, "num_layers": 2, "num_heads": 4,
                      "intermediate_size": 512, "vocab_size": 1000},
          "training": {"max_steps": 300, "learning_rate": 0.001}}


def tiny_spec(warehouse_url: str, tmp: Path, student: dict | None = None, **training) -> Path:
    data = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    data["warehouse"]["url"] = warehouse_url
    data["llm"].pop("tuner", None)  # tuning and DPO have their own test (test_pipeline_stages)
    data["tuning"]["enabled"] = data["dpo"]["enabled"] = False
    data["slicing"]["max_rows_per_slice"] = 40
    data["generation"].update(concurrency=3, page_size=20)
    data["student"]["tiny"] = student or {"hidden_size": 64, "num_layers": 1, "num_heads": 2,
                                          "intermediate_size": 128, "vocab_size": 400}
    data["training"].update({"max_steps": 150, "batch_size": 8, "learning_rate": 0.003,
                             "max_length": 256, **training})
    data["evaluation"].update(holdout_fraction=0.2)
    data["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    path = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def two_runs(small_warehouse_url, tmp_path_factory, prefect_api):
    """Run the flow twice on one registry: a normal run, then a deliberately worse one."""
    from flows.pipeline import post_training

    tmp = tmp_path_factory.mktemp("pipeline")
    first = post_training(spec_path=str(tiny_spec(
        small_warehouse_url, tmp, LEARNS["student"], **LEARNS["training"])),
        out_dir=str(tmp / "run1"))
    second = post_training(spec_path=str(tiny_spec(
        small_warehouse_url, tmp, LEARNS["student"], **{**LEARNS["training"], "max_steps": 1})),
        out_dir=str(tmp / "run2"))
    return tmp, first, second


def test_summary_has_every_figure(two_runs):
    tmp, first, _ = two_runs
    on_disk = json.loads((tmp / "run1" / "summary.json").read_text())
    assert on_disk == first
    for key in ("run_id", "mlflow_run_id", "slices", "examples_accepted", "examples_rejected",
                "llm_calls", "input_tokens", "output_tokens", "train_examples",
                "eval_examples", "base_accuracy", "accuracy", "macro_f1", "model_name",
                "model_version", "promoted", "wall_seconds"):
        assert key in first, key
    assert first["teacher"] == "simulated"
    assert first["slices"] >= 5
    assert first["llm_calls"] > first["slices"] and first["input_tokens"] > 0
    # both roles ran through their own SDK against the simulated teacher, and were paid for
    assert set(first["cost_by_role"]) == {"generator", "judge"}
    assert first["cost_usd"] == pytest.approx(sum(first["cost_by_role"].values()))
    assert first["max_context_tokens"] <= 16000


def test_every_non_holdout_row_labelled_once_and_holdout_never_seen(two_runs, small_warehouse_url):
    tmp, first, _ = two_runs
    engine = sa.create_engine(small_warehouse_url)
    with engine.connect() as c:
        total = c.execute(sa.text("SELECT count(*) FROM articles")).scalar_one()
    # every row is either held out, accepted once, or refused because its text is a copy of
    # a held-out article (the BBC corpus holds duplicates)
    copies = first["examples_rejected"].get("copy_of_eval_row", 0)
    assert first["examples_accepted"] + first["eval_examples"] + copies == total
    # the BBC corpus holds some duplicate articles: curate drops exact copies and anything
    # identical to a held-out prompt
    assert first["train_examples"] == (first["examples_accepted"] - first["duplicates_dropped"]
                                       - first["eval_copies_dropped"]
                                       - first["contamination"]["sft_removed"])
    assert first["contamination"]["sft_checked"] > 0 and first["contamination"]["enabled"]
    store = sa.create_engine(f"sqlite:///{tmp / 'run1' / 'store.db'}")
    with store.connect() as c:
        rows = c.execute(sa.text(
            "SELECT row_id FROM examples WHERE status = 'accepted'")).scalars().all()
        calls = c.execute(sa.text("SELECT count(*) FROM llm_calls")).scalar_one()
    assert len(rows) == len(set(rows))  # each row once
    assert calls == first["llm_calls"]
    prompts = [json.loads(line)["prompt"] for line in
               (tmp / "run1" / "data" / "train.jsonl").read_text().splitlines()]
    final = json.loads((tmp / "run1" / "eval.json").read_text())["final"]
    eval_rows = final["n"]
    assert eval_rows == first["eval_examples"]
    # figures by slice group (the promotion rule's max_slice_drop reads them) cover every row
    assert sum(g["n"] for g in final["by_slice"].values()) == eval_rows
    assert all(g.startswith("region=") for g in final["by_slice"])
    assert all(p.startswith("Title: ") and p.endswith("\nTopic:") for p in prompts)
    assert len(prompts) == first["train_examples"]
    from flows.spec import load_spec
    from flows.warehouse import fetch_eval_rows, make_engine, render_prompt

    spec = load_spec(min(tmp.glob("spec-*.yaml")))
    held_out = {render_prompt(spec, r) for r in fetch_eval_rows(spec, make_engine(spec.warehouse.url))}
    assert not held_out & set(prompts)


def test_gate_rejections_are_counted_by_reason(two_runs):
    _, first, _ = two_runs
    # the demo teacher sends 2% off-spec labels first: the gate rejects and the agent fixes
    assert set(first["examples_rejected"]) <= {"label_not_in_set", "row_not_in_slice",
                                                "duplicate", "invalid_schema",
                                                "copy_of_eval_row", "judge_disagreed"}
    assert first["examples_rejected"].get("label_not_in_set", 0) > 0


def test_mlflow_parent_child_dataset_and_registry(two_runs):
    tmp, first, second = two_runs
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["posttrain.teacher"] == "simulated"
    assert parent.data.params["task.gold_column"] == "topic"
    assert parent.data.metrics["accuracy"] == pytest.approx(first["accuracy"])
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first['mlflow_run_id']}'")
    assert len(children) == 1 and "train_loss" in children[0].data.metrics

    # first run: promoted; second (1 training step, worse): registered but not promoted
    assert first["promoted"] is True and first["model_version"] == "1"
    assert second["model_version"] == "2"
    assert second["accuracy"] < first["accuracy"] and second["promoted"] is False
    champion = client.get_model_version_by_alias(first["model_name"], "champion")
    assert str(champion.version) == "1"

    # the second run judged the champion on its own held-out rows: the same rows and the
    # same model as the first run, so the same accuracy
    assert first["champion_accuracy"] is None
    assert first["promotion_reason"].startswith("no champion yet; accuracy ")
    assert first["accuracy"] > first["majority_baseline"] + 0.05
    assert second["champion_accuracy"] == pytest.approx(first["accuracy"])
    assert second["promotion_reason"].startswith("accuracy ")
    assert client.get_model_version(first["model_name"], "2").tags["promotion"] == (
        second["promotion_reason"])
    # lineage of the registered model
    tags = champion.tags
    assert tags["posttrain.spec_hash"] == parent.data.tags["posttrain.spec_hash"]
    assert tags["posttrain.parent_run_id"] == first["mlflow_run_id"]
    assert len(tags["posttrain.dataset_sha256"]) == 64
    skills = dict(s.split("@") for s in tags["posttrain.skills"].split(","))
    assert set(skills) == {"label-examples", "review-examples"}
    assert all(len(v) == 12 for v in skills.values())
    assert tags["posttrain.git_commit"] == "unknown" or len(tags["posttrain.git_commit"]) == 40
    assert float(tags["posttrain.cost_usd"]) == pytest.approx(first["cost_usd"], abs=1e-4)

    # the trained model's per-label report and confusion matrix, on disk and in MLflow
    for run, out in ((first, "run1"), (second, "run2")):
        assert {a.path for a in client.list_artifacts(run["mlflow_run_id"], "eval")} == {
            "eval/confusion_matrix.png", "eval/per_label.md"}
        assert (tmp / out / "eval" / "confusion_matrix.png").stat().st_size > 5000
    report = (tmp / "run2" / "eval" / "per_label.md").read_text()
    assert "| business |" in report and "# Champion v1 on the same rows" in report

    # one transcript per agent in MLflow (redaction is tested in test_gateway.py)
    transcripts = client.list_artifacts(first["mlflow_run_id"], "transcripts")
    assert len(transcripts) == first["slices"] + first["topup_slices"]
    text = Path(client.download_artifacts(first["mlflow_run_id"], transcripts[0].path,
                                          str(tmp / "dl"))).read_text()
    assert "<slice>" in text and '"role": "assistant"' in text
    # and one MLflow trace per agent in the parent run's Traces tab (flows/agent_traces.py)
    import mlflow

    mlflow.flush_trace_async_logging()
    traces = client.search_traces(locations=[parent.info.experiment_id],
                                  run_id=first["mlflow_run_id"], include_spans=False)
    file_name = lambda slice_id: "".join(  # as flows/generation.py names them
        c if c.isalnum() or c in "-_.=" else "_" for c in slice_id)
    assert sorted(file_name(t.info.tags["slice_id"]) for t in traces) == sorted(
        r.path.split("/")[-1].removesuffix(".jsonl") for r in transcripts)


def test_prefect_recorded_one_task_run_per_slice(two_runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    tmp, first, _ = two_runs
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        assert sum(r.state.is_completed() for r in runs) >= 2
        # this module's first run (other modules' runs share the session's Prefect API)
        run = next(r for r in runs if r.state.is_completed()
                   and r.parameters.get("out_dir") == str(tmp / "run1"))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
    names = [t.name for t in tasks]
    assert sum(n.startswith("agent ") for n in names) == first["slices"]
    assert any(n.startswith("train-sft") for n in names)


def test_a_nightly_run_without_new_data_stops_early(two_runs, small_warehouse_url, tmp_path):
    """The champion (v1) was trained on this very warehouse: a run asked to train only on new
    data says so, records the skip and trains nothing; changed data would go ahead."""
    from flows.pipeline import post_training
    from flows.run_lifecycle import unchanged_since_champion
    from flows.spec import load_spec
    from flows.store import Store

    tmp, first, _ = two_runs
    spec_path = min(tmp.glob("spec-*.yaml"))
    summary = post_training(spec_path=str(spec_path), out_dir=str(tmp / "run3"),
                            only_if_new_data=True, budget_usd=5.0)
    assert summary["skipped"] is True and summary["promoted"] is False
    assert summary["reason"].startswith("No new data since champion v1 ")
    assert summary["data_fingerprint"] == first["data_fingerprint"]
    assert not (tmp / "run3" / "model").exists()
    assert (tmp / "run3" / "spec.pinned.yaml").is_file()  # the override was pinned
    store = Store(f"sqlite:///{tmp / 'run3' / 'store.db'}")
    assert [r["status"] for r in store.list_runs()] == ["skipped"]
    store.close()
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    spec = load_spec(spec_path)
    assert unchanged_since_champion(client, spec, "1:0") is None  # other data: train


def test_error_driven_run_probes_the_champion_and_focuses(two_runs, small_warehouse_url):
    """On the registry `two_runs` left (champion v1), an error-driven run: the agents label
    a hash sample of each slice, the champion predicts it, and the map decides the order; the
    probe rows are ordinary examples of the run, each row still labelled once."""
    from flows.pipeline import post_training

    tmp, first, _ = two_runs
    path = tiny_spec(small_warehouse_url, tmp, LEARNS["student"], max_steps=1)
    data = yaml.safe_load(path.read_text())
    data["error_driven"] = {"enabled": True, "probe_rows": 6, "weak_labels": 2,
                            "focus_turns": 2.0}
    path.write_text(yaml.safe_dump(data))
    s = post_training(spec_path=str(path), out_dir=str(tmp / "run_ed"))
    emap = json.loads((tmp / "run_ed" / "error_map_before.json").read_text())
    assert emap["champion_version"] == "1" and s["error_map"]["champion_version"] == "1"
    store = sa.create_engine(f"sqlite:///{tmp / 'run_ed' / 'store.db'}")
    with store.connect() as c:
        probed = c.execute(sa.text("SELECT slice_id, row_id FROM examples WHERE status = "
                                   "'accepted' AND slice_id LIKE '%+probe'")).all()
        rows = c.execute(sa.text(
            "SELECT row_id FROM examples WHERE status = 'accepted'")).scalars().all()
    assert len(probed) == emap["n"] > 0 and emap["probe_slices"] == first["slices"]
    assert all(n <= 6 for n in Counter(sid for sid, _ in probed).values())
    assert len(rows) == len(set(rows))  # the first agents skipped the probed rows
    assert s["examples_accepted"] == first["examples_accepted"]  # the same rows, once each
    # the champion learnt the task (0.7+ held out): its map is of real predictions
    assert emap["accuracy"] > 0.4 and sum(g["n"] for g in emap["by_slice"].values()) == emap["n"]
    f1 = {k: m["f1"] for k, m in emap["per_label"].items() if m["support"]}
    assert emap["weak_labels"] == sorted(f1, key=lambda k: (f1[k], -emap["per_label"][k][
        "support"], k))[:2]
    errors = [emap["by_slice"].get(g.split("#")[0], {}).get("error", 0)
              for g in emap["focus"]["order"]]
    assert errors == sorted(errors, reverse=True)  # worst group first
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(s["mlflow_run_id"])
    assert run.data.metrics["error_map.champion_accuracy"] == pytest.approx(emap["accuracy"])
    assert run.data.tags["posttrain.weak_labels"] == ",".join(emap["weak_labels"])
    assert "error_map_before.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    after = s["error_map"]["after"]
    assert set(after["f1"]) == set(data["task"]["labels"])
    assert all({"final", "champion"} <= set(v) for v in after["f1"].values())
    assert "## Error map" in (tmp / "run_ed" / "summary.md").read_text()
    # the SFT fine-tuned the champion's own weights and tokenizer (start_from_champion)
    sft_run = next(r for r in client.search_runs([run.info.experiment_id])
                   if r.data.tags.get("mlflow.parentRunId") == run.info.run_id
                   and "model.name_or_path" in r.data.params)
    assert sft_run.data.params["model.name_or_path"] == str(tmp / "run_ed" / "champion" / "model")
    assert emap["start_from_champion"] is True and s["error_map"]["start_from_champion"] is True
    assert "fine-tuned from the champion's weights" in (tmp / "run_ed" / "summary.md").read_text()
    assert s["promoted"] is False  # one training step: v1 stays champion for the next test
