"""Training options through a real `accelerate launch` of training.sft: LoRA (the adapter is
logged, not a copy of the base), BFD packing, gradient checkpointing (same losses), the
pretrained model source (a local folder; a clear error offline), and the bf16/Liger switches
failing clearly where this machine cannot honour them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from examples.news_topics.build_warehouse import read_articles
from training.launch import TrainingFailed, launch_sft
from training.model_source import ModelUnavailable, load_pretrained

PROMPT = "Title: {title}\nLead: {body:.300}\nTopic:"
TINY = {
    "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
    "vocab_size": 400, "max_position_embeddings": 256,
}  # fmt: skip


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    rows = read_articles(per_label=8)  # 40 real articles
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": PROMPT.format(**r), "completion": " " + r["topic"]}) + "\n"
        for r in rows))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.create_experiment("options", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    yield {"uri": uri, "parent": parent, "client": client}
    mlflow.set_tracking_uri(previous)


def config(train_file: Path, **extra) -> dict:
    return {"train_file": str(train_file), "tiny": TINY, "seed": 0, "max_steps": 12,
            "learning_rate": 1e-2, "batch_size": 4, "lr_scheduler": "constant",
            "warmup_ratio": 0.0, "max_length": 256, "threads": 1, "logging_steps": 1, **extra}


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "train.log").read_text().splitlines()
    return [json.loads(x.split(" ", 1)[1])["loss"] for x in lines
            if x.startswith("[progress]") and '"loss"' in x]


def test_lora_trains_an_adapter_and_logs_only_the_adapter(tmp_path, train_file, store):
    mlflow_cfg = {"tracking_uri": store["uri"], "parent_run_id": store["parent"],
                  "run_name": "lora", "tags": {"posttrain.stage": "lora-test"}}
    result = launch_sft(config(train_file, lora={"r": 4, "alpha": 8}, mlflow=mlflow_cfg),
                        tmp_path)
    assert result["lora_r"] == 4
    assert 0 < result["trainable_parameters"] < result["num_parameters"] / 5
    adapter = Path(result["adapter_dir"])
    assert (adapter / "adapter_config.json").is_file()
    weights = adapter / "adapter_model.safetensors"
    base_bytes = sum(p.stat().st_size for p in (tmp_path / "base").glob("*.safetensors"))
    assert weights.stat().st_size < base_bytes / 5  # the adapter, not a copy of the base
    assert (tmp_path / "final" / "config.json").is_file()  # merged, loads like any model
    # the MLflow child run holds the adapter files and no full model weights
    run = store["client"].get_run(result["mlflow_run_id"])
    assert run.data.tags["posttrain.stage"] == "lora-test"  # config tags override the default
    logged = {a.path for a in store["client"].list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in logged
    assert not [a for a in store["client"].list_artifacts(run.info.run_id) if a.path == "final"]


def test_packing_fills_rows_with_several_examples(tmp_path, train_file):
    tiny = {**TINY, "max_position_embeddings": 1024}
    result = launch_sft(config(train_file, packing=True, tiny=tiny, max_length=1024), tmp_path)
    assert result["packing"] is True and result["n_train"] == 40
    assert result["train_rows"] <= 40 / 3  # examples are ~220 tokens: 4 fit a 1024-token row
    assert result["final_loss"] < result["train_loss"] * 1.5


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, train_file):
    plain = losses_of(tmp_path / "plain", train_file)
    ckpt = losses_of(tmp_path / "ckpt", train_file, gradient_checkpointing=True)
    assert len(plain) == len(ckpt) == 12
    assert max(abs(a - b) for a, b in zip(plain, ckpt, strict=True)) < 1e-4


def losses_of(run_dir: Path, train_file: Path, **extra) -> list[float]:
    launch_sft(config(train_file, **extra), run_dir)
    return losses(run_dir)


def test_pretrained_source_loads_a_local_folder(tmp_path, train_file):
    first = launch_sft(config(train_file, max_steps=2), tmp_path / "first")
    again = launch_sft(config(train_file, max_steps=2,
                              model={"source": "pretrained", "name_or_path": first["final_dir"]}),
                       tmp_path / "again")
    assert again["num_parameters"] == first["num_parameters"]
    assert again["vocab_size"] == first["vocab_size"]  # its own tokenizer, not a new one


def test_pretrained_source_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable, match="not in the local Hugging Face cache") as err:
        load_pretrained("posttrain-tests/no-such-model")
    assert "student.name_or_path" in str(err.value) and "hf download" in str(err.value)
    with pytest.raises(ModelUnavailable, match="is not a folder"):
        load_pretrained(str(tmp_path / "missing-folder"))


@pytest.mark.parametrize(("option", "message"), [
    ({"bf16": "on"}, "training.bf16: on needs a CUDA GPU"),
    ({"liger": "on"}, "training.liger: on needs `pip install liger-kernel`"),
])
def test_options_this_machine_cannot_honour_fail_clearly(tmp_path, train_file, option, message):
    import importlib.util

    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("liger_kernel"):
        pytest.skip("this machine has a GPU or liger-kernel: the option would run")
    with pytest.raises(TrainingFailed) as err:
        launch_sft(config(train_file, max_steps=1, **option), tmp_path)
    assert message in err.value.reason
