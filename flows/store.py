"""The example store: every run, slice, example (kept or rejected) and LLM call, in SQL.

Any SQLAlchemy URL works: a SQLite file by default (WAL, a busy timeout and `BEGIN
IMMEDIATE` writes, so several agent threads can write at once), PostgreSQL in production.
`Store` is thread-safe: each method opens one short session of its own.

The tables (runs, slices, examples, LLM calls, slice members, the call cache) are in
flows/store_tables.py; the gateway's view of the call cache, `Store.call_cache()`, in
flows/call_cache.py.
"""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import sessionmaker

from flows.call_cache import StoreCallCache
from flows.store_tables import (
    CALL_STATUSES,
    EXAMPLE_STATUSES,
    RUN_STATUSES,
    SLICE_STATUSES,
    Base,
    CachedCall,
    Example,
    LLMCall,
    Run,
    Slice,
    SliceMember,
    _check,
    _now,
    _row,
    content_hash,
)


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    db = url.database
    if db and db != ":memory:" and not db.startswith("file:"):
        Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a commit is not fsynced (a checkpoint is), so a crash
        # of this process loses nothing and the file never corrupts; only a power cut may lose
        # the last commits. FULL fsynced every example's commit: most of an agent's CPU.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Take the write lock up front: a deferred transaction that reads, then writes,
        # can fail at once with SQLITE_BUSY instead of waiting for the busy timeout. A
        # read-only one (`Store._reading`) takes no lock: in WAL, readers never wait.
        read_only = conn.get_execution_options().get("pt_read_only")
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


class Store:
    """The example store at a SQLAlchemy URL; creates its tables on first use."""

    def __init__(self, url: str):
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "sqlite":
            self.engine = _sqlite_engine(parsed)
        else:
            self.engine = sa.create_engine(parsed, pool_pre_ping=True)
        Base.metadata.create_all(self.engine)
        for index in Example.__table__.indexes:  # a store made before an index was added
            index.create(self.engine, checkfirst=True)
        self.url = url
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def _reading(self) -> sa.Connection:
        """A connection for reads only: on SQLite it takes no write lock (see `_on_begin`).
        The hot reads (the call cache, a slice, its members) use it."""
        return self.engine.connect().execution_options(pt_read_only=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ── runs ──
    def start_run(self, name: str, spec_hash: str, spec_json: str | dict) -> str:
        if not isinstance(spec_json, str):
            spec_json = json.dumps(spec_json, sort_keys=True)
        run_id = uuid.uuid4().hex
        with self._session.begin() as s:
            s.add(Run(id=run_id, name=name, spec_hash=spec_hash, spec_json=spec_json,
                      started_at=_now(), status="running"))
        return run_id

    def finish_run(self, run_id: str, status: str, summary: dict | None = None) -> None:
        _check(status, RUN_STATUSES, "run status")
        self._update(Run, Run.id == run_id, f"run {run_id}", status=status, finished_at=_now(),
                     summary_json=None if summary is None
                     else json.dumps(summary, sort_keys=True, default=str))

    def set_mlflow_run(self, run_id: str, mlflow_run_id: str) -> None:
        self._update(Run, Run.id == run_id, f"run {run_id}", mlflow_run_id=mlflow_run_id)

    def get_run(self, run_id: str) -> dict | None:
        with self._session() as s:
            run = s.get(Run, run_id)
            return None if run is None else self._run_dict(run)

    def list_runs(self) -> list[dict]:
        """All runs, newest first, with their summary parsed."""
        with self._session() as s:
            runs = s.scalars(sa.select(Run).order_by(Run.started_at.desc(), Run.id)).all()
            return [self._run_dict(r) for r in runs]

    @staticmethod
    def _run_dict(run: Run) -> dict:
        out = _row(run, skip=("spec_json", "summary_json"))
        out["summary"] = json.loads(run.summary_json) if run.summary_json else None
        return out

    # ── slices ──
    def add_slices(self, run_id: str, descriptors: list[Any]) -> None:
        """Record planned slices (SliceDescriptor objects or their dicts) as pending.

        Idempotent per run: a slice id already recorded (a retried planning task) is kept."""
        with self._session.begin() as s:
            known = set(s.scalars(sa.select(Slice.slice_id).where(Slice.run_id == run_id)))
            for d in descriptors:
                data = d.model_dump(mode="json") if hasattr(d, "model_dump") else dict(d)
                if data["slice_id"] in known:
                    continue
                known.add(data["slice_id"])
                s.add(Slice(run_id=run_id, slice_id=data["slice_id"], row_count=data["row_count"],
                            descriptor_json=json.dumps(data, sort_keys=True), status="pending",
                            accepted=0, rejected=0))

    def update_slice(self, run_id: str, slice_id: str, **fields: Any) -> None:
        """Set any of: status, agent, accepted, rejected, stopped_reason, row_count."""
        allowed = {"status", "agent", "accepted", "rejected", "stopped_reason", "row_count"}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"update_slice: unknown field(s) {', '.join(unknown)}")
        if "status" in fields:
            _check(fields["status"], SLICE_STATUSES, "slice status")
        self._update(Slice, (Slice.run_id == run_id) & (Slice.slice_id == slice_id),
                     f"slice {slice_id!r} of run {run_id}", **fields)

    def get_slice(self, run_id: str, slice_id: str) -> dict | None:
        """One slice of a run (an indexed read), or None."""
        with self._reading() as conn:
            row = conn.execute(sa.select(Slice).where(Slice.run_id == run_id,
                                                      Slice.slice_id == slice_id)).first()
            return None if row is None else dict(row._mapping)

    def list_slices(self, run_id: str) -> list[dict]:
        with self._session() as s:
            rows = s.scalars(sa.select(Slice).where(Slice.run_id == run_id).order_by(Slice.id))
            return [_row(r) for r in rows]

    # ── slice members (flows.slicing.MemberStore) ──
    def add_members(self, plan_id: str, chunks: list[tuple[str, int, list[str]]]) -> None:
        """Record chunks (part, position of the first id, ids) of a plan, in one insert."""
        if chunks:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(SliceMember), [
                    {"plan_id": plan_id, "part": part, "first_pos": first, "n": len(ids),
                     "row_ids": json.dumps(ids)} for part, first, ids in chunks])

    def members(self, plan_id: str, part: str, lo: int, hi: int) -> list[str]:
        """The row ids at positions lo..hi-1 of a plan's part, in position order."""
        m = SliceMember
        with self._reading() as conn:
            rows = conn.execute(
                sa.select(m.first_pos, m.row_ids).where(
                    m.plan_id == plan_id, m.part == part, m.first_pos < hi,
                    m.first_pos + m.n > lo).order_by(m.first_pos)).all()
        out: list[str] = []
        for first, ids in rows:
            ids = json.loads(ids)
            out.extend(ids[max(lo - first, 0):hi - first])
        return out

    # ── examples ──
    def add_example(
        self,
        run_id: str,
        *,
        slice_id: str | None,
        row_id: str | int | None,
        prompt: str | None,
        completion: str | None,
        label: str | None,
        status: str = "accepted",
        reason: str | None = None,
        agent: str | None = None,
        model: str | None = None,
    ) -> int:
        """Record one submission; a rejected one needs the gate's reason, an accepted none."""
        return self.add_examples(run_id, [{
            "slice_id": slice_id, "row_id": row_id, "prompt": prompt, "completion": completion,
            "label": label, "status": status, "reason": reason, "agent": agent,
            "model": model}])[0]

    def add_examples(self, run_id: str, examples: list[dict]) -> list[int]:
        """Record several submissions (each with `add_example`'s keywords) in one transaction:
        an agent's whole submission is one write. Returns their ids."""
        rows = []
        for e in examples:
            status, reason = e.get("status", "accepted"), e.get("reason")
            _check(status, EXAMPLE_STATUSES, "example status")
            if status == "accepted" and reason is not None:
                raise ValueError("an accepted example has no rejection reason")
            if status == "rejected" and not reason:
                raise ValueError("a rejected example needs its reason")
            row_id, prompt, completion = e["row_id"], e["prompt"], e["completion"]
            rows.append(Example(
                run_id=run_id, slice_id=e["slice_id"],
                row_id=None if row_id is None else str(row_id), prompt=prompt,
                completion=completion, label=e["label"], status=status, reason=reason,
                agent=e.get("agent"), model=e.get("model"),
                content_hash=content_hash(prompt, completion), created_at=_now()))
        if not rows:
            return []
        with self._session.begin() as s:
            s.add_all(rows)
            s.flush()
            return [r.id for r in rows]

    def accepted_examples(self, run_id: str) -> list[dict]:
        """The run's accepted examples in the order they were written."""
        with self._session() as s:
            rows = s.scalars(
                sa.select(Example)
                .where(Example.run_id == run_id, Example.status == "accepted")
                .order_by(Example.id)
            )
            return [_row(r, skip=("reason",)) for r in rows]

    def row_outcomes(self, run_id: str, reasons: tuple[str, ...] = ()) -> list[tuple]:
        """(slice_id, row_id, status) of every accepted example, and of every rejection for
        one of `reasons` (as status `reason`): what coverage is measured from. One query."""
        with self._session() as s:
            cond = Example.status == "accepted"
            if reasons:
                cond = cond | ((Example.status == "rejected") & Example.reason.in_(reasons))
            rows = s.execute(sa.select(
                Example.slice_id, Example.row_id,
                sa.case((Example.status == "accepted", "accepted"), else_=Example.reason),
            ).where(Example.run_id == run_id, cond)).all()
            return [tuple(r) for r in rows]

    def rejection_counts(self, run_id: str) -> dict[str, int]:
        """reason -> how many submissions the gates rejected for it, most frequent first."""
        with self._session() as s:
            rows = s.execute(
                sa.select(Example.reason, sa.func.count())
                .where(Example.run_id == run_id, Example.status == "rejected")
                .group_by(Example.reason)
                .order_by(sa.func.count().desc(), Example.reason)
            ).all()
            return {reason: n for reason, n in rows}

    # ── LLM calls ──
    def record_call(
        self,
        run_id: str | None,
        *,
        api: str,
        model: str,
        request_hash: str,
        role: str | None = None,
        slice_id: str | None = None,
        agent: str | None = None,
        cached: bool = False,
        attempt: int = 1,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: float = 0.0,
        latency_ms: float = 0.0,
        status: str = "ok",
        error: str | None = None,
        reply: dict | None = None,
    ) -> int:
        """Record one gateway record (see docs/agent-runtime.md): an attempt or a cache hit.
        With `reply` ({"api", "model", "response"}: what `cache_put` takes for this request
        hash), the call cache entry is written in the same transaction."""
        _check(status, CALL_STATUSES, "call status")
        values = {"run_id": run_id, "slice_id": slice_id, "agent": agent, "role": role,
                  "provider": api, "model": model, "request_hash": request_hash,
                  "cached": bool(cached), "attempt": int(attempt),
                  "input_tokens": int(input_tokens), "output_tokens": int(output_tokens),
                  "cache_read_tokens": int(cache_read_tokens),
                  "cache_write_tokens": int(cache_write_tokens), "cost_usd": float(cost_usd),
                  "latency_ms": float(latency_ms), "status": status, "error": error,
                  "created_at": _now()}
        with self.engine.begin() as conn:  # one transaction: this runs once per LLM call
            if reply is not None:
                self._cache_insert(conn, request_hash, **reply)
            return conn.execute(sa.insert(LLMCall).values(**values)).inserted_primary_key[0]

    # ── the call cache (implements agents.gateway.CallCache) ──
    def cache_get(self, key: str) -> dict | None:
        with self._reading() as conn:
            hit = conn.execute(sa.select(CachedCall.response_json).where(
                CachedCall.request_hash == key)).scalar()
            return None if hit is None else json.loads(hit)

    def cache_put(self, key: str, *, api: str, model: str, response: dict) -> None:
        """Keep a reply; the first one kept for a key stays (one INSERT, no read first)."""
        try:
            with self.engine.begin() as conn:
                self._cache_insert(conn, key, api=api, model=model, response=response)
        except sa.exc.IntegrityError:  # another database, a key put twice: the first stays
            pass

    def _cache_insert(self, conn: sa.Connection, key: str, *, api: str, model: str,
                      response: dict) -> None:
        values = {"request_hash": key, "api": api, "model": model, "created_at": _now(),
                  "response_json": json.dumps(response, sort_keys=True)}
        insert = {"sqlite": sqlite_insert, "postgresql": pg_insert}.get(self.engine.dialect.name)
        if insert is None:
            conn.execute(sa.insert(CachedCall).values(**values))
        else:
            conn.execute(insert(CachedCall).values(**values).on_conflict_do_nothing(
                index_elements=["request_hash"]))

    def call_cache(self, with_records: bool = False) -> StoreCallCache:
        return StoreCallCache(self, with_records)

    def call_totals(self, run_id: str) -> dict:
        """Over the run's records: calls (provider attempts), errors, cache_hits, tokens, cost,
        and the same per role."""
        total = sa.func.coalesce
        with self._session() as s:
            rows = s.execute(
                sa.select(
                    LLMCall.role,
                    sa.func.sum(sa.case((LLMCall.cached.is_(False), 1), else_=0)),
                    sa.func.sum(sa.case((LLMCall.status == "error", 1), else_=0)),
                    sa.func.sum(sa.case((LLMCall.cached.is_(True), 1), else_=0)),
                    total(sa.func.sum(LLMCall.input_tokens), 0),
                    total(sa.func.sum(LLMCall.output_tokens), 0),
                    total(sa.func.sum(LLMCall.cost_usd), 0.0),
                ).where(LLMCall.run_id == run_id).group_by(LLMCall.role)
            ).all()
        keys = ("calls", "errors", "cache_hits", "input_tokens", "output_tokens", "cost_usd")
        by_role = {role or "unknown": dict(zip(keys, (int(v or 0) for v in vals[:-1]),
                                               strict=False)) | {"cost_usd": float(vals[-1])}
                   for role, *vals in rows}
        out = {k: sum(r[k] for r in by_role.values()) for k in keys}
        out["cost_usd"] = round(out["cost_usd"], 6)
        return {**out, "by_role": by_role}

    # ── resume ──
    def reopen_run(self, run_id: str) -> None:
        self._update(Run, Run.id == run_id, f"run {run_id}", status="running", finished_at=None)

    def clear_slice_examples(self, run_id: str, slice_id: str) -> int:
        """Forget a slice's examples before its agent runs again (its replay re-records them)."""
        with self._session.begin() as s:
            return s.execute(sa.delete(Example).where(
                Example.run_id == run_id, Example.slice_id == slice_id)).rowcount

    def revoke_example(self, run_id: str, slice_id: str, row_id: str, reason: str) -> int:
        """Turn an accepted example into a rejected one (a judge's re-review disagreed)."""
        with self._session.begin() as s:
            return s.execute(sa.update(Example).where(
                Example.run_id == run_id, Example.slice_id == slice_id,
                Example.row_id == str(row_id), Example.status == "accepted",
            ).values(status="rejected", reason=reason)).rowcount

    # ── helpers ──
    def _update(self, model: type[Base], where: Any, what: str, **values: Any) -> None:
        with self._session.begin() as s:
            n = s.execute(sa.update(model).where(where).values(**values)).rowcount
        if n == 0:
            raise LookupError(f"no {what} in the store")


@functools.cache
def shared_store(url: str) -> Store:
    """One store (one connection pool) per URL per process, shared by the agent threads."""
    return Store(url)
