"""Accelerate profiles: every profile is a config accelerate accepts, the launcher picks the
process count from the machine and refuses what it cannot run before launching, and a real
2-process CPU (gloo DDP) run trains exactly like 1 process with the same global batch.
"""

from __future__ import annotations

import importlib.util
import json

import mlflow
import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from mlflow import MlflowClient

from examples.news_topics.build_warehouse import read_articles
from training import launch
from training.launch import (
    PROFILES_DIR,
    ProfileUnavailable,
    TrainingFailed,
    build_command,
    launch_sft,
    num_processes_for,
    parse_progress,
)

PROFILES = {"cpu", "cpu_ddp", "single_gpu", "multi_gpu", "fsdp", "deepspeed_zero3"}
GPU_PROFILES = {"single_gpu", "multi_gpu", "fsdp", "deepspeed_zero3"}
NEEDED = {"compute_environment", "distributed_type", "mixed_precision", "num_machines",
          "num_processes", "use_cpu"}  # fmt: skip
TINY = {
    "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
    "vocab_size": 400, "max_position_embeddings": 256,
}  # fmt: skip


@pytest.fixture
def with_deepspeed(monkeypatch):
    """Pretend deepspeed is installed, so GPU checks are tested on their own."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "deepspeed" else real(name, *a),
    )


# ── profiles ──────────────────────────────────────────────────────────────────────────────────
def test_every_profile_parses_and_accelerate_accepts_it():
    paths = sorted(PROFILES_DIR.glob("*.yaml"))
    assert PROFILES <= {p.stem for p in paths}
    for path in paths:
        text = path.read_text()
        assert text.startswith("# "), f"{path.name}: needs a comment header saying when to use it"
        settings = yaml.safe_load(text)
        assert NEEDED <= set(settings), f"{path.name}: missing {NEEDED - set(settings)}"
        assert settings["compute_environment"] == "LOCAL_MACHINE"
        ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader takes it

    load = {p.stem: yaml.safe_load(p.read_text()) for p in paths}
    assert load["cpu"]["distributed_type"] == "NO" and load["cpu"]["use_cpu"] is True
    # MULTI_GPU + use_cpu is what makes `accelerate launch` start N gloo processes on CPU
    assert load["cpu_ddp"]["distributed_type"] == "MULTI_GPU" and load["cpu_ddp"]["use_cpu"]
    assert load["single_gpu"]["distributed_type"] == "NO" and not load["single_gpu"]["use_cpu"]
    assert load["multi_gpu"]["distributed_type"] == "MULTI_GPU" and not load["multi_gpu"]["use_cpu"]
    fsdp = load["fsdp"]
    assert fsdp["distributed_type"] == "FSDP" and fsdp["mixed_precision"] == "bf16"
    assert fsdp["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    layers = fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    # accelerate matches these by class __name__: they must be the real names
    assert layers == [modeling_llama.LlamaDecoderLayer.__name__,
                      modeling_qwen2.Qwen2DecoderLayer.__name__]  # fmt: skip
    ds = load["deepspeed_zero3"]
    assert ds["distributed_type"] == "DEEPSPEED" and ds["mixed_precision"] == "bf16"
    assert ds["deepspeed_config"]["zero_stage"] == 3


# ── process counts and clear refusals ─────────────────────────────────────────────────────────
def test_process_count_comes_from_the_machine(with_deepspeed):
    assert num_processes_for("cpu", {"processes": 4}) == 1
    assert num_processes_for("cpu_ddp", {}) == 2
    assert num_processes_for("cpu_ddp", {"processes": 3}) == 3
    assert num_processes_for("single_gpu", {}, gpus=8) == 1
    for profile in ("multi_gpu", "fsdp", "deepspeed_zero3"):
        assert num_processes_for(profile, {}, gpus=4) == 4
    cmd = build_command(PROFILES_DIR / "x.json", "cpu_ddp", 2)
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--config_file") + 1].endswith("cpu_ddp.yaml")


def test_gpu_profile_without_gpu_is_refused_clearly(tmp_path, monkeypatch, with_deepspeed):
    for profile in GPU_PROFILES:
        with pytest.raises(ProfileUnavailable) as err:
            num_processes_for(profile, {}, gpus=0)
        assert str(err.value) == (
            f"profile {profile} needs CUDA GPUs; none visible: use cpu or cpu_ddp"
        )
    with pytest.raises(ProfileUnavailable, match="multi_gpu needs 2\\+ CUDA GPUs; 1 visible"):
        num_processes_for("multi_gpu", {}, gpus=1)
    with pytest.raises(ProfileUnavailable, match="processes >= 2"):
        num_processes_for("cpu_ddp", {"processes": 1})

    # through the public API: a TrainingFailed, raised before any file is written or launched
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch.visible_gpus() == 0
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(TrainingFailed) as err:
        launch_sft({"train_file": "x"}, tmp_path / "run", profile="multi_gpu")
    assert err.value.reason == "profile multi_gpu needs CUDA GPUs; none visible: use cpu or cpu_ddp"
    assert not (tmp_path / "run").exists()


def test_missing_deepspeed_is_refused_clearly(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real(name, *a),
    )
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    for gpus in (0, 8):  # checked first: the fix is the same whatever the machine
        with pytest.raises(ProfileUnavailable) as err:
            num_processes_for("deepspeed_zero3", {}, gpus=gpus)
        assert str(err.value) == "profile deepspeed_zero3 needs `pip install deepspeed`"
    with pytest.raises(TrainingFailed, match="needs `pip install deepspeed`"):
        launch_sft({"train_file": "x"}, tmp_path / "run", profile="deepspeed_zero3")


# ── the key check: 2 CPU processes (gloo DDP) == 1 process at the same global batch ───────────
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tmp_path):
    """1 process x batch 8 and 2 processes (cpu_ddp, gloo) x batch 4 train alike.

    What makes the two runs comparable:
    - the same tiny model (hidden 32, seeded, no dropout in Llama by default) on every rank,
      and DDP broadcasts rank 0's weights anyway;
    - the same data order: Trainer's seeded sampler (seed/data_seed) draws one permutation;
      accelerate shards each global batch of 8 into 4 + 4 (batch i goes to rank i % 2), so
      step k sees the same 8 examples in both runs;
    - 80 examples = exactly 10 global batches, so no epoch ends in a short batch: with 60,
      the 2-process run pads its last batch with repeated examples (even_batches) and the
      runs diverge from step 8 on;
    - the loss is normalised by the token count of the whole global batch
      (`average_tokens_across_devices`), so the mean over 4 + 4 equals the mean over 8.

    Tolerance: what is left is floating-point summation order (two partial gradients summed
    by gloo's all-reduce vs one sum; per-rank padding lengths). Measured: every logged loss
    agreed to ~1e-6 and the final loss exactly (1.6572 both, train_loss 2.77145217 both).
    We allow 1e-3 absolute on each of the 30 logged losses and 1e-4 relative on the final
    and mean loss: ~1000x the noise, yet far below the ~0.02+ jump a different batch
    composition produces (measured with 60 examples: 3.699 vs 3.688 at step 8, final
    1.512 vs 1.484).
    """
    rows = read_articles(per_label=16)
    assert len(rows) == 80
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(
        json.dumps({"prompt": f"Title: {r['title']}\nLead: {r['body'][:300]}\nTopic:",
                    "completion": " " + r["topic"]}) + "\n"
        for r in rows
    ))  # fmt: skip

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient()
        exp_id = client.create_experiment("ddp", artifact_location=str(tmp_path / "artifacts"))
        parent = client.create_run(exp_id, run_name="pipeline").info.run_id
        base = {
            "train_file": str(train_file), "tiny": TINY, "seed": 0, "max_steps": 30,
            "learning_rate": 1e-2, "lr_scheduler": "cosine", "warmup_ratio": 0.0,
            "max_length": 256, "threads": 1, "logging_steps": 1,
        }  # fmt: skip
        runs = {}
        for name, profile, extra in [
            ("one", "cpu", {"batch_size": 8}),
            ("two", "cpu_ddp", {"batch_size": 4, "processes": 2, "mlflow": {
                "tracking_uri": uri, "parent_run_id": parent, "run_name": "sft-ddp"}}),
        ]:  # fmt: skip
            lines: list[str] = []
            result = launch_sft({**base, **extra}, tmp_path / name, profile, lines.append)
            losses = [p["loss"] for p in map(parse_progress, lines) if p and "loss" in p]
            runs[name] = (result, losses)

        (one, one_losses), (two, two_losses) = runs["one"], runs["two"]
        assert (one["num_processes"], two["num_processes"]) == (1, 2)  # really 2 processes
        assert one["global_batch_size"] == two["global_batch_size"] == 8
        assert one["steps"] == two["steps"] == 30
        assert len(one_losses) == len(two_losses) == 30
        assert one_losses[-1] < one_losses[0] - 2  # it trained
        for step, (a, b) in enumerate(zip(one_losses, two_losses, strict=True), 1):
            assert a == pytest.approx(b, abs=1e-3), f"step {step}: {a} vs {b}"
        assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)

        # rank 0 alone wrote the files and the MLflow run: exactly one child run for the job
        assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
        assert (tmp_path / "two" / "base").is_dir()
        children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}'")
        assert [r.info.run_id for r in children] == [two["mlflow_run_id"]]
        assert len(client.search_runs([exp_id])) == 2  # the parent and that one child
        run = children[0]
        assert run.info.status == "FINISHED" and run.info.run_name == "sft-ddp"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == list(range(1, 31))  # logged once, not per rank
        assert run.data.metrics["result/num_processes"] == 2
    finally:
        mlflow.set_tracking_uri(previous)
