"""The example store's tables, as SQLAlchemy declarative classes, and the status values and
row helpers `flows.store.Store` uses with them.

`runs` (one pipeline run), `slices` (one agent's share and how it ended), `examples` (every
submission: accepted, or rejected with the gate's reason), `llm_calls` (tokens, latency and
errors of every provider call), `slice_members` (which row ids each planned slice holds,
written once at planning: see flows/slicing.py) and `call_cache` (completed LLM replies, by
request hash).
"""

from __future__ import annotations

import datetime as dt
import hashlib

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_STATUSES = ("running", "completed", "failed", "skipped", "preview")
SLICE_STATUSES = ("pending", "running", "done", "failed", "interrupted")  # interrupted: an outage
EXAMPLE_STATUSES = ("accepted", "rejected")
CALL_STATUSES = ("ok", "error")

# BIGINT ids on servers; SQLite only auto-increments a column declared INTEGER.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def content_hash(prompt: str | None, completion: str | None) -> str:
    """sha256 of prompt + NUL + completion: equal examples have equal hashes."""
    return hashlib.sha256(f"{prompt or ''}\x00{completion or ''}".encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    spec_hash: Mapped[str] = mapped_column(sa.String(64))
    spec_json: Mapped[str] = mapped_column(sa.Text)
    started_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    status: Mapped[str] = mapped_column(sa.String(16), default="running")
    mlflow_run_id: Mapped[str | None] = mapped_column(sa.String(64))
    summary_json: Mapped[str | None] = mapped_column(sa.Text)


class Slice(Base):
    __tablename__ = "slices"
    __table_args__ = (sa.UniqueConstraint("run_id", "slice_id", name="uq_slices_run_slice"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id"))
    slice_id: Mapped[str] = mapped_column(sa.String(300))
    descriptor_json: Mapped[str] = mapped_column(sa.Text)
    row_count: Mapped[int] = mapped_column(sa.Integer)
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    agent: Mapped[str | None] = mapped_column(sa.String(200))
    accepted: Mapped[int] = mapped_column(sa.Integer, default=0)
    rejected: Mapped[int] = mapped_column(sa.Integer, default=0)
    stopped_reason: Mapped[str | None] = mapped_column(sa.Text)


class Example(Base):
    __tablename__ = "examples"
    __table_args__ = (
        sa.Index("ix_examples_run_status", "run_id", "status"),
        sa.Index("ix_examples_run_hash", "run_id", "content_hash"),
        # a slice's examples (clearing, revoking) without reading the whole run's
        sa.Index("ix_examples_run_slice_row", "run_id", "slice_id", "row_id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id"))
    slice_id: Mapped[str | None] = mapped_column(sa.String(300))
    row_id: Mapped[str | None] = mapped_column(sa.String(200))
    prompt: Mapped[str | None] = mapped_column(sa.Text)
    completion: Mapped[str | None] = mapped_column(sa.Text)
    label: Mapped[str | None] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    agent: Mapped[str | None] = mapped_column(sa.String(200))
    model: Mapped[str | None] = mapped_column(sa.String(200))
    content_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=_now)


class LLMCall(Base):
    """One provider attempt or one cache hit (cached=True: no tokens spent, no cost)."""

    __tablename__ = "llm_calls"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str | None] = mapped_column(sa.ForeignKey("runs.id"))
    slice_id: Mapped[str | None] = mapped_column(sa.String(300))
    agent: Mapped[str | None] = mapped_column(sa.String(200))
    role: Mapped[str | None] = mapped_column(sa.String(32))
    provider: Mapped[str] = mapped_column(sa.String(64))  # the wire format: openai | anthropic
    model: Mapped[str] = mapped_column(sa.String(200))
    request_hash: Mapped[str] = mapped_column(sa.String(128), index=True)
    cached: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    attempt: Mapped[int] = mapped_column(sa.Integer, default=1)
    input_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(sa.Float, default=0.0)
    latency_ms: Mapped[float] = mapped_column(sa.Float, default=0.0)
    status: Mapped[str] = mapped_column(sa.String(16), default="ok")
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=_now)


class SliceMember(Base):
    """Rows `first_pos`..`first_pos + n - 1` of part `part` of plan `plan_id`: their ids (as
    `agents.gates.row_key` text), a JSON array. A slice is a position range of one part, so
    its ids are one indexed read of a few chunks, and a million ids are a thousand inserts."""

    __tablename__ = "slice_members"
    plan_id: Mapped[str] = mapped_column(sa.String(80), primary_key=True)
    part: Mapped[str] = mapped_column(sa.String(300), primary_key=True)
    first_pos: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    n: Mapped[int] = mapped_column(sa.Integer)
    row_ids: Mapped[str] = mapped_column(sa.Text)


class CachedCall(Base):
    """The call cache: a completed LLM reply, keyed by the content of its request."""

    __tablename__ = "call_cache"
    request_hash: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    api: Mapped[str] = mapped_column(sa.String(64))
    model: Mapped[str] = mapped_column(sa.String(200))
    response_json: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=_now)


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _iso(v: dt.datetime | None) -> str | None:
    return None if v is None else v.isoformat()


def _row(obj: Base, skip: tuple[str, ...] = ()) -> dict:
    out = {}
    for col in obj.__table__.columns:
        if col.key in skip:
            continue
        v = getattr(obj, col.key)
        out[col.key] = _iso(v) if isinstance(v, dt.datetime) else v
    return out
