"""The champion decision, made atomically: two runs that finish together never both compare
against the old champion.

    result, approval = settle_champion(spec, ev, out=run.out, store_url=run.store_url,
                                       mlflow_uri=run.mlflow_uri,
                                       decide=lambda ev: (verdict, approval),
                                       apply=lambda verdict: promote(...))

Evaluation scores the champion of its time, minutes before promotion. Under the lock the
champion is read again; when another run moved it in between, the new champion is scored on
this run's held-out rows (`against_current_champion`) before the rule decides and the alias
moves. Whichever run finishes last, the better model ends as champion.

The lock (`champion_lock`), keyed by the registered model's name:
  * a file lock (fcntl) beside the MLflow database (a SQLite tracking URI: every run using that
    registry on this machine shares it), else in the runs' parent folder;
  * and, when the example store is PostgreSQL, a PostgreSQL advisory lock on a hash of the
    name, so runs on other machines sharing that store wait too.
Both are released by the operating system or the server when their holder dies: a crashed run
never leaves the champion locked. They are always taken in that order (no deadlock).
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from flows.spec import Spec

POLL_S = 0.1


class ChampionLockTimeout(TimeoutError):
    """Another run held the champion lock longer than the caller would wait."""


def lock_file(model_name: str, mlflow_uri: str | None, out: Path) -> Path:
    """Where the file lock of `model_name` lives: beside a SQLite MLflow database (or inside a
    file store's folder), else in the runs' parent folder (`out`'s parent)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)[:80]
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:8]
    name = f".posttrain-champion-{slug}-{digest}.lock"
    folder = Path(out).resolve().parent
    if mlflow_uri:
        parts = urlsplit(mlflow_uri)
        if parts.scheme == "sqlite":
            database = sa.make_url(mlflow_uri).database
            if database and database != ":memory:" and not database.startswith("file:"):
                folder = Path(database).expanduser().resolve().parent
        elif parts.scheme in ("", "file"):
            folder = Path(parts.path if parts.scheme == "file" else mlflow_uri).expanduser()
    return folder.resolve() / name


def advisory_key(model_name: str) -> int:
    """A signed 64-bit key for pg_advisory_lock, the same in every process and machine."""
    digest = hashlib.sha256(f"posttrain.champion:{model_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def champion_lock(model_name: str, *, out: Path, store_url: str | None = None,
                  mlflow_uri: str | None = None, timeout_s: float | None = None
                  ) -> Iterator[None]:
    """Hold the champion lock of `model_name` (see the module docstring) for the block.
    Waits as long as another run holds it (a person's approval may take a while), saying so
    once; `timeout_s` bounds the wait (ChampionLockTimeout)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with ExitStack() as stack:
        stack.enter_context(_file_lock(lock_file(model_name, mlflow_uri, out), model_name,
                                       deadline))
        if store_url and sa.make_url(store_url).get_backend_name() == "postgresql":
            stack.enter_context(_advisory_lock(store_url, model_name, deadline))
        yield


def _waiting(model_name: str, where: str) -> None:
    print(f"Another run is deciding the champion of {model_name} ({where}): waiting for it.",
          file=sys.stderr, flush=True)


def _check_deadline(deadline: float | None, model_name: str, where: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise ChampionLockTimeout(f"the champion lock of {model_name} ({where}) was still held "
                                  f"by another run")


@contextmanager
def _file_lock(path: Path, model_name: str, deadline: float | None) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    _waiting(model_name, str(path))
                    said = True
                _check_deadline(deadline, model_name, str(path))
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _advisory_lock(store_url: str, model_name: str, deadline: float | None) -> Iterator[None]:
    key = advisory_key(model_name)
    engine = sa.create_engine(store_url, poolclass=NullPool)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            said = False
            while not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"),
                                   {"k": key}).scalar_one():
                where = f"PostgreSQL advisory lock {key}"
                if not said:
                    _waiting(model_name, where)
                    said = True
                _check_deadline(deadline, model_name, where)
                time.sleep(POLL_S)
            try:
                yield
            finally:
                try:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                except sa.exc.SQLAlchemyError:
                    pass  # a lost connection released it already
    finally:
        engine.dispose()


# ── the decision under the lock ──────────────────────────────────────────────────────────────
def against_current_champion(spec: Spec, out: Path, ev: dict,
                             score: Callable[[str], dict] | None = None
                             ) -> tuple[dict, dict | None]:
    """`ev` against the champion as it is now (call it under `champion_lock`).

    Returns (ev, None) when the champion is still the one evaluation scored; (ev with the
    current champion's scores, None) when another run moved it since, and this kind can score
    it here (`score(version)`, default: download it and score it on this run's held-out rows);
    (ev, a not-promote verdict) when it cannot (text answers: the comparison needs the run's
    judge), so a model never replaces a champion it was not compared with."""
    from training.registry import champion_version

    current = champion_version(spec.tracking.registered_model)
    evaluated = ev.get("champion_version")
    if _same(current, evaluated):
        return ev, None
    if current is None:  # the champion alias was removed meanwhile: nothing to beat but the rule
        return {**ev, "champion": None, "champion_version": None}, None
    if spec.task.kind != "classification" and score is None:
        return ev, {"promote": False, "reason": (
            f"the champion moved to v{current} while this run was compared with "
            f"{'v' + str(evaluated) if evaluated else 'no champion'}; its judged comparison "
            f"needs a new evaluation: re-run to compare with v{current}")}
    scores = (score or (lambda v: _score_champion(spec, out)))(current)
    print(f"The champion moved to v{current} since this run's evaluation "
          f"({'v' + str(evaluated) if evaluated else 'no champion'} then): scored it on this "
          f"run's held-out rows before deciding.")
    return {**ev, "champion": scores, "champion_version": current}, None


def _same(a: object, b: object) -> bool:
    return (None if a is None else str(a)) == (None if b is None else str(b))


def _score_champion(spec: Spec, out: Path) -> dict:
    """The current champion, downloaded, scored on this run's held-out rows."""
    from flows.kinds import kind_of
    from flows.warehouse import fetch_eval_rows, shared_engine
    from training.registry import champion_model_dir

    rows = fetch_eval_rows(spec, shared_engine(spec.warehouse.url))
    model_dir = champion_model_dir(spec.tracking.registered_model, Path(out) / "champion")
    return kind_of(spec).score(model_dir, rows)


def settle_champion(spec: Spec, ev: dict, *, out: Path, store_url: str | None,
                    mlflow_uri: str | None,
                    decide: Callable[[dict], tuple[dict, dict | None]],
                    apply: Callable[[dict], dict],
                    score: Callable[[str], dict] | None = None,
                    timeout_s: float | None = None) -> tuple[dict, dict | None]:
    """Under the champion lock: read the champion again (re-scored when it moved since `ev`),
    `decide(ev)` -> (verdict, approval or None), `apply(verdict)` (moves the alias when the
    verdict says promote). Returns (what `apply` returned, approval)."""
    with champion_lock(spec.tracking.registered_model, out=out, store_url=store_url,
                       mlflow_uri=mlflow_uri, timeout_s=timeout_s):
        ev, refused = against_current_champion(spec, out, ev, score)
        verdict, approval = (refused, None) if refused else decide(ev)
        return apply(verdict), approval
