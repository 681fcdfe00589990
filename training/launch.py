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
"""

from __future__ import annotations

import collections
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
    output line to `run_dir/train.log` and `on_line`; a failed run raises `TrainingFailed`."""
    num_processes = num_processes_for(profile, config)  # fails fast, before any file is written
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "output_dir": str(Path(config.get("output_dir") or run_dir).resolve())}
    config_path = run_dir / f"{module.rsplit('.', 1)[-1]}_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = run_dir / "train.log"
    result_path = Path(config["output_dir"]) / result_name
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
