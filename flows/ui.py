"""`posttrain ui`: the Prefect server and the MLflow UI on 127.0.0.1, their URLs printed.

Both run as child processes until Ctrl-C. The MLflow UI reads the same backend store the runs
logged to (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db as `posttrain run` writes it)
with the lean settings from STACK.md (one worker, job execution off). Flows started from
this shell afterwards report to this Prefect server when PREFECT_API_URL points at it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _wait_for(url: str, timeout_s: float = 90.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def default_mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('runs/mlflow.db').resolve()}"


def start_uis(mlflow_uri: str | None = None, prefect_port: int = 4200,
              mlflow_port: int = 5000) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """Start both servers; return the processes and {"prefect": url, "mlflow": url} once both
    answer their health checks (raises RuntimeError naming the one that did not)."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               MLFLOW_DISABLE_TELEMETRY="true",
               # the UI asks the server where its API is; without this it says :4200
               PREFECT_UI_API_URL=f"http://127.0.0.1:{prefect_port}/api")
    urls = {"prefect": f"http://127.0.0.1:{prefect_port}",
            "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                          "127.0.0.1", "--port", str(prefect_port)], env=env),
        subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                          mlflow_uri or default_mlflow_uri(), "--host", "127.0.0.1", "--port",
                          str(mlflow_port), "--workers", "1"], env=env),
    ]
    checks = {"prefect": urls["prefect"] + "/api/health", "mlflow": urls["mlflow"] + "/health"}
    for name, url in checks.items():
        if not _wait_for(url):
            stop(procs)
            raise RuntimeError(f"{name} did not answer {url} within 90 s")
    return procs, urls


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def run_uis(mlflow_uri: str | None = None, prefect_port: int = 4200,
            mlflow_port: int = 5000) -> int:
    procs, urls = start_uis(mlflow_uri, prefect_port, mlflow_port)
    print(f"Prefect UI: {urls['prefect']}   (export PREFECT_API_URL={urls['prefect']}/api)")
    print(f"MLflow UI:  {urls['mlflow']}   (backend {mlflow_uri or default_mlflow_uri()})")
    print("Ctrl-C stops both.", flush=True)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop(procs)
    return 0
