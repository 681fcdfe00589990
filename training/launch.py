"""Run a training script (`training.sft`, `training.dpo`) under `accelerate launch` in a
subprocess, and watch it.

    result = launch_sft(config, run_dir, profile="cpu", on_line=print)
    result = launch_training("training.dpo", config, run_dir, "cpu", print, "dpo_result.json")

writes `run_dir/<script>_config.json` (sft_config.json, dpo_config.json), runs

    accelerate launch --config_file training/accelerate/<profile>.yaml \\
        -m training.sft --config run_dir/sft_config.json

with `--num_processes` taken from the machine (`num_processes_for`: the visible GPUs for a GPU
profile, the config's `processes` (default 2) for `cpu_ddp`, 1 for `cpu`), offline, streams
every output line to `run_dir/train.log` and to `on_line`, and returns the parsed result file
the script wrote in its output_dir (`train_result.json` for `training.sft`,
`dpo_result.json` for `training.dpo`). A failed run raises `TrainingFailed` carrying the
last 40 log lines; a profile this machine cannot run (no GPU, no deepspeed) raises
`ProfileUnavailable` (a `TrainingFailed`) before anything starts. `parse_progress(line)` turns
the script's progress lines into dicts. Profiles and commands: docs/training.md.

Crash safety (docs/training.md, "Checkpoints and resume"): the config gets a `fingerprint`
(`job_fingerprint`: the training-relevant config, the sha256 of its data files and of
`model_dir`, the profile and the process count). The script checkpoints to
`output_dir/checkpoints/` and resumes from the last one made under the same fingerprint; it
writes `output_dir/done.json` only after final/ and the result file are complete. A launch
whose output_dir already holds a `done.json` of the same fingerprint does not train again: it
returns the stored result with `"reused": true`.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
PROFILES_DIR = PACKAGE_DIR / "accelerate"
TAIL_LINES = 40
PROGRESS_PREFIX = "[progress] "
RESUME_PREFIX = "[resume] "
CHECKPOINTS = "checkpoints"  # output_dir/checkpoints/checkpoint-N, and job.json beside them
DONE = "done.json"  # output_dir/done.json: the job finished; written last
STAGES = {"training.sft": "SFT", "training.dpo": "DPO"}

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


class TrainingFailed(RuntimeError):
    """The training subprocess failed. `reason` is its own last error line (not the launcher's
    wrapper traceback); `tail` holds the last log lines."""

    def __init__(self, returncode: int, tail: list[str], log_path: Path):
        self.returncode, self.tail, self.log_path = returncode, tail, log_path
        self.reason = failure_reason(tail)
        super().__init__(
            f"training failed (exit code {returncode}): {self.reason}\n"
            f"full log: {log_path}; last lines:\n" + "\n".join(tail)
        )


_CHAIN_LINES = ("The above exception was the direct cause of the following exception:",
                "During handling of the above exception, another exception occurred:")
_ECHO = "RuntimeError: "  # accelerate >= 1.16: its CalledProcessError is chained to a
#                           RuntimeError holding the tail of the script's stderr, printed again


def failure_reason(tail: list[str]) -> str:
    """The script's last non-empty line before accelerate's CalledProcessError traceback (and
    before the copy of the script's stderr that newer accelerate chains to it)."""
    lines = list(tail)
    for i in range(len(lines) - 1, -1, -1):
        if (
            lines[i].startswith("Traceback")
            and any("CalledProcessError" in line for line in lines[i:])
            and any("accelerate" in line for line in lines[i:])
        ):
            lines = lines[:i]
            break
    text = [line.strip() for line in lines if line.strip() and line.strip() not in _CHAIN_LINES]
    if len(text) > 1 and text[-1].startswith(_ECHO) and text[-1][len(_ECHO):] == text[-2]:
        text.pop()  # the one-line echo; a longer echo ends with the script's own last line
    return text[-1] if text else "no output"


class ProfileUnavailable(TrainingFailed):
    """The accelerate profile cannot run on this machine; raised before launching anything."""

    def __init__(self, message: str):
        self.returncode, self.tail, self.log_path = None, [message], None
        self.reason = message
        RuntimeError.__init__(self, message)


# profiles that need a Python package beyond the base stack
PROFILE_PACKAGES = {"deepspeed_zero3": "deepspeed"}


def profile_settings(profile: str) -> dict:
    import yaml

    return yaml.safe_load(profile_path(profile).read_text()) or {}


def visible_gpus() -> int:
    """CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES is honoured by torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def num_processes_for(profile: str, config: dict, gpus: int | None = None) -> int:
    """How many processes `accelerate launch` starts for `profile` on this machine.

    CPU profiles (`use_cpu: true`): 1 unless distributed (`cpu_ddp`: config `processes`,
    default 2). GPU profiles: one per visible GPU (`single_gpu`: 1). Raises
    `ProfileUnavailable` when the machine cannot run the profile."""
    settings = profile_settings(profile)
    if int(settings.get("num_machines") or 1) > 1:
        raise ProfileUnavailable(
            f"profile {profile} spans {settings['num_machines']} machines: launch it on each "
            "node with its rank as docs/scaling.md shows, not from the pipeline")
    distributed = settings.get("distributed_type", "NO") != "NO"
    package = PROFILE_PACKAGES.get(profile)
    if package and importlib.util.find_spec(package) is None:
        raise ProfileUnavailable(f"profile {profile} needs `pip install {package}`")
    if settings.get("use_cpu"):
        if not distributed:
            return 1
        n = int(config.get("processes") or 2)
        if n < 2:
            raise ProfileUnavailable(f"profile {profile} needs processes >= 2, got {n}: use cpu")
        return n
    gpus = visible_gpus() if gpus is None else gpus
    if gpus == 0:
        raise ProfileUnavailable(
            f"profile {profile} needs CUDA GPUs; none visible: use cpu or cpu_ddp"
        )
    if not distributed:
        return 1
    if settings.get("distributed_type") == "MULTI_GPU" and gpus < 2:
        raise ProfileUnavailable(
            f"profile {profile} needs 2+ CUDA GPUs; {gpus} visible: use single_gpu"
        )
    return gpus


def profile_path(profile: str) -> Path:
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ValueError(f"unknown accelerate profile {profile!r}; choose one of: {choices}")
    return path


def build_command(config_path: Path, profile: str = "cpu", num_processes: int = 1,
                  module: str = "training.sft") -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(profile_path(profile)),
        "--num_processes", str(num_processes),
        "-m", module, "--config", str(config_path),
    ]  # fmt: skip


def _env(config: dict) -> dict[str, str]:
    env = dict(os.environ, **OFFLINE_ENV)
    threads = str(config.get("threads", 1))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    # the script picks its MLflow run from the config, never from an inherited variable
    for key in ("MLFLOW_RUN_ID", "MLFLOW_NESTED_RUN"):
        env.pop(key, None)
    return env


# ── crash safety: what makes two launches the same job ─────────────────────────────────────────
# keys that change neither the trained weights nor the reported figures (paths are replaced by
# the sha256 of what they point at; the MLflow parent run is kept, below)
NOT_TRAINING = frozenset({"output_dir", "mlflow", "threads", "logging_steps", "save_steps",
                          "save_total_limit", "keep_checkpoints", "fingerprint", "train_file",
                          "eval_file", "model_dir"})


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes ("missing" when there is none: the script reports that)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return "missing"
    return digest.hexdigest()


def dir_sha256(path: str | Path) -> str:
    """sha256 over a folder's files (relative names and bytes, sorted): a model's identity."""
    root = Path(path)
    if not root.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + file_sha256(f).encode())
    return digest.hexdigest()


def job_fingerprint(module: str, config: dict, profile: str | None = None,
                    num_processes: int | None = None) -> str:
    """The identity of a training job: two launches with the same fingerprint train the same
    model from the same data, so a checkpoint or a finished model of one serves the other.

    Covers the config's training keys, the bytes of train_file / eval_file and of the model_dir
    folder (DPO's SFT model), the MLflow parent run (another pipeline run retrains rather than
    borrowing this one's model and child run), the profile and the process count."""
    parts = {
        "module": module,
        "config": {k: v for k, v in config.items() if k not in NOT_TRAINING},
        "parent_run_id": (config.get("mlflow") or {}).get("parent_run_id"),
        "files": {k: file_sha256(config[k]) for k in ("train_file", "eval_file")
                  if config.get(k)},
        "model_dir": dir_sha256(config["model_dir"]) if config.get("model_dir") else None,
        "profile": profile,
        "num_processes": num_processes,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def finished_result(output_dir: str | Path, fingerprint: str, result_name: str) -> dict | None:
    """The result of a job that already finished in `output_dir` under `fingerprint` (its
    done.json, result file and final/ all there), else None."""
    out = Path(output_dir)
    try:
        done = json.loads((out / DONE).read_text())
        result = json.loads((out / result_name).read_text())
    except (OSError, ValueError):
        return None
    if (done.get("fingerprint") != fingerprint or done.get("result") != result_name
            or not Path(result.get("final_dir") or out / "final").is_dir()):
        return None
    return result


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that a reader (or a kill) never sees half a file: a temp file, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def launch_sft(
    config: dict,
    run_dir: Path,
    profile: str = "cpu",
    on_line: Callable[[str], None] | None = None,
) -> dict:
    """Train through `accelerate launch` and return train_result.json as a dict.

    `config` is the JSON config of `training.sft`; `output_dir` defaults to `run_dir`.
    `config["processes"]` sets the process count of `cpu_ddp`; `batch_size` is per process."""
    return launch_training("training.sft", config, run_dir, profile, on_line, "train_result.json")


def launch_training(
    module: str,
    config: dict,
    run_dir: Path,
    profile: str = "cpu",
    on_line: Callable[[str], None] | None = None,
    result_name: str = "train_result.json",
) -> dict:
    """Run `accelerate launch -m <module> --config run_dir/<name>_config.json` and return the
    `result_name` JSON the script wrote in its `output_dir` (default `run_dir`).

    The same for every script: process count from the machine and the profile, offline, each
    output line to `run_dir/train.log` and `on_line`; a failed run raises `TrainingFailed`.

    A job that already finished in its output_dir under the same `job_fingerprint` is not run
    again: its stored result comes back with `"reused": True` (and one `[resume]` line). A job
    that was killed resumes from its last checkpoint (the script decides, see training.sft)."""
    num_processes = num_processes_for(profile, config)  # fails fast, before any file is written
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "output_dir": str(Path(config.get("output_dir") or run_dir).resolve())}
    config["fingerprint"] = job_fingerprint(module, config, profile, num_processes)
    log_path = run_dir / "train.log"
    output_dir = Path(config["output_dir"])
    result_path = output_dir / result_name

    finished = finished_result(output_dir, config["fingerprint"], result_name)
    if finished is not None:
        line = (f"{RESUME_PREFIX}{STAGES.get(module, module)} already finished for this config "
                f"and data: reusing {output_dir / result_name} and its final/, no retraining")
        with log_path.open("a") as log:
            log.write(line + "\n")
        if on_line is not None:
            on_line(line)
        return {**finished, "reused": True}

    config_path = run_dir / f"{module.rsplit('.', 1)[-1]}_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    (output_dir / DONE).unlink(missing_ok=True)  # not finished until the script says so again
    result_path.unlink(missing_ok=True)  # never mistake an old result for this run's
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    with log_path.open("w") as log:
        proc = subprocess.Popen(
            build_command(config_path, profile, num_processes, module),
            cwd=REPO_ROOT,
            env=_env(config),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                log.write(line + "\n")
                log.flush()
                tail.append(line)
                if on_line is not None:
                    on_line(line)
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise

    if returncode != 0 or not result_path.is_file():
        raise TrainingFailed(returncode, list(tail), log_path)
    return json.loads(result_path.read_text())


def parse_progress(line: str) -> dict | None:
    """`{"step", "max_steps", "loss", ...}` from a progress line of a training script, else None."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        return json.loads(line[len(PROGRESS_PREFIX) :])
    except json.JSONDecodeError:
        return None
