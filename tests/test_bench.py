"""Bench scripts run from a fresh clone: their `--quick` modes, as a user runs them (a
subprocess of this interpreter, from the repository root), each printing one JSON object on
its last line. The figures the issues set as targets are checked too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, tmp_path: Path, *args: str, timeout: int = 900) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # its own ephemeral Prefect, not a test server's
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


def test_robustness_quick_meets_its_targets(tmp_path):
    """An 11,125-row warehouse, slices of 700+ rows, a teacher erring like a hosted model."""
    f = run_bench("robustness.py", tmp_path, "--quick", "--keep", str(tmp_path / "runs"))
    assert f["rows"] >= 10_000 and f["slice_rows_min"] >= 700
    assert f["agents_alarmed_fraction"] <= 0.02
    assert f["coverage"] >= 0.98
    assert f["duplicates_after_reanchor"] == 0
    assert f["step_alarm_after_calls"] is not None and f["step_alarm_after_calls"] <= 50
    assert f["step_accepted_label_accuracy"] >= 0.9


def test_sft_accuracy_quick_beats_the_majority_baseline(tmp_path):
    f = run_bench("sft_accuracy.py", tmp_path, "--quick", "--out", str(tmp_path / "sft"))
    assert f["n_train"] > 100 and f["n_eval"] > 30
    assert f["accuracy"] > f["majority_baseline"] + 0.05
