"""Run `training.sft` under `accelerate launch` in a subprocess, and watch it.

    result = launch_sft(config, run_dir, profile="cpu", on_line=print)

writes `run_dir/sft_config.json`, runs

    accelerate launch --config_file training/accelerate/<profile>.yaml \\
        -m training.sft --config run_dir/sft_config.json

offline, streams every output line to `run_dir/train.log` and to `on_line`, and returns the
parsed `train_result.json` (see `training.sft`). A failed run raises `TrainingFailed` carrying
the last 40 log lines. `parse_progress(line)` turns the script's progress lines into dicts.
"""

from __future__ import annotations

import collections
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


def failure_reason(tail: list[str]) -> str:
    """The script's last non-empty line before accelerate's CalledProcessError traceback."""
    lines = list(tail)
    for i in range(len(lines) - 1, -1, -1):
        if (
            lines[i].startswith("Traceback")
            and any("CalledProcessError" in line for line in lines[i:])
            and any("accelerate" in line for line in lines[i:])
        ):
            lines = lines[:i]
            break
    return next((line.strip() for line in reversed(lines) if line.strip()), "no output")


def profile_path(profile: str) -> Path:
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ValueError(f"unknown accelerate profile {profile!r}; choose one of: {choices}")
    return path


def build_command(config_path: Path, profile: str = "cpu") -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(profile_path(profile)),
        "-m", "training.sft", "--config", str(config_path),
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

    `config` is the JSON config of `training.sft`; `output_dir` defaults to `run_dir`."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "output_dir": str(Path(config.get("output_dir") or run_dir).resolve())}
    config_path = run_dir / "sft_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = run_dir / "train.log"
    result_path = Path(config["output_dir"]) / "train_result.json"
    result_path.unlink(missing_ok=True)  # never mistake an old result for this run's
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    with log_path.open("w") as log:
        proc = subprocess.Popen(
            build_command(config_path, profile),
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
    """`{"step", "max_steps", "loss", ...}` from a progress line of training.sft, else None."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        return json.loads(line[len(PROGRESS_PREFIX) :])
    except json.JSONDecodeError:
        return None
