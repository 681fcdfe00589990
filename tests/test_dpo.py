"""The DPO stage, real components only: the sanity check on log histories; preference pairs
written by the simulated teacher over HTTP (openai SDK) and gated against the curated SFT
data; a real `accelerate launch` of TRL SFT then DPO logging to a real MLflow (SQLite) store;
and a degenerate DPO run stopped by the sanity check with its one-line reason."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import mlflow
import pytest
import sqlalchemy as sa
import yaml
from mlflow import MlflowClient

from agents.pairs import (
    CHOSEN_EQUALS_REJECTED,
    CHOSEN_NOT_IN_SET,
    CHOSEN_NOT_SFT_LABEL,
    DUPLICATE_PAIR,
    INVALID_PAIR,
    INVALID_REPLY,
    NO_PAIR,
    PAIRS_SCHEMA,
    REJECTED_NOT_IN_SET,
    ROW_NOT_ASKED,
    Pair,
    PairWriter,
    gate_pair,
    pairs_block,
)
from agents.providers import ProviderError
from agents.skills import load_skill
from training.dpo_sanity import (
    STUCK_MARGIN,
    WINDOW,
    dpo_health,
    warmup_steps,
)
from training.launch import TrainingFailed, launch_sft, launch_training

DEMO = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"
LABELS = ["business", "entertainment", "politics", "sports", "tech"]
TINY = {
    "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
    "vocab_size": 400, "max_position_embeddings": 256,
}  # fmt: skip
NOISY_ROWS = 6  # curated examples whose SFT label is wrong: the teacher's chosen disagrees


# ── the sanity check on synthetic histories ──────────────────────────────────────────────────
def history(margins, accuracies, loss=None, every=2):
    return [{"step": every * (i + 1), "loss": 0.69 if loss is None else loss[i],
             "rewards/margins": m, "rewards/accuracies": a}
            for i, (m, a) in enumerate(zip(margins, accuracies, strict=True))]


def verdicts(h, max_steps):
    """The first message over growing prefixes of the history (as the callback sees it)."""
    return next((msg for i in range(1, len(h) + 1) if (msg := dpo_health(h[:i], max_steps))),
                None)


def test_a_healthy_run_passes():
    n = 20
    margins = [0.0, 0.0004, 0.002, 0.01] + [0.02 * i for i in range(1, n - 3)]
    accuracies = [0.0, 0.5, 0.5, 0.625] + [min(1.0, 0.6 + 0.05 * i) for i in range(1, n - 3)]
    assert verdicts(history(margins, accuracies), max_steps=2 * n) is None
    # noisy but growing margins (as logged by a real tiny run: single points dip below zero)
    noisy = [0.0, -0.006, 0.0002, 0.003, -0.0036, 0.02, 0.0026, 0.007, 0.025, 0.015, 0.007,
             0.005, 0.012, 0.0067, 0.05, 0.025, -0.0075, 0.007, 0.022, -0.0034]
    assert verdicts(history(noisy, [0.5] * 20), max_steps=40) is None


def test_non_finite_loss_or_reward_stops_at_once():
    h = history([0.0, 0.01], [0.0, 0.6], loss=[0.69, math.nan])
    assert dpo_health(h, 100).startswith("DPO degenerate: loss=nan at step 4")
    h = history([0.0, math.inf], [0.0, 0.6])
    assert "rewards/margins=inf" in dpo_health(h, 100)


def test_stuck_at_ln2_after_warmup():
    n = 12
    h = history([0.0] * n, [0.0] * n)  # a frozen policy: margins exactly 0, ties count wrong
    msg = verdicts(h, max_steps=2 * n)
    assert msg.startswith("DPO degenerate: sigmoid loss stuck at ln 2 (0.693)")
    assert "raise dpo.learning_rate" in msg and "\n" not in msg
    # not before warm-up + a full window
    first = next(i for i in range(1, n + 1) if dpo_health(h[:i], 2 * n))
    first_after_warmup = next(e["step"] for e in h if e["step"] >= warmup_steps(2 * n))
    assert h[first - 1]["step"] == first_after_warmup + 2 * (WINDOW - 1)
    # tiny margins with a clear preference are not stuck; nor are margins above the band
    assert verdicts(history([STUCK_MARGIN / 2] * n, [0.9] * n), 2 * n) is None
    assert verdicts(history([STUCK_MARGIN * 3] * n, [0.5] * n), 2 * n) is None


def test_collapsing_and_negative_margins():
    up = [0.02 * i for i in range(1, 13)]  # up to 0.24
    down = [0.24, 0.1, 0.05, 0.01, 0.0, -0.01, 0.0, 0.0]
    h = history(up + down, [1.0] * 12 + [0.6] * 8)
    msg = verdicts(h, max_steps=40)
    assert msg.startswith("DPO degenerate: rewards/margins collapsed") and "peak" in msg
    h = history([0.0, -0.01, -0.03, -0.05, -0.08, -0.1, -0.12, -0.15, -0.2, -0.25],
                [0.3] * 10)
    assert "prefers the rejected completions" in verdicts(h, max_steps=20)
    # a plateau after the peak (a cosine schedule) is healthy
    assert verdicts(history(up + [0.2] * 8, [1.0] * 20), max_steps=40) is None


# ── the pair gate ────────────────────────────────────────────────────────────────────────────
ITEMS = [{"row_id": str(i), "prompt": f"Title: story {i}\nTopic:", "completion": f" {LABELS[i]}"}
         for i in range(5)]
SKILL = load_skill("write-preference-pairs")


class FakeGateway:
    """Answers complete_json with a function of the parsed <pairs> block; records the calls."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def complete_json(self, **kw):
        self.calls.append(kw)
        content = kw["messages"][1]["content"]
        return self.answer(json.loads(content[len("<pairs>"):-len("</pairs>")]))


def test_gate_pair_reasons():
    asked = {i["row_id"]: i for i in ITEMS}
    completions = {f" {x}": x for x in LABELS}
    ok = {"row_id": "0", "chosen": " business", "rejected": " tech"}
    assert gate_pair(ok, asked, completions) == (
        Pair("0", ITEMS[0]["prompt"], " business", " tech"), None)
    cases = [
        ({"row_id": "0", "chosen": " business"}, INVALID_PAIR),
        ({"row_id": 0.5, "chosen": " business", "rejected": " tech"}, INVALID_PAIR),
        ({**ok, "row_id": "99"}, ROW_NOT_ASKED),
        ({**ok, "chosen": "business"}, CHOSEN_NOT_IN_SET),          # template not kept
        ({**ok, "chosen": " business, I think"}, CHOSEN_NOT_IN_SET),
        ({**ok, "rejected": " weather"}, REJECTED_NOT_IN_SET),
        ({**ok, "rejected": " business"}, CHOSEN_EQUALS_REJECTED),
        ({**ok, "chosen": " politics"}, CHOSEN_NOT_SFT_LABEL),      # contradicts the SFT data
    ]
    for raw, reason in cases:
        assert gate_pair(raw, asked, completions) == (None, reason), raw


def test_writer_counts_every_item_and_every_failed_call():
    def answer(block):
        ids = [i["row_id"] for i in block["items"]]
        return {"pairs": [
            {"row_id": ids[0], "chosen": " business", "rejected": " sports"},   # kept
            {"row_id": ids[1], "chosen": " business", "rejected": " sports"},   # not SFT's
            {"row_id": ids[2], "chosen": " politics", "rejected": " politics"},
            {"row_id": ids[3], "chosen": " sports", "rejected": " tech"},       # twice
            {"row_id": ids[3], "chosen": " sports", "rejected": " business"},
            # ids[4] left out
        ]}

    gw = FakeGateway(answer)
    writer = PairWriter(gw, model="cheap", skill=SKILL, labels=LABELS,
                        description="Label a news article with its topic.")
    result = writer.write(ITEMS, agent="pairs/0", slice_id="dpo-pairs")
    assert result.pairs == [Pair("0", ITEMS[0]["prompt"], " business", " sports")]
    assert result.rejected == {CHOSEN_NOT_SFT_LABEL: 1, CHOSEN_EQUALS_REJECTED: 1,
                               DUPLICATE_PAIR: 2, NO_PAIR: 1}
    call = gw.calls[0]
    assert call["schema"] == PAIRS_SCHEMA and call["schema_name"] == "pairs"
    assert call["model"] == "cheap" and call["agent"] == "pairs/0"
    system = call["messages"][0]["content"]
    assert system.startswith(SKILL.instructions) and "Label a news article" in system
    assert call["messages"][1]["content"] == pairs_block(LABELS, ITEMS, " {label}")

    not_json = PairWriter(FakeGateway(lambda b: {"verdicts": []}), model="m", skill=SKILL,
                          labels=LABELS).write(ITEMS, "pairs/1")
    assert not_json.rejected == {INVALID_REPLY: 5} and not not_json.pairs

    def fail(block):
        raise ProviderError("server", "500 after every retry")

    failed = PairWriter(FakeGateway(fail), model="m", skill=SKILL, labels=LABELS).write(
        ITEMS, "pairs/2")
    assert failed.rejected == {"call_failed:server": 5} and failed.failed_calls == 1


def test_pairs_block_escapes_a_closing_tag():
    block = pairs_block(LABELS, [{"row_id": 1, "prompt": "x </pairs> y"}], " {label}")
    assert block.count("</pairs>") == 1
    assert json.loads(block[len("<pairs>"):-len("</pairs>")])["items"][0]["prompt"] == (
        "x </pairs> y")


# ── the real stage: store -> pairs over HTTP -> SFT -> DPO, on MLflow ────────────────────────
@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp_id = client.create_experiment("dpo-tests", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp_id, run_name="pipeline").info.run_id
    yield {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent}
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def stage(small_warehouse_url, tmp_path_factory, tracking, prefect_api):
    """Accepted examples in a real store (a few with a wrong SFT label), the curated file,
    pairs written by the simulated teacher (with truncated replies the gateway retries), a
    real SFT on the curated file."""
    from agents.teacher import TeacherConfig, TeacherServer
    from flows.preferences import write_pairs
    from flows.render import render_completion, render_prompt
    from flows.runtime import RuntimeSettings
    from flows.spec import load_spec
    from flows.store import shared_store

    tmp = tmp_path_factory.mktemp("dpo")
    data = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    data["warehouse"]["url"] = small_warehouse_url
    data["llm"]["simulated"] = {"truncated_rate": 0.3, "seed": 1}
    # plain sigmoid: on this 30k-parameter model the spec's default sigmoid+sft (beta 0.1) is
    # dominated by its sft term and moved held-out reward accuracy only to 0.5-0.625 of 8 pairs
    data["dpo"] = {"enabled": True, "pairs_per_call": 8, "holdout_fraction": 0.2,
                   "loss_type": ["sigmoid"], "max_steps": 30, "learning_rate": 1e-3,
                   "batch_size": 8, "max_length": 256}
    data["tracking"]["uri"] = tracking["uri"]
    # the "curated" rows below include held-out ones (curation is skipped): no guard here
    data["contamination"] = {"enabled": False}
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    spec = load_spec(spec_path)

    with sa.create_engine(small_warehouse_url).connect() as c:
        everything = [dict(r._mapping) for r in c.execute(sa.text(
            "SELECT * FROM articles ORDER BY id"))]
    rows = [r for label in LABELS for r in [x for x in everything if x["topic"] == label][:12]]
    assert len(rows) == 60
    store_url = f"sqlite:///{tmp / 'store.db'}"
    store = shared_store(store_url)
    run_id = store.start_run(spec.name, spec.content_hash(), spec.model_dump_json())
    curated = []
    for i, row in enumerate(rows):
        label = row["topic"]
        if i % 10 == 3:  # the SFT data's noise: a wrong label that passed the gates
            label = next(x for x in LABELS if x != label)
        prompt, completion = render_prompt(spec, row), render_completion(spec, label)
        store.add_example(run_id, slice_id=f"region={row['region']}", row_id=str(row["id"]),
                          prompt=prompt, completion=completion, label=label)
        curated.append({"prompt": prompt, "completion": completion})
    curated.append({"prompt": "Title: not from the store\nLead: -\nTopic:", "completion": " tech"})
    train_file = tmp / "data" / "train.jsonl"
    train_file.parent.mkdir()
    train_file.write_text("".join(json.dumps(c) + "\n" for c in curated))

    server = TeacherServer(TeacherConfig(small_warehouse_url, "articles", "id", "topic", LABELS,
                                         knobs=spec.llm.simulated))
    base = server.start()
    try:
        settings = RuntimeSettings(str(spec_path), run_id, store_url, str(tmp),
                                   (("generator", base), ("judge", server.url)))
        pairs = write_pairs(spec, {"path": str(train_file)}, settings, store_url, run_id, tmp,
                            tracking["parent_run_id"])
    finally:
        server.stop()

    sft = launch_sft({
        "train_file": str(train_file), "tiny": TINY, "seed": 0, "max_steps": 100,
        "learning_rate": 1e-2, "batch_size": 8, "lr_scheduler": "cosine", "warmup_ratio": 0.0,
        "max_length": 256, "threads": 1}, tmp / "model")
    return {"spec": spec, "tmp": tmp, "pairs": pairs, "sft": sft, "store": store,
            "run_id": run_id}


def test_pairs_are_gated_split_and_logged(stage, tracking):
    pairs, tmp = stage["pairs"], stage["tmp"]
    # every curated prompt is accounted for: kept, or rejected with its reason
    assert pairs["prompts"] == 60 and pairs["calls"] == 8 and pairs["failed_calls"] == 0
    assert pairs["rejected"] == {CHOSEN_NOT_SFT_LABEL: NOISY_ROWS, "not_in_store": 1}
    assert pairs["n_train"] + pairs["n_eval"] == 60 - NOISY_ROWS
    assert 5 <= pairs["n_eval"] <= 20
    # truncated replies were retried by the gateway, and recorded as errors in the store
    assert stage["store"].call_totals(stage["run_id"])["errors"] > 0
    train = [json.loads(x) for x in Path(pairs["train_path"]).read_text().splitlines()]
    held = [json.loads(x) for x in Path(pairs["eval_path"]).read_text().splitlines()]
    assert Path(pairs["train_path"]) == tmp / "data" / "pairs_train.jsonl"
    assert {k for p in train + held for k in p} == {"prompt", "chosen", "rejected"}
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    curated = {c["prompt"]: c["completion"] for c in map(
        json.loads, (tmp / "data" / "train.jsonl").read_text().splitlines())}
    for p in train + held:
        assert p["chosen"] == curated[p["prompt"]] != p["rejected"]
        assert p["rejected"] in {f" {x}" for x in LABELS}
    run = MlflowClient().get_run(tracking["parent_run_id"])
    names = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert {"news-topics-dpo-pairs", "news-topics-dpo-pairs-heldout"} <= names
    assert run.data.metrics["dpo_pairs_train"] == pairs["n_train"]


@pytest.fixture(scope="module")
def dpo(stage, tracking):
    from flows.preferences import train_dpo
    from flows.progress import Progress

    lines: list[str] = []
    progress = Progress.create()
    progress.training_line = lines.append  # the task feeds every log line to the progress
    result = train_dpo(stage["spec"], stage["pairs"], Path(stage["sft"]["final_dir"]),
                       stage["tmp"], tracking["uri"], tracking["parent_run_id"], progress.id)
    return {"result": result, "lines": lines}


def test_dpo_trains_from_the_sft_model_and_reports_held_out_reward_accuracy(dpo, stage,
                                                                           tracking):
    result, tmp = dpo["result"], stage["tmp"]
    assert result["steps"] == 30 and result["n_eval"] == stage["pairs"]["n_eval"]
    assert result["final_dir"] == str(tmp / "dpo" / "final")
    assert (tmp / "dpo" / "dpo_config.json").is_file() and (tmp / "dpo" / "train.log").is_file()
    # the SFT model memorised its data; DPO moves probability to the chosen completions
    assert result["reward_accuracy"] > 0.5 and result["reward_margin"] > 0
    assert result["train_reward_margin"] > 0
    assert any(line.startswith("[progress] ") and "rewards/margins" in line
               for line in dpo["lines"])
    client = MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == tracking["parent_run_id"]
    assert run.data.tags["posttrain.stage"] == "dpo" and run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "rewards/accuracies")) >= 5
    assert run.data.metrics["eval_rewards/accuracies"] == pytest.approx(result["reward_accuracy"])
    parent = client.get_run(tracking["parent_run_id"])
    assert parent.data.metrics["dpo_reward_accuracy"] == pytest.approx(result["reward_accuracy"])
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(result["final_dir"]).num_parameters() > 0


def test_a_degenerate_dpo_run_stops_with_the_sanity_message(stage, tracking):
    pairs, tmp = stage["pairs"], stage["tmp"]
    config = {
        "train_file": pairs["train_path"], "eval_file": pairs["eval_path"],
        "model_dir": stage["sft"]["final_dir"], "beta": 0.1, "loss_type": ["sigmoid"],
        "max_steps": 40, "learning_rate": 1e-12, "batch_size": 8, "max_length": 256,
        "threads": 1, "logging_steps": 2,
        "mlflow": {"tracking_uri": tracking["uri"], "parent_run_id": tracking["parent_run_id"],
                   "run_name": "dpo-degenerate"},
    }  # fmt: skip
    with pytest.raises(TrainingFailed) as err:
        launch_training("training.dpo", config, tmp / "dpo-degenerate",
                        result_name="dpo_result.json")
    assert err.value.reason.startswith("DPO degenerate: sigmoid loss stuck at ln 2"), (
        err.value.reason)
    assert err.value.returncode != 0
    assert not (tmp / "dpo-degenerate" / "dpo_result.json").exists()
    failed = MlflowClient().search_runs(
        [tracking["experiment_id"]], "attributes.run_name = 'dpo-degenerate'")
    assert [r.info.status for r in failed] == ["FAILED"]


def test_lora_dpo_needs_no_second_model_and_saves_a_merged_final(stage):
    pairs, tmp = stage["pairs"], stage["tmp"]
    config = {
        "train_file": pairs["train_path"], "eval_file": pairs["eval_path"],
        "model_dir": stage["sft"]["final_dir"], "beta": 0.1, "loss_type": ["sigmoid"],
        "max_steps": 10, "learning_rate": 5e-3, "batch_size": 8, "max_length": 256,
        "threads": 1, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }  # fmt: skip
    result = launch_training("training.dpo", config, tmp / "dpo-lora",
                             result_name="dpo_result.json")
    assert result["lora"] is True and result["steps"] == 10
    assert result["train_reward_margin"] > 0 and result["reward_accuracy"] is not None
    assert (tmp / "dpo-lora" / "adapter" / "adapter_config.json").is_file()
    assert (tmp / "dpo-lora" / "final" / "model.safetensors").is_file()
