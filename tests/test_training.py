"""Training room: tokenizer and tiny model, a real `accelerate launch` of TRL SFT logging to a
real MLflow (SQLite) store as a child run, evaluation, registration and promotion.

One short training run (60 real BBC articles, 60 steps, hidden 32) is shared by the module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from examples.news_topics.build_warehouse import read_articles
from training.evaluate import (
    INVALID,
    classification_metrics,
    confusion_matrix_png,
    evaluate_classifier,
    match_label,
    per_label_report,
)
from training.launch import TrainingFailed, failure_reason, launch_sft, parse_progress
from training.registry import (
    champion_model_dir,
    champion_version,
    decide_promotion,
    git_commit,
    promote,
    register_model,
)
from training.tiny_model import build_tiny_model, train_tokenizer

PROMPT = "Title: {title}\nLead: {body:.300}\nTopic:"
LABELS = ["business", "entertainment", "politics", "sports", "tech"]
TINY = {
    "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
    "vocab_size": 400, "max_position_embeddings": 256,
}  # fmt: skip


# ── fast unit tests ───────────────────────────────────────────────────────────────────────────
def test_tokenizer_is_deterministic_and_round_trips():
    texts = [f"Title: story {i}\nTopic: {LABELS[i % 5]}" for i in range(50)]
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.get_vocab() == b.get_vocab()
    ids = a("Title: naïve café – 2005\nTopic: tech").input_ids
    assert ids[0] == a.bos_token_id
    assert a.decode(ids, skip_special_tokens=True) == "Title: naïve café – 2005\nTopic: tech"
    assert {a.pad_token, a.bos_token, a.eos_token} == {"<pad>", "<s>", "</s>"}


def test_tiny_model_is_seeded_with_tied_embeddings():
    tok = train_tokenizer([f"text number {i}" for i in range(30)], 300)
    m1 = build_tiny_model(tok, 32, 1, 2, 64, 128, seed=3)
    m2 = build_tiny_model(tok, 32, 1, 2, 64, 128, seed=3)
    assert m1.config.vocab_size == len(tok)
    assert m1.lm_head.weight.data_ptr() == m1.model.embed_tokens.weight.data_ptr()
    assert all((p1 == p2).all() for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True))


def test_match_label_and_metrics():
    assert match_label("  tech</s>", LABELS) == "tech"
    assert match_label("technology", ["tech", "technology"]) == "technology"
    assert match_label("weather", LABELS) == INVALID
    m = classification_metrics(["a", "a", "b", INVALID], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert m["accuracy"] == 0.5 and m["invalid"] == 1 and m["n"] == 4
    assert m["per_label"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    assert m["per_label"]["b"]["recall"] == pytest.approx(1 / 3)
    assert m["per_label"]["b"]["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert m["confusion"] == {"a": {"a": 1, "b": 0, "c": 0, INVALID: 0},
                              "b": {"a": 1, "b": 1, "c": 0, INVALID: 1},
                              "c": {"a": 0, "b": 0, "c": 0, INVALID: 0}}
    report = per_label_report(m)
    assert "| a | 0.500 | 1.000 | 0.667 | 1 |" in report and "1 invalid of 4" in report


def test_confusion_matrix_png_is_written(tmp_path):
    gold = [LABELS[i % 5] for i in range(40)]
    predictions = [g if i % 3 else LABELS[(i + 1) % 5] for i, g in enumerate(gold)]
    predictions[0] = INVALID
    m = classification_metrics(predictions, gold, LABELS)
    path = confusion_matrix_png(m, LABELS, tmp_path / "eval" / "cm.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000


def _result(accuracy: float, **f1: float) -> dict:
    """An evaluate_classifier-shaped result with the given per-label F1."""
    per_label = {label: {"precision": v, "recall": v, "f1": v, "support": 10}
                 for label, v in f1.items()}
    return {"accuracy": accuracy, "macro_f1": sum(f1.values()) / len(f1), "per_label": per_label}


def test_decide_promotion():
    rule = {"metric": "accuracy", "min_improvement": 0.0, "max_label_drop": None}
    new = _result(0.80, tech=0.612, sport=0.95)
    assert decide_promotion(new, None, **rule) == {"promote": True, "reason": "no champion yet"}
    old = _result(0.70, tech=0.801, sport=0.60)
    better = decide_promotion(new, old, **rule)
    assert better["promote"] and better["reason"] == "accuracy 0.800 > champion 0.700 + 0"
    not_enough = decide_promotion(new, old, **(rule | {"min_improvement": 0.1}))
    assert not not_enough["promote"]
    assert not_enough["reason"] == "accuracy 0.800 <= champion 0.700 + 0.1"
    assert not decide_promotion(old, old, **rule)["promote"]  # a tie is not better
    macro = decide_promotion(new, old, **(rule | {"metric": "macro_f1"}))
    assert macro["promote"] and macro["reason"].startswith("macro_f1 0.781 > champion 0.70")


def test_a_champion_worse_on_a_label_by_more_than_the_rule_allows_is_not_replaced():
    rule = {"metric": "accuracy", "min_improvement": 0.0}
    new = _result(0.80, tech=0.612, sport=0.95)
    old = _result(0.70, tech=0.801, sport=0.60)
    dropped = decide_promotion(new, old, **rule, max_label_drop=0.05)
    assert not dropped["promote"]
    assert dropped["reason"] == "label 'tech' F1 0.612 < champion 0.801 - 0.05"
    within = decide_promotion(new, old, **rule, max_label_drop=0.2)
    assert within["promote"] and "no label's F1 dropped by more than 0.2" in within["reason"]
    exact = _result(0.80, tech=0.75, sport=0.95)  # a drop of exactly the allowance is allowed
    assert decide_promotion(exact, _result(0.7, tech=0.8, sport=0.6), **rule,
                            max_label_drop=0.05)["promote"]
    missing = _result(0.80, sport=0.95)  # a label the candidate never got right counts as 0
    assert "label 'tech' F1 0.000" in decide_promotion(missing, old, **rule,
                                                       max_label_drop=0.5)["reason"]


def test_git_commit():
    commit = git_commit()
    assert commit == "unknown" or len(commit) == 40


def test_failure_reason_skips_the_launcher_traceback():
    tail = [
        "ValueError: train_file does not exist",
        "Traceback (most recent call last):",
        '  File ".../accelerate/commands/launch.py", line 999, in simple_launcher',
        "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 1.",
    ]
    assert failure_reason(tail) == "ValueError: train_file does not exist"
    # accelerate 1.16 chains the CalledProcessError to a RuntimeError echoing the script's
    # stderr tail: one line ...
    chained = ["ValueError: train_file does not exist",
               "RuntimeError: ValueError: train_file does not exist", "", "",
               "The above exception was the direct cause of the following exception:", "",
               *tail[1:]]
    assert failure_reason(chained) == "ValueError: train_file does not exist"
    # ... or several, the script's own last line last
    chained = ["Traceback (most recent call last):", '  File "training/sft.py", line 9',
               "ValueError: train_file does not exist",
               "RuntimeError: Traceback (most recent call last):",
               '  File "training/sft.py", line 9', "ValueError: train_file does not exist",
               "", "The above exception was the direct cause of the following exception:", "",
               *tail[1:]]
    assert failure_reason(chained) == "ValueError: train_file does not exist"
    assert parse_progress('[progress] {"step": 2, "loss": 1.5}') == {"step": 2, "loss": 1.5}
    assert parse_progress("{'loss': 1.5}") is None


# ── one real training run, shared ─────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow SQLite store with its own artifact folder and a pipeline-style parent run."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # None: unset again afterwards
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp_id = client.create_experiment("training-tests", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp_id, run_name="pipeline")
    yield {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent.info.run_id, "root": root}
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def articles():
    rows = read_articles(per_label=12)  # 60 real articles
    return [{"prompt": PROMPT.format(**r), "completion": " " + r["topic"]} for r in rows]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, store, articles):
    run_dir = tmp_path_factory.mktemp("sft")
    train_file = run_dir / "train.jsonl"
    train_file.write_text("".join(json.dumps(a) + "\n" for a in articles))
    lines: list[str] = []
    config = {
        "train_file": str(train_file), "tiny": TINY, "seed": 0, "max_steps": 60,
        "learning_rate": 1e-2, "batch_size": 8, "lr_scheduler": "cosine", "warmup_ratio": 0.0,
        "max_length": 256, "threads": 1,
        "mlflow": {
            "tracking_uri": store["uri"], "experiment": "training-tests",
            "parent_run_id": store["parent_run_id"], "run_name": "sft-test",
        },
    }  # fmt: skip
    result = launch_sft(config, run_dir, on_line=lines.append)
    return {"result": result, "run_dir": run_dir, "lines": lines}


def test_launch_writes_result_log_and_progress(trained):
    result, run_dir = trained["result"], trained["run_dir"]
    assert result["steps"] == 60 and result["n_train"] == 60 and result["n_dropped"] == 0
    assert result["final_loss"] < result["train_loss"] < 10
    assert result["tokens_per_second"] > 0
    assert (run_dir / "sft_config.json").is_file()
    log = (run_dir / "train.log").read_text().splitlines()
    assert log == trained["lines"]
    steps = [p["step"] for p in map(parse_progress, log) if p and "loss" in p]
    assert steps and steps[-1] == 60 and steps == sorted(steps)


def test_child_run_is_logged_under_the_parent(trained, store):
    client = MlflowClient()
    run = client.get_run(trained["result"]["mlflow_run_id"])
    assert run.info.experiment_id == store["experiment_id"]
    assert run.data.tags["mlflow.parentRunId"] == store["parent_run_id"]
    assert run.info.run_name == "sft-test" and run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= 5 and losses[-1].step == 60
    assert run.data.metrics["result/train_loss"] == pytest.approx(trained["result"]["train_loss"])
    assert run.data.params["tiny.hidden_size"] == "32"
    children = client.search_runs(
        [store["experiment_id"]], f"tags.mlflow.parentRunId = '{store['parent_run_id']}'"
    )
    assert [r.info.run_id for r in children] == [run.info.run_id]


def test_base_and_final_models_load_and_differ(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(trained["result"]["base_dir"])
    final = AutoModelForCausalLM.from_pretrained(trained["result"]["final_dir"])
    tok = AutoTokenizer.from_pretrained(trained["result"]["final_dir"])
    assert base.config.hidden_size == final.config.hidden_size == 32
    assert len(tok) == final.config.vocab_size == trained["result"]["vocab_size"]
    b, f = base.state_dict(), final.state_dict()
    assert any(not (b[k] == f[k]).all() for k in f)


def test_evaluation_of_base_and_final(trained, articles):
    prompts = [a["prompt"] for a in articles]
    gold = [a["completion"].strip() for a in articles]
    base = evaluate_classifier(trained["result"]["base_dir"], prompts, gold, LABELS)
    final = evaluate_classifier(trained["result"]["final_dir"], prompts, gold, LABELS, batch_size=7)
    for m in (base, final):
        assert m["n"] == 60 and len(m["predictions"]) == 60
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
        assert set(m["per_label"]) == set(LABELS)
        assert sum(v["support"] for v in m["per_label"].values()) == 60
    assert base["invalid"] == 60  # an untrained model does not emit labels
    assert final["invalid"] < 30  # a trained one has learned the answer format
    assert final["accuracy"] > base["accuracy"]


def test_register_promote_and_download_the_champion(trained, store, articles, tmp_path):
    name = "training-tests-classifier"
    run_id = trained["result"]["mlflow_run_id"]
    final_dir = trained["result"]["final_dir"]
    assert champion_version(name) is None
    assert champion_model_dir(name, tmp_path / "none") is None

    v1 = register_model(final_dir, run_id, name, {"accuracy": 0.5}, {"spec_hash": "abc"})
    first = promote(name, v1, {"promote": True, "reason": "no champion yet"})
    assert first == {"promoted": True, "previous_champion_version": None,
                     "reason": "no champion yet"}

    v2 = register_model(final_dir, run_id, name, {"accuracy": 0.5}, {"spec_hash": "abc"})
    kept = promote(name, v2, {"promote": False, "reason": "accuracy 0.500 <= champion 0.500 + 0"})
    assert not kept["promoted"] and kept["previous_champion_version"] == v1
    assert champion_version(name) == v1

    client = MlflowClient()
    mv = client.get_model_version(name, v1)
    assert mv.tags["spec_hash"] == "abc" and float(mv.tags["accuracy"]) == 0.5
    assert mv.tags["promotion"] == "no champion yet"
    assert client.get_model_version(name, v2).tags["promotion"].startswith("accuracy 0.500 <=")
    assert mv.run_id == run_id
    # artifacts stay in the experiment's own folder, never ./mlruns
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.experiment_id == store["experiment_id"] and logged.source_run_id == run_id
    model_dir = Path(logged.artifact_location.removeprefix("file://"))
    assert Path(store["root"]) in model_dir.parents and (model_dir / "MLmodel").is_file()
    assert (model_dir / "model").is_dir() or any(model_dir.rglob("*.safetensors"))

    # the champion comes back as a folder evaluate_classifier loads, scoring as the original
    downloaded = champion_model_dir(name, tmp_path / "champion")
    assert downloaded is not None and (downloaded / "config.json").is_file()
    prompts = [a["prompt"] for a in articles[:20]]
    gold = [a["completion"].strip() for a in articles[:20]]
    again = evaluate_classifier(downloaded, prompts, gold, LABELS)
    original = evaluate_classifier(final_dir, prompts, gold, LABELS)
    assert again["predictions"] == original["predictions"]
    assert again["accuracy"] == original["accuracy"] and again["invalid"] < 20


def test_failed_training_raises_with_the_reason(tmp_path):
    config = {
        "train_file": str(tmp_path / "missing.jsonl"), "tiny": TINY, "seed": 0, "max_steps": 1,
        "learning_rate": 1e-3, "batch_size": 2, "threads": 1,
    }  # fmt: skip
    with pytest.raises(TrainingFailed) as err:
        launch_sft(config, tmp_path / "run")
    assert "missing.jsonl" in err.value.reason
    assert err.value.returncode != 0 and (tmp_path / "run" / "train.log").is_file()


def test_a_model_no_better_than_the_majority_baseline_is_never_promoted():
    rule = {"metric": "accuracy", "min_improvement": 0.0, "max_label_drop": None,
            "baseline": 0.527, "min_over_baseline": 0.05}
    weak = _result(0.559, tech=0.5, sport=0.6)
    for champion in (None, _result(0.40, tech=0.3, sport=0.4)):  # champion or not
        verdict = decide_promotion(weak, champion, **rule)
        assert not verdict["promote"]
        assert verdict["reason"].startswith("accuracy 0.559 <= majority baseline 0.527 + 0.05")
    good = decide_promotion(_result(0.80, tech=0.8, sport=0.8), None, **rule)
    assert good["promote"] and "> majority baseline 0.527" in good["reason"]
