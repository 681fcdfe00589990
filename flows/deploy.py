"""The nightly deployment, defined once in prefect.yaml and used two ways.

    posttrain deploy [--pool posttrain] [--timezone Europe/Paris]
        registers `post-training/nightly` on a process work pool (created when missing) with
        `prefect deploy`; `prefect worker start --pool posttrain` then runs its flow runs.
    posttrain serve [--timezone ...]
        serves the same deployment from this process (no worker, no pool): its schedule
        creates runs and this process executes them until stopped.

Both read the schedule and parameters from prefect.yaml, so the file stays the one source.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
FLOW_NAME = "post-training"


def deployment_settings(name: str = "nightly", path: Path = PREFECT_YAML) -> dict:
    """The deployment `name` from prefect.yaml: entrypoint, schedules, parameters, pool."""
    data = yaml.safe_load(path.read_text()) or {}
    for deployment in data.get("deployments") or []:
        if deployment.get("name") == name:
            return deployment
    names = ", ".join(d.get("name", "?") for d in data.get("deployments") or [])
    raise SystemExit(f"{path}: no deployment named {name!r} (found: {names or 'none'})")


def ensure_process_pool(pool: str) -> bool:
    """Create the process work pool `pool` if it does not exist; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True


def deploy(name: str = "nightly", pool: str | None = None, timezone: str | None = None) -> int:
    """`prefect deploy` of prefect.yaml's deployment `name`, from the repository root."""
    settings = deployment_settings(name)
    pool = pool or settings["work_pool"]["name"]
    if ensure_process_pool(pool):
        print(f"created process work pool {pool!r}")
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy",
               "--name", f"{FLOW_NAME}/{name}", "--pool", pool]
    if timezone:  # the schedule again, with the other timezone
        for schedule in settings.get("schedules") or []:
            command += ["--cron", schedule["cron"]]
        command += ["--timezone", timezone]
    env = dict(os.environ, POSTTRAIN_HOME=str(REPO_ROOT))
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, check=False)
    if done.returncode == 0:
        print(f"deployed {FLOW_NAME}/{name} on pool {pool!r}; run it with: "
              f"prefect worker start --pool {pool}")
    return done.returncode


def serve(name: str = "nightly", timezone: str | None = None) -> None:
    """Serve prefect.yaml's deployment `name` from this process, schedule included."""
    from prefect.schedules import Cron

    from flows.pipeline import post_training

    settings = deployment_settings(name)
    schedules = [Cron(s["cron"], timezone=timezone or s.get("timezone") or "UTC")
                 for s in settings.get("schedules") or [] if s.get("active", True)]
    os.chdir(REPO_ROOT)  # parameters hold paths relative to the repository root
    post_training.serve(name=name, schedules=schedules,
                        parameters=settings.get("parameters") or {},
                        description=settings.get("description"),
                        global_limit=settings.get("concurrency_limit"))
