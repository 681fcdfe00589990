"""Real servers for tests: a `prefect server start` subprocess, and Prefect's senders reset.

    proc, url = start_prefect_server(home, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    ...
    stop_process(proc)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path, timeout_s: float = 90, **env_extra: str):
    """`prefect server start` on a free port of 127.0.0.1 with its own PREFECT_HOME, no
    analytics, the UI told its own API URL, and `env_extra` (e.g. a database URL). Returns
    (process, base URL without /api) once /api/health answers; the log is home/server.log."""
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1",
               PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",  # else the UI calls :4200
               **env_extra)
    env.pop("PREFECT_API_URL", None)
    with (home / "server.log").open("w") as log:  # the child holds its own copy
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"prefect server did not start:\n"
                                   f"{(home / 'server.log').read_text()[-3000:]}") from None
            time.sleep(0.5)


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def drain_prefect_senders() -> None:
    """Send Prefect's queued events and logs and stop their workers. A worker's API URL is
    fixed when it starts, and a later flow in this process reuses it whatever PREFECT_API_URL
    says then: task-run states (sent as events) would reach the wrong server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
