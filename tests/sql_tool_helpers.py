"""Shared by tests/test_sql_tool*.py: the slice's readable columns, and for the checks on both
backends a `Backend` (a private copy of the warehouse with its checksum), the europe slice as
flows/slicing.py gives it to an agent's SQL tool, and the checksums that prove a warehouse
unchanged."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from agents.sql_tool import ScopedTable, SQLTool
from flows.slicing import MembersRef, MemoryMembers, SliceDescriptor, slice_source
from flows.warehouse import stable_hash

COLUMNS = ["id", "title", "body", "published_at", "region", "word_count"]
LEFTOVERS = "posttrain_hostile*"  # files the corpus tries to create under /tmp


# ── both backends: private copies of the warehouse, checksummed ─────────────────────────
@dataclass
class Backend:
    name: str
    engine: sa.Engine
    role: str | None
    source: str  # the trusted slice SQL, written the way flows/slicing.py writes it
    params: dict
    checksum: object  # () -> str
    before: str = ""

    def tool(self, timeout_s: float = 1.0, row_limit: int = 500, **kw) -> SQLTool:
        scoped = ScopedTable("articles", COLUMNS, kw.pop("source", self.source),
                             kw.pop("params", self.params), "id")
        return SQLTool(self.engine, scoped, row_limit=row_limit, timeout_s=timeout_s,
                       pg_role=kw.pop("pg_role", self.role))

    def slice_rows(self) -> list[dict]:
        with self.engine.connect() as conn:
            sql = f"SELECT * FROM ({self.source}) AS s ORDER BY id"
            return [dict(r) for r in conn.execute(sa.text(sql), self.params).mappings()]


def _slice_source(engine: sa.Engine) -> tuple[str, dict]:
    """The europe slice (its non-held-out rows), exactly as flows/slicing.py gives it to an
    agent's SQL tool: its ids bound as one JSON array."""
    with engine.connect() as conn:
        ids = [i for i in conn.execute(sa.text(
            "SELECT id FROM articles WHERE region = 'europe' ORDER BY id")).scalars()
            if stable_hash(i) % 10000 >= 1000]
    members = MemoryMembers()
    members.add_members("p", [("europe", 0, [str(i) for i in ids])])
    d = SliceDescriptor(slice_id="region=europe", key={"region": "europe"}, table="articles",
                        id_column="id", columns=COLUMNS, row_count=len(ids),
                        members=MembersRef(url=members.url, plan_id="p", part="europe", lo=0,
                                           hi=len(ids)))
    return slice_source(engine, d)


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()


def _sqlite_checksum(path: Path) -> str:
    """sha256 of the file's bytes and of a full ordered dump of the schema and every table."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        dump = [schema]
        for _, name, _ in (s for s in schema if s[0] == "table"):
            dump.append(conn.execute(f'SELECT * FROM "{name}" ORDER BY rowid').fetchall())
    finally:
        conn.close()
    return _digest([hashlib.sha256(path.read_bytes()).hexdigest(), *dump])


def _pg_checksum(engine: sa.Engine, schema: str, role: str) -> str:
    """sha256 of the schema's columns, the role's privileges and every table's ordered rows."""
    with engine.connect() as conn:
        cols = conn.execute(sa.text(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = :s ORDER BY table_name, ordinal_position"), {"s": schema}).all()
        grants = conn.execute(sa.text(
            "SELECT grantee, table_name, column_name, privilege_type FROM "
            "information_schema.column_privileges WHERE table_schema = :s AND grantee = :r "
            "ORDER BY 1, 2, 3, 4"), {"s": schema, "r": role}).all()
        dump = [cols, grants]
        for (table,) in conn.execute(sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = :s ORDER BY 1"), {"s": schema}):
            dump.append(conn.exec_driver_sql(f'SELECT * FROM "{schema}"."{table}" ORDER BY 1').all())
    return _digest(dump)


def _no_leftovers() -> list[str]:
    return sorted(str(p) for p in Path("/tmp").glob(LEFTOVERS))
