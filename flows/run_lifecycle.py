"""One post-training run's life: prepared, resumed or started, recorded, closed.

    run = prepare_run(spec_path, out_dir, overrides)     # spec pinned, store, MLflow, fingerprint
    if only_if_new_data and (why := unchanged_since_champion(run.client, run.spec, run.fingerprint)):
        return skip_run(run, why)
    with run.recorded():                                 # store record + MLflow parent run
        ... the stages, with run.id and run.mlflow_run_id ...

A run killed or failed on exactly this spec in this folder is resumed, not redone: the store
keeps its finished slices and its call cache, and the MLflow parent run is reopened. The
folder names its run (`.posttrain-run`) and is held by one run at a time (`.posttrain.lock`):
a run of the same spec in another folder on a shared store is a run of its own. On the
way out both records are closed, a run that raised as failed, so nothing is lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from agents.redact import redact
from flows import tracking
from flows.llm_endpoints import llm_tag, simulated_roles
from flows.overrides import pin_overrides
from flows.preflight import check_services
from flows.progress import Progress
from flows.runtime import RuntimeSettings, check_keys
from flows.spec import Spec, load_spec
from flows.store import Store, shared_store
from flows.warehouse import data_fingerprint, shared_engine
from training.launch import OFFLINE_ENV
from training.registry import champion_version

RUN_MARKER = ".posttrain-run"  # the store's id of the run this out folder holds
FOLDER_LOCK = ".posttrain.lock"


@dataclass
class PostTrainingRun:
    """What every stage of one run shares. `id` and `mlflow_run_id` are set by `recorded()`."""

    spec: Spec
    spec_path: str  # the pinned spec every stage reads
    out: Path
    store_url: str
    store: Store
    mlflow_uri: str
    client: MlflowClient
    fingerprint: str  # the warehouse data, rows:hash
    progress: Progress
    started: float = field(default_factory=time.perf_counter)
    id: str = ""
    mlflow_run_id: str = ""
    resumed: bool = False
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)  # this start of the run
    # a preview (flows/preview.py) is a store run of its own: it never resumes a run, nor
    # names itself in the folder's marker, so the next full run resumes (or not) as before
    preview: bool = False

    def settings(self, endpoints: dict[str, str | None]) -> RuntimeSettings:
        """What a task needs to rebuild the LLM runtime (small, hashable, no secrets)."""
        return RuntimeSettings(self.spec_path, self.id, self.store_url, str(self.out),
                               tuple(sorted(endpoints.items())), self.attempt)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.started, 2)

    @contextmanager
    def recorded(self) -> Iterator[PostTrainingRun]:
        """Resume the unfinished run of this spec or start one, in the store and in MLflow;
        close both on the way out (failed when the body raised)."""
        spec, store = self.spec, self.store
        folder_lock = self._claim_folder()
        previous = None if self.preview else self._resumable()
        if previous:
            self.id, self.mlflow_run_id, self.resumed = (previous["id"],
                                                         previous["mlflow_run_id"], True)
            store.reopen_run(self.id)
            print(f"Resuming run {self.id[:8]}: finished slices are kept, completed LLM calls "
                  f"come from the call cache.")
        else:
            self.id = store.start_run(spec.name, spec.content_hash(), spec.model_dump_json())
        if not self.preview:
            (self.out / RUN_MARKER).write_text(self.id + "\n")
        if self.mlflow_run_id:
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
        else:
            self.mlflow_run_id = self._start_parent_run()
            store.set_mlflow_run(self.id, self.mlflow_run_id)
        failed = True
        try:
            yield self
            failed = False
        finally:
            try:
                self.client.set_terminated(self.mlflow_run_id,
                                           status="FAILED" if failed else "FINISHED")
                if failed:
                    store.finish_run(self.id, "failed", None)
            finally:
                folder_lock.close()  # releases the folder

    def _claim_folder(self):
        """This run's hold on its out folder (an exclusive lock, released when the run ends
        or its process dies): two runs in one folder would resume and write the same run."""
        lock = (self.out / FOLDER_LOCK).open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RuntimeError(f"{self.out} is in use by another posttrain run; give this "
                               f"one its own --out folder") from None
        return lock

    def _resumable(self) -> dict | None:
        """The unfinished run (killed or failed) this folder holds, when it ran exactly this
        spec. Only this folder's own run: another folder's run of the same spec on a shared
        store is another run, running or not."""
        marker = self.out / RUN_MARKER
        if not marker.exists():
            return None
        previous = self.store.get_run(marker.read_text().strip())
        if (previous and previous["spec_hash"] == self.spec.content_hash()
                and previous["status"] in ("running", "failed")):
            return previous
        return None

    def _start_parent_run(self) -> str:
        spec, simulated, tag = self.spec, simulated_roles(self.spec), llm_tag(self.spec)
        experiment_id = tracking.ensure_experiment(self.client, spec.tracking.experiment,
                                                   self.out)
        return tracking.start_parent_run(
            self.client, experiment_id, run_name=f"{spec.name}-{self.id[:8]}",
            params=tracking.flatten(redact(spec.model_dump(mode="json"))),
            tags={"posttrain.run_id": self.id, "posttrain.spec_hash": spec.content_hash(),
                  "posttrain.llm": tag,
                  "posttrain.teacher": "simulated" if simulated else "real",
                  **({"posttrain.preview": "true"} if self.preview else {}),
                  "mlflow.note.content": (
                      f"Roles played by posttrain's SIMULATED teacher: {', '.join(simulated)}."
                      if simulated else f"LLMs: {tag}.")},
        )


def prepare_run(spec_path: str, out_dir: str, overrides: dict[str, Any],
                preview: bool = False) -> PostTrainingRun:
    """Pin the spec with the flow's overrides, check the API keys and the services (one clear
    error before any work: flows/preflight.py), open the example store and MLflow, and
    fingerprint the warehouse data. `preview`: the run is a preview (see `PostTrainingRun`)."""
    os.environ.update(OFFLINE_ENV)
    started = time.perf_counter()
    out = Path(out_dir).resolve()
    pinned = str(pin_overrides(Path(spec_path).resolve(), out, overrides).resolve())
    spec = load_spec(pinned)
    check_keys(spec)
    check_services(spec, out, prefect_api=False)  # this flow already reached its Prefect API
    out.mkdir(parents=True, exist_ok=True)
    store_url = spec.store.url or f"sqlite:///{out / 'store.db'}"
    mlflow_uri = tracking.tracking_uri(spec.tracking.uri, out)
    mlflow.set_tracking_uri(mlflow_uri)  # also sets $MLFLOW_TRACKING_URI for subprocesses
    return PostTrainingRun(
        spec=spec, spec_path=pinned, out=out, store_url=store_url,
        store=shared_store(store_url), mlflow_uri=mlflow_uri,
        client=MlflowClient(mlflow_uri),
        fingerprint=data_fingerprint(spec, shared_engine(spec.warehouse.url)),
        progress=Progress.create(), started=started, preview=preview)


def unchanged_since_champion(client: MlflowClient, spec: Spec, fingerprint: str) -> str | None:
    """Why this run can stop early (the champion was trained on exactly this warehouse data),
    or None when there is no champion or the data changed."""
    name = spec.tracking.registered_model
    version = champion_version(name)
    if version is None:
        return None
    tags = client.get_model_version(name, str(version)).tags
    if tags.get("posttrain.data_fingerprint") != fingerprint:
        return None
    return (f"No new data since champion v{version} of {name} "
            f"(warehouse fingerprint {fingerprint}, rows:hash): nothing to retrain, stopping.")


def skip_run(run: PostTrainingRun, reason: str) -> dict:
    """Record a run that stopped early (nothing to retrain) and return its summary."""
    print(reason)
    summary = {"skipped": True, "reason": reason, "data_fingerprint": run.fingerprint,
               "model_name": run.spec.tracking.registered_model, "promoted": False,
               "wall_seconds": run.elapsed()}
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    spec = run.spec
    skipped = run.store.start_run(spec.name, spec.content_hash(), spec.model_dump_json())
    run.store.finish_run(skipped, "skipped", summary)
    return summary
